//! The shared store: one redb file served to several nodes over mutual TLS
//! (`laddnet store serve`), and [`SharedStoreClient`], the [`Store`] a node
//! uses to reach it (`[store] backend = "shared"`).
//!
//! It exists so a cluster can run, and be tested, where FoundationDB
//! cannot: on one machine, in CI, on a laptop. It is not replicated; its
//! host is a single point of failure. Production clusters use FoundationDB
//! (`backend = "foundationdb"`), which has the same transaction semantics.
//!
//! Transactions are optimistic, like FoundationDB's:
//! - reads go to the server one at a time; each answers with the commit
//!   version it reflects, and the client remembers the key or range and
//!   that version. Writes are buffered in the client (reads see them:
//!   read-your-writes);
//! - commit sends the reads and the writes together. The server's single
//!   writer keeps, for the last [`CONFLICT_WINDOW`], which version last
//!   wrote each key; a commit any of whose reads was overtaken by a later
//!   write (or is older than the window) is a conflict, and the client runs
//!   the closure again (at most [`RETRY_LIMIT`] times). Checking costs no
//!   disk read, so commits stay cheap however much a transaction read;
//! - a commit whose answer is lost (connection dropped) may or may not have
//!   happened: the closure runs again, and writes that must happen once
//!   carry an idempotency key (`claim_once`), as on FoundationDB;
//! - a read-only transaction with more than one read is validated the same
//!   way, so it always sees one consistent state;
//! - commits that arrive together are applied in one redb transaction with
//!   one fsync (group commit); versions become visible to reads only once
//!   that transaction is durable.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use laddnet_proto::v1;
use laddnet_proto::v1::store_service_client::StoreServiceClient;
use laddnet_store::{KeyValue, MAX_VALUE_BYTES, Store, StoreError, StoreExt, Transaction, add_to};
use tonic::transport::Channel;

/// Runs of one transaction's closure before giving up.
pub const RETRY_LIMIT: u32 = 100;
/// How long one call to the store server may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest the server holds one watch call.
const MAX_WATCH: Duration = Duration::from_secs(60);
/// Watch calls the server holds at once (each holds a blocking thread).
const MAX_WATCHERS: usize = 256;
/// How long a transaction keeps retrying an unreachable server.
const UNREACHABLE_FOR: Duration = Duration::from_secs(15);

/// How long the server remembers which keys commits wrote. A transaction
/// that read before that is refused as a conflict and runs again
/// (FoundationDB's limit is 5 s).
pub const CONFLICT_WINDOW: Duration = Duration::from_secs(10);

/// A write buffered in the client until commit.
#[derive(Debug, Clone)]
enum Pending {
    Set(Vec<u8>),
    Clear,
    /// An atomic add on a value the transaction has not read.
    Add(i64),
}

/// A node's connection to `laddnet store serve`.
pub struct SharedStoreClient {
    /// The client's own runtime: the trait is synchronous and may be called
    /// from any thread, including the node's async workers.
    rt: Option<tokio::runtime::Runtime>,
    client: StoreServiceClient<Channel>,
}

