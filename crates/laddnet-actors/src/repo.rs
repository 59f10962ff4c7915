//! Chargers, sites and sessions in the store. Every accepted transaction
//! event is one store transaction: its `(transaction, seq)` key is claimed
//! (a replay finds it and changes nothing), its neighbours are read, and
//! the session record is updated — so a session of any length never makes
//! a large transaction.
//!
//! | key | value |
//! |---|---|
//! | `("charger", id)` | [`ChargerRecord`] |
//! | `("site", id)` | [`SiteRecord`] |
//! | `("session", transaction_id)` | [`SessionRecord`] |
//! | `("session-event", transaction_id, seq)` | the [`TxEvent`] |
//! | `("session-open", charger_id, transaction_id)` | empty: sessions not ended |
//! | `("session-by-charger", charger_id, transaction_id)` | empty: every session of a charger (written when it is created) |
//! | `("session-by-site", site_id, transaction_id)` | empty: every session recorded at a site |
//! | `("session-open-at-site", site_id, transaction_id)` | empty: a site's sessions not ended (written when one is created; sessions from before it are not in it) |
//! | `("migrated", "session-index")` | empty: every stored session is in the two indices above (see [`index_sessions_once`]) |
//! | `("metric", "energy-wh")` | energy of every session recorded, in Wh (atomic add; see [`energy_delivered_wh`]) |

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use laddnet_core::charging::{Connector, ConnectorStatus, Point, SessionRecord, SessionStatus, TxEvent};
use laddnet_core::{ErrorKind, HasKind};
use laddnet_store::{Store, StoreError, StoreExt, Transaction, keys};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("transaction {0} belongs to another charger")]
    ForeignTransaction(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("stored record is corrupted: {0}")]
    Corrupted(String),
    #[error("the session actor did not answer in time")]
    Timeout,
    #[error("the session actor is gone: {0}")]
    Gone(String),
}

impl HasKind for RepoError {
    fn kind(&self) -> ErrorKind {
        match self {
            RepoError::Store(_) | RepoError::Timeout | RepoError::Gone(_) => ErrorKind::Unavailable,
            RepoError::NotFound(_) => ErrorKind::NotFound,
            RepoError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            RepoError::ForeignTransaction(_) => ErrorKind::PermissionDenied,
            RepoError::Invalid(_) => ErrorKind::InvalidArgument,
            RepoError::Corrupted(_) => ErrorKind::Internal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargerRecord {
    pub charger_id: String,
    #[serde(default)]
    pub site_id: Option<String>,
    pub vendor: String,
    pub model: String,
    pub firmware_version: String,
    pub connectors: Vec<Connector>,
    /// Unix seconds.
    pub last_seen: i64,
    #[serde(default)]
    pub certificate_serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub site_id: String,
    pub name: String,
    pub address: String,
    pub time_zone: String,
    pub grid_limit_w: u32,
}

fn get<T: DeserializeOwned>(tx: &mut dyn Transaction, key: &[u8]) -> Result<Option<T>, RepoError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| RepoError::Corrupted(e.to_string())),
    }
}

fn put<T: Serialize>(tx: &mut dyn Transaction, key: &[u8], value: &T) -> Result<(), RepoError> {
    let v = serde_json::to_vec(value).map_err(|e| RepoError::Corrupted(e.to_string()))?;
    Ok(tx.set(key, &v)?)
}

fn charger_key(id: &str) -> Vec<u8> {
    keys::pack(&("charger", id))
}
fn site_key(id: &str) -> Vec<u8> {
    keys::pack(&("site", id))
}
fn session_key(tx_id: &str) -> Vec<u8> {
    keys::pack(&("session", tx_id))
}
fn event_key(tx_id: &str, seq: u64) -> Vec<u8> {
    keys::pack(&("session-event", tx_id, seq))
}
fn open_key(charger_id: &str, tx_id: &str) -> Vec<u8> {
    keys::pack(&("session-open", charger_id, tx_id))
}
fn energy_total_key() -> Vec<u8> {
    keys::pack(&("metric", "energy-wh"))
}
fn by_charger_key(charger_id: &str, tx_id: &str) -> Vec<u8> {
    keys::pack(&("session-by-charger", charger_id, tx_id))
}
fn open_at_site_key(site_id: &str, tx_id: &str) -> Vec<u8> {
    keys::pack(&("session-open-at-site", site_id, tx_id))
}

/// The session is no longer open: out of both open indices.
fn clear_open(tx: &mut dyn Transaction, r: &SessionRecord) -> Result<(), StoreError> {
    tx.clear(&open_key(&r.charger_id, &r.transaction_id))?;
    if let Some(site) = &r.site_id {
        tx.clear(&open_at_site_key(site, &r.transaction_id))?;
    }
    Ok(())
}

fn by_site_key(site_id: &str, tx_id: &str) -> Vec<u8> {
    keys::pack(&("session-by-site", site_id, tx_id))
}
fn indexed_marker() -> Vec<u8> {
    keys::pack(&("migrated", "session-index"))
}

