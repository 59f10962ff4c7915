use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Job, KeyValue, Store, StoreError, Transaction, WriteBudget};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The embedded default: one redb file, ACID; a commit returns only once
/// it is on disk.
///
/// redb runs one write transaction at a time, so transactions never
/// conflict here; reads run on snapshots beside the writer.
///
/// **Group commit.** Each transaction commits without an fsync, then waits
/// for a durable commit that began after it: the first waiter runs one
/// (an empty redb commit with `Durability::Immediate`, which makes every
/// earlier commit durable), and the commits that arrive meanwhile share
/// the next one. So `run` still returns only after its writes are on disk,
/// and one fsync serves every transaction that was waiting. A transaction
/// is visible to readers of this process from its own commit, a little
/// before it is durable; a crash in between loses it, and its caller was
/// never told it succeeded.
///
/// **The writer.** Transactions handed over with [`Store::submit`] go to
/// one writer thread (started by the first), which runs every job waiting
/// in one redb write transaction: each job writes into a layer of its own
/// over the table, read back by its own reads, and folded into the table
/// only if the job succeeds, so a failing job leaves nothing and the others
/// still commit. One commit and one durable flush then answer the whole
/// batch; no job is answered before it is durable. If the shared commit
/// fails, each job that had succeeded runs again alone. This is the hot
/// path's way in (every meter event): no blocking-pool thread per event,
/// no contention for redb's write slot, one fsync per batch.
pub struct RedbStore {
    inner: Arc<Inner>,
    writer: OnceLock<Writer>,
}

struct Inner {
    db: Database,
    durable: bool,
    watches: Watches,
    group: GroupCommit,
}

/// The writer thread and its queue. Dropping the store closes the queue;
/// the thread finishes what was queued and ends.
struct Writer {
    queue: Sender<Box<dyn Job>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The most jobs one writer commit takes.
const MAX_BATCH: usize = 1024;

/// The state of group commit: tickets are taken after a commit, and a
/// durable commit started after a ticket was taken covers it.
#[derive(Default)]
struct GroupCommit {
    state: Mutex<GroupState>,
    done: Condvar,
}

#[derive(Default)]
struct GroupState {
    /// The last ticket handed out.
    taken: u64,
    /// Every ticket up to this one is durable.
    synced: u64,
    /// A durable commit is running.
    syncing: bool,
    /// Tickets up to this one were in a durable commit that failed (and
    /// are not covered by a later one that succeeded).
    failed: u64,
    failure: String,
    /// Durable commits run so far.
    flushes: u64,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once a durable commit that began after this call has
    /// finished, running it if no other caller is.
    fn durable(&self, db: &Database) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.taken += 1;
        let ticket = s.taken;
        loop {
            if s.synced >= ticket {
                return Ok(());
            }
            if s.failed >= ticket {
                return Err(StoreError::Io(format!(
                    "the commit may not be on disk: the flush failed: {}",
                    s.failure
                )));
            }
            if s.syncing {
                s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.syncing = true;
            let through = s.taken;
            drop(s);
            let flushed = flush(db);
            s = self.lock();
            s.syncing = false;
            s.flushes += 1;
            match flushed {
                Ok(()) => s.synced = through,
                Err(e) => {
                    s.failed = through;
                    s.failure = e.to_string();
                }
            }
            self.done.notify_all();
        }
    }
}

/// An empty durable commit: redb writes and fsyncs every commit made
/// without durability before it.
fn flush(db: &Database) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(StoreError::io)?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(StoreError::io)?;
    txn.commit().map_err(StoreError::io)
}

/// The keys being watched, each with a count of the commits that wrote it
/// since the first watcher came. A commit bumps the count of every watched
/// key it wrote and wakes the watchers, which then compare values.
#[derive(Default)]
struct Watches {
    keys: Mutex<HashMap<Vec<u8>, Watched>>,
    changed: Condvar,
}

struct Watched {
    watchers: usize,
    writes: u64,
}

