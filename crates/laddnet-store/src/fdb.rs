//! The FoundationDB backend (feature `fdb`): the same trait over a
//! FoundationDB cluster, for when one machine is not enough.
//!
//! - Every transaction has a timeout (5 s, FoundationDB's own horizon) and a
//!   retry limit; retryable errors, from reads or from commit, go through
//!   `on_error`, which backs off and resets the transaction, and the closure
//!   runs again.
//! - `commit_unknown_result` is retried like any other retryable error: the
//!   transaction may have committed, so every write that must happen once
//!   carries an idempotency key (`Transaction::claim_once`) in the same
//!   transaction, and the retry finds it and writes nothing twice.
//! - Atomic add is FoundationDB's own `ADD` mutation: no read, no conflict.
//! - Keys are tuple-encoded (`keys::pack`), as FoundationDB's own layers
//!   encode them, and live under an optional prefix (a subspace), so one
//!   FoundationDB cluster can hold several installations (or test runs).
//! - Values larger than FoundationDB's 100 kB limit are never written:
//!   every backend keeps that limit, and large objects (firmware images,
//!   diagnostics bundles) are stored in chunks by the node (`blobs.rs`).
//!
//! The trait is synchronous; this backend blocks on FoundationDB's futures,
//! which its network thread completes. Callers already run transactions on
//! blocking threads.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use foundationdb::options::{MutationType, StreamingMode, TransactionOption};
use foundationdb::{Database, FdbError, RangeOption};
use futures::executor::block_on;

use crate::{KeyValue, Store, StoreError, Transaction, WriteBudget};

/// Milliseconds before a transaction is abandoned.
const TIMEOUT_MS: i32 = 5_000;
/// Retries of one transaction before giving up.
const RETRY_LIMIT: i32 = 100;

static NETWORK: OnceLock<foundationdb::api::NetworkAutoStop> = OnceLock::new();

fn fdb_err(e: FdbError) -> StoreError {
    StoreError::Io(format!("foundationdb: {e}"))
}

/// A FoundationDB cluster, through its cluster file.
pub struct FdbStore {
    db: Database,
    prefix: Vec<u8>,
}

impl FdbStore {
    /// Starts the client's network thread (once per process) and opens the
    /// database of `cluster_file` (None: the default cluster file).
    pub fn open(cluster_file: Option<&str>) -> Result<Self, StoreError> {
        Self::open_in(cluster_file, &[])
    }

    /// As [`FdbStore::open`], with every key under `prefix`.
    pub fn open_in(cluster_file: Option<&str>, prefix: &[u8]) -> Result<Self, StoreError> {
        NETWORK.get_or_init(|| {
            // SAFETY: boot is called once per process (OnceLock) and the
            // guard is kept for the life of the process, as the client
            // library requires: the network thread must not be restarted.
            #[allow(unsafe_code)]
            unsafe {
                foundationdb::boot()
            }
        });
        let db = Database::new(cluster_file).map_err(fdb_err)?;
        Ok(Self {
            db,
            prefix: prefix.to_vec(),
        })
    }
}

struct FdbTx<'a> {
    trx: &'a foundationdb::Transaction,
    prefix: &'a [u8],
    /// The first FoundationDB error an operation hit: the closure's own
    /// result is then ignored and the transaction goes through on_error.
    failed: Option<FdbError>,
    budget: WriteBudget,
    read_only: bool,
}

impl FdbTx<'_> {
    fn note<T>(&mut self, r: Result<T, FdbError>) -> Result<T, StoreError> {
        r.map_err(|e| {
            let s = fdb_err(e);
            if self.failed.is_none() {
                self.failed = Some(e);
            }
            s
        })
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(self.prefix);
        k.extend_from_slice(key);
        k
    }

    fn check_write(&mut self, key: &[u8], value_len: usize) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        self.budget.charge(key, value_len)
    }
}