/// Adds a new session to the by-charger and by-site indices.
fn index_session(tx: &mut dyn Transaction, r: &SessionRecord) -> Result<(), StoreError> {
    tx.set(&by_charger_key(&r.charger_id, &r.transaction_id), b"")?;
    if let Some(site) = &r.site_id {
        tx.set(&by_site_key(site, &r.transaction_id), b"")?;
    }
    Ok(())
}

/// What became of an event.
#[derive(Debug, Clone)]
pub struct Applied {
    pub record: SessionRecord,
    /// The event had been accepted before (a replay): nothing changed.
    pub duplicate: bool,
    /// The session's running cost after this event, when a tariff applies.
    pub running_cost: Option<RunningCost>,
}

/// A live session's cost so far (before step rounding, which happens when
/// it ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningCost {
    pub currency: String,
    pub excl_vat: rust_decimal::Decimal,
    pub incl_vat: rust_decimal::Decimal,
}

/// Validates an event's fields before anything is stored.
pub fn validate_event(e: &TxEvent) -> Result<(), RepoError> {
    if e.transaction_id.is_empty() || e.transaction_id.len() > 64 {
        return Err(RepoError::Invalid("transaction_id must be 1 to 64 characters".into()));
    }
    if e.connector_id == 0 {
        return Err(RepoError::Invalid("connector_id must be 1 or more".into()));
    }
    if e.seq > (1 << 40) {
        return Err(RepoError::Invalid("seq is out of range".into()));
    }
    Ok(())
}

/// Accepts one transaction event for `charger_id`, exactly once.
pub fn apply_event(
    store: &dyn Store,
    charger_id: &str,
    site_id: Option<&str>,
    max_power_w: u32,
    e: &TxEvent,
) -> Result<Applied, RepoError> {
    validate_event(e)?;
    store.transact(|tx| apply_event_in(tx, charger_id, site_id, max_power_w, e))
}

/// [`apply_event`]'s transaction, for an event already validated.
pub fn apply_event_in(
    tx: &mut dyn Transaction,
    charger_id: &str,
    site_id: Option<&str>,
    max_power_w: u32,
    e: &TxEvent,
) -> Result<Applied, RepoError> {
    let mut run = Run::default();
    let applied = run.apply(tx, charger_id, site_id, max_power_w, e)?;
    run.finish(tx)?;
    Ok(applied)
}

/// A run of events (already validated) in one transaction, each with its
/// own result: an event refused on its own (another charger's
/// transaction, a corrupted record) writes nothing and the others go on.
/// A store error fails the whole run (the caller rolls it back).
pub fn apply_run_in(
    tx: &mut dyn Transaction,
    charger_id: &str,
    site_id: Option<&str>,
    max_power_w: u32,
    events: &[TxEvent],
) -> Result<Vec<Result<Applied, RepoError>>, RepoError> {
    let mut run = Run::default();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        match run.apply(tx, charger_id, site_id, max_power_w, e) {
            Err(RepoError::Store(err)) => return Err(RepoError::Store(err)),
            r => out.push(r),
        }
    }
    run.finish(tx)?;
    Ok(out)
}

/// The sessions a run touches, each record read once and written once
/// (at [`Run::finish`]) however many of the run's events it takes: the
/// hot path of every meter event.
#[derive(Default)]
struct Run {
    sessions: Vec<RunSession>,
}

/// A session as a run has left it.
struct RunSession {
    tx_id: String,
    /// `None`: no session yet.
    record: Option<SessionRecord>,
    /// Its energy when the run read it.
    energy_before: u64,
    changed: bool,
    /// The run creates it (it was not stored).
    new: bool,
}

impl Run {
    fn slot(&mut self, tx: &mut dyn Transaction, tx_id: &str) -> Result<usize, RepoError> {
        if let Some(i) = self.sessions.iter().position(|s| s.tx_id == tx_id) {
            return Ok(i);
        }
        let record: Option<SessionRecord> = get(tx, &session_key(tx_id))?;
        self.sessions.push(RunSession {
            tx_id: tx_id.to_string(),
            energy_before: record.as_ref().map_or(0, SessionRecord::energy_wh),
            new: record.is_none(),
            record,
            changed: false,
        });
        Ok(self.sessions.len() - 1)
    }

