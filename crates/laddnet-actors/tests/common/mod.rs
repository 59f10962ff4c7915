//! Charger events and stores for the store-level tests.
// Each test binary uses some of these.
#![allow(dead_code)]

use laddnet_actors::repo;
use laddnet_core::charging::{MeterSample, TxEvent, TxEventKind};
use laddnet_store::RedbStore;

/// An empty store on disk (the directory lives as long as the guard).
pub fn open_store(name: &str) -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join(name)).unwrap();
    (dir, store)
}

/// A session of `charger` (at `site`) from 1,000 Wh, 1,500 Wh per
/// reading, three readings 10 minutes apart from `start_ms`; ended unless
/// `open`.
pub fn session(store: &RedbStore, charger: &str, site: Option<&str>, tx: &str, start_ms: i64, open: bool) {
    for seq in 0..3u64 {
        let kind = match seq {
            0 => TxEventKind::Started,
            2 if !open => TxEventKind::Ended,
            _ => TxEventKind::Updated,
        };
        let e = event(tx, seq, kind, start_ms + seq as i64 * 600_000, 1_000 + seq * 1_500);
        repo::apply_event(store, charger, site, 22_000, &e).unwrap();
    }
}

/// Event `seq` of transaction `tx` at `at_ms`, the meter at `energy_wh`
/// (11 kW, 16 A, 230 V).
pub fn event(tx: &str, seq: u64, kind: TxEventKind, at_ms: i64, energy_wh: u64) -> TxEvent {
    TxEvent {
        transaction_id: tx.into(),
        seq,
        kind,
        connector_id: 1,
        at_ms,
        meter: MeterSample {
            energy_wh,
            power_w: 11_000,
            current_ma: 16_000,
            voltage_mv: 230_000,
            soc_percent: None,
        },
        offline: false,
        stop_reason: String::new(),
        driver_id: None,
        token_ref: None,
    }
}