impl Watches {
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Watched>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn committed(&self, written: &[Vec<u8>]) {
        if written.is_empty() {
            return;
        }
        let mut keys = self.lock();
        if keys.is_empty() {
            return;
        }
        let mut woke = false;
        for key in written {
            if let Some(w) = keys.get_mut(key) {
                w.writes += 1;
                woke = true;
            }
        }
        if woke {
            self.changed.notify_all();
        }
    }
}

impl RedbStore {
    /// Opens the store file, creating it if absent.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, true)
    }

    /// A store whose commits are not flushed to disk: a crash loses recent
    /// commits. Only for tests and benchmarks that measure something else.
    pub fn open_volatile(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, false)
    }

    fn open_with(path: impl AsRef<Path>, durable: bool) -> Result<Self, StoreError> {
        let db = Database::create(path.as_ref()).map_err(StoreError::io)?;
        // Make sure the table exists so read transactions can open it (a
        // write, and its flush, only the first time).
        let exists = match db.begin_read().map_err(StoreError::io)?.open_table(KV) {
            Ok(_) => true,
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(StoreError::io(e)),
        };
        if !exists {
            let tx = db.begin_write().map_err(StoreError::io)?;
            tx.open_table(KV).map_err(StoreError::io)?;
            tx.commit().map_err(StoreError::io)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                durable,
                watches: Watches::default(),
                group: GroupCommit::default(),
            }),
            writer: OnceLock::new(),
        })
    }

    /// How many fsyncs (durable commits) group commit has run: fewer than
    /// the transactions committed when they arrive together.
    pub fn flushes(&self) -> u64 {
        self.inner.group.lock().flushes
    }

    fn writer(&self) -> &Writer {
        self.writer.get_or_init(|| {
            let (queue, jobs) = std::sync::mpsc::channel();
            let inner = self.inner.clone();
            let thread = std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer_loop(&inner, &jobs));
            match thread {
                Ok(t) => Writer {
                    queue,
                    thread: Mutex::new(Some(t)),
                },
                Err(e) => {
                    // No thread: the queue's receiver is gone, so every
                    // submit fails with this error rather than waiting.
                    tracing::error!(error = %e, "the store's writer thread did not start");
                    Writer {
                        queue,
                        thread: Mutex::new(None),
                    }
                }
            }
        })
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else { return };
        let Writer { queue, thread } = writer;
        drop(queue);
        let thread = thread.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            // Waits for the queued jobs; the database closes with the last
            // handle, which is then this store's.
            let _ = t.join();
        }
    }
}

fn writer_loop(inner: &Inner, jobs: &Receiver<Box<dyn Job>>) {
    // Below the threads that serve requests: on a busy core a read or a
    // reply that wakes up preempts a commit's page copying instead of
    // waiting out its time slice, and the jobs that queue meanwhile join
    // the next commit (a larger group). Durability is unchanged: nothing
    // is acknowledged before its commit.
    crate::background_priority();
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        inner.run_batch(batch);
    }
}

/// A job's transaction inside the writer's shared one: its writes stay in
/// `writes` (read back by its own reads) until the job has succeeded.
struct JobTx<'t, 'a> {
    table: &'t redb::Table<'a, &'static [u8], &'static [u8]>,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    budget: WriteBudget,
}

impl Transaction for JobTx<'_, '_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(key)?;
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        Ok(self.table.get(key).map_err(StoreError::io)?.map(|v| v.value().to_vec()))
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.budget.charge(key, value.len())?;
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.budget.charge(key, 0)?;
        self.writes.insert(key.to_vec(), None);
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
        let mine: Vec<_> = self
            .writes
            .range::<[u8], _>((std::ops::Bound::Included(begin), std::ops::Bound::Excluded(end)))
            .collect();
        if mine.is_empty() {
            return range_of(self.table, begin, end, limit, reverse);
        }
        let fetch = if limit == 0 { 0 } else { limit + mine.len() };
        let stored = range_of(self.table, begin, end, fetch, reverse)?;
        Ok(crate::overlay_rows(
            stored,
            mine.into_iter().map(|(k, v)| (k.clone(), v.clone())),
            limit,
            reverse,
        ))
    }

    fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), StoreError> {
        let sum = crate::add_to(self.get(key)?.as_deref(), delta);
        self.set(key, &sum)
    }
}

