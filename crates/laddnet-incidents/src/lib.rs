//! Incidents: what operators and technicians work through.
//!
//! Detection rules raise *alarms* — a kind, a subject (`charger:CP-1`,
//! `connector:CP-1/2`, `session:TX`) and a detail — and clear them when the
//! condition ends. Alarms are de-duplicated into *incidents*: one per kind
//! and subject at a time. An incident has a severity and a timeline: opened
//! → acknowledged → assigned to a technician → resolved. When its condition
//! clears it resolves itself; when the condition returns before anyone
//! closed the case for good, the same incident reopens (an incident an
//! operator resolved by hand stays resolved: a recurrence opens a new one).
//! Every step is one store transaction, so a raise and its clear can come
//! from any node in any order and the incident stays consistent.
//!
//! | key | value |
//! |---|---|
//! | `("incident", id)` | [`Incident`] |
//! | `("incident-live", kind, subject)` | id of the incident the kind/subject maps to |
//! | `("incident-by-time", opened_at, id)` | empty: listing newest first |

#![forbid(unsafe_code)]

use laddnet_core::{ErrorKind, HasKind};
use laddnet_store::{Store, StoreError, StoreExt, Transaction, keys};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("stored record is corrupted: {0}")]
    Corrupted(String),
}

impl HasKind for IncidentError {
    fn kind(&self) -> ErrorKind {
        match self {
            IncidentError::Store(_) => ErrorKind::Unavailable,
            IncidentError::NotFound(_) => ErrorKind::NotFound,
            IncidentError::Invalid(_) => ErrorKind::InvalidArgument,
            IncidentError::Precondition(_) => ErrorKind::FailedPrecondition,
            IncidentError::Corrupted(_) => ErrorKind::Internal,
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmKind {
    /// No connection (or heartbeat) from a charger for longer than allowed.
    Offline,
    /// The charger reported a fault with an error code.
    ChargerFault,
    /// The meter went backwards, jumped, or disagrees with the power
    /// integral: possible tampering.
    MeterAnomaly,
    /// An active session sent no meter data for too long.
    StuckSession,
    /// A certificate in use expires soon and has no successor yet.
    CertificateExpiring,
    /// A connector draws more power than it is rated for.
    Overload,
    /// A charger keeps losing and regaining its connection.
    Flapping,
    /// A session gets far less power than the car, connector and limit
    /// allow, or will not finish before the driver's departure.
    LowPower,
    /// A charger draws more than the charging limit it was sent.
    LimitIgnored,
    /// A site draws more than its grid connection's limit.
    SiteOverload,
}

impl AlarmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::Offline => "offline",
            AlarmKind::ChargerFault => "charger-fault",
            AlarmKind::MeterAnomaly => "meter-anomaly",
            AlarmKind::StuckSession => "stuck-session",
            AlarmKind::CertificateExpiring => "certificate-expiring",
            AlarmKind::Overload => "overload",
            AlarmKind::Flapping => "flapping",
            AlarmKind::LowPower => "low-power",
            AlarmKind::LimitIgnored => "limit-ignored",
            AlarmKind::SiteOverload => "site-overload",
        }
    }

    pub fn parse(s: &str) -> Result<Self, IncidentError> {
        Ok(match s {
            "offline" => AlarmKind::Offline,
            "charger-fault" => AlarmKind::ChargerFault,
            "meter-anomaly" => AlarmKind::MeterAnomaly,
            "stuck-session" => AlarmKind::StuckSession,
            "certificate-expiring" => AlarmKind::CertificateExpiring,
            "overload" => AlarmKind::Overload,
            "flapping" => AlarmKind::Flapping,
            "low-power" => AlarmKind::LowPower,
            "limit-ignored" => AlarmKind::LimitIgnored,
            "site-overload" => AlarmKind::SiteOverload,
            _ => {
                return Err(IncidentError::Invalid(format!(
                    "alarm kind {s:?}: expected offline, charger-fault, meter-anomaly, stuck-session, certificate-expiring, overload, flapping, low-power, limit-ignored or site-overload"
                )));
            }
        })
    }