    fn apply(
        &mut self,
        tx: &mut dyn Transaction,
        charger_id: &str,
        site_id: Option<&str>,
        max_power_w: u32,
        e: &TxEvent,
    ) -> Result<Applied, RepoError> {
        let i = self.slot(tx, &e.transaction_id)?;
        let existing = &self.sessions[i].record;
        if let Some(r) = existing
            && r.charger_id != charger_id
        {
            return Err(RepoError::ForeignTransaction(e.transaction_id.clone()));
        }
        let ek = event_key(&e.transaction_id, e.seq);
        if tx.get(&ek)?.is_some() {
            let record = existing
                .clone()
                .ok_or_else(|| RepoError::Corrupted("event without session".into()))?;
            return Ok(Applied {
                record,
                duplicate: true,
                running_cost: None,
            });
        }
        // The readings either side of this one, for the plausibility
        // checks. An event after the last (the usual case) has the last
        // reading before it and none after, which the record holds; only
        // an event out of order looks them up.
        let (prev, next) = match existing {
            Some(r) if r.samples > 0 && e.seq > r.last.seq => {
                debug_assert_eq!(neighbours(tx, e, &ek)?, (Some(r.last), None));
                (Some(r.last), None)
            }
            _ => neighbours(tx, e, &ek)?,
        };
        put(tx, &ek, e)?;
        let slot = &mut self.sessions[i];
        let record = slot
            .record
            .get_or_insert_with(|| SessionRecord::open(charger_id, site_id.map(str::to_string), max_power_w, e));
        if record.status == SessionStatus::Interrupted {
            record.status = SessionStatus::Active;
            record.interrupted_at = None;
        }
        record.apply(e, prev, next);
        slot.changed = true;
        Ok(Applied {
            record: record.clone(),
            duplicate: false,
            running_cost: None,
        })
    }

    /// Writes every record the run changed, and its open-session marker
    /// (or, once ended, its mark for billing), a new session's index
    /// entries, and adds the energy the run added to the store's total.
    fn finish(self, tx: &mut dyn Transaction) -> Result<(), RepoError> {
        let (mut energy, mut wrote, mut created) = (0i64, false, false);
        for RunSession {
            tx_id,
            record,
            energy_before,
            changed,
            new,
        } in self.sessions
        {
            let Some(record) = record.filter(|_| changed) else {
                continue;
            };
            energy += record.energy_wh() as i64 - energy_before as i64;
            wrote = true;
            put_session(tx, &record)?;
            if new {
                index_session(tx, &record)?;
                created = true;
            }
            if record.status == SessionStatus::Ended {
                clear_open(tx, &record)?;
                // Billed by whoever gets there first: the session actor
                // now, or the billing sweeper after a crash. The CDR
                // clears this.
                if tx.get(&keys::pack(&("cdr-written", tx_id.as_str())))?.is_none() {
                    tx.set(&laddnet_ledger::cdr::unbilled_key(&tx_id), b"")?;
                }
            } else {
                tx.set(&open_key(&record.charger_id, &tx_id), b"")?;
                // Once, when the session is created: a site's load manager
                // reads it when it starts, and no meter event pays for it.
                if new && let Some(site) = &record.site_id {
                    tx.set(&open_at_site_key(site, &tx_id), b"")?;
                }
            }
        }
        // Even when it adds nothing (a first reading): a store that has
        // recorded a run then has the counter, and a node start never
        // takes it for one from before the counter (and counts it).
        if wrote {
            tx.atomic_add(&energy_total_key(), energy)?;
        }
        // Likewise: a store whose first session this version wrote has
        // nothing to index at the next start (a store from before the
        // indices is indexed at node start, before any run).
        if created {
            tx.set(&indexed_marker(), b"")?;
        }
        Ok(())
    }
}

/// The stored readings of `e`'s session just before and just after it by
/// sequence number (`ek` is its key; it is not stored yet).
fn neighbours(tx: &mut dyn Transaction, e: &TxEvent, ek: &[u8]) -> Result<(Option<Point>, Option<Point>), RepoError> {
    let (begin, end) = keys::tuple_range(&("session-event", e.transaction_id.as_str()));
    let prev = tx.get_range(&begin, ek, 1, true)?;
    let mut after = ek.to_vec();
    after.push(0);
    let next = tx.get_range(&after, &end, 1, false)?;
    let point = |rows: Vec<(Vec<u8>, Vec<u8>)>| -> Result<Option<Point>, RepoError> {
        match rows.into_iter().next() {
            None => Ok(None),
            Some((_, v)) => {
                let ev: TxEvent = serde_json::from_slice(&v).map_err(|e| RepoError::Corrupted(e.to_string()))?;
                Ok(Some(Point::from(&ev)))
            }
        }
    };
    Ok((point(prev)?, point(next)?))
}

/// Runs a write transaction from async code: handed to the store's writer
/// where the store queues (the embedded store: many transactions, one
/// commit), otherwise on the blocking pool. Either way it returns once the
/// transaction is durable.
pub async fn write<T, F>(store: &laddnet_store::SharedStore, f: F) -> Result<T, RepoError>
where
    T: Send + 'static,
    F: FnMut(&mut dyn Transaction) -> Result<T, RepoError> + Send + 'static,
{
    if store.queues() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        laddnet_store::submit_with(store.as_ref(), f, move |r| {
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| {
            RepoError::Store(StoreError::Internal(
                "the store's writer dropped the transaction".into(),
            ))
        })?
    } else {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.transact(f))
            .await
            .map_err(|e| RepoError::Gone(e.to_string()))?
    }
}