impl Transaction for FdbTx<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        WriteBudget::check_key(key)?;
        let r = block_on(self.trx.get(&self.key(key), false));
        Ok(self.note(r)?.map(|v| v.to_vec()))
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.check_write(key, value.len())?;
        self.trx.set(&self.key(key), value);
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.check_write(key, 0)?;
        self.trx.clear(&self.key(key));
        Ok(())
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if begin >= end {
            return Ok(Vec::new());
        }
        let mut opt = RangeOption {
            limit: (limit > 0).then_some(limit),
            reverse,
            mode: StreamingMode::WantAll,
            ..RangeOption::from((self.key(begin), self.key(end)))
        };
        let mut out = Vec::new();
        let mut iteration = 1;
        loop {
            let r = block_on(self.trx.get_range(&opt, iteration, false));
            let values = self.note(r)?;
            let n = self.prefix.len();
            out.extend(values.iter().map(|kv| (kv.key()[n..].to_vec(), kv.value().to_vec())));
            match opt.next_range(&values) {
                Some(next) => {
                    opt = next;
                    iteration += 1;
                }
                None => break,
            }
        }
        Ok(out)
    }

    fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), StoreError> {
        self.check_write(key, 8)?;
        self.trx
            .atomic_op(&self.key(key), &delta.to_le_bytes(), MutationType::Add);
        Ok(())
    }
}

impl FdbStore {
    fn attempt(
        &self,
        read_only: bool,
        f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut trx = self.db.create_trx().map_err(fdb_err)?;
        let mut attempts = 0u32;
        loop {
            trx.set_option(TransactionOption::Timeout(TIMEOUT_MS))
                .map_err(fdb_err)?;
            trx.set_option(TransactionOption::RetryLimit(RETRY_LIMIT))
                .map_err(fdb_err)?;
            let mut tx = FdbTx {
                trx: &trx,
                prefix: &self.prefix,
                failed: None,
                budget: WriteBudget::default(),
                read_only,
            };
            let result = f(&mut tx);
            if let Some(e) = tx.failed.take() {
                attempts += 1;
                trx = block_on(trx.on_error(e)).map_err(|e| retry_exhausted(e, attempts))?;
                continue;
            }
            result?;
            if read_only {
                return Ok(());
            }
            match block_on(trx.commit()) {
                Ok(_) => return Ok(()),
                Err(commit_err) => {
                    attempts += 1;
                    trx = block_on(commit_err.on_error()).map_err(|e| retry_exhausted(e, attempts))?;
                }
            }
        }
    }
}

fn retry_exhausted(e: FdbError, attempts: u32) -> StoreError {
    if e.is_retryable() {
        StoreError::TooManyRetries(attempts)
    } else {
        fdb_err(e)
    }
}

impl Store for FdbStore {
    fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.attempt(false, f)
    }

    fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.attempt(true, f)
    }

    fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: Duration) -> Result<bool, StoreError> {
        WriteBudget::check_key(key)?;
        let mut full = self.prefix.clone();
        full.extend_from_slice(key);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let trx = self.db.create_trx().map_err(fdb_err)?;
            // Bounds the read and the watch alike: a partitioned cluster
            // ends the wait instead of holding the thread forever.
            let ms = i32::try_from(left.as_millis() + u128::from(TIMEOUT_MS as u32)).unwrap_or(i32::MAX);
            trx.set_option(TransactionOption::Timeout(ms)).map_err(fdb_err)?;
            let current = match block_on(trx.get(&full, false)) {
                Ok(v) => v,
                Err(e) if e.is_retryable() && !left.is_zero() => {
                    std::thread::sleep(Duration::from_millis(100).min(left));
                    continue;
                }
                Err(e) => return Err(fdb_err(e)),
            };
            if current.as_deref() != seen {
                return Ok(true);
            }
            if left.is_zero() {
                return Ok(false);
            }
            // FoundationDB fires the watch when the value differs from the
            // one this transaction read; the commit arms it.
            let watch = trx.watch(&full);
            if let Err(e) = block_on(trx.commit()) {
                if !e.is_retryable() {
                    return Err(fdb_err(e.into()));
                }
                continue;
            }
            let (wake, timer) = futures::channel::oneshot::channel::<()>();
            std::thread::spawn(move || {
                std::thread::sleep(left);
                let _ = wake.send(());
            });
            match block_on(futures::future::select(watch, timer)) {
                // Fired: the next pass reads the value and compares.
                futures::future::Either::Left((Ok(()), _)) => {}
                // Cancelled or timed out by the cluster: read again (and
                // give up at the deadline).
                futures::future::Either::Left((Err(_), _)) => {
                    std::thread::sleep(Duration::from_millis(100).min(left));
                }
                futures::future::Either::Right(_) => return Ok(false),
            }
        }
    }

    fn backend(&self) -> &'static str {
        "foundationdb"
    }
}
