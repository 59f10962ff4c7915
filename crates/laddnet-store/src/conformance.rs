//! One conformance suite for every backend. [`run_all`] exercises what the
//! rest of laddnet relies on: ordered range reads, read-your-writes,
//! aborts that leave nothing behind, serializable read-modify-write under
//! concurrency, atomic adds, idempotent retries, watches, and
//! FoundationDB's limits.
//!
//! Every key lives under `("conformance", <run id>)`, so the suite can run
//! against a shared cluster; it clears its keys when done. Failures panic
//! with a message naming the property.

use std::sync::Arc;

use crate::keys::{pack, tuple_range};
use crate::{MAX_KEY_BYTES, MAX_VALUE_BYTES, Store, StoreError, StoreExt};

/// Runs every check against `store`.
pub fn run_all(store: Arc<dyn Store>) {
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let ns = |parts: &str| pack(&("conformance", run.as_str(), parts));
    basics(store.as_ref(), &run);
    ranges(store.as_ref(), &run);
    aborts(store.as_ref(), &ns("abort"));
    atomic_adds(store.clone(), &ns("add"));
    read_modify_write(store.clone(), &ns("rmw"));
    idempotent_retry(store.as_ref(), &run);
    limits(store.as_ref(), &ns("limit"));
    watches(store.clone(), &ns("watch"));
    tuple_order();
    let (b, e) = tuple_range(&("conformance", run.as_str()));
    store
        .transact(|tx| {
            for (k, _) in tx.get_range(&b, &e, 0, false)? {
                tx.clear(&k)?;
            }
            Ok::<_, StoreError>(())
        })
        .expect("cleanup");
}

fn basics(s: &dyn Store, run: &str) {
    let k = pack(&("conformance", run, "basic"));
    assert_eq!(s.snapshot(|tx| tx.get(&k)).unwrap(), None, "absent key reads as None");
    s.transact(|tx| {
        tx.set(&k, b"v1")?;
        // Read-your-writes inside the transaction.
        assert_eq!(tx.get(&k)?.as_deref(), Some(&b"v1"[..]), "read-your-writes");
        tx.set(&k, b"v2")
    })
    .unwrap();
    assert_eq!(
        s.snapshot(|tx| tx.get(&k)).unwrap().as_deref(),
        Some(&b"v2"[..]),
        "last write wins"
    );
    s.transact(|tx| tx.clear(&k)).unwrap();
    assert_eq!(s.snapshot(|tx| tx.get(&k)).unwrap(), None, "clear removes");
    assert!(
        matches!(s.snapshot(|tx| tx.set(&k, b"x")), Err(StoreError::ReadOnly)),
        "snapshots refuse writes"
    );
}

fn ranges(s: &dyn Store, run: &str) {
    s.transact(|tx| {
        for i in [10i64, 2, 33, 4, 5] {
            tx.set(&pack(&("conformance", run, "range", i)), &i.to_le_bytes())?;
        }
        tx.set(&pack(&("conformance", run, "rangf", 0i64)), b"outside")
    })
    .unwrap();
    let (b, e) = tuple_range(&("conformance", run, "range"));
    let all = s.snapshot(|tx| tx.get_range(&b, &e, 0, false)).unwrap();
    let nums: Vec<i64> = all
        .iter()
        .map(|(_, v)| i64::from_le_bytes(v[..8].try_into().unwrap()))
        .collect();
    assert_eq!(nums, vec![2, 4, 5, 10, 33], "ascending tuple order, prefix-bounded");
    // Read-your-writes in ranges: a set and a clear inside the transaction
    // show in its own range reads, limits applied after them.
    s.transact(|tx| {
        tx.set(&pack(&("conformance", run, "range", 3i64)), &3i64.to_le_bytes())?;
        tx.clear(&pack(&("conformance", run, "range", 2i64)))?;
        let seen: Vec<i64> = tx
            .get_range(&b, &e, 2, false)?
            .iter()
            .map(|(_, v)| i64::from_le_bytes(v[..8].try_into().unwrap()))
            .collect();
        assert_eq!(seen, vec![3, 4], "a range read sees the transaction's own writes");
        Err::<(), _>(StoreError::Internal("abort: leave the range as it was".into()))
    })
    .unwrap_err();
    let rev = s.snapshot(|tx| tx.get_range(&b, &e, 2, true)).unwrap();
    let nums: Vec<i64> = rev
        .iter()
        .map(|(_, v)| i64::from_le_bytes(v[..8].try_into().unwrap()))
        .collect();
    assert_eq!(nums, vec![33, 10], "reverse with limit");
    let from = pack(&("conformance", run, "range", 5i64));
    let tail = s.snapshot(|tx| tx.get_range(&from, &e, 0, false)).unwrap();
    assert_eq!(tail.len(), 3, "begin is inclusive");
    assert!(
        s.snapshot(|tx| tx.get_range(&e, &b, 0, false)).unwrap().is_empty(),
        "inverted range is empty"
    );
}

