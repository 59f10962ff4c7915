//! laddnet's durable state: a transactional, ordered key-value store shaped
//! like FoundationDB's transactions, so the same code runs on the embedded
//! default and on a FoundationDB cluster.
//!
//! - [`Store`] / [`Transaction`]: get, set, clear, range reads and atomic add
//!   inside a closure that the store retries on conflict. The closure may
//!   run more than once: it must have no side effects outside the
//!   transaction. Writes that must happen once carry an idempotency key
//!   written in the same transaction ([`Transaction::claim_once`]).
//! - [`RedbStore`]: the embedded default, one file in the data dir.
//! - `FdbStore` (feature `fdb`): FoundationDB, for clusters.
//! - [`conformance`]: one suite every backend must pass.
//! - [`keys`]: tuple-encoded keys (`foundationdb-tuple`), shared by all
//!   backends so the layout is the same everywhere.
//!
//! The trait is synchronous: a transaction is a short burst of work, and
//! async callers run it on `spawn_blocking` so no executor thread blocks on
//! disk — or, where the backend [queues](Store::queues) transactions (the
//! embedded store's writer thread), hand it over with [`submit_with`] and
//! await the answer, many transactions then sharing one commit. FoundationDB's own limits (key 10 kB, value 100 kB, transaction
//! 10 MB) are enforced by every backend, so code that fits the embedded
//! store fits FoundationDB too.

// The FoundationDB client's one-time boot is the only unsafe call (fdb.rs).
#![deny(unsafe_code)]

pub mod conformance;
mod error;
#[cfg(feature = "fdb")]
mod fdb;
pub mod keys;
mod redb_store;

use std::sync::Arc;
use std::time::Duration;

pub use error::StoreError;
#[cfg(feature = "fdb")]
pub use fdb::FdbStore;
pub use redb_store::RedbStore;

/// FoundationDB's limit on a key's size.
pub const MAX_KEY_BYTES: usize = 10_000;
/// FoundationDB's limit on a value's size.
pub const MAX_VALUE_BYTES: usize = 100_000;
/// FoundationDB's limit on the bytes a transaction writes.
pub const MAX_TRANSACTION_BYTES: usize = 10_000_000;