impl Drop for SharedStoreClient {
    fn drop(&mut self) {
        // May be dropped on an async thread, where a blocking shutdown panics.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl SharedStoreClient {
    /// Connects to `endpoint` (`https://host:port`), verifying the server
    /// as `server_name` against `root_pem` and presenting the node's store
    /// credentials.
    pub fn connect(
        endpoint: &str,
        server_name: &str,
        root_pem: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-client")
            .enable_all()
            .build()?;
        let tls = laddnet_pki::tls::client_config(root_pem, Some((chain_pem, key_pem)))?;
        let (endpoint, server_name) = (endpoint.to_string(), server_name.to_string());
        // Not rt.block_on: the caller may itself be on a runtime thread.
        let connecting = rt.spawn(async move { laddnet_client::connect(&endpoint, &server_name, tls).await });
        let channel = futures::executor::block_on(connecting)??;
        let client = StoreServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        Ok(Self { rt: Some(rt), client })
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(StoreServiceClient<Channel>) -> futures::future::BoxFuture<'static, Result<T, tonic::Status>>,
    ) -> Result<T, CallError> {
        self.call_within(CALL_TIMEOUT, f)
    }

    fn call_within<T: Send + 'static>(
        &self,
        within: Duration,
        f: impl FnOnce(StoreServiceClient<Channel>) -> futures::future::BoxFuture<'static, Result<T, tonic::Status>>,
    ) -> Result<T, CallError> {
        let fut = f(self.client.clone());
        let Some(rt) = self.rt.as_ref() else {
            return Err(CallError::Unreachable("the store client is shutting down".into()));
        };
        let handle = rt.spawn(async move { tokio::time::timeout(within, fut).await });
        match futures::executor::block_on(handle) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(status)))
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) =>
            {
                Err(CallError::Refused(status.message().to_string()))
            }
            Ok(Ok(Err(status))) => Err(CallError::Unreachable(format!(
                "{}: {}",
                status.code(),
                status.message()
            ))),
            Ok(Err(_)) => Err(CallError::Unreachable(format!(
                "store server did not answer within {} s",
                within.as_secs()
            ))),
            Err(e) => Err(CallError::Unreachable(e.to_string())),
        }
    }

    fn read_op(&self, op: v1::store_read::Op) -> Result<v1::StoreReadReply, CallError> {
        self.call(move |mut c| {
            Box::pin(async move { c.read(v1::StoreRead { op: Some(op) }).await.map(|r| r.into_inner()) })
        })
    }

    fn attempt(
        &self,
        read_only: bool,
        f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut runs = 0u32;
        loop {
            runs += 1;
            let mut tx = ClientTx {
                store: self,
                writes: BTreeMap::new(),
                checks: Vec::new(),
                failed: None,
                budget: Default::default(),
                read_only,
            };
            let result = f(&mut tx);
            let outcome = match tx.failed.take() {
                Some(e) => Err(e),
                None => {
                    result?;
                    tx.commit()
                }
            };
            let why = match outcome {
                Ok(true) => return Ok(()),
                Ok(false) => "conflict".to_string(),
                Err(CallError::Refused(m)) => return Err(StoreError::Internal(format!("store server refused: {m}"))),
                Err(CallError::Unreachable(m)) => {
                    // Not "conflicted": a refused or lost connection is
                    // reported as what it is.
                    if started.elapsed() > UNREACHABLE_FOR || runs >= RETRY_LIMIT {
                        return Err(StoreError::Io(format!("shared store unreachable: {m}")));
                    }
                    m
                }
            };
            if runs >= RETRY_LIMIT {
                return Err(StoreError::TooManyRetries(runs));
            }
            tracing::debug!(attempt = runs, reason = %why, "shared-store transaction retried");
            // Back off a little, more each time, with jitter.
            let ms = (1u64 << runs.min(7)).min(100) + rand::random::<u64>() % 5;
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

enum CallError {
    /// The server refused the request itself (a bug, not a conflict).
    Refused(String),
    /// No answer: the server is down or the network dropped it.
    Unreachable(String),
}

struct ClientTx<'a> {
    store: &'a SharedStoreClient,
    writes: BTreeMap<Vec<u8>, Pending>,
    checks: Vec<v1::StoreCheck>,
    failed: Option<CallError>,
    budget: laddnet_store::WriteBudget,
    read_only: bool,
}

impl ClientTx<'_> {
    fn note<T>(&mut self, r: Result<T, CallError>) -> Result<T, StoreError> {
        r.map_err(|e| {
            let msg = match &e {
                CallError::Refused(m) | CallError::Unreachable(m) => m.clone(),
            };
            if self.failed.is_none() {
                self.failed = Some(e);
            }
            StoreError::Io(format!("shared store: {msg}"))
        })
    }

    fn server_get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let op = v1::store_read::Op::Get(key.to_vec());
        let r = self.store.read_op(op.clone());
        let reply = self.note(r)?;
        self.checks.push(v1::StoreCheck {
            read: Some(v1::StoreRead { op: Some(op) }),
            version: reply.version,
        });
        Ok(if reply.found {
            Some(reply.rows.into_iter().next().map(|r| r.value).unwrap_or_default())
        } else {
            None
        })
    }

    fn server_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        let op = v1::store_read::Op::Range(v1::StoreRange {
            begin: begin.to_vec(),
            end: end.to_vec(),
            limit,
            reverse,
        });
        let r = self.store.read_op(op);
        let reply = self.note(r)?;
        let rows: Vec<KeyValue> = reply.rows.into_iter().map(|r| (r.key, r.value)).collect();
        // A read that stopped at its limit saw only part of the range: only
        // writes to that part can make it stale.
        let (mut b, mut e) = (begin.to_vec(), end.to_vec());
        if limit > 0
            && rows.len() >= limit as usize
            && let Some((last, _)) = rows.last()
        {
            if reverse {
                b = last.clone();
            } else if last.len() < laddnet_store::MAX_KEY_BYTES {
                e = last.iter().copied().chain([0u8]).collect();
            }
        }
        self.checks.push(v1::StoreCheck {
            read: Some(v1::StoreRead {
                op: Some(v1::store_read::Op::Range(v1::StoreRange {
                    begin: b,
                    end: e,
                    limit: 0,
                    reverse: false,
                })),
            }),
            version: reply.version,
        });
        Ok(rows)
    }

    fn charge(&mut self, key: &[u8], value_len: usize) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        self.budget.charge(key, value_len)
    }

    /// Ok(true): committed; Ok(false): conflict.
    fn commit(self) -> Result<bool, CallError> {
        if self.writes.is_empty() && self.checks.len() <= 1 {
            // Nothing to write and at most one read: trivially consistent.
            return Ok(true);
        }
        let mutations = self
            .writes
            .into_iter()
            .map(|(key, p)| v1::StoreMutation {
                op: Some(match p {
                    Pending::Set(value) => v1::store_mutation::Op::Set(v1::StoreRow { key, value }),
                    Pending::Clear => v1::store_mutation::Op::Clear(key),
                    Pending::Add(d) => v1::store_mutation::Op::Add(v1::StoreRow {
                        key,
                        value: d.to_le_bytes().to_vec(),
                    }),
                }),
            })
            .collect();
        let req = v1::StoreCommit {
            checks: self.checks,
            mutations,
        };
        self.store
            .call(move |mut c| Box::pin(async move { c.commit(req).await.map(|r| r.into_inner().committed) }))
    }
}

