//! The expiry index: what expires in a window is a range read, and a store
//! from before the index gets it once at open.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use laddnet_pki::{Ca, CaFiles, Policy, RevocationReason, Subject};
use laddnet_store::{SharedStore, StoreExt, keys};
use laddnet_vault::KeySource;

const DAY: i64 = 86_400;

fn charger(id: &str) -> Subject {
    Subject::Charger {
        id: laddnet_core::ChargerId::new(id).unwrap(),
        site: None,
    }
}

fn serials(v: &[laddnet_pki::CertRecord]) -> Vec<String> {
    let mut s: Vec<String> = v.iter().map(|c| c.serial.clone()).collect();
    s.sort();
    s
}

#[test]
fn certificates_expiring_in_a_window_come_from_the_expiry_index_and_old_stores_are_indexed_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("kek");
    laddnet_vault::create_key_file(&key).unwrap();
    let source = KeySource::KeyFile(key);
    let store: SharedStore = Arc::new(laddnet_store::RedbStore::open(dir.path().join("store.redb")).unwrap());
    let files = CaFiles::new(dir.path().join("ca"));
    let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
    let at = Arc::new(AtomicI64::new(t0));
    let clock: laddnet_pki::Clock = {
        let at = at.clone();
        Arc::new(move || at.load(Ordering::SeqCst))
    };
    laddnet_pki::init(&files, &Policy::default(), &source, &store, &clock).unwrap();
    let ca = Ca::open(&files, Policy::default(), &source, store.clone(), clock.clone()).unwrap();

    // Three chargers enrolled 0, 10 and 100 days apart, and one revoked.
    let mut issued = Vec::new();
    for (i, day) in [0, 10, 100].into_iter().enumerate() {
        at.store(t0 + day * DAY, Ordering::SeqCst);
        let (c, _) = ca.issue_with_new_key(&charger(&format!("CP-{i}")), "test").unwrap();
        issued.push(c.record);
    }
    let revoked = ca.issue_with_new_key(&charger("CP-REVOKED"), "test").unwrap().0.record;
    ca.revoke(&revoked.serial, RevocationReason::KeyCompromise, "test")
        .unwrap();
    let first = issued[0].not_after;
    assert!(issued[1].not_after >= first + 10 * DAY && issued[2].not_after >= first + 100 * DAY);

    let window = |from: i64, to: i64| serials(&ca.expiring_between(from, to).unwrap());
    assert_eq!(window(first, first + 30 * DAY), serials(&issued[..2]));
    assert_eq!(
        window(first + 1, first + 30 * DAY),
        serials(&issued[1..2]),
        "the window's start is inclusive"
    );
    assert_eq!(window(first - DAY, first), Vec::<String>::new(), "its end is not");
    assert_eq!(
        window(first, first + 1_000 * DAY),
        serials(&[&issued[..], std::slice::from_ref(&revoked)].concat()),
        "revoked ones are in the index; the caller decides by status"
    );

    // A store from before the index: its entries and its mark gone.
    let (b, e) = keys::tuple_range(&("pki", "by-expiry"));
    store
        .transact(|tx| {
            for (k, _) in tx.get_range(&b, &e, 0, false)? {
                tx.clear(&k)?;
            }
            tx.clear(&keys::pack(&("pki", "by-expiry-indexed")))
        })
        .unwrap();
    assert!(window(first, first + 30 * DAY).is_empty(), "nothing indexed");
    // Opening the CA indexes what is stored, once.
    let ca = Ca::open(&files, Policy::default(), &source, store.clone(), clock).unwrap();
    assert_eq!(window(first, first + 30 * DAY), serials(&issued[..2]));
    assert_eq!(ca.index_expiry_once().unwrap(), 0, "already indexed");
}
