//! RELIABILITY.md 27: a session of 100,000 samples never exceeds the
//! store's transaction limits, because each event is its own small
//! transaction and the session record does not grow with the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use laddnet_actors::repo;
use laddnet_core::charging::{MeterSample, SessionStatus, TxEvent, TxEventKind};
use laddnet_store::{KeyValue, RedbStore, Store, StoreError, Transaction, keys};

/// Forwards to a real store and records the largest transaction and value.
struct Probe {
    inner: RedbStore,
    max_tx_bytes: AtomicUsize,
    max_value: AtomicUsize,
}

struct ProbeTx<'a> {
    inner: &'a mut dyn Transaction,
    bytes: usize,
    max_value: usize,
}

impl Transaction for ProbeTx<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.bytes += key.len() + value.len();
        self.max_value = self.max_value.max(value.len());
        self.inner.set(key, value)
    }
    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.bytes += key.len();
        self.inner.clear(key)
    }
    fn get_range(&mut self, b: &[u8], e: &[u8], limit: usize, reverse: bool) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.get_range(b, e, limit, reverse)
    }
    fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), StoreError> {
        self.bytes += key.len() + 8;
        self.inner.atomic_add(key, delta)
    }
}

impl Store for Probe {
    fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.inner.run(&mut |tx| {
            let mut p = ProbeTx {
                inner: tx,
                bytes: 0,
                max_value: 0,
            };
            let r = f(&mut p);
            self.max_tx_bytes.fetch_max(p.bytes, Ordering::Relaxed);
            self.max_value.fetch_max(p.max_value, Ordering::Relaxed);
            r
        })
    }
    fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.inner.read(f)
    }

    fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: std::time::Duration) -> Result<bool, StoreError> {
        self.inner.watch(key, seen, timeout)
    }
    fn backend(&self) -> &'static str {
        "probe"
    }
}

#[test]
fn a_100k_sample_session_stays_within_the_limits() {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe {
        inner: RedbStore::open_volatile(dir.path().join("s.redb")).unwrap(),
        max_tx_bytes: AtomicUsize::new(0),
        max_value: AtomicUsize::new(0),
    });
    for seq in 0..N {
        let kind = match seq {
            0 => TxEventKind::Started,
            s if s == N - 1 => TxEventKind::Ended,
            _ => TxEventKind::Updated,
        };
        let e = TxEvent {
            transaction_id: "tx-long".into(),
            seq,
            kind,
            connector_id: 1,
            at_ms: 1_700_000_000_000 + seq as i64 * 10_000,
            meter: MeterSample {
                energy_wh: 1_000 + seq * 20,
                power_w: 7_200,
                ..Default::default()
            },
            offline: false,
            stop_reason: String::new(),
            driver_id: None,
            token_ref: None,
        };
        repo::apply_event(probe.as_ref(), "CP-1", None, 22_000, &e).unwrap();
    }
    let r = repo::get_session(probe.as_ref(), "tx-long").unwrap().unwrap();
    assert_eq!(
        (r.samples, r.status, r.energy_wh()),
        (N, SessionStatus::Ended, (N - 1) * 20)
    );
    assert!(r.flags.is_empty(), "{:?}", r.flags);
    let max_tx = probe.max_tx_bytes.load(Ordering::Relaxed);
    let max_value = probe.max_value.load(Ordering::Relaxed);
    assert!(max_tx < 4_096, "largest transaction wrote {max_tx} bytes");
    assert!(max_value < 2_048, "largest value is {max_value} bytes");
    assert!(max_tx < laddnet_store::MAX_TRANSACTION_BYTES && max_value < laddnet_store::MAX_VALUE_BYTES);
    // Every sample is there, in order, for whoever bills it.
    let (b, e) = keys::tuple_range(&("session-event", "tx-long"));
    let count = probe.snapshot_count(&b, &e);
    assert_eq!(count, N as usize);
}

trait Count {
    fn snapshot_count(&self, b: &[u8], e: &[u8]) -> usize;
}

impl Count for Probe {
    fn snapshot_count(&self, b: &[u8], e: &[u8]) -> usize {
        use laddnet_store::StoreExt;
        self.snapshot(|tx| tx.get_range(b, e, 0, false).map(|v| v.len()))
            .unwrap()
    }
}