/// Writes a session record, and keeps its driver's open sessions and
/// history (pseudonymous keys) in step with it.
fn put_session(tx: &mut dyn Transaction, r: &SessionRecord) -> Result<(), RepoError> {
    put(tx, &session_key(&r.transaction_id), r)?;
    if let Some(d) = &r.driver_id {
        tx.set(&laddnet_drivers::key::history(d, &r.transaction_id), b"")?;
        let active = laddnet_drivers::key::active_session(d, &r.transaction_id);
        if r.status == SessionStatus::Ended {
            tx.clear(&active)?;
        } else {
            tx.set(&active, b"")?;
        }
    }
    Ok(())
}

/// Records the after-the-fact authorization of a session's start: the
/// driver it belongs to and, when refused, why (and the session is flagged).
pub fn set_authorization(
    store: &dyn Store,
    tx_id: &str,
    driver_id: Option<String>,
    refused: Option<String>,
) -> Result<Option<SessionRecord>, RepoError> {
    store.transact(|tx| {
        let Some(mut r): Option<SessionRecord> = get(tx, &session_key(tx_id))? else {
            return Ok(None);
        };
        if r.driver_id.is_none() {
            r.driver_id = driver_id.clone();
        }
        if let Some(why) = &refused {
            r.flags.insert(laddnet_core::charging::FLAG_UNAUTHORIZED_START.into());
            r.authorization = Some(why.clone());
        }
        put_session(tx, &r)?;
        Ok(Some(r))
    })
}

/// Whether event `seq` of transaction `tx_id` is stored (accepted).
pub fn event_stored(store: &dyn Store, tx_id: &str, seq: u64) -> Result<bool, RepoError> {
    Ok(store.snapshot(|tx| tx.get(&event_key(tx_id, seq)))?.is_some())
}

pub fn get_session(store: &dyn Store, tx_id: &str) -> Result<Option<SessionRecord>, RepoError> {
    store.snapshot(|tx| get(tx, &session_key(tx_id)))
}

/// Adds a flag to a session (e.g. stuck).
pub fn flag_session(store: &dyn Store, tx_id: &str, flag: &str) -> Result<Option<SessionRecord>, RepoError> {
    store.transact(|tx| {
        let Some(mut r): Option<SessionRecord> = get(tx, &session_key(tx_id))? else {
            return Ok(None);
        };
        if r.flags.insert(flag.to_string()) {
            put_session(tx, &r)?;
        }
        Ok(Some(r))
    })
}

/// Transaction ids of `charger_id`'s sessions that have not ended.
pub fn open_sessions(store: &dyn Store, charger_id: &str) -> Result<Vec<String>, RepoError> {
    let (b, e) = keys::tuple_range(&("session-open", charger_id));
    store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(k, _)| {
                keys::unpack::<(String, String, String)>(&k)
                    .map(|t| t.2)
                    .map_err(|e| RepoError::Corrupted(format!("{e:?}")))
            })
            .collect()
    })
}

/// Marks `charger_id`'s active sessions interrupted (it dropped).
pub fn interrupt_sessions(store: &dyn Store, charger_id: &str, now: i64) -> Result<Vec<String>, RepoError> {
    store.transact(|tx| interrupt_sessions_in(tx, charger_id, now))
}

/// [`interrupt_sessions`] inside a caller's transaction.
pub fn interrupt_sessions_in(tx: &mut dyn Transaction, charger_id: &str, now: i64) -> Result<Vec<String>, RepoError> {
    let (b, e) = keys::tuple_range(&("session-open", charger_id));
    let mut done = Vec::new();
    for (k, _) in tx.get_range(&b, &e, 0, false)? {
        let id = keys::unpack::<(String, String, String)>(&k)
            .map(|t| t.2)
            .map_err(|e| RepoError::Corrupted(format!("{e:?}")))?;
        if let Some(mut r) = get::<SessionRecord>(tx, &session_key(&id))?
            && r.status == SessionStatus::Active
        {
            r.status = SessionStatus::Interrupted;
            r.interrupted_at = Some(now);
            r.power_w = 0;
            put_session(tx, &r)?;
            done.push(id);
        }
    }
    Ok(done)
}

/// After a node start, every active session whose charger is not
/// `attached` (again) is interrupted until its charger comes back (or the
/// timeout closes it). The node runs this beside accepting, so a large
/// fleet's sessions do not hold up its start.
pub fn interrupt_all_active(store: &dyn Store, now: i64, attached: &dyn Fn(&str) -> bool) -> Result<usize, RepoError> {
    let (b, e) = keys::tuple_range(&("session-open",));
    let chargers: std::collections::BTreeSet<String> = store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(k, _)| {
                keys::unpack::<(String, String, String)>(&k)
                    .map(|t| t.1)
                    .map_err(|e| RepoError::Corrupted(format!("{e:?}")))
            })
            .collect::<Result<_, RepoError>>()
    })?;
    // A few large transactions, not one per charger: after a crash with a
    // large fleet charging this is on the way to accepting connections.
    let chargers: Vec<String> = chargers.into_iter().collect();
    let mut n = 0;
    for batch in chargers.chunks(INTERRUPT_BATCH) {
        n += store.transact(|tx| {
            let mut k = 0;
            // Checked inside the write: a charger that attaches after
            // this check commits its events after this transaction, and
            // its next event makes the session active again.
            for c in batch.iter().filter(|c| !attached(c)) {
                k += interrupt_sessions_in(tx, c, now)?.len();
            }
            Ok::<_, RepoError>(k)
        })?;
    }
    Ok(n)
}