    /// How bad, by default.
    pub fn severity(self) -> Severity {
        match self {
            AlarmKind::Offline | AlarmKind::ChargerFault | AlarmKind::Overload | AlarmKind::LimitIgnored => {
                Severity::Major
            }
            AlarmKind::MeterAnomaly | AlarmKind::SiteOverload => Severity::Critical,
            AlarmKind::StuckSession | AlarmKind::CertificateExpiring | AlarmKind::Flapping | AlarmKind::LowPower => {
                Severity::Minor
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Minor,
    Major,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Open,
    Acknowledged,
    Assigned,
    Resolved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Open => "open",
            State::Acknowledged => "acknowledged",
            State::Assigned => "assigned",
            State::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Result<Self, IncidentError> {
        Ok(match s {
            "open" => State::Open,
            "acknowledged" => State::Acknowledged,
            "assigned" => State::Assigned,
            "resolved" => State::Resolved,
            _ => {
                return Err(IncidentError::Invalid(format!(
                    "state {s:?}: expected open, acknowledged, assigned or resolved"
                )));
            }
        })
    }
}

/// One step in an incident's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// opened, recurred, acknowledged, assigned, resolved, cleared, reopened.
    pub what: String,
    /// Who (an operator's name) or "laddnet".
    pub by: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub kind: AlarmKind,
    pub subject: String,
    pub severity: Severity,
    pub state: State,
    /// The condition holds now (not cleared since it was last raised).
    pub active: bool,
    pub assignee: Option<String>,
    /// Times the alarm was raised into this incident.
    pub occurrences: u32,
    pub opened_at_ms: i64,
    pub timeline: Vec<Step>,
}

/// A raised condition.
#[derive(Debug, Clone)]
pub struct Alarm<'a> {
    pub kind: AlarmKind,
    pub subject: &'a str,
    pub detail: &'a str,
    pub at_ms: i64,
}

/// What a raise or clear did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Opened,
    Recurred,
    Reopened,
    Cleared,
    Unchanged,
}

const SYSTEM: &str = "laddnet";
/// Timeline length kept per incident (a flapping condition would otherwise
/// grow it without bound): the first steps and the latest.
const MAX_STEPS: usize = 200;

fn incident_key(id: &str) -> Vec<u8> {
    keys::pack(&("incident", id))
}
fn live_key(kind: AlarmKind, subject: &str) -> Vec<u8> {
    keys::pack(&("incident-live", kind.as_str(), subject))
}

fn load(tx: &mut dyn Transaction, id: &str) -> Result<Incident, IncidentError> {
    let v = tx
        .get(&incident_key(id))?
        .ok_or_else(|| IncidentError::NotFound(format!("incident {id}")))?;
    serde_json::from_slice(&v).map_err(|e| IncidentError::Corrupted(e.to_string()))
}

/// The active index: the incidents whose condition holds now, by kind, so
/// counting them (every metrics scrape) reads those and not the history.
fn active_key(kind: AlarmKind, id: &str) -> Vec<u8> {
    keys::pack(&("incident-active", kind.as_str(), id))
}
/// Set once every incident stored before the active index is in it.
fn active_indexed_key() -> Vec<u8> {
    keys::pack(&("incident-active-indexed",))
}

/// Every write of an incident goes through here, and keeps the active
/// index in step with it.
fn save(tx: &mut dyn Transaction, i: &Incident) -> Result<(), IncidentError> {
    let v = serde_json::to_vec(i).map_err(|e| IncidentError::Corrupted(e.to_string()))?;
    tx.set(&incident_key(&i.id), &v)?;
    if i.active {
        tx.set(&active_key(i.kind, &i.id), b"")?;
    } else {
        tx.clear(&active_key(i.kind, &i.id))?;
    }
    Ok(())
}

fn push(i: &mut Incident, at_ms: i64, what: &str, by: &str, detail: &str) {
    if i.timeline.len() >= MAX_STEPS {
        i.timeline.remove(MAX_STEPS / 2);
    }
    i.timeline.push(Step {
        at_ms,
        what: what.into(),
        by: by.into(),
        detail: detail.into(),
    });
}

