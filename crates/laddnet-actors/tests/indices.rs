//! The session indices by charger and by site: listings of a charger's or
//! a site's sessions, and of the sessions not ended, read those sessions
//! only, not the whole history.
//!
//! A corrupted record of another charger's session is planted in each
//! store: a listing that scanned every session would stop on it.

mod common;

use common::{open_store, session};
use laddnet_actors::repo;
use laddnet_core::charging::SessionStatus;
use laddnet_store::{RedbStore, StoreExt, keys};

const T0: i64 = 1_700_000_000_000;

/// CP-A at site-1: two ended sessions and one live; CP-B at site-2: one
/// ended, one live; and a record that does not decode, of a charger no
/// listing here asks for.
fn fleet() -> (tempfile::TempDir, RedbStore) {
    let (dir, store) = open_store("s.redb");
    session(&store, "CP-A", Some("site-1"), "tx-a1", T0, false);
    session(&store, "CP-A", Some("site-1"), "tx-a2", T0 + 86_400_000, false);
    session(&store, "CP-A", Some("site-1"), "tx-a3", T0 + 2 * 86_400_000, true);
    session(&store, "CP-B", Some("site-2"), "tx-b1", T0, false);
    session(&store, "CP-B", Some("site-2"), "tx-b2", T0, true);
    store
        .transact(|tx| tx.set(&keys::pack(&("session", "tx-broken")), b"{not json"))
        .unwrap();
    (dir, store)
}

/// The fleet's sessions are listed by charger and by site.
fn assert_fleet_indexed(store: &RedbStore) {
    for (charger, site, expected) in [
        ("CP-A", "site-1", vec!["tx-a1", "tx-a2", "tx-a3"]),
        ("CP-B", "site-2", vec!["tx-b1", "tx-b2"]),
    ] {
        assert_eq!(ids(&repo::sessions_of_charger(store, charger).unwrap()), expected);
        assert_eq!(ids(&repo::sessions_at_site(store, site).unwrap()), expected);
    }
}

fn ids(records: &[laddnet_core::charging::SessionRecord]) -> Vec<&str> {
    records.iter().map(|r| r.transaction_id.as_str()).collect()
}

#[test]
fn a_chargers_listing_reads_its_sessions_only_and_pages() {
    let (_dir, store) = fleet();
    let (all, more) = repo::list_sessions(&store, None, Some("CP-A"), None, 100).unwrap();
    assert_eq!((ids(&all), more), (vec!["tx-a1", "tx-a2", "tx-a3"], false));

    // Pages in transaction id order, as the full listing does.
    let (page, more) = repo::list_sessions(&store, None, Some("CP-A"), None, 2).unwrap();
    assert_eq!((ids(&page), more), (vec!["tx-a1", "tx-a2"], true));
    let (page, more) = repo::list_sessions(&store, None, Some("CP-A"), Some("tx-a2"), 2).unwrap();
    assert_eq!((ids(&page), more), (vec!["tx-a3"], false));

    // With a status.
    let (ended, _) = repo::list_sessions(&store, Some(SessionStatus::Ended), Some("CP-B"), None, 100).unwrap();
    assert_eq!(ids(&ended), vec!["tx-b1"]);
    assert_eq!(
        ids(&repo::sessions_of_charger(&store, "CP-B").unwrap()),
        vec!["tx-b1", "tx-b2"]
    );
    assert!(repo::sessions_of_charger(&store, "CP-NONE").unwrap().is_empty());

    // The whole history is still listed by a full scan, which the planted
    // record stops: the listings above did not read it.
    assert!(repo::list_sessions(&store, None, None, None, 100).is_err());
}

#[test]
fn a_sites_sessions_come_from_its_index() {
    let (_dir, store) = fleet();
    assert_fleet_indexed(&store);
    assert!(repo::sessions_at_site(&store, "site-3").unwrap().is_empty());
}

#[test]
fn the_active_listing_pages_over_the_open_sessions() {
    let (_dir, store) = fleet();
    repo::interrupt_sessions(&store, "CP-B", T0 / 1000 + 100).unwrap();
    let (active, more) = repo::list_sessions(&store, Some(SessionStatus::Active), None, None, 100).unwrap();
    assert_eq!((ids(&active), more), (vec!["tx-a3"], false));
    let (dropped, _) = repo::list_sessions(&store, Some(SessionStatus::Interrupted), None, None, 100).unwrap();
    assert_eq!(ids(&dropped), vec!["tx-b2"]);

    session(&store, "CP-C", None, "tx-c1", T0, true);
    session(&store, "CP-C", None, "tx-c0", T0, true);
    let (page, more) = repo::list_sessions(&store, Some(SessionStatus::Active), None, None, 2).unwrap();
    assert_eq!((ids(&page), more), (vec!["tx-a3", "tx-c0"], true));
    let (page, more) = repo::list_sessions(&store, Some(SessionStatus::Active), None, Some("tx-c0"), 2).unwrap();
    assert_eq!((ids(&page), more), (vec!["tx-c1"], false));
}