impl Transaction for ClientTx<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        laddnet_store::check_key(key)?;
        match self.writes.get(key).cloned() {
            Some(Pending::Set(v)) => Ok(Some(v)),
            Some(Pending::Clear) => Ok(None),
            Some(Pending::Add(d)) => {
                let base = self.server_get(key)?;
                let v = add_to(base.as_deref(), d);
                // Now read: the add becomes a plain write of the sum.
                self.writes.insert(key.to_vec(), Pending::Set(v.clone()));
                Ok(Some(v))
            }
            None => self.server_get(key),
        }
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.charge(key, value.len())?;
        self.writes.insert(key.to_vec(), Pending::Set(value.to_vec()));
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.charge(key, 0)?;
        self.writes.insert(key.to_vec(), Pending::Clear);
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
        let touched: Vec<(Vec<u8>, Pending)> = self
            .writes
            .range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end)))
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        if touched.is_empty() {
            return self.server_range(begin, end, limit, reverse);
        }
        // Our own writes fall in the range: read all of it and lay them over.
        let stored = self.server_range(begin, end, 0, false)?;
        let mine: Vec<(Vec<u8>, Option<Vec<u8>>)> = touched
            .into_iter()
            .map(|(k, p)| {
                let v = match p {
                    Pending::Set(v) => Some(v),
                    Pending::Clear => None,
                    Pending::Add(d) => {
                        let base = stored
                            .binary_search_by(|(s, _)| s.as_slice().cmp(&k))
                            .ok()
                            .map(|i| stored[i].1.as_slice());
                        Some(add_to(base, d))
                    }
                };
                (k, v)
            })
            .collect();
        Ok(laddnet_store::overlay_rows(stored, mine, limit, reverse))
    }

    fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), StoreError> {
        self.charge(key, 8)?;
        let next = match self.writes.get(key) {
            Some(Pending::Set(v)) => Pending::Set(add_to(Some(v), delta)),
            Some(Pending::Clear) => Pending::Set(add_to(None, delta)),
            Some(Pending::Add(d)) => Pending::Add(d.wrapping_add(delta)),
            None => Pending::Add(delta),
        };
        self.writes.insert(key.to_vec(), next);
        Ok(())
    }
}