/// Raises an alarm: opens an incident, or adds to the one it maps to.
pub fn raise(tx: &mut dyn Transaction, a: &Alarm<'_>) -> Result<(Incident, Change), IncidentError> {
    if a.subject.is_empty() {
        return Err(IncidentError::Invalid("an alarm needs a subject".into()));
    }
    if let Some(id) = tx.get(&live_key(a.kind, a.subject))? {
        let id = String::from_utf8_lossy(&id).into_owned();
        let mut i = load(tx, &id)?;
        let change = if i.state == State::Resolved {
            // Resolved by the condition clearing: the same case, reopened.
            i.state = if i.assignee.is_some() {
                State::Assigned
            } else {
                State::Open
            };
            push(&mut i, a.at_ms, "reopened", SYSTEM, a.detail);
            Change::Reopened
        } else if i.active {
            return Ok((i, Change::Unchanged));
        } else {
            push(&mut i, a.at_ms, "recurred", SYSTEM, a.detail);
            Change::Recurred
        };
        i.active = true;
        i.occurrences += 1;
        save(tx, &i)?;
        return Ok((i, change));
    }
    let id = format!("inc-{}", hex::encode(rand::random::<[u8; 6]>()));
    let mut i = Incident {
        id: id.clone(),
        kind: a.kind,
        subject: a.subject.into(),
        severity: a.kind.severity(),
        state: State::Open,
        active: true,
        assignee: None,
        occurrences: 1,
        opened_at_ms: a.at_ms,
        timeline: Vec::new(),
    };
    push(&mut i, a.at_ms, "opened", SYSTEM, a.detail);
    save(tx, &i)?;
    tx.set(&live_key(a.kind, a.subject), id.as_bytes())?;
    tx.set(&keys::pack(&("incident-by-time", a.at_ms, id.as_str())), b"")?;
    Ok((i, Change::Opened))
}

/// Whether an incident of this kind and subject is live (cheap: one read),
/// so callers can skip a write transaction when there is nothing to clear.
pub fn is_live(tx: &mut dyn Transaction, kind: AlarmKind, subject: &str) -> Result<bool, IncidentError> {
    Ok(tx.get(&live_key(kind, subject))?.is_some())
}

/// The condition ended: the incident resolves itself (it reopens if the
/// condition returns).
pub fn clear(
    tx: &mut dyn Transaction,
    kind: AlarmKind,
    subject: &str,
    at_ms: i64,
    detail: &str,
) -> Result<Option<(Incident, Change)>, IncidentError> {
    let Some(id) = tx.get(&live_key(kind, subject))? else {
        return Ok(None);
    };
    let id = String::from_utf8_lossy(&id).into_owned();
    let mut i = load(tx, &id)?;
    if !i.active {
        return Ok(Some((i, Change::Unchanged)));
    }
    i.active = false;
    if i.state != State::Resolved {
        i.state = State::Resolved;
    }
    push(&mut i, at_ms, "cleared", SYSTEM, detail);
    save(tx, &i)?;
    Ok(Some((i, Change::Cleared)))
}

fn act(
    store: &dyn Store,
    id: &str,
    f: impl Fn(&mut Incident) -> Result<(), IncidentError>,
) -> Result<Incident, IncidentError> {
    store.transact(|tx| {
        let mut i = load(tx, id)?;
        f(&mut i)?;
        save(tx, &i)?;
        Ok(i)
    })
}

/// Someone has seen it.
pub fn acknowledge(store: &dyn Store, id: &str, by: &str, at_ms: i64) -> Result<Incident, IncidentError> {
    act(store, id, |i| {
        if i.state != State::Open {
            return Err(IncidentError::Precondition(format!(
                "incident {} is {}, not open",
                i.id,
                i.state.as_str()
            )));
        }
        i.state = State::Acknowledged;
        push(i, at_ms, "acknowledged", by, "");
        Ok(())
    })
}

/// A technician owns it now.
pub fn assign(store: &dyn Store, id: &str, technician: &str, by: &str, at_ms: i64) -> Result<Incident, IncidentError> {
    if technician.trim().is_empty() || technician.len() > 64 || technician.chars().any(char::is_control) {
        return Err(IncidentError::Invalid(
            "technician: 1 to 64 printable characters".into(),
        ));
    }
    act(store, id, |i| {
        if i.state == State::Resolved {
            return Err(IncidentError::Precondition(format!("incident {} is resolved", i.id)));
        }
        i.state = State::Assigned;
        i.assignee = Some(technician.into());
        push(i, at_ms, "assigned", by, technician);
        Ok(())
    })
}

