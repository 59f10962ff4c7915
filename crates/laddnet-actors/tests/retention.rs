//! Retention deletes ended sessions past the cutoff, but never one that is
//! not billed yet: that would lose its revenue.

mod common;

use common::session;
use laddnet_actors::repo;
use laddnet_store::{RedbStore, StoreExt};

#[test]
fn retention_keeps_sessions_not_billed_yet() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    let old = 1_700_000_000_000;
    let recent = old + 800 * 86_400_000;
    session(&store, "CP-1", None, "tx-billed", old, false);
    session(&store, "CP-2", None, "tx-unbilled", old, false);
    session(&store, "CP-3", None, "tx-recent", recent, false);
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

#[test]
fn a_record_that_does_not_decode_does_not_stop_retention() {
    let (_dir, store) = common::open_store("s.redb");
    let old = 1_700_000_000_000;
    // Sorted before and after the planted record.
    session(&store, "CP-1", None, "tx-a", old, false);
    session(&store, "CP-2", None, "tx-z", old, false);
    store
        .transact(|tx| tx.set(&laddnet_store::keys::pack(&("session", "tx-m")), b"{not json"))
        .unwrap();
    let defaults = laddnet_ledger::cdr::BillingDefaults { currency: "EUR".into() };
    for tx in ["tx-a", "tx-z"] {
        laddnet_ledger::cdr::bill_session(&store, tx, &defaults).unwrap();
    }
    assert_eq!(repo::purge_ended_before(&store, old + 730 * 86_400_000).unwrap(), 2);
    assert!(repo::get_session(&store, "tx-a").unwrap().is_none());
    assert!(repo::get_session(&store, "tx-z").unwrap().is_none());
}
