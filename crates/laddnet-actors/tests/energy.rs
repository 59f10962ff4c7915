//! The store's energy counter and the open-session view: what a metrics
//! scrape reads instead of every session the store has ever held.

mod common;

use common::{event, open_store, session};
use laddnet_actors::repo;
use laddnet_core::charging::{SessionStatus, TxEventKind};
use laddnet_store::{RedbStore, StoreExt, keys};

fn total_over_sessions(store: &RedbStore) -> u64 {
    repo::all_sessions(store).unwrap().iter().map(|s| s.energy_wh()).sum()
}

#[test]
fn the_counter_survives_retention() {
    let (_dir, store) = open_store("s.redb");
    let old = 1_700_000_000_000;
    session(&store, "CP-1", None, "tx-old", old, false);
    session(&store, "CP-2", None, "tx-new", old + 800 * 86_400_000, false);
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), 6_000);
    let defaults = laddnet_ledger::cdr::BillingDefaults { currency: "EUR".into() };
    laddnet_ledger::cdr::bill_session(&store, "tx-old", &defaults).unwrap();
    assert_eq!(repo::purge_ended_before(&store, old + 730 * 86_400_000).unwrap(), 1);
    // The sessions held now have 3,000 Wh; the energy delivered is still
    // 6,000 Wh (a counter does not go back when history is purged).
    assert_eq!(total_over_sessions(&store), 3_000);
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), 6_000);
}

#[test]
fn a_store_from_before_the_counter_is_counted_once() {
    let (_dir, store) = open_store("s.redb");
    session(&store, "CP-1", None, "tx-1", 1_700_000_000_000, false);
    session(&store, "CP-2", None, "tx-2", 1_700_000_000_000, true);
    // As a store written before the counter existed.
    store
        .transact(|tx| tx.clear(&keys::pack(&("metric", "energy-wh"))))
        .unwrap();
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), 0);

    assert_eq!(repo::count_energy_once(&store).unwrap(), Some(2));
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), 6_000);
    // Once only: a second start leaves it alone, and events add to it.
    assert_eq!(repo::count_energy_once(&store).unwrap(), None);
    let e = event("tx-2", 3, TxEventKind::Updated, 1_700_000_000_000 + 1_800_000, 5_500);
    repo::apply_event(&store, "CP-2", None, 22_000, &e).unwrap();
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), 7_500);
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), total_over_sessions(&store));

    // A new store starts at zero.
    let (_fresh_dir, fresh) = open_store("fresh.redb");
    assert_eq!(repo::count_energy_once(&fresh).unwrap(), Some(0));
    assert_eq!(repo::energy_delivered_wh(&fresh).unwrap(), 0);
}

#[test]
fn sessions_without_energy_yet_still_start_the_counter() {
    // Only first readings: no energy, but the store has the counter, so a
    // node start does not read every session to count it.
    let (_dir, store) = open_store("s.redb");
    for i in 0..3 {
        let e = event(&format!("tx-{i}"), 0, TxEventKind::Started, 1_700_000_000_000, 1_000);
        repo::apply_event(&store, "CP-1", None, 22_000, &e).unwrap();
    }
    assert_eq!(repo::count_energy_once(&store).unwrap(), None);
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), 0);
}

#[test]
fn the_open_view_holds_the_sessions_not_ended() {
    let (_dir, store) = open_store("s.redb");
    session(&store, "CP-1", None, "tx-ended", 1_700_000_000_000, false);
    session(&store, "CP-1", None, "tx-live", 1_700_000_000_000, true);
    session(&store, "CP-2", None, "tx-dropped", 1_700_000_000_000, true);
    repo::interrupt_sessions(&store, "CP-2", 1_700_000_100).unwrap();

    let mut open: Vec<(String, SessionStatus)> = repo::open_session_records(&store)
        .unwrap()
        .into_iter()
        .map(|r| (r.transaction_id, r.status))
        .collect();
    open.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        open,
        [
            ("tx-dropped".to_string(), SessionStatus::Interrupted),
            ("tx-live".to_string(), SessionStatus::Active),
        ]
    );
}