/// Closed by hand: a recurrence after this opens a new incident.
pub fn resolve(store: &dyn Store, id: &str, by: &str, note: &str, at_ms: i64) -> Result<Incident, IncidentError> {
    store.transact(|tx| {
        let mut i = load(tx, id)?;
        if i.state == State::Resolved && !i.active {
            // Auto-resolved already: the operator closes the case for good.
            push(&mut i, at_ms, "closed", by, note);
        } else {
            i.state = State::Resolved;
            push(&mut i, at_ms, "resolved", by, note);
        }
        i.active = false;
        save(tx, &i)?;
        // Detach it: the next alarm of this kind and subject is a new case.
        if tx.get(&live_key(i.kind, &i.subject))?.as_deref() == Some(i.id.as_bytes()) {
            tx.clear(&live_key(i.kind, &i.subject))?;
        }
        Ok(i)
    })
}

pub fn get(store: &dyn Store, id: &str) -> Result<Incident, IncidentError> {
    store.snapshot(|tx| load(tx, id))
}

/// Incidents newest first, filtered by state, up to `limit` (0: all).
pub fn list(store: &dyn Store, state: Option<State>, limit: usize) -> Result<Vec<Incident>, IncidentError> {
    let (b, e) = keys::tuple_range(&("incident-by-time",));
    store.snapshot(|tx| {
        let mut out = Vec::new();
        for (k, _) in tx.get_range(&b, &e, 0, true)? {
            let (_, _, id): (String, i64, String) =
                keys::unpack(&k).map_err(|e| IncidentError::Corrupted(format!("{e:?}")))?;
            let i = load(tx, &id)?;
            if state.is_none_or(|s| s == i.state) {
                out.push(i);
                if limit > 0 && out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    })
}

/// Every kind, for listings and metrics.
pub const KINDS: [AlarmKind; 10] = [
    AlarmKind::Offline,
    AlarmKind::ChargerFault,
    AlarmKind::MeterAnomaly,
    AlarmKind::StuckSession,
    AlarmKind::CertificateExpiring,
    AlarmKind::Overload,
    AlarmKind::Flapping,
    AlarmKind::LowPower,
    AlarmKind::LimitIgnored,
    AlarmKind::SiteOverload,
];

/// Incidents whose condition holds now, by kind: a range of the active
/// index per kind. A store whose incidents were never indexed (a node of
/// this version has not started on it yet) is counted the old way, from
/// every incident.
pub fn active_counts(store: &dyn Store) -> Result<std::collections::BTreeMap<AlarmKind, u64>, IncidentError> {
    let mut out = std::collections::BTreeMap::new();
    let indexed = store.snapshot(|tx| {
        if tx.get(&active_indexed_key())?.is_none() {
            return Ok::<_, IncidentError>(false);
        }
        for kind in KINDS {
            let (b, e) = keys::tuple_range(&("incident-active", kind.as_str()));
            let n = tx.get_range(&b, &e, 0, false)?.len() as u64;
            if n > 0 {
                out.insert(kind, n);
            }
        }
        Ok(true)
    })?;
    if !indexed {
        out.clear();
        for i in list(store, None, 0)? {
            if i.active {
                *out.entry(i.kind).or_default() += 1;
            }
        }
    }
    Ok(out)
}

/// Adds the incidents stored before the active index to it, once (a start
/// cut short does it again: each batch sets the entries from the records
/// as they are then), 500 a transaction. Returns how many incidents were
/// read (0 when already done); a record that does not decode is passed
/// over and logged.
pub fn index_active_once(store: &dyn Store) -> Result<usize, IncidentError> {
    let done = laddnet_store::backfill_once(
        store,
        &active_indexed_key(),
        keys::tuple_range(&("incident",)),
        500,
        |tx, _, v| match serde_json::from_slice::<Incident>(v) {
            Ok(i) if i.active => tx.set(&active_key(i.kind, &i.id), b"").map(|()| true),
            Ok(i) => tx.clear(&active_key(i.kind, &i.id)).map(|()| true),
            Err(_) => Ok(false),
        },
    )?;
    let Some(done) = done else { return Ok(0) };
    if done.unreadable > 0 {
        tracing::warn!(
            unreadable = done.unreadable,
            "incident records that do not decode were not indexed"
        );
    }
    Ok(done.indexed + done.unreadable)
}