/// Runs a job's body, a panic becoming its error (the writer thread lives on).
fn run_job(job: &mut Box<dyn Job>, tx: &mut dyn Transaction) -> Result<(), StoreError> {
    catch_unwind(AssertUnwindSafe(|| job.run(tx)))
        .unwrap_or_else(|_| Err(StoreError::Internal("the transaction panicked".into())))
}

fn finish(job: Box<dyn Job>, result: Result<(), StoreError>) {
    if catch_unwind(AssertUnwindSafe(|| job.done(result))).is_err() {
        tracing::error!("a store job's completion panicked");
    }
}

/// The same error again, for every job of a batch it applies to.
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Io(m) => StoreError::Io(m.clone()),
        other => StoreError::Internal(other.to_string()),
    }
}

impl Inner {
    fn run_batch(&self, mut jobs: Vec<Box<dyn Job>>) {
        let mut results = Vec::with_capacity(jobs.len());
        let mut written = Vec::new();
        match self.commit_batch(&mut jobs, &mut results, &mut written) {
            Ok(()) => {
                let durable = if self.durable {
                    self.group.durable(&self.db)
                } else {
                    Ok(())
                };
                self.watches.committed(&written);
                for (job, r) in jobs.into_iter().zip(results) {
                    let r = match (&durable, r) {
                        (Err(e), Ok(())) => Err(again(e)),
                        (_, r) => r,
                    };
                    finish(job, r);
                }
            }
            Err(e) => {
                // The shared commit failed: every job that had not failed
                // on its own runs again, alone.
                tracing::warn!(error = %e, jobs = jobs.len(), "a batched commit failed; committing its jobs one by one");
                results.resize_with(jobs.len(), || Ok(()));
                for (mut job, r) in jobs.into_iter().zip(results) {
                    let r = match r {
                        Ok(()) => self.run(&mut |tx| run_job(&mut job, tx)),
                        Err(e) => Err(e),
                    };
                    finish(job, r);
                }
            }
        }
    }

    /// Runs the jobs in one write transaction and commits it (not yet
    /// durable); `results` gets each job's own outcome.
    fn commit_batch(
        &self,
        jobs: &mut [Box<dyn Job>],
        results: &mut Vec<Result<(), StoreError>>,
        written: &mut Vec<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(StoreError::io)?;
        txn.set_durability(redb::Durability::None).map_err(StoreError::io)?;
        let applied = (|| {
            let mut table = txn.open_table(KV).map_err(StoreError::io)?;
            for job in jobs.iter_mut() {
                let mut tx = JobTx {
                    table: &table,
                    writes: BTreeMap::new(),
                    budget: WriteBudget::default(),
                };
                let r = run_job(job, &mut tx);
                let writes = tx.writes;
                if r.is_ok() {
                    for (k, v) in writes {
                        match v {
                            Some(v) => table.insert(&k[..], &v[..]).map(drop),
                            None => table.remove(&k[..]).map(drop),
                        }
                        .map_err(StoreError::io)?;
                        written.push(k);
                    }
                }
                results.push(r);
            }
            Ok::<_, StoreError>(())
        })();
        if let Err(e) = applied {
            txn.abort().map_err(StoreError::io)?;
            return Err(e);
        }
        txn.commit().map_err(StoreError::io)
    }
}

fn check_key(key: &[u8]) -> Result<(), StoreError> {
    WriteBudget::check_key(key)
}

struct WriteTx<'a> {
    table: redb::Table<'a, &'static [u8], &'static [u8]>,
    budget: WriteBudget,
    /// Keys this transaction wrote, for the watchers once it commits.
    written: Vec<Vec<u8>>,
}

type RangeItem<'a> = Result<
    (
        redb::AccessGuard<'a, &'static [u8]>,
        redb::AccessGuard<'a, &'static [u8]>,
    ),
    redb::StorageError,
>;

