//! Retention deletes ended sessions past the cutoff, but never one that is
//! not billed yet: that would lose its revenue.

mod common;

use common::event;
use laddnet_actors::repo;
use laddnet_core::charging::TxEventKind;
use laddnet_store::RedbStore;

fn session(store: &RedbStore, charger: &str, tx: &str, start_ms: i64) {
    for (seq, kind) in [
        (0, TxEventKind::Started),
        (1, TxEventKind::Updated),
        (2, TxEventKind::Ended),
    ] {
        let e = event(tx, seq, kind, start_ms + seq as i64 * 600_000, 1_000 + seq * 1_500);
        repo::apply_event(store, charger, None, 22_000, &e).unwrap();
    }
}

#[test]
fn retention_keeps_sessions_not_billed_yet() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    let old = 1_700_000_000_000;
    let recent = old + 800 * 86_400_000;
    session(&store, "CP-1", "tx-billed", old);
    session(&store, "CP-2", "tx-unbilled", old);
    session(&store, "CP-3", "tx-recent", recent);
    let defaults = laddnet_ledger::cdr::BillingDefaults { currency: "EUR".into() };
    laddnet_ledger::cdr::bill_session(&store, "tx-billed", &defaults).unwrap();

    let cutoff = old + 730 * 86_400_000;
    assert_eq!(repo::purge_ended_before(&store, cutoff).unwrap(), 1);
    assert!(repo::get_session(&store, "tx-billed").unwrap().is_none());
    assert!(!repo::event_stored(&store, "tx-billed", 0).unwrap());
    // Its CDR is what accounting keeps.
    assert!(laddnet_ledger::cdr::get_cdr(&store, "tx-billed").unwrap().is_some());
    // Ended two years ago, never billed (a crash, billing off): kept whole,
    // and still billable.
    assert!(repo::get_session(&store, "tx-unbilled").unwrap().is_some());
    assert!(repo::get_session(&store, "tx-recent").unwrap().is_some());
    let cdr = laddnet_ledger::cdr::bill_session(&store, "tx-unbilled", &defaults).unwrap();
    assert_eq!(cdr.energy_wh, 3_000);
    // Once billed, the next pass deletes it.
    assert_eq!(repo::purge_ended_before(&store, cutoff).unwrap(), 1);
    assert!(repo::get_session(&store, "tx-unbilled").unwrap().is_none());
    assert_eq!(repo::purge_ended_before(&store, cutoff).unwrap(), 0);
}
