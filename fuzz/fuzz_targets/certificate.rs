//! Peer-certificate inspection, as the node runs it after every handshake.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = laddnet_pki::summarize_certificate(data);
});
