//! TLS session tickets as a client presents them: any bytes, opened by a
//! node holding two keys (the sealing key and the previous one). Nothing
//! but a ticket sealed by one of them may open; nothing may panic.
#![no_main]
use std::sync::OnceLock;

use laddnet_pki::tickets::TicketKeys;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static TicketKeys {
    static KEYS: OnceLock<std::sync::Arc<TicketKeys>> = OnceLock::new();
    KEYS.get_or_init(|| TicketKeys::from_secrets(&[(7, 2, [7u8; 32]), (9, 1, [9u8; 32])]))
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    assert!(k.unseal(data).is_none() || data.len() >= 32);
    // A ticket sealed from the input opens to it, and an altered one does not.
    if let Some(t) = k.seal(data) {
        assert_eq!(k.unseal(&t).as_deref(), Some(data));
        let mut bad = t.clone();
        let i = data.first().map_or(0, |b| *b as usize) % bad.len();
        bad[i] ^= 0x80;
        assert!(k.unseal(&bad).is_none());
    }
});