#[test]
fn a_store_from_before_the_indices_is_indexed_once() {
    let (_dir, store) = fleet();
    forget_the_indices(&store);
    assert!(repo::sessions_of_charger(&store, "CP-A").unwrap().is_empty());

    let done = repo::index_sessions_once(&store).unwrap().expect("indexed");
    assert_eq!(
        (done.sessions, done.unreadable),
        (5, 1),
        "the planted record is counted, not indexed"
    );
    assert_fleet_indexed(&store);
    // Once: the next start reads the marker.
    assert_eq!(repo::index_sessions_once(&store).unwrap(), None);

    // A store whose sessions this version wrote needs no indexing.
    let (_d, fresh) = open_store("fresh.redb");
    session(&fresh, "CP-A", None, "tx-1", T0, true);
    assert_eq!(repo::index_sessions_once(&fresh).unwrap(), None);
}

/// Makes `store` as one written before the session indices existed: no
/// entries, no marker.
fn forget_the_indices(store: &RedbStore) {
    store
        .transact(|tx| {
            for index in ["session-by-charger", "session-by-site"] {
                let (b, e) = keys::tuple_range(&(index,));
                for (k, _) in tx.get_range(&b, &e, 0, false)? {
                    tx.clear(&k)?;
                }
            }
            tx.clear(&keys::pack(&("migrated", "session-index")))
        })
        .unwrap();
}

/// The index entries under `(index, owner)`, read raw.
fn entries(store: &RedbStore, index: &str, owner: &str) -> usize {
    let (b, e) = keys::tuple_range(&(index, owner));
    store.snapshot(|tx| tx.get_range(&b, &e, 0, false)).unwrap().len()
}

#[test]
fn retention_clears_the_purged_sessions_index_entries() {
    let (_dir, store) = fleet();
    let defaults = laddnet_ledger::cdr::BillingDefaults { currency: "EUR".into() };
    for tx in ["tx-a1", "tx-a2", "tx-b1"] {
        laddnet_ledger::cdr::bill_session(&store, tx, &defaults).unwrap();
    }
    // Ended before the second day: tx-a1 and tx-b1.
    assert_eq!(repo::purge_ended_before(&store, T0 + 86_400_000).unwrap(), 2);
    assert_eq!(entries(&store, "session-by-charger", "CP-A"), 2);
    assert_eq!(entries(&store, "session-by-charger", "CP-B"), 1);
    assert_eq!(entries(&store, "session-by-site", "site-1"), 2);
    assert_eq!(entries(&store, "session-by-site", "site-2"), 1);
    assert_eq!(ids(&repo::sessions_at_site(&store, "site-2").unwrap()), vec!["tx-b2"]);
}

#[test]
fn a_store_larger_than_a_batch_is_indexed_and_counted_whole() {
    use laddnet_core::charging::TxEventKind;
    let (_dir, store) = open_store("s.redb");
    // 2,345 sessions of 2 readings each (500 Wh), written in one run.
    let events: Vec<_> = (0..2_345)
        .flat_map(|i| {
            let tx = format!("tx-{i:05}");
            [
                common::event(&tx, 0, TxEventKind::Started, T0, 1_000),
                common::event(&tx, 1, TxEventKind::Updated, T0 + 60_000, 1_500),
            ]
        })
        .collect();
    store
        .transact(|tx| repo::apply_run_in(tx, "CP-A", Some("site-1"), 22_000, &events).map(|_| ()))
        .unwrap();
    // As a store from before the indices and the counter.
    forget_the_indices(&store);
    store
        .transact(|tx| tx.clear(&keys::pack(&("metric", "energy-wh"))))
        .unwrap();

    let done = repo::index_sessions_once(&store).unwrap().expect("indexed");
    assert_eq!((done.sessions, done.unreadable), (2_345, 0));
    assert_eq!(entries(&store, "session-by-charger", "CP-A"), 2_345);
    assert_eq!(entries(&store, "session-by-site", "site-1"), 2_345);
    assert_eq!(repo::count_energy_once(&store).unwrap(), Some(2_345));
    assert_eq!(repo::energy_delivered_wh(&store).unwrap(), 2_345 * 500);
}

#[test]
fn a_sites_open_sessions_come_from_its_open_index() {
    let (_dir, store) = fleet();
    // Written when a session is created, cleared when it ends.
    assert_eq!(
        ids(&repo::open_sessions_at_site(&store, "site-1").unwrap()),
        vec!["tx-a3"]
    );
    assert_eq!(
        ids(&repo::open_sessions_at_site(&store, "site-2").unwrap()),
        vec!["tx-b2"]
    );
    session(&store, "CP-A", Some("site-1"), "tx-a4", T0 + 3 * 86_400_000, true);
    assert_eq!(
        ids(&repo::open_sessions_at_site(&store, "site-1").unwrap()),
        vec!["tx-a3", "tx-a4"]
    );
    // An interrupted session stays open until it is closed for good.
    let now_s = T0 / 1000 + 4 * 86_400;
    assert_eq!(repo::interrupt_sessions(&store, "CP-A", now_s).unwrap().len(), 2);
    assert_eq!(repo::open_sessions_at_site(&store, "site-1").unwrap().len(), 2);
    assert_eq!(repo::close_interrupted(&store, 60, now_s + 61).unwrap().len(), 2);
    assert!(repo::open_sessions_at_site(&store, "site-1").unwrap().is_empty());
    // The other site is untouched, and a session without a site is in neither.
    session(&store, "CP-C", None, "tx-c1", T0, true);
    assert_eq!(
        ids(&repo::open_sessions_at_site(&store, "site-2").unwrap()),
        vec!["tx-b2"]
    );
    assert!(repo::open_sessions_at_site(&store, "site-3").unwrap().is_empty());
}