fn range_of<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    begin: &[u8],
    end: &[u8],
    limit: usize,
    reverse: bool,
) -> Result<Vec<KeyValue>, StoreError> {
    if begin >= end {
        return Ok(Vec::new());
    }
    let iter = table.range::<&[u8]>(begin..end).map_err(StoreError::io)?;
    let limit = if limit == 0 { usize::MAX } else { limit };
    let mut out = Vec::new();
    let mut push = |item: RangeItem<'_>| {
        let (k, v) = item.map_err(StoreError::io)?;
        out.push((k.value().to_vec(), v.value().to_vec()));
        Ok::<_, StoreError>(())
    };
    if reverse {
        for item in iter.rev().take(limit) {
            push(item)?;
        }
    } else {
        for item in iter.take(limit) {
            push(item)?;
        }
    }
    Ok(out)
}

impl Transaction for WriteTx<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(key)?;
        Ok(self.table.get(key).map_err(StoreError::io)?.map(|v| v.value().to_vec()))
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.budget.charge(key, value.len())?;
        self.table.insert(key, value).map_err(StoreError::io)?;
        self.written.push(key.to_vec());
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.budget.charge(key, 0)?;
        self.table.remove(key).map_err(StoreError::io)?;
        self.written.push(key.to_vec());
        Ok(())
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        range_of(&self.table, begin, end, limit, reverse)
    }

    fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), StoreError> {
        let sum = crate::add_to(self.get(key)?.as_deref(), delta);
        self.set(key, &sum)
    }
}

struct ReadTx {
    table: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl Transaction for ReadTx {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(key)?;
        Ok(self.table.get(key).map_err(StoreError::io)?.map(|v| v.value().to_vec()))
    }
    fn set(&mut self, _: &[u8], _: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
    fn clear(&mut self, _: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        range_of(&self.table, begin, end, limit, reverse)
    }
    fn atomic_add(&mut self, _: &[u8], _: i64) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
}

impl Inner {
    fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(StoreError::io)?;
        // Durable stores flush in groups, after the commit (see the type).
        txn.set_durability(redb::Durability::None).map_err(StoreError::io)?;
        let written = {
            let table = txn.open_table(KV).map_err(StoreError::io)?;
            let mut tx = WriteTx {
                table,
                budget: WriteBudget::default(),
                written: Vec::new(),
            };
            if let Err(e) = f(&mut tx) {
                drop(tx);
                txn.abort().map_err(StoreError::io)?;
                return Err(e);
            }
            tx.written
        };
        txn.commit().map_err(StoreError::io)?;
        if self.durable {
            self.group.durable(&self.db)?;
        }
        self.watches.committed(&written);
        Ok(())
    }
}

impl Store for RedbStore {
    fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.inner.run(f)
    }

    fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let txn = self.inner.db.begin_read().map_err(StoreError::io)?;
        let table = txn.open_table(KV).map_err(StoreError::io)?;
        f(&mut ReadTx { table })
    }

    fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: Duration) -> Result<bool, StoreError> {
        check_key(key)?;
        let deadline = Instant::now() + timeout;
        let watches = &self.inner.watches;
        // Registered before the first read, so a commit after that read
        // bumps the count this watcher waits on.
        watches
            .lock()
            .entry(key.to_vec())
            .or_insert(Watched { watchers: 0, writes: 0 })
            .watchers += 1;
        let result = self.wait_for_change(key, seen, deadline);
        let mut keys = watches.lock();
        if let Some(w) = keys.get_mut(key) {
            w.watchers -= 1;
            if w.watchers == 0 {
                keys.remove(key);
            }
        }
        result
    }

    fn backend(&self) -> &'static str {
        "redb"
    }

    fn queues(&self) -> bool {
        true
    }

    fn local_reads(&self) -> bool {
        true
    }

    fn submit(&self, job: Box<dyn Job>) {
        if let Err(refused) = self.writer().queue.send(job) {
            finish(
                refused.0,
                Err(StoreError::Internal("the store's writer thread is not running".into())),
            );
        }
    }
}