impl Store for SharedStoreClient {
    fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.attempt(false, f)
    }

    fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.attempt(true, f)
    }

    fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: Duration) -> Result<bool, StoreError> {
        laddnet_store::check_key(key)?;
        let deadline = Instant::now() + timeout;
        loop {
            // The server holds a watch at most MAX_WATCH; longer ones are
            // several calls.
            let left = deadline.saturating_duration_since(Instant::now()).min(MAX_WATCH);
            let req = v1::StoreWatch {
                key: key.to_vec(),
                present: seen.is_some(),
                seen: seen.unwrap_or_default().to_vec(),
                timeout_ms: u32::try_from(left.as_millis()).unwrap_or(u32::MAX),
            };
            let reply = self
                .call_within(left + CALL_TIMEOUT, move |mut c| {
                    Box::pin(async move { c.watch(req).await.map(|r| r.into_inner()) })
                })
                .map_err(|e| match e {
                    CallError::Refused(m) => StoreError::Internal(format!("store server refused a watch: {m}")),
                    CallError::Unreachable(m) => StoreError::Io(format!("store server unreachable: {m}")),
                })?;
            if reply.changed {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    fn backend(&self) -> &'static str {
        "shared"
    }
}

// ---------------------------------------------------------------- server

/// One commit waiting for the group-commit writer.
struct Job {
    req: v1::StoreCommit,
    reply: tokio::sync::oneshot::Sender<Result<bool, String>>,
}

/// Which keys recent commits wrote, and at which version: what the commit
/// check compares reads against. (Public for the fuzz target.)
pub struct ConflictWindow {
    /// The last version that wrote each key, for writes within the window.
    written: BTreeMap<Vec<u8>, u64>,
    /// The commits in the window, oldest first: (version, when, keys).
    log: VecDeque<(u64, Instant, Vec<Vec<u8>>)>,
    /// Reads at versions below this may have missed a write that is no
    /// longer remembered: they conflict.
    floor: u64,
    /// The last version handed out.
    last: u64,
}

impl ConflictWindow {
    pub fn new(start: u64) -> Self {
        Self {
            written: BTreeMap::new(),
            log: VecDeque::new(),
            floor: start,
            last: start,
        }
    }

    /// Whether any of `checks` was overtaken by a later write.
    pub fn conflicts(&self, checks: &[v1::StoreCheck]) -> bool {
        checks.iter().any(|c| {
            if c.version < self.floor {
                return true;
            }
            match c.read.as_ref().and_then(|r| r.op.as_ref()) {
                Some(v1::store_read::Op::Get(k)) => self.written.get(k).is_some_and(|&w| w > c.version),
                Some(v1::store_read::Op::Range(r)) if r.begin < r.end => self
                    .written
                    .range::<[u8], _>((Bound::Included(&r.begin[..]), Bound::Excluded(&r.end[..])))
                    .any(|(_, &w)| w > c.version),
                Some(v1::store_read::Op::Range(_)) => false,
                None => true,
            }
        })
    }

    /// Records a commit that writes `keys`; returns its version.
    pub fn record(&mut self, keys: Vec<Vec<u8>>, now: Instant) -> u64 {
        self.last += 1;
        for k in &keys {
            self.written.insert(k.clone(), self.last);
        }
        self.log.push_back((self.last, now, keys));
        self.last
    }

    /// Forgets commits older than the window.
    pub fn prune(&mut self, now: Instant) {
        while self
            .log
            .front()
            .is_some_and(|(_, at, _)| now.duration_since(*at) >= CONFLICT_WINDOW)
        {
            let Some((v, _, keys)) = self.log.pop_front() else {
                break;
            };
            for k in keys {
                if self.written.get(&k) == Some(&v) {
                    self.written.remove(&k);
                }
            }
            self.floor = v;
        }
    }
}

/// Load counters, logged by the server now and then.
#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    commits: AtomicU64,
    conflicts: AtomicU64,
}

/// `StoreService` over a local store: reads from snapshots, commits through
/// one writer thread that applies what arrived together in one transaction.
pub struct StoreServer {
    store: Arc<dyn Store>,
    jobs: std::sync::mpsc::Sender<Job>,
    window: Arc<std::sync::Mutex<ConflictWindow>>,
    /// The last version whose writes are durable and visible to reads.
    published: Arc<AtomicU64>,
    counters: Arc<Counters>,
    watchers: Arc<tokio::sync::Semaphore>,
}

impl StoreServer {
    pub fn new(store: Arc<dyn Store>) -> std::io::Result<Self> {
        // Versions start above any an earlier run of the server handed out
        // (one per commit, far fewer than one per nanosecond), so a
        // transaction that read from an earlier run conflicts.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
            .unwrap_or(0);
        let window = Arc::new(std::sync::Mutex::new(ConflictWindow::new(start)));
        let published = Arc::new(AtomicU64::new(start));
        let counters = Arc::new(Counters::default());
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let writer = Writer {
            store: store.clone(),
            window: window.clone(),
            published: published.clone(),
            counters: counters.clone(),
        };
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            store,
            jobs,
            window,
            published,
            counters,
            watchers: Arc::new(tokio::sync::Semaphore::new(MAX_WATCHERS)),
        })
    }

    /// Logs the load since the last call (reads, commits, conflicts).
    fn log_load(&self, every: Duration) {
        let c = &self.counters;
        let (r, w, x) = (
            c.reads.swap(0, Ordering::Relaxed),
            c.commits.swap(0, Ordering::Relaxed),
            c.conflicts.swap(0, Ordering::Relaxed),
        );
        if r + w > 0 {
            tracing::info!(
                reads = r,
                commits = w,
                conflicts = x,
                seconds = every.as_secs(),
                "store load"
            );
        }
    }
}