/// Chargers whose sessions [`interrupt_all_active`] rewrites in one
/// transaction (a session record is well under 1 KiB, so a batch stays far
/// below the store's transaction limit).
const INTERRUPT_BATCH: usize = 2_000;

/// Closes sessions interrupted for longer than `timeout_s`.
pub fn close_interrupted(store: &dyn Store, timeout_s: i64, now: i64) -> Result<Vec<String>, RepoError> {
    let (b, e) = keys::tuple_range(&("session-open",));
    let open: Vec<(String, String)> = store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(k, _)| {
                keys::unpack::<(String, String, String)>(&k)
                    .map(|t| (t.1, t.2))
                    .map_err(|e| RepoError::Corrupted(format!("{e:?}")))
            })
            .collect::<Result<Vec<_>, RepoError>>()
    })?;
    let mut closed = Vec::new();
    for (_, id) in open {
        let did = store.transact(|tx| {
            let Some(mut r): Option<SessionRecord> = get(tx, &session_key(&id))? else {
                return Ok(false);
            };
            match (r.status, r.interrupted_at) {
                (SessionStatus::Interrupted, Some(at)) if now - at >= timeout_s => {
                    r.status = SessionStatus::Ended;
                    r.ended = Some(r.last);
                    r.stop_reason = "interrupted".into();
                    put_session(tx, &r)?;
                    clear_open(tx, &r)?;
                    tx.set(&laddnet_ledger::cdr::unbilled_key(&id), b"")?;
                    Ok::<_, RepoError>(true)
                }
                _ => Ok(false),
            }
        })?;
        if did {
            closed.push(id);
        }
    }
    Ok(closed)
}

/// Sessions after `after` (transaction id order), filtered, at most `limit`.
pub fn list_sessions(
    store: &dyn Store,
    status: Option<SessionStatus>,
    charger: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<SessionRecord>, bool), RepoError> {
    let keep = |r: &SessionRecord| status.is_none_or(|s| s == r.status) && charger.is_none_or(|c| c == r.charger_id);
    if let Some(c) = charger {
        // A charger's sessions, from its index: not the whole history.
        return scan_index(store, "session-by-charger", c, after, limit, keep);
    }
    if matches!(status, Some(SessionStatus::Active | SessionStatus::Interrupted)) {
        // Sessions not ended are in the open index (bounded by the fleet,
        // not the history): read them all, then page in id order.
        let mut open: Vec<SessionRecord> = open_session_records(store)?
            .into_iter()
            .filter(|r| keep(r) && after.is_none_or(|a| r.transaction_id.as_str() > a))
            .collect();
        open.sort_by(|a, b| a.transaction_id.cmp(&b.transaction_id));
        let more = open.len() > limit;
        open.truncate(limit);
        return Ok((open, more));
    }
    scan(store, "session", after, limit, keep)
}

/// Every session `charger_id` recorded (its index; retention bounds it).
pub fn sessions_of_charger(store: &dyn Store, charger_id: &str) -> Result<Vec<SessionRecord>, RepoError> {
    Ok(scan_index(store, "session-by-charger", charger_id, None, usize::MAX, |_| true)?.0)
}

/// Every session recorded at `site_id` (its index; retention bounds it),
/// whichever chargers are there now.
pub fn sessions_at_site(store: &dyn Store, site_id: &str) -> Result<Vec<SessionRecord>, RepoError> {
    Ok(scan_index(store, "session-by-site", site_id, None, usize::MAX, |_| true)?.0)
}

/// The sessions at `site_id` that have not ended (its open index: a
/// site's load manager starts from them).
pub fn open_sessions_at_site(store: &dyn Store, site_id: &str) -> Result<Vec<SessionRecord>, RepoError> {
    let (b, e) = keys::tuple_range(&("session-open-at-site", site_id));
    let rows = store.snapshot(|tx| tx.get_range(&b, &e, 0, false))?;
    load_indexed(store, &rows)
}

/// What [`index_sessions_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indexed {
    /// Sessions added to the indices.
    pub sessions: usize,
    /// Session records that did not decode: left out (no listing can show
    /// them either), counted so the start can say so.
    pub unreadable: usize,
}

