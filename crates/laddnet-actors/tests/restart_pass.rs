//! The pass a node runs after a start: sessions a crash left active are
//! interrupted, in a few large transactions, except those whose charger
//! is already back.

mod common;

use laddnet_actors::repo;
use laddnet_core::charging::{SessionStatus, TxEvent, TxEventKind};
use laddnet_store::RedbStore;

fn started(tx: &str) -> TxEvent {
    common::event(tx, 0, TxEventKind::Started, 1_700_000_000_000, 100)
}

#[test]
fn sessions_left_active_are_interrupted_except_where_the_charger_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    // More chargers than one batch holds, so several batches run.
    let n = 4_500;
    for i in 0..n {
        repo::apply_event(&store, &format!("CP-{i}"), None, 22_000, &started(&format!("tx-{i}"))).unwrap();
    }
    let back = |c: &str| c == "CP-7" || c == "CP-4499";
    let flushes = store.flushes();
    let done = repo::interrupt_all_active(&store, 1_700_000_100, &back).unwrap();
    assert_eq!(done, n - 2);
    assert!(
        store.flushes() - flushes <= 3,
        "one transaction per batch of chargers, not one per charger"
    );
    for i in 0..n {
        let s = repo::get_session(&store, &format!("tx-{i}")).unwrap().unwrap();
        let expected = if back(&format!("CP-{i}")) {
            SessionStatus::Active
        } else {
            SessionStatus::Interrupted
        };
        assert_eq!(s.status, expected, "tx-{i}");
    }
    // A second pass finds nothing left to do.
    assert_eq!(repo::interrupt_all_active(&store, 1_700_000_200, &back).unwrap(), 0);
}