fn lock(m: &std::sync::Mutex<ConflictWindow>) -> std::sync::MutexGuard<'_, ConflictWindow> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a read answers.
fn answer(tx: &mut dyn Transaction, op: &v1::store_read::Op) -> Result<v1::StoreReadReply, StoreError> {
    Ok(match op {
        v1::store_read::Op::Get(key) => {
            let v = tx.get(key)?;
            v1::StoreReadReply {
                found: v.is_some(),
                rows: v
                    .map(|value| v1::StoreRow {
                        key: key.clone(),
                        value,
                    })
                    .into_iter()
                    .collect(),
                version: 0,
            }
        }
        v1::store_read::Op::Range(r) => {
            let rows = tx.get_range(&r.begin, &r.end, r.limit as usize, r.reverse)?;
            v1::StoreReadReply {
                found: !rows.is_empty(),
                rows: rows
                    .into_iter()
                    .map(|(key, value)| v1::StoreRow { key, value })
                    .collect(),
                version: 0,
            }
        }
    })
}

/// Applies one accepted commit's mutations inside the writer's transaction.
fn apply_one(tx: &mut dyn Transaction, req: &v1::StoreCommit) -> Result<(), StoreError> {
    for m in &req.mutations {
        match &m.op {
            Some(v1::store_mutation::Op::Set(r)) => tx.set(&r.key, &r.value)?,
            Some(v1::store_mutation::Op::Clear(k)) => tx.clear(k)?,
            Some(v1::store_mutation::Op::Add(r)) => {
                let d: [u8; 8] = r
                    .value
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Internal("an add needs an 8-byte delta".into()))?;
                tx.atomic_add(&r.key, i64::from_le_bytes(d))?;
            }
            None => return Err(StoreError::Internal("a mutation without an operation".into())),
        }
    }
    Ok(())
}

pub fn mutation_key(m: &v1::StoreMutation) -> Option<&Vec<u8>> {
    match &m.op {
        Some(v1::store_mutation::Op::Set(r)) | Some(v1::store_mutation::Op::Add(r)) => Some(&r.key),
        Some(v1::store_mutation::Op::Clear(k)) => Some(k),
        None => None,
    }
}

/// Checks a commit's shape before it reaches the writer, so a malformed
/// one is refused alone instead of failing the group it arrives with.
pub fn well_formed(req: &v1::StoreCommit) -> Result<(), String> {
    let mut bytes = 0usize;
    for c in &req.checks {
        match c.read.as_ref().and_then(|r| r.op.as_ref()) {
            None => return Err("a check without a read".into()),
            Some(v1::store_read::Op::Get(k)) => laddnet_store::check_key(k).map_err(|e| e.to_string())?,
            Some(v1::store_read::Op::Range(r)) => {
                laddnet_store::check_key(&r.begin).map_err(|e| e.to_string())?;
                laddnet_store::check_key(&r.end).map_err(|e| e.to_string())?;
            }
        }
    }
    for m in &req.mutations {
        let (k, vlen) = match &m.op {
            Some(v1::store_mutation::Op::Set(r)) => (&r.key, r.value.len()),
            Some(v1::store_mutation::Op::Clear(k)) => (k, 0),
            Some(v1::store_mutation::Op::Add(r)) if r.value.len() == 8 => (&r.key, 8),
            Some(v1::store_mutation::Op::Add(_)) => return Err("an add needs an 8-byte delta".into()),
            None => return Err("a mutation without an operation".into()),
        };
        laddnet_store::check_key(k).map_err(|e| e.to_string())?;
        if vlen > MAX_VALUE_BYTES {
            return Err(StoreError::ValueTooLarge(vlen).to_string());
        }
        bytes += k.len() + vlen;
    }
    if bytes > laddnet_store::MAX_TRANSACTION_BYTES {
        return Err(StoreError::TransactionTooLarge(bytes).to_string());
    }
    Ok(())
}

/// The single writer: checks each commit against the conflict window and
/// applies the accepted ones of a group in one store transaction.
struct Writer {
    store: Arc<dyn Store>,
    window: Arc<std::sync::Mutex<ConflictWindow>>,
    published: Arc<AtomicU64>,
    counters: Arc<Counters>,
}