/// Builds the by-charger and by-site indices of a store written before
/// them, once: at node start, before chargers are accepted. Batches of
/// sessions, each in a transaction of its own (the entries are idempotent,
/// so a start cut short just does it again); the marker last. `None`: the
/// store was indexed already.
pub fn index_sessions_once(store: &dyn Store) -> Result<Option<Indexed>, RepoError> {
    let done = laddnet_store::backfill_once::<StoreError>(
        store,
        &indexed_marker(),
        keys::tuple_range(&("session",)),
        1_000,
        |tx, _, v| match serde_json::from_slice::<SessionRecord>(v) {
            Ok(r) => index_session(tx, &r).map(|()| true),
            Err(_) => Ok(false),
        },
    )?;
    Ok(done.map(|d| Indexed {
        sessions: d.indexed,
        unreadable: d.unreadable,
    }))
}

/// Energy of every session this store has recorded, in Wh: each run adds
/// what it added to one counter in the same commit (an atomic add, so
/// nodes writing at once do not conflict), so this is one read, whatever
/// the history; a retention purge leaves it as it is (it is a counter).
/// A meter anomaly that lowers a session's energy (a register going
/// backwards, flagged on the session) lowers it too: it is the sessions'
/// energy, not a sum of readings.
pub fn energy_delivered_wh(store: &dyn Store) -> Result<u64, RepoError> {
    let v = store.snapshot(|tx| tx.get(&energy_total_key()))?;
    Ok(v.map_or(0, |v| {
        let mut buf = [0u8; 8];
        buf[..v.len().min(8)].copy_from_slice(&v[..v.len().min(8)]);
        i64::from_le_bytes(buf).max(0) as u64
    }))
}

/// Starts the energy counter of a store written before it existed: the
/// sum over the sessions it holds, once (a store that has the counter is
/// left alone). Runs at node start, before chargers are accepted. Returns
/// how many sessions it counted (`None`: the store had the counter).
pub fn count_energy_once(store: &dyn Store) -> Result<Option<usize>, RepoError> {
    // Every start but the first finds it with a read, not a write.
    if store.snapshot(|tx| tx.get(&energy_total_key()))?.is_some() {
        return Ok(None);
    }
    // Summed in batches, each its own snapshot: one transaction over every
    // session would pass FoundationDB's 5 s and 10 MB limits on a large
    // store (and fail at every start). Nothing of this node writes
    // meanwhile (it accepts no charger yet); a node that does writes the
    // counter, and then this one leaves it alone.
    const BATCH: usize = 1_000;
    let (begin, end) = keys::tuple_range(&("session",));
    let (mut from, mut total, mut sessions) = (begin, 0i64, 0usize);
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &end, BATCH, false))?;
        for (_, v) in &rows {
            let r: SessionRecord = serde_json::from_slice(v).map_err(|e| RepoError::Corrupted(e.to_string()))?;
            total += r.energy_wh() as i64;
            sessions += 1;
        }
        match rows.last() {
            Some((k, _)) if rows.len() == BATCH => {
                from = k.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    store.transact(|tx| {
        if tx.get(&energy_total_key())?.is_some() {
            return Ok(None);
        }
        tx.set(&energy_total_key(), &total.to_le_bytes())?;
        Ok(Some(sessions))
    })
}

/// The records of the sessions not ended (active or interrupted), from
/// the open-session index: what a live view needs, without reading the
/// ended history.
pub fn open_session_records(store: &dyn Store) -> Result<Vec<SessionRecord>, RepoError> {
    let (b, e) = keys::tuple_range(&("session-open",));
    let rows = store.snapshot(|tx| tx.get_range(&b, &e, 0, false))?;
    load_indexed(store, &rows)
}

/// The records an index's rows (`(index, owner, transaction_id)` keys)
/// name, each read on its own: a listing needs no snapshot across
/// sessions, and one that held hundreds of reads while those sessions
/// took readings would conflict on a store that checks read-only
/// transactions (the shared store does) and run again and again. A
/// session gone meanwhile (purged) is passed over.
fn load_indexed(store: &dyn Store, rows: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<SessionRecord>, RepoError> {
    let mut out = Vec::with_capacity(rows.len());
    for (k, _) in rows {
        let (_, _, id) =
            keys::unpack::<(String, String, String)>(k).map_err(|e| RepoError::Corrupted(format!("{e:?}")))?;
        if let Some(r) = get_session(store, &id)? {
            out.push(r);
        }
    }
    Ok(out)
}

/// Every session record (exports). A full scan: listings by charger,
/// site or open status read their indices instead.
pub fn all_sessions(store: &dyn Store) -> Result<Vec<SessionRecord>, RepoError> {
    Ok(scan(store, "session", None, usize::MAX, |_: &SessionRecord| true)?.0)
}

/// Deletes ended sessions whose end reading is before `cutoff_ms`, with
/// their meter events and their drivers' history entries (retention).
/// CDRs and the ledger are kept. Returns how many were deleted.
///
/// A session not billed yet (its `session-unbilled` marker still set: a
/// crash caught it between its end and its CDR, or billing is off) is
/// kept whatever its age: deleting it would lose the revenue, and the CDR
/// is what accounting keeps. The marker is set in the transaction that
/// ends a session and only ever cleared, so a session seen billed here
/// stays billed.
pub fn purge_ended_before(store: &dyn Store, cutoff_ms: i64) -> Result<usize, RepoError> {
    // Not `scan`: one record that does not decode would stop every purge
    // after it, and ended sessions (personal data among them) would be
    // kept past their retention. It is passed over, and counted.
    let (begin, end) = keys::tuple_range(&("session",));
    let (mut from, mut old, mut unreadable) = (begin, Vec::new(), 0usize);
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &end, 512, false))?;
        for (_, v) in &rows {
            match serde_json::from_slice::<SessionRecord>(v) {
                Ok(r) if r.status == SessionStatus::Ended && r.ended.is_some_and(|e| e.at_ms < cutoff_ms) => {
                    old.push(r)
                }
                Ok(_) => {}
                Err(_) => unreadable += 1,
            }
        }
        match rows.last() {
            Some((k, _)) if rows.len() == 512 => {
                from = k.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    if unreadable > 0 {
        tracing::warn!(unreadable, "retention passed over session records that do not decode");
    }
    let mut billed = Vec::with_capacity(old.len());
    for r in old {
        let marker = laddnet_ledger::cdr::unbilled_key(&r.transaction_id);
        if store.snapshot(|tx| tx.get(&marker))?.is_none() {
            billed.push(r);
        }
    }
    let old = billed;
    for r in &old {
        // One session per transaction: events are chunked the same way.
        loop {
            let (b, e) = keys::tuple_range(&("session-event", r.transaction_id.as_str()));
            let more = store.transact(|tx| {
                let rows = tx.get_range(&b, &e, 1_000, false)?;
                for (k, _) in &rows {
                    tx.clear(k)?;
                }
                Ok::<_, RepoError>(rows.len() == 1_000)
            })?;
            if !more {
                break;
            }
        }
        store.transact(|tx| {
            tx.clear(&session_key(&r.transaction_id))?;
            tx.clear(&by_charger_key(&r.charger_id, &r.transaction_id))?;
            if let Some(site) = &r.site_id {
                tx.clear(&by_site_key(site, &r.transaction_id))?;
            }
            if let Some(d) = &r.driver_id {
                tx.clear(&laddnet_drivers::key::history(d, &r.transaction_id))?;
            }
            Ok::<_, RepoError>(())
        })?;
    }
    Ok(old.len())
}

fn scan<T: DeserializeOwned>(
    store: &dyn Store,
    kind: &str,
    after: Option<&str>,
    limit: usize,
    keep: impl Fn(&T) -> bool,
) -> Result<(Vec<T>, bool), RepoError> {
    let (begin, end) = keys::tuple_range(&(kind,));
    let mut from = match after {
        Some(a) => {
            let mut k = keys::pack(&(kind, a));
            k.push(0);
            k
        }
        None => begin,
    };
    let mut out = Vec::new();
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &end, 512, false).map_err(RepoError::from))?;
        let exhausted = rows.len() < 512;
        for (k, v) in rows {
            from = k;
            from.push(0);
            let item: T = serde_json::from_slice(&v).map_err(|e| RepoError::Corrupted(e.to_string()))?;
            if keep(&item) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(item);
            }
        }
        if exhausted {
            return Ok((out, false));
        }
    }
}