fn aborts(s: &dyn Store, k: &[u8]) {
    let r: Result<(), StoreError> = s.transact(|tx| {
        tx.set(k, b"half")?;
        tx.atomic_add(k, 1)?;
        Err(StoreError::Internal("abort on purpose".into()))
    });
    assert!(r.is_err());
    assert_eq!(
        s.snapshot(|tx| tx.get(k)).unwrap(),
        None,
        "an aborted transaction leaves nothing"
    );
}

fn read_i64(s: &dyn Store, k: &[u8]) -> i64 {
    s.snapshot(|tx| tx.get(k))
        .unwrap()
        .map(|v| i64::from_le_bytes(v[..8].try_into().unwrap()))
        .unwrap_or(0)
}

fn atomic_adds(s: Arc<dyn Store>, k: &[u8]) {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (s, k) = (s.clone(), k.to_vec());
            std::thread::spawn(move || {
                for _ in 0..50 {
                    s.transact(|tx| tx.atomic_add(&k, 3)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    s.transact(|tx| tx.atomic_add(k, -100)).unwrap();
    assert_eq!(
        read_i64(s.as_ref(), k),
        4 * 50 * 3 - 100,
        "atomic adds from many threads sum exactly"
    );
}

fn read_modify_write(s: Arc<dyn Store>, k: &[u8]) {
    // Plain get + set increments: only serializable transactions (with
    // retries on conflict) keep every increment.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (s, k) = (s.clone(), k.to_vec());
            std::thread::spawn(move || {
                for _ in 0..50 {
                    s.transact(|tx| {
                        let n = tx
                            .get(&k)?
                            .map(|v| i64::from_le_bytes(v[..8].try_into().unwrap()))
                            .unwrap_or(0);
                        tx.set(&k, &(n + 1).to_le_bytes())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        read_i64(s.as_ref(), k),
        200,
        "no lost update under concurrent read-modify-write"
    );
}

fn idempotent_retry(s: &dyn Store, run: &str) {
    let balance = pack(&("conformance", run, "balance"));
    let once = pack(&("conformance", run, "once", "posting-1"));
    let post = |tx: &mut dyn crate::Transaction| -> Result<(), StoreError> {
        if tx.claim_once(&once)? {
            tx.atomic_add(&balance, 500)?;
        }
        Ok(())
    };
    // The same posting committed again, as a retry after
    // commit_unknown_result does: applied once.
    s.transact(post).unwrap();
    s.transact(post).unwrap();
    assert_eq!(
        read_i64(s, &balance),
        500,
        "an idempotency key makes a retried commit apply once"
    );
}

fn limits(s: &dyn Store, k: &[u8]) {
    let big = vec![0u8; MAX_VALUE_BYTES + 1];
    assert!(
        matches!(s.transact(|tx| tx.set(k, &big)), Err(StoreError::ValueTooLarge(_))),
        "value limit"
    );
    let long_key = vec![1u8; MAX_KEY_BYTES + 1];
    assert!(
        matches!(
            s.transact(|tx| tx.set(&long_key, b"v")),
            Err(StoreError::KeyTooLarge(_))
        ),
        "key limit"
    );
    let chunk = vec![7u8; MAX_VALUE_BYTES];
    let r = s.transact(|tx| {
        for i in 0..120u32 {
            let mut key = k.to_vec();
            key.extend_from_slice(&i.to_be_bytes());
            tx.set(&key, &chunk)?;
        }
        Ok::<_, StoreError>(())
    });
    assert!(
        matches!(r, Err(StoreError::TransactionTooLarge(_))),
        "transaction size limit"
    );
    let mut first = k.to_vec();
    first.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        s.snapshot(|tx| tx.get(&first)).unwrap(),
        None,
        "an oversized transaction writes nothing"
    );
}

fn tuple_order() {
    assert!(pack(&("a", 2i64)) < pack(&("a", 10i64)), "integers order numerically");
    assert!(pack(&("a", -1i64)) < pack(&("a", 0i64)), "negatives first");
    assert!(pack(&("a", "b")) < pack(&("a", "b", 0i64)), "a prefix sorts first");
}

fn watches(store: Arc<dyn Store>, base: &[u8]) {
    use std::time::{Duration, Instant};
    let key = |n: &str| {
        let mut k = base.to_vec();
        k.extend_from_slice(&pack(&(n,)));
        k
    };
    let (k, other) = (key("k"), key("other"));
    let s = store.as_ref();
    // No change within the timeout.
    assert!(
        !s.watch(&k, None, Duration::from_millis(200)).unwrap(),
        "a watch on an unchanged key times out"
    );
    // A change the caller has not seen yet is reported at once.
    s.transact(|tx| tx.set(&k, b"one")).unwrap();
    let t = Instant::now();
    assert!(
        s.watch(&k, None, Duration::from_secs(30)).unwrap(),
        "a key written since the caller read it"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "reported without waiting out the timeout"
    );
    // A write from another thread wakes the watcher; writes to other keys do not.
    let writer = {
        let store = store.clone();
        let (k, other) = (k.clone(), other.clone());
        std::thread::spawn(move || {
            for i in 0..5u8 {
                store.transact(|tx| tx.set(&other, &[i])).unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
            store.transact(|tx| tx.set(&k, b"two")).unwrap();
        })
    };
    let t = Instant::now();
    assert!(
        s.watch(&k, Some(b"one"), Duration::from_secs(30)).unwrap(),
        "a write from elsewhere wakes the watcher"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "woken by the write, not the timeout"
    );
    assert_eq!(s.snapshot(|tx| tx.get(&k)).unwrap().as_deref(), Some(&b"two"[..]));
    writer.join().expect("writer thread");
    // Other keys' writes alone do not end a watch.
    let noise = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..10u8 {
                store.transact(|tx| tx.set(&other, &[i])).unwrap();
            }
        })
    };
    assert!(
        !s.watch(&k, Some(b"two"), Duration::from_millis(300)).unwrap(),
        "writes to other keys do not fire a watch"
    );
    noise.join().expect("noise thread");
    // Clearing is a change.
    let clearer = {
        let store = store.clone();
        let k = k.clone();
        std::thread::spawn(move || store.transact(|tx| tx.clear(&k)).unwrap())
    };
    assert!(
        s.watch(&k, Some(b"two"), Duration::from_secs(30)).unwrap(),
        "clearing the key fires the watch"
    );
    clearer.join().expect("clearer thread");
    assert!(
        matches!(
            s.watch(&vec![0u8; MAX_KEY_BYTES + 1], None, Duration::from_millis(10)),
            Err(StoreError::KeyTooLarge(_))
        ),
        "a watch on an oversized key is refused"
    );
}
