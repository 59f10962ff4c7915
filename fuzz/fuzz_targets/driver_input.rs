//! What drivers, operators and the environment hand the drivers code:
//! token values of each kind, departure times, payment kinds, channels,
//! statuses, preferences, the master-key spec, and sealed personal fields
//! as read back from the store (arbitrary bytes, and a real blob with
//! bytes flipped). Every one must give a value or an error, never a panic;
//! a tampered sealed field must never open.
#![no_main]
use std::sync::{Arc, OnceLock};

use laddnet_drivers::{AccountStatus, Channel, PaymentKind, Preferences, TokenKind, TokenStatus, parse_hhmm};
use laddnet_store::{RedbStore, SharedStore, StoreExt};
use laddnet_vault::{FieldRef, LocalMasterKeys, Vault};
use libfuzzer_sys::fuzz_target;

const AT: FieldRef<'static> = FieldRef {
    table: "driver",
    field: "name",
    record_id: "drv-1",
};

fn vault() -> &'static (SharedStore, Vault, Vec<u8>) {
    static V: OnceLock<(SharedStore, Vault, Vec<u8>)> = OnceLock::new();
    V.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("laddnet-fuzz-vault-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store: SharedStore = Arc::new(RedbStore::open_volatile(&path).unwrap());
        let keys = LocalMasterKeys::from_keys([(1, [7u8; 32])]).unwrap();
        let vault = Vault::load(store.as_ref(), Arc::new(keys)).unwrap();
        let blob = store
            .transact(|tx| {
                vault.create_subject(tx, "drv-1")?;
                vault.seal_field(tx, "drv-1", AT, b"Ada Lovelace")
            })
            .unwrap();
        (store, vault, blob)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match op % 6 {
        0 => {
            for k in [TokenKind::Rfid, TokenKind::App, TokenKind::Contract] {
                if let Ok(v) = k.normalize(&text) {
                    // Normal forms are stable.
                    assert_eq!(k.normalize(&v).ok().as_deref(), Some(v.as_str()));
                }
            }
        }
        1 => {
            if let Some(m) = parse_hhmm(&text) {
                assert!(m < 24 * 60);
            }
            let p = Preferences {
                departure: Some(text.to_string()),
                max_price_per_kwh: text.parse().ok(),
                target_soc_percent: rest.first().map(|b| u32::from(*b)),
                ..Default::default()
            };
            let _ = p.validate();
        }
        2 => {
            let _ = PaymentKind::parse(&text);
            let _ = Channel::parse(&text);
            let _ = AccountStatus::parse(&text);
            let _ = TokenStatus::parse(&text);
        }
        3 => {
            let _ = LocalMasterKeys::parse_spec(&text);
        }
        4 | 5 => {
            let (store, vault, good) = vault();
            let blob = if op % 6 == 4 {
                rest.to_vec()
            } else {
                // The real blob with the input xor-ed over it.
                let mut b = good.clone();
                for (i, x) in rest.iter().enumerate() {
                    let n = b.len();
                    b[i % n] ^= x;
                }
                b
            };
            let opened = store.snapshot(|tx| Ok::<_, laddnet_vault::VaultError>(vault.open_field(tx, "drv-1", AT, &blob)));
            if let Ok(Ok(clear)) = opened {
                assert!(blob == *good && clear.as_slice() == b"Ada Lovelace", "a tampered field opened");
            }
        }
        _ => unreachable!(),
    }
});