/// Like [`scan`], over the sessions an index (`("session-by-…", owner,
/// transaction_id)`) lists: their records in transaction id order, after
/// `after`, at most `limit`, and whether more match. An entry whose
/// session is gone (purged meanwhile) is passed over.
fn scan_index(
    store: &dyn Store,
    index: &str,
    owner: &str,
    after: Option<&str>,
    limit: usize,
    keep: impl Fn(&SessionRecord) -> bool,
) -> Result<(Vec<SessionRecord>, bool), RepoError> {
    // A page of a listing reads no more records than it can return
    // (and one to tell whether there are more), unless the filter
    // leaves some out.
    let page = limit.saturating_add(1).clamp(1, 512);
    let (begin, end) = keys::tuple_range(&(index, owner));
    let mut from = match after {
        Some(a) => {
            let mut k = keys::pack(&(index, owner, a));
            k.push(0);
            k
        }
        None => begin,
    };
    let mut out = Vec::new();
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &end, page, false))?;
        let next = (rows.len() == page)
            .then(|| rows.last().map(|(k, _)| k.clone()))
            .flatten();
        for r in load_indexed(store, &rows)? {
            if keep(&r) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(r);
            }
        }
        match next {
            Some(mut k) => {
                k.push(0);
                from = k;
            }
            None => return Ok((out, false)),
        }
    }
}

/// Records what a charger said at boot, inside the caller's transaction (an
/// attach's, with the ownership claim); keeps its site.
pub fn record_boot_in(tx: &mut dyn Transaction, mut rec: ChargerRecord) -> Result<ChargerRecord, RepoError> {
    let old: Option<ChargerRecord> = get(tx, &charger_key(&rec.charger_id))?;
    if let Some(old) = old {
        // The site an operator set wins over the one the enrollment
        // token named: sites are changeable.
        rec.site_id = old.site_id.or(rec.site_id.clone());
        // Keep known statuses of connectors that still exist.
        for c in &mut rec.connectors {
            if let Some(o) = old.connectors.iter().find(|o| o.connector_id == c.connector_id) {
                c.status = o.status;
                c.error_code = o.error_code.clone();
            }
        }
    }
    put(tx, &charger_key(&rec.charger_id), &rec)?;
    Ok(rec)
}