impl Writer {
    fn run(self, rx: std::sync::mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < 256 {
                match rx.try_recv() {
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            // Decide in arrival order, each commit against the ones before.
            let now = Instant::now();
            let (verdicts, last) = {
                let mut w = lock(&self.window);
                w.prune(now);
                let verdicts: Vec<bool> = group
                    .iter()
                    .map(|job| {
                        if w.conflicts(&job.req.checks) {
                            return false;
                        }
                        let keys = job.req.mutations.iter().filter_map(mutation_key).cloned().collect();
                        w.record(keys, now);
                        true
                    })
                    .collect();
                (verdicts, w.last)
            };
            let accepted = verdicts.iter().filter(|v| **v).count() as u64;
            self.counters.commits.fetch_add(accepted, Ordering::Relaxed);
            self.counters
                .conflicts
                .fetch_add(group.len() as u64 - accepted, Ordering::Relaxed);
            let r = if accepted == 0 {
                Ok(())
            } else {
                self.store.transact(|tx| {
                    for (job, ok) in group.iter().zip(&verdicts) {
                        if *ok {
                            apply_one(tx, &job.req)?;
                        }
                    }
                    Ok::<_, StoreError>(())
                })
            };
            // Published even when the transaction failed: its versions
            // then wrote nothing, and reads at them are right.
            self.published.store(last, Ordering::Release);
            match r {
                Ok(()) => {
                    for (job, ok) in group.into_iter().zip(verdicts) {
                        let _ = job.reply.send(Ok(ok));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, commits = group.len(), "store commit failed");
                    for job in group {
                        let _ = job.reply.send(Err(e.to_string()));
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl v1::store_service_server::StoreService for StoreServer {
    async fn read(
        &self,
        req: tonic::Request<v1::StoreRead>,
    ) -> Result<tonic::Response<v1::StoreReadReply>, tonic::Status> {
        require_node(&req)?;
        let op = req
            .into_inner()
            .op
            .ok_or_else(|| tonic::Status::invalid_argument("a read needs get or range"))?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        // The version first: the snapshot then holds at least its writes.
        let version = self.published.load(Ordering::Acquire);
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || store.snapshot(|tx| answer(tx, &op)))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        match r {
            Ok(mut reply) => {
                reply.version = version;
                Ok(tonic::Response::new(reply))
            }
            Err(e @ StoreError::KeyTooLarge(_)) => Err(tonic::Status::invalid_argument(e.to_string())),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    }

    async fn commit(
        &self,
        req: tonic::Request<v1::StoreCommit>,
    ) -> Result<tonic::Response<v1::StoreCommitReply>, tonic::Status> {
        require_node(&req)?;
        let req = req.into_inner();
        well_formed(&req).map_err(tonic::Status::invalid_argument)?;
        if req.mutations.is_empty() {
            // Validation of a read-only transaction: no writer needed.
            let conflict = {
                let mut w = lock(&self.window);
                w.prune(Instant::now());
                w.conflicts(&req.checks)
            };
            if conflict {
                self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(tonic::Response::new(v1::StoreCommitReply { committed: !conflict }));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job { req, reply: tx })
            .map_err(|_| tonic::Status::unavailable("the store writer stopped"))?;
        match rx.await {
            Ok(Ok(committed)) => Ok(tonic::Response::new(v1::StoreCommitReply { committed })),
            Ok(Err(e)) => Err(tonic::Status::unavailable(e)),
            Err(_) => Err(tonic::Status::unavailable("the store writer stopped")),
        }
    }

    async fn watch(
        &self,
        req: tonic::Request<v1::StoreWatch>,
    ) -> Result<tonic::Response<v1::StoreWatchReply>, tonic::Status> {
        require_node(&req)?;
        let req = req.into_inner();
        laddnet_store::check_key(&req.key).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if req.seen.len() > MAX_VALUE_BYTES {
            return Err(tonic::Status::invalid_argument(format!(
                "a watched value is at most {MAX_VALUE_BYTES} bytes"
            )));
        }
        if !req.present && !req.seen.is_empty() {
            return Err(tonic::Status::invalid_argument("an absent key has no value"));
        }
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(format!("the store holds {MAX_WATCHERS} watches already; poll instead"))
        })?;
        let timeout = Duration::from_millis(u64::from(req.timeout_ms)).min(MAX_WATCH);
        let store = self.store.clone();
        let changed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let seen = req.present.then_some(req.seen.as_slice());
            store.watch(&req.key, seen, timeout)
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(tonic::Response::new(v1::StoreWatchReply { changed }))
    }
}

/// Only nodes of the cluster may use the store.
fn require_node<T>(req: &tonic::Request<T>) -> Result<(), tonic::Status> {
    let info = req
        .extensions()
        .get::<crate::transport::PeerInfo>()
        .ok_or_else(|| tonic::Status::unauthenticated("no connection info"))?;
    match info.identity.as_deref().map(|i| &i.principal) {
        Some(crate::identity::Principal::Node { .. }) => Ok(()),
        _ => Err(tonic::Status::permission_denied(
            "only nodes of this cluster may use the store",
        )),
    }
}

/// A running `laddnet store serve`.
pub struct StoreServing {
    pub addr: std::net::SocketAddr,
    /// Where each client's credentials were written: (name, cert, key).
    pub clients: Vec<(String, std::path::PathBuf, std::path::PathBuf)>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Serves the store of `config`'s data dir (its embedded redb file) to the
/// nodes of a cluster on `listen`, until `shutdown`.
///
/// - The server's own certificate is minted by the CA of the data dir at
///   every start (its key only in memory), like a node's.
/// - For each name in `clients` without credentials yet, a node
///   certificate is issued and written to `<data_dir>/store-clients/`
///   (`NAME.crt`, `NAME.key` mode 0600): copy them to that node and point
///   its `store.cert` / `store.key` at them.
/// - Only node certificates of this CA, recorded and not revoked, may
///   connect; a revocation ends the revoked node's connections as soon as
///   it commits (the server watches the CRL).
pub async fn serve(
    config: crate::NodeConfig,
    listen: std::net::SocketAddr,
    clients: Vec<String>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<StoreServing> {
    use anyhow::Context;
    if config.store.backend != crate::config::StoreBackend::Embedded {
        anyhow::bail!("the store server serves its own data dir's embedded store: set store.backend = \"embedded\"");
    }
    for c in &clients {
        laddnet_core::ChargerId::new(c.clone())
            .map_err(|_| anyhow::anyhow!("client name {c:?} must be 1 to 48 characters of A-Z a-z 0-9 . _ -"))?;
    }
    let store = crate::node::open_store(&config)?;
    let files = laddnet_pki::CaFiles::new(config.ca_dir());
    if !files.exists() {
        anyhow::bail!("no CA in {}: run `laddnet init` first", files.dir.display());
    }
    let policy = crate::node::load_policy(&config)?;
    let source = crate::node::key_source(&config);
    let out_dir = config.data_dir.join("store-clients");
    let (ca, server_cert, server_key, written) = {
        let (config, store, out_dir) = (config.clone(), store.clone(), out_dir.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let ca = laddnet_pki::Ca::open(&files, policy, &source, store, laddnet_pki::system_clock())
                .context("opening the CA")?;
            let subject = laddnet_pki::Subject::Node {
                name: format!("{}-store", config.node.name),
                sans: config.tls.server_names.clone(),
            };
            let (issued, key) = ca
                .issue_with_new_key(&subject, "system")
                .context("issuing the store server's certificate")?;
            std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
            let mut written = Vec::new();
            for name in clients {
                let (crt, keyf) = (out_dir.join(format!("{name}.crt")), out_dir.join(format!("{name}.key")));
                if !(crt.exists() && keyf.exists()) {
                    let subject = laddnet_pki::Subject::Node {
                        name: name.clone(),
                        sans: vec!["localhost".into()],
                    };
                    let (c, k) = ca
                        .issue_with_new_key(&subject, "system")
                        .with_context(|| format!("issuing store credentials for {name}"))?;
                    crate::bootstrap::write_private(&keyf, k.as_bytes())?;
                    std::fs::write(&crt, c.chain_pem.as_bytes())
                        .with_context(|| format!("writing {}", crt.display()))?;
                }
                written.push((name, crt, keyf));
            }
            Ok((Arc::new(ca), issued, key, written))
        })
        .await??
    };
    let chain = laddnet_pki::tls::certs_from_pem(&server_cert.chain_pem)?;
    let key = laddnet_pki::tls::key_from_pem(&server_key)?;
    let (crl, revoked) = {
        let ca = ca.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let crl = ca.crl_record()?.context("the CA has no CRL")?;
            Ok((crl, ca.revoked_serials()?))
        })
        .await??
    };
    let tls = laddnet_pki::tls::mtls_server_config(
        ca.root_pem(),
        laddnet_pki::tls::crl_from_pem(&crl.pem)?,
        chain,
        key,
        None,
    )?;
    let revoked = Arc::new(std::sync::RwLock::new(
        revoked.into_iter().collect::<std::collections::HashSet<_>>(),
    ));
    let registry = Arc::new(crate::transport::ConnRegistry::default());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the store listener on {listen}"))?;
    let addr = listener.local_addr()?;
    let incoming = crate::transport::accept_loop(
        listener,
        crate::transport::AcceptorSettings {
            tls: Arc::new(std::sync::RwLock::new(tls)),
            handshake_timeout: config.handshake_timeout(),
            max_pending: config.tls.max_pending_handshakes,
            identity_check: Some(Arc::new(crate::identity::CaIdentityCheck::new(
                ca.clone(),
                revoked.clone(),
            ))),
            registry: registry.clone(),
        },
        shutdown.clone(),
    );
    let watched = store.clone();
    let server = Arc::new(StoreServer::new(store)?);
    {
        let (server, stop) = (server.clone(), shutdown.clone());
        const EVERY: Duration = Duration::from_secs(30);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(EVERY) => server.log_load(EVERY),
                }
            }
        });
    }
    let service = v1::store_service_server::StoreServiceServer::from_arc(server)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        // Revocations (made by any node, through this store) end the
        // revoked node's connections as soon as they commit: every one
        // rewrites the CRL, which this server watches; a re-read every
        // minute is the safety net.
        let changed = Arc::new(tokio::sync::Notify::new());
        if let Err(e) = crate::follow::follow_key(watched, laddnet_pki::crl_key(), "crl", changed.clone(), stop.clone())
        {
            tracing::error!(error = %e, "cannot start the CRL watch; revocations apply within a minute");
        }
        let poll = tokio::spawn({
            let (ca, revoked, registry, stop) = (ca.clone(), revoked.clone(), registry.clone(), stop.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = changed.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                    let ca = ca.clone();
                    let Ok(Ok(serials)) = tokio::task::spawn_blocking(move || ca.revoked_serials()).await else {
                        continue;
                    };
                    let fresh: Vec<String> = {
                        let mut set = revoked.write().unwrap_or_else(|p| p.into_inner());
                        serials.into_iter().filter(|s| set.insert(s.clone())).collect()
                    };
                    for s in fresh {
                        registry.close_serial(&s);
                    }
                }
            }
        });
        let r = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                stop.cancelled_owned(),
            )
            .await;
        poll.abort();
        if let Err(e) = r {
            tracing::error!(error = %e, "store server stopped");
        }
    });
    tracing::info!(addr = %addr, "store serving");
    Ok(StoreServing {
        addr,
        clients: written,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(key: &[u8], version: u64) -> v1::StoreCheck {
        v1::StoreCheck {
            read: Some(v1::StoreRead {
                op: Some(v1::store_read::Op::Get(key.to_vec())),
            }),
            version,
        }
    }

    fn range(begin: &[u8], end: &[u8], version: u64) -> v1::StoreCheck {
        v1::StoreCheck {
            read: Some(v1::StoreRead {
                op: Some(v1::store_read::Op::Range(v1::StoreRange {
                    begin: begin.to_vec(),
                    end: end.to_vec(),
                    limit: 0,
                    reverse: false,
                })),
            }),
            version,
        }
    }

    #[test]
    fn a_read_overtaken_by_a_later_write_conflicts_and_others_do_not() {
        let now = Instant::now();
        let mut w = ConflictWindow::new(100);
        let v = w.record(vec![b"a".to_vec(), b"m".to_vec()], now);
        assert_eq!(v, 101);
        // Read before the write: stale.
        assert!(w.conflicts(&[get(b"a", 100)]));
        assert!(w.conflicts(&[range(b"k", b"n", 100)]));
        // Read at or after it: current.
        assert!(!w.conflicts(&[get(b"a", 101)]));
        assert!(!w.conflicts(&[range(b"a", b"z", 101)]));
        // Other keys and ranges that miss the write are untouched.
        assert!(!w.conflicts(&[get(b"b", 100), range(b"n", b"z", 100), range(b"b", b"m", 100)]));
        // An empty or inverted range never conflicts (and never panics).
        assert!(!w.conflicts(&[range(b"z", b"a", 100), range(b"a", b"a", 100)]));
        // Older than the server's start: conflicts.
        assert!(w.conflicts(&[get(b"zz", 99)]));
        // A check without a read is refused as a conflict, not a panic.
        assert!(w.conflicts(&[v1::StoreCheck {
            read: None,
            version: 101
        }]));
    }

    #[test]
    fn forgotten_writes_raise_the_floor() {
        let t0 = Instant::now();
        let mut w = ConflictWindow::new(0);
        w.record(vec![b"a".to_vec()], t0);
        let v2 = w.record(vec![b"b".to_vec()], t0 + CONFLICT_WINDOW / 2);
        w.prune(t0 + CONFLICT_WINDOW);
        // The first write is forgotten: a read from before it cannot be
        // checked any more, so it conflicts whatever key it read.
        assert!(!w.written.contains_key(b"a".as_slice()));
        assert!(w.conflicts(&[get(b"c", 0)]));
        assert!(!w.conflicts(&[get(b"a", 1)]));
        assert!(w.conflicts(&[get(b"b", 1)]));
        assert!(!w.conflicts(&[get(b"b", v2)]));
        w.prune(t0 + CONFLICT_WINDOW * 2);
        assert!(w.written.is_empty() && w.log.is_empty());
        assert_eq!(w.floor, v2);
    }
}
