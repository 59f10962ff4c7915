use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{KeyValue, Store, StoreError, Transaction, WriteBudget};

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
pub struct RedbStore {
    db: Database,
    durable: bool,
    watches: Watches,
    group: GroupCommit,
}

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
        let db = Database::create(path.as_ref()).map_err(StoreError::io)?;
        // Make sure the table exists so read transactions can open it.
        let tx = db.begin_write().map_err(StoreError::io)?;
        tx.open_table(KV).map_err(StoreError::io)?;
        tx.commit().map_err(StoreError::io)?;
        Ok(Self {
            db,
            durable: true,
            watches: Watches::default(),
            group: GroupCommit::default(),
        })
    }

    /// How many fsyncs (durable commits) group commit has run: fewer than
    /// the transactions committed when they arrive together.
    pub fn flushes(&self) -> u64 {
        self.group.lock().flushes
    }

    /// A store whose commits are not flushed to disk: a crash loses recent
    /// commits. Only for tests and benchmarks that measure something else.
    pub fn open_volatile(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let mut s = Self::open(path)?;
        s.durable = false;
        Ok(s)
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
        let current = match self.get(key)? {
            None => 0,
            Some(v) => {
                let mut buf = [0u8; 8];
                let n = v.len().min(8);
                buf[..n].copy_from_slice(&v[..n]);
                i64::from_le_bytes(buf)
            }
        };
        self.set(key, &current.wrapping_add(delta).to_le_bytes())
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

impl Store for RedbStore {
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

    fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::io)?;
        let table = txn.open_table(KV).map_err(StoreError::io)?;
        f(&mut ReadTx { table })
    }

    fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: Duration) -> Result<bool, StoreError> {
        check_key(key)?;
        let deadline = Instant::now() + timeout;
        // Registered before the first read, so a commit after that read
        // bumps the count this watcher waits on.
        self.watches
            .lock()
            .entry(key.to_vec())
            .or_insert(Watched { watchers: 0, writes: 0 })
            .watchers += 1;
        let result = self.wait_for_change(key, seen, deadline);
        let mut keys = self.watches.lock();
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
}

impl RedbStore {
    fn current(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::io)?;
        let table = txn.open_table(KV).map_err(StoreError::io)?;
        Ok(table.get(key).map_err(StoreError::io)?.map(|v| v.value().to_vec()))
    }

    fn wait_for_change(&self, key: &[u8], seen: Option<&[u8]>, deadline: Instant) -> Result<bool, StoreError> {
        loop {
            let writes = self.watches.lock().get(key).map_or(0, |w| w.writes);
            if self.current(key)?.as_deref() != seen {
                return Ok(true);
            }
            let mut keys = self.watches.lock();
            while keys.get(key).map_or(0, |w| w.writes) == writes {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                keys = self
                    .watches
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
        s.group.lock().syncing = true;
        let writers: Vec<_> = (0..5u8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || s.transact(|tx| tx.set(&[b'k', i], b"v")).unwrap())
            })
            .collect();
        while s.group.lock().taken < 5 {
            std::thread::yield_now();
        }
        {
            let mut g = s.group.lock();
            g.syncing = false;
            g.synced = 0;
        }
        s.group.done.notify_all();
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