/// Sets a connector's status and appends it to the status history at
/// `at_ms` (the charger's time; 0: now).
pub fn set_connector_status(
    store: &dyn Store,
    charger_id: &str,
    connector_id: u32,
    status: ConnectorStatus,
    error_code: &str,
    now: i64,
    at_ms: i64,
) -> Result<(), RepoError> {
    store.transact(|tx| {
        let mut rec: ChargerRecord =
            get(tx, &charger_key(charger_id))?.ok_or_else(|| RepoError::NotFound(format!("charger {charger_id}")))?;
        let c = rec
            .connectors
            .iter_mut()
            .find(|c| c.connector_id == connector_id)
            .ok_or_else(|| RepoError::Invalid(format!("connector {connector_id} was not declared at boot")))?;
        c.status = status;
        c.error_code = error_code.to_string();
        rec.last_seen = now;
        let at = if at_ms > 0 { at_ms } else { now * 1000 };
        put(
            tx,
            &keys::pack(&("status-history", charger_id, i64::from(connector_id), at)),
            &crate::availability::StatusPoint {
                status,
                error_code: error_code.to_string(),
            },
        )?;
        put(tx, &charger_key(charger_id), &rec)
    })
}

/// Records a charger's connection coming up or going down (node time).
/// Records a connection (or disconnection) in the charger's history.
pub fn record_connection_in(
    tx: &mut dyn Transaction,
    charger_id: &str,
    online: bool,
    at_ms: i64,
) -> Result<(), RepoError> {
    put(tx, &keys::pack(&("conn-history", charger_id, at_ms)), &online)
}

pub fn touch_charger(store: &dyn Store, charger_id: &str, now: i64) -> Result<(), RepoError> {
    store.transact(|tx| {
        if let Some(mut rec) = get::<ChargerRecord>(tx, &charger_key(charger_id))? {
            rec.last_seen = now;
            put(tx, &charger_key(charger_id), &rec)?;
        }
        Ok(())
    })
}

pub fn get_charger(store: &dyn Store, id: &str) -> Result<Option<ChargerRecord>, RepoError> {
    store.snapshot(|tx| get(tx, &charger_key(id)))
}

pub fn list_chargers(
    store: &dyn Store,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<ChargerRecord>, bool), RepoError> {
    scan(store, "charger", after, limit, |_: &ChargerRecord| true)
}

/// Chargers assigned to a site (a scan of all chargers).
pub fn chargers_at_site(store: &dyn Store, site_id: &str) -> Result<Vec<ChargerRecord>, RepoError> {
    Ok(scan(store, "charger", None, usize::MAX, |c: &ChargerRecord| {
        c.site_id.as_deref() == Some(site_id)
    })?
    .0)
}

pub fn set_charger_site(store: &dyn Store, charger_id: &str, site_id: &str) -> Result<ChargerRecord, RepoError> {
    store.transact(|tx| {
        if get::<SiteRecord>(tx, &site_key(site_id))?.is_none() {
            return Err(RepoError::NotFound(format!("site {site_id}")));
        }
        let mut rec: ChargerRecord =
            get(tx, &charger_key(charger_id))?.ok_or_else(|| RepoError::NotFound(format!("charger {charger_id}")))?;
        rec.site_id = Some(site_id.to_string());
        put(tx, &charger_key(charger_id), &rec)?;
        Ok(rec)
    })
}

pub fn create_site(store: &dyn Store, site: &SiteRecord) -> Result<(), RepoError> {
    store.transact(|tx| {
        if tx.get(&site_key(&site.site_id))?.is_some() {
            return Err(RepoError::AlreadyExists(format!("site {}", site.site_id)));
        }
        put(tx, &site_key(&site.site_id), site)
    })
}

pub fn get_site(store: &dyn Store, id: &str) -> Result<Option<SiteRecord>, RepoError> {
    store.snapshot(|tx| get(tx, &site_key(id)))
}

pub fn list_sites(store: &dyn Store, after: Option<&str>, limit: usize) -> Result<(Vec<SiteRecord>, bool), RepoError> {
    scan(store, "site", after, limit, |_: &SiteRecord| true)
}

/// Records the firmware a charger now runs (after an installed update).
pub fn set_firmware_version(store: &dyn Store, id: &str, version: &str) -> Result<(), RepoError> {
    store.transact(|tx| {
        if let Some(mut rec) = get::<ChargerRecord>(tx, &charger_key(id))? {
            rec.firmware_version = version.to_string();
            put(tx, &charger_key(id), &rec)?;
        }
        Ok(())
    })
}