/// How much lower (nice) than request threads the store's own thread and
/// background sweeps run.
pub const BACKGROUND_NICE: i32 = 10;
const _: () = assert!(BACKGROUND_NICE > 0, "background threads run below the request threads");

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`], for
/// threads whose work may wait while requests are served: the store's
/// writer, sweeps over the whole store. It cannot be raised again
/// without privileges, so call it only on a thread of one's own (not a
/// pooled one). Does nothing where it is not supported.
///
/// It also gives the thread the default time slice back: a thread
/// spawned by a request thread inherits that one's short slice
/// ([`request_priority`]), and a background thread switched out every
/// 100 µs would commit in smaller pieces at more cost (the reconnect
/// storm measured 0.69 instead of 0.83 of the raw handshakes so).
#[allow(unsafe_code)]
pub fn background_priority() {
    #[cfg(target_os = "linux")]
    {
        let attr = SchedAttr::fair(BACKGROUND_NICE, 0);
        // SAFETY: sched_setattr on this thread (0) with a struct laid out
        // as the kernel's `sched_attr` (its first version) and its size.
        if unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) } == 0 {
            return;
        }
        // SAFETY: setpriority on this thread's own id; no memory is passed.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            if libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) != 0 {
                tracing::debug!("a background thread keeps its priority");
            }
        }
    }
}

/// The time slice request threads ask the scheduler for: short, so a
/// request thread that wakes (a message arrived) runs at once instead of
/// waiting out the slice of a background thread that is running (the
/// store's writer, whose slice is otherwise 1–3 ms).
pub const REQUEST_SLICE_US: u64 = 100;

/// Asks the scheduler for a [`REQUEST_SLICE_US`] time slice for the
/// calling thread, at normal priority: a thread that serves requests
/// (the node's runtime threads). Under EEVDF (Linux 6.12 and later) a
/// woken thread with a shorter slice than the running one preempts it.
/// Throughput is unchanged: each thread keeps its share of the CPU, only
/// in shorter turns. Older kernels take the call and ignore the slice;
/// where the call is refused or missing this does nothing.
#[allow(unsafe_code)]
pub fn request_priority() {
    #[cfg(target_os = "linux")]
    {
        let attr = SchedAttr::fair(0, REQUEST_SLICE_US * 1_000);
        // SAFETY: sched_setattr on this thread (0) with a struct laid out
        // as the kernel's `sched_attr` (its first version) and its size.
        let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
        if r != 0 {
            tracing::debug!("a request thread keeps the default time slice");
        }
    }
}

/// The kernel's `struct sched_attr`, first version (48 bytes).
#[cfg(target_os = "linux")]
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

#[cfg(target_os = "linux")]
impl SchedAttr {
    /// SCHED_OTHER at `nice`, with `slice_ns` as its slice (0: default).
    fn fair(nice: i32, slice_ns: u64) -> Self {
        SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: libc::SCHED_OTHER as u32,
            flags: 0,
            nice,
            priority: 0,
            runtime: slice_ns,
            deadline: 0,
            period: 0,
        }
    }
}

/// FoundationDB's limits, kept by every backend's write transaction.
#[derive(Debug, Default)]
pub struct WriteBudget {
    written: usize,
}

impl WriteBudget {
    pub fn check_key(key: &[u8]) -> Result<(), StoreError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLarge(key.len()));
        }
        Ok(())
    }

    /// Checks a write of `key` with a value of `value_len` bytes and counts it.
    pub fn charge(&mut self, key: &[u8], value_len: usize) -> Result<(), StoreError> {
        Self::check_key(key)?;
        if value_len > MAX_VALUE_BYTES {
            return Err(StoreError::ValueTooLarge(value_len));
        }
        self.written += key.len() + value_len;
        if self.written > MAX_TRANSACTION_BYTES {
            return Err(StoreError::TransactionTooLarge(self.written));
        }
        Ok(())
    }
}

/// Refuses a key longer than FoundationDB allows.
pub fn check_key(key: &[u8]) -> Result<(), StoreError> {
    WriteBudget::check_key(key)
}

/// One key-value pair from a range read.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// FoundationDB's `ADD` on a stored value: the little-endian i64 in `base`
/// (absent = 0; a shorter value is zero-extended, a longer one cut to 8
/// bytes) plus `delta`, wrapping.
pub fn add_to(base: Option<&[u8]>, delta: i64) -> Vec<u8> {
    let mut buf = [0u8; 8];
    if let Some(v) = base {
        let n = v.len().min(8);
        buf[..n].copy_from_slice(&v[..n]);
    }
    i64::from_le_bytes(buf).wrapping_add(delta).to_le_bytes().to_vec()
}

/// A range read with a transaction's own writes laid over it: `stored` is
/// what the store holds in the range, `mine` the transaction's writes
/// inside it (`None`: cleared). At most `limit` rows (0 = no limit), in
/// `reverse` order if asked. `stored` needs only the first
/// `limit + mine.len()` rows in that order: each write hides at most one.
pub fn overlay_rows(
    stored: Vec<KeyValue>,
    mine: impl IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    limit: usize,
    reverse: bool,
) -> Vec<KeyValue> {
    let mut merged: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
    for (k, v) in mine {
        match v {
            Some(v) => merged.insert(k, v),
            None => merged.remove(&k),
        };
    }
    let limit = if limit == 0 { usize::MAX } else { limit };
    if reverse {
        merged.into_iter().rev().take(limit).collect()
    } else {
        merged.into_iter().take(limit).collect()
    }
}

/// The operations available inside a transaction.
pub trait Transaction {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError>;
    /// Keys in `[begin, end)`, ascending (or descending with `reverse`), at
    /// most `limit` of them (0 = no limit).
    fn get_range(&mut self, begin: &[u8], end: &[u8], limit: usize, reverse: bool)
    -> Result<Vec<KeyValue>, StoreError>;
    /// Adds `delta` to the little-endian i64 at `key` (absent = 0), as
    /// FoundationDB's `ADD` mutation does.
    fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), StoreError>;

    /// Records `key` as done and returns true the first time; false when an
    /// earlier commit already claimed it. Write the effect in the same
    /// transaction and a retried commit can never apply twice.
    fn claim_once(&mut self, key: &[u8]) -> Result<bool, StoreError> {
        if self.get(key)?.is_some() {
            return Ok(false);
        }
        self.set(key, b"")?;
        Ok(true)
    }
}

/// A transactional ordered key-value store.
pub trait Store: Send + Sync + 'static {
    /// Runs `f` in a read-write transaction and commits it, running `f`
    /// again on a retryable conflict. An `Err` from `f` aborts the
    /// transaction: nothing it wrote is kept.
    fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError>;

    /// Runs `f` in a read-only snapshot. Writes inside it are refused.
    fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError>;

    /// Blocks until the value at `key` is other than `seen` (None: the key
    /// is absent) or `timeout` has passed, and says whether it changed.
    ///
    /// This is FoundationDB's watch, for keys that other processes write
    /// and this one must follow (the CRL): the embedded store wakes on its
    /// own commits, FoundationDB and the shared store on theirs, so no
    /// caller polls. A change is never missed, since the value is compared
    /// with `seen`, not with whatever it is when the watch starts; `false`
    /// only means "not within `timeout`". Run it on a thread of its own: it
    /// holds the thread for up to `timeout`.
    fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: Duration) -> Result<bool, StoreError>;

    /// Which backend this is, for logs and `laddnet config validate`.
    fn backend(&self) -> &'static str;

    /// Whether [`Store::submit`] queues a transaction and returns at once
    /// (so an async caller may call it on an executor thread) rather than
    /// running it on the calling thread.
    fn queues(&self) -> bool {
        false
    }

    /// Whether a small read is served from this process (memory, or a
    /// local file in the page cache) in microseconds, so an async caller
    /// may run it on an executor thread instead of handing it to the
    /// blocking pool (a thread hand-off costs more than such a read). False
    /// where a read is a network round trip.
    fn local_reads(&self) -> bool {
        false
    }

    /// Runs `job` as a read-write transaction and then calls its
    /// [`Job::done`] with the result, once committed (durably) or failed.
    /// A backend that queues runs queued jobs together in one commit, each
    /// still all-or-nothing: a job that fails leaves nothing, and the
    /// others commit. The default runs it here, on the calling thread.
    fn submit(&self, mut job: Box<dyn Job>) {
        let result = self.run(&mut |tx| job.run(tx));
        job.done(result);
    }
}

/// A transaction handed to [`Store::submit`]: its body (which may run more
/// than once, like [`Store::run`]'s closure) and what to do with the result.
pub trait Job: Send {
    fn run(&mut self, tx: &mut dyn Transaction) -> Result<(), StoreError>;
    /// Called once, after the commit (or the failure).
    fn done(self: Box<Self>, result: Result<(), StoreError>);
}

/// A shared store handle.
pub type SharedStore = Arc<dyn Store>;

/// Typed helpers over [`Store::run`] and [`Store::read`]: the closure
/// returns the caller's own result and error types.
pub trait StoreExt {
    fn transact<T, E, F>(&self, f: F) -> Result<T, E>
    where
        E: From<StoreError>,
        F: FnMut(&mut dyn Transaction) -> Result<T, E>;

    fn snapshot<T, E, F>(&self, f: F) -> Result<T, E>
    where
        E: From<StoreError>,
        F: FnMut(&mut dyn Transaction) -> Result<T, E>;
}

fn adapt<T, E: From<StoreError>>(
    run: impl FnOnce(&mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError>,
    mut f: impl FnMut(&mut dyn Transaction) -> Result<T, E>,
) -> Result<T, E> {
    let mut out: Option<Result<T, E>> = None;
    let result = run(&mut |tx| capture(&mut f, tx, &mut out));
    settle(result, out)
}

/// Runs the typed closure, keeping its own result in `out`; an error aborts
/// the transaction.
fn capture<T, E>(
    f: &mut impl FnMut(&mut dyn Transaction) -> Result<T, E>,
    tx: &mut dyn Transaction,
    out: &mut Option<Result<T, E>>,
) -> Result<(), StoreError> {
    match f(tx) {
        Ok(v) => {
            *out = Some(Ok(v));
            Ok(())
        }
        Err(e) => {
            *out = Some(Err(e));
            Err(StoreError::Aborted)
        }
    }
}

/// The caller's result from the store's and the closure's.
fn settle<T, E: From<StoreError>>(result: Result<(), StoreError>, out: Option<Result<T, E>>) -> Result<T, E> {
    match (result, out) {
        (Ok(()), Some(out)) => out,
        (Err(StoreError::Aborted), Some(Err(e))) => Err(e),
        (Err(e), _) => Err(e.into()),
        (Ok(()), None) => Err(StoreError::Internal("transaction closure did not run".into()).into()),
    }
}

/// What [`backfill_once`] did: rows `index` took, and rows it passed over
/// (a record that does not decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backfilled {
    pub indexed: usize,
    pub unreadable: usize,
}

/// Builds an index over the rows of `[begin, end)` once per store: each
/// batch of `batch` rows is read and indexed in one transaction (`index`
/// gets each row's key and value and says whether it took it), and
/// `marker` is set with the last batch. A store that has `marker` is left
/// alone (`None`). A pass cut short runs again from the start, so `index`
/// must be idempotent; rows written meanwhile keep their index entries
/// through the ordinary writes.
pub fn backfill_once<E: From<StoreError>>(
    store: &dyn Store,
    marker: &[u8],
    (begin, end): (Vec<u8>, Vec<u8>),
    batch: usize,
    mut index: impl FnMut(&mut dyn Transaction, &[u8], &[u8]) -> Result<bool, E>,
) -> Result<Option<Backfilled>, E> {
    if store.snapshot(|tx| tx.get(marker))?.is_some() {
        return Ok(None);
    }
    let mut done = Backfilled::default();
    let mut from = begin;
    loop {
        let (took, next) = store.transact(|tx| {
            let rows = tx.get_range(&from, &end, batch, false)?;
            let mut took = Backfilled::default();
            for (k, v) in &rows {
                if index(tx, k, v)? {
                    took.indexed += 1;
                } else {
                    took.unreadable += 1;
                }
            }
            let next = match rows.last() {
                Some((k, _)) if rows.len() == batch => {
                    let mut k = k.clone();
                    k.push(0);
                    Some(k)
                }
                _ => {
                    tx.set(marker, b"")?;
                    None
                }
            };
            Ok::<_, E>((took, next))
        })?;
        done.indexed += took.indexed;
        done.unreadable += took.unreadable;
        match next {
            Some(k) => from = k,
            None => return Ok(Some(done)),
        }
    }
}

/// [`Store::submit`] with a typed closure, like [`StoreExt::transact`]:
/// `done` gets the closure's result once the transaction is committed, or
/// the error.
pub fn submit_with<T, E, F, D>(store: &dyn Store, f: F, done: D)
where
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
    F: FnMut(&mut dyn Transaction) -> Result<T, E> + Send + 'static,
    D: FnOnce(Result<T, E>) + Send + 'static,
{
    struct Typed<T, E, F, D> {
        f: F,
        out: Option<Result<T, E>>,
        done: D,
    }
    impl<T, E, F, D> Job for Typed<T, E, F, D>
    where
        T: Send,
        E: From<StoreError> + Send,
        F: FnMut(&mut dyn Transaction) -> Result<T, E> + Send,
        D: FnOnce(Result<T, E>) + Send,
    {
        fn run(&mut self, tx: &mut dyn Transaction) -> Result<(), StoreError> {
            capture(&mut self.f, tx, &mut self.out)
        }
        fn done(self: Box<Self>, result: Result<(), StoreError>) {
            let this = *self;
            (this.done)(settle(result, this.out))
        }
    }
    store.submit(Box::new(Typed { f, out: None, done }))
}

impl<S: Store + ?Sized> StoreExt for S {
    fn transact<T, E, F>(&self, f: F) -> Result<T, E>
    where
        E: From<StoreError>,
        F: FnMut(&mut dyn Transaction) -> Result<T, E>,
    {
        adapt(|g| self.run(g), f)
    }

    fn snapshot<T, E, F>(&self, f: F) -> Result<T, E>
    where
        E: From<StoreError>,
        F: FnMut(&mut dyn Transaction) -> Result<T, E>,
    {
        adapt(|g| self.read(g), f)
    }
}

/// The range that holds every key starting with `prefix`.
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.to_vec();
    // Strip trailing 0xff bytes, then increment the last byte: the first key
    // greater than every key with this prefix.
    while end.last() == Some(&0xff) {
        end.pop();
    }
    match end.last_mut() {
        Some(b) => *b += 1,
        None => end = vec![0xff; 1],
    }
    (prefix.to_vec(), end)
}