impl RedbStore {
    fn current(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(StoreError::io)?;
        let table = txn.open_table(KV).map_err(StoreError::io)?;
        Ok(table.get(key).map_err(StoreError::io)?.map(|v| v.value().to_vec()))
    }

    fn wait_for_change(&self, key: &[u8], seen: Option<&[u8]>, deadline: Instant) -> Result<bool, StoreError> {
        loop {
            let watches = &self.inner.watches;
            let writes = watches.lock().get(key).map_or(0, |w| w.writes);
            if self.current(key)?.as_deref() != seen {
                return Ok(true);
            }
            let mut keys = watches.lock();
            while keys.get(key).map_or(0, |w| w.writes) == writes {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                keys = watches
                    .changed
                    .wait_timeout(keys, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MAX_VALUE_BYTES, StoreExt, keys};

    fn store() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path().join("t.redb")).unwrap();
        (dir, s)
    }

    /// The writer thread runs niced below the threads serving requests.
    #[cfg(target_os = "linux")]
    #[test]
    fn writer_runs_at_lower_priority() {
        let (_dir, s) = store();
        // A submitted job starts the writer thread, here from a thread
        // with a request thread's short slice, which it inherits.
        std::thread::scope(|sc| {
            sc.spawn(|| {
                crate::request_priority();
                submitted(&s, |tx| tx.set(b"k", b"v")).recv().unwrap().unwrap();
            });
        });
        // `file` of every store-writer thread's /proc entry.
        let writer_proc = |file: &str| -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| {
                    let t = t.ok()?.path();
                    let comm = std::fs::read_to_string(t.join("comm")).ok()?;
                    (comm.trim() == "store-writer").then(|| std::fs::read_to_string(t.join(file)).ok())?
                })
                .collect()
        };
        let nice = writer_proc("stat")
            .into_iter()
            // Field 19 of stat is the nice value; fields after the
            // command's closing parenthesis start at 3.
            .filter_map(|stat| stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse::<i32>().ok())
            .collect::<Vec<_>>();
        assert!(!nice.is_empty(), "no store-writer thread found");
        assert!(
            nice.iter().all(|n| *n >= crate::BACKGROUND_NICE),
            "writer nice values: {nice:?}"
        );
        // ... and the default time slice, not the short one it inherited
        // (where the kernel shows slices: EEVDF).
        let slices = writer_proc("sched")
            .into_iter()
            .filter_map(|sched| {
                let line = sched
                    .lines()
                    .find(|l| l.trim_start().starts_with("se.slice"))?
                    .to_string();
                line.split(':').nth(1)?.trim().parse::<u64>().ok()
            })
            .collect::<Vec<_>>();
        assert!(
            slices.iter().all(|s| *s != crate::REQUEST_SLICE_US * 1_000),
            "writer slices: {slices:?}"
        );
    }

    /// A request thread asks for the short slice (where the kernel shows
    /// slices: EEVDF, Linux 6.12 and later).
    #[cfg(target_os = "linux")]
    #[test]
    fn request_threads_ask_for_a_short_slice() {
        let sched = std::thread::spawn(|| {
            crate::request_priority();
            std::fs::read_to_string("/proc/thread-self/sched").unwrap()
        })
        .join()
        .unwrap();
        let Some(line) = sched.lines().find(|l| l.trim_start().starts_with("se.slice")) else {
            eprintln!("this kernel shows no scheduler slices (before EEVDF): nothing to check");
            return;
        };
        let slice = line.split(':').nth(1).and_then(|v| v.trim().parse::<u64>().ok());
        assert_eq!(slice, Some(crate::REQUEST_SLICE_US * 1_000), "{line}");
    }

    #[test]
    fn set_get_range_and_abort() {
        let (_d, s) = store();
        s.transact(|tx| {
            for i in 0..5i64 {
                tx.set(&keys::pack(&("a", i)), &[i as u8])?;
            }
            tx.set(&keys::pack(&("b", 0i64)), b"x")
        })
        .unwrap();
        let (b, e) = keys::tuple_range(&("a",));
        let rows = s.snapshot(|tx| tx.get_range(&b, &e, 0, false)).unwrap();
        assert_eq!(rows.len(), 5);
        let rev = s.snapshot(|tx| tx.get_range(&b, &e, 2, true)).unwrap();
        assert_eq!(rev.iter().map(|r| r.1[0]).collect::<Vec<_>>(), vec![4, 3]);

        // An aborted transaction leaves nothing behind.
        let r: Result<(), StoreError> = s.transact(|tx| {
            tx.set(b"half", b"written")?;
            Err(StoreError::Internal("boom".into()))
        });
        assert!(r.is_err());
        assert_eq!(s.snapshot(|tx| tx.get(b"half")).unwrap(), None);
    }

    #[test]
    fn atomic_add_and_claim_once() {
        let (_d, s) = store();
        for _ in 0..3 {
            s.transact(|tx| tx.atomic_add(b"n", 7)).unwrap();
        }
        let v = s.snapshot(|tx| tx.get(b"n")).unwrap().unwrap();
        assert_eq!(i64::from_le_bytes(v.try_into().unwrap()), 21);
        assert!(s.transact(|tx| tx.claim_once(b"once")).unwrap());
        assert!(!s.transact(|tx| tx.claim_once(b"once")).unwrap());
    }

    #[test]
    fn transactions_waiting_together_share_one_flush() {
        let (_d, s) = store();
        let s = std::sync::Arc::new(s);
        // A flush is running (held here): five transactions commit
        // meanwhile and wait, and the next flush covers all five.
        s.inner.group.lock().syncing = true;
        let writers: Vec<_> = (0..5u8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || s.transact(|tx| tx.set(&[b'k', i], b"v")).unwrap())
            })
            .collect();
        while s.inner.group.lock().taken < 5 {
            std::thread::yield_now();
        }
        {
            let mut g = s.inner.group.lock();
            g.syncing = false;
            g.synced = 0;
        }
        s.inner.group.done.notify_all();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(s.flushes(), 1, "one flush for the five waiting transactions");
        for i in 0..5u8 {
            assert_eq!(s.snapshot(|tx| tx.get(&[b'k', i])).unwrap().as_deref(), Some(&b"v"[..]));
        }
        // Alone, a transaction is flushed by itself before it returns.
        s.transact(|tx| tx.set(b"alone", b"v")).unwrap();
        assert_eq!(s.flushes(), 2);
    }

    /// Submits `f` and waits for its result.
    fn submitted<T: Send + 'static>(
        s: &RedbStore,
        f: impl FnMut(&mut dyn Transaction) -> Result<T, StoreError> + Send + 'static,
    ) -> std::sync::mpsc::Receiver<Result<T, StoreError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        crate::submit_with(s, f, move |r| {
            let _ = tx.send(r);
        });
        rx
    }

    #[test]
    fn queued_jobs_commit_together_and_a_failing_one_leaves_nothing() {
        let (_d, s) = store();
        // The writer's first batch waits on a held flush; everything
        // submitted meanwhile queues up for the second.
        s.inner.group.lock().syncing = true;
        let first = submitted(&s, |tx| tx.set(b"first", b"1"));
        while s.inner.group.lock().taken < 1 {
            std::thread::yield_now();
        }
        let ok: Vec<_> = (0..5u8)
            .map(|i| submitted(&s, move |tx| tx.set(&[b'k', i], b"v")))
            .collect();
        let failing = submitted(&s, |tx| {
            tx.set(b"half", b"written")?;
            Err::<(), _>(StoreError::Internal("refused".into()))
        });
        let panicking = submitted(&s, |tx| -> Result<(), StoreError> {
            tx.set(b"panicked", b"written")?;
            panic!("a bug in a job")
        });
        // Reads see the earlier jobs of the batch, and the job's own writes.
        let reader = submitted(&s, |tx| {
            tx.set(&[b'k', 9], b"mine")?;
            tx.clear(&[b'k', 0])?;
            let rows = tx.get_range(b"k", b"l", 0, false)?;
            Ok(rows.into_iter().map(|(k, _)| k[1]).collect::<Vec<_>>())
        });
        {
            let mut g = s.inner.group.lock();
            g.syncing = false;
            g.synced = 0;
        }
        s.inner.group.done.notify_all();
        first.recv().unwrap().unwrap();
        for r in ok {
            r.recv().unwrap().unwrap();
        }
        assert!(matches!(failing.recv().unwrap(), Err(StoreError::Internal(m)) if m == "refused"));
        assert!(matches!(panicking.recv().unwrap(), Err(StoreError::Internal(m)) if m.contains("panicked")));
        assert_eq!(reader.recv().unwrap().unwrap(), vec![1, 2, 3, 4, 9]);
        assert_eq!(s.flushes(), 2, "the eight queued jobs shared one flush");
        assert_eq!(s.snapshot(|tx| tx.get(b"half")).unwrap(), None);
        assert_eq!(s.snapshot(|tx| tx.get(b"panicked")).unwrap(), None);
        assert_eq!(s.snapshot(|tx| tx.get(&[b'k', 0])).unwrap(), None);
        assert_eq!(
            s.snapshot(|tx| tx.get(&[b'k', 9])).unwrap().as_deref(),
            Some(&b"mine"[..])
        );
        // The writer lives on after the panic.
        submitted(&s, |tx| tx.set(b"after", b"1")).recv().unwrap().unwrap();
    }

    #[test]
    fn a_job_reads_exactly_what_a_plain_transaction_would() {
        // The same random operations, in a queued job and in a plain
        // transaction on a store with the same rows: every read agrees.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (_d1, plain) = store();
        let (_d2, queued) = store();
        for s in [&plain, &queued] {
            s.transact(|tx| {
                for i in 0..40u8 {
                    if i % 3 != 0 {
                        tx.set(&[b'r', i], &[i])?;
                    }
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        }
        for _round in 0..50 {
            let ops: Vec<(u64, u8, u8, usize, bool)> = (0..30)
                .map(|_| {
                    let (a, b) = (next(42) as u8, next(42) as u8);
                    (next(4), a.min(b), a.max(b), next(6) as usize, next(2) == 1)
                })
                .collect();
            let run = move |tx: &mut dyn Transaction| {
                let mut seen = Vec::new();
                for &(op, a, b, limit, reverse) in &ops {
                    match op {
                        0 => tx.set(&[b'r', a], &[b])?,
                        1 => tx.clear(&[b'r', a])?,
                        2 => seen.push(tx.get(&[b'r', a])?.map(|v| vec![(vec![a], v)]).unwrap_or_default()),
                        _ => seen.push(tx.get_range(&[b'r', a], &[b'r', b], limit, reverse)?),
                    }
                }
                Ok::<_, StoreError>(seen)
            };
            let want = plain.transact(run.clone()).unwrap();
            let got = submitted(&queued, run).recv().unwrap().unwrap();
            assert_eq!(got, want);
        }
        let all = |s: &RedbStore| s.snapshot(|tx| tx.get_range(b"r", b"s", 0, false)).unwrap();
        assert_eq!(all(&queued), all(&plain));
    }

    #[test]
    fn dropping_the_store_finishes_queued_jobs_and_closes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let s = RedbStore::open(&path).unwrap();
        let waits: Vec<_> = (0..100u8)
            .map(|i| submitted(&s, move |tx| tx.set(&[b'd', i], b"v")))
            .collect();
        drop(s);
        for w in waits {
            w.recv().unwrap().unwrap();
        }
        // Reopening fails while any handle still holds the file.
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.snapshot(|tx| tx.get_range(b"d", b"e", 0, false)).unwrap().len(), 100);
    }

    #[test]
    fn limits_are_enforced_and_reads_are_read_only() {
        let (_d, s) = store();
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            s.transact(|tx| tx.set(b"k", &big)),
            Err(StoreError::ValueTooLarge(_))
        ));
        assert!(matches!(s.snapshot(|tx| tx.set(b"k", b"v")), Err(StoreError::ReadOnly)));
    }
}
