//! Fault detection: the rules that raise and clear alarms, which
//! `laddnet-incidents` turns into incidents. The rules that keep state
//! between readings run in one `AlarmActor`, which owns the thresholds
//! (`[alarms]`) and that state; the charger streams tell it what happens
//! without waiting for it.
//!
//! - charger fault: a connector reports `Faulted` (with its error code);
//!   cleared when it reports any working status;
//! - offline: a charger's connection dropped and it did not return within
//!   `alarms.offline_after_s`; cleared when it reconnects;
//! - certificate expiring: a valid certificate with no successor within
//!   `alarms.certificate_expiry_days` of its end; resolved when it is
//!   renewed or revoked (checked every `alarms.certificate_check_s`);
//! - overload: a session's power above its connector's rating (by more
//!   than 5 %); cleared by a reading within it;
//! - flapping: `alarms.flap_reconnects` connections of one charger within
//!   `alarms.flap_window_s`; resolved after a window with fewer;
//! - meter anomaly: a session's register went backwards, delivered more
//!   energy than the connector's power allows, or energy that disagrees
//!   with the reported power's integral (possible tampering); resolved by
//!   an operator (it never clears by itself);
//! - too little power: a session drawing less than
//!   `alarms.low_power_percent` of what the car, the connector and its
//!   charging limit allow, for `alarms.low_power_after_s` (below
//!   `alarms.low_power_below_soc`, where batteries taper), or one whose
//!   pace will not reach the driver's target before their departure;
//!   cleared when it recovers or ends;
//! - limit ignored and site overload: see [`crate::load`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use laddnet_core::charging::{
    ConnectorStatus, FLAG_ENERGY_EXCEEDS_CAPACITY, FLAG_ENERGY_POWER_MISMATCH, FLAG_REGISTER_BACKWARDS, SessionRecord,
    SessionStatus,
};
use laddnet_incidents::{Alarm, AlarmKind, Change};
use laddnet_store::StoreExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::config::AlarmsSection;
use crate::now_ms;
use crate::services::rfc3339;
use crate::state::NodeState;

/// Raises an alarm (once per condition: repeats are absorbed).
pub async fn raise(state: &Arc<NodeState>, kind: AlarmKind, subject: String, detail: String) {
    let st = state.clone();
    let (s2, d2) = (subject.clone(), detail.clone());
    let r = tokio::task::spawn_blocking(move || {
        st.store.transact(|tx| {
            laddnet_incidents::raise(
                tx,
                &Alarm {
                    kind,
                    subject: &s2,
                    detail: &d2,
                    at_ms: now_ms(),
                },
            )
        })
    })
    .await;
    match r {
        Ok(Ok((i, Change::Opened | Change::Reopened | Change::Recurred))) => {
            tracing::warn!(incident = %i.id, kind = kind.as_str(), subject = %subject, detail = %detail, "incident opened");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "raising an alarm failed"),
        Err(e) => tracing::error!(error = %e, "raising an alarm failed"),
    }
}

/// The condition ended.
pub async fn clear(state: &Arc<NodeState>, kind: AlarmKind, subject: String, detail: &'static str) {
    // Most working statuses and reconnects have nothing to clear: a read,
    // here on the embedded store (a reconnect storm is thousands of them
    // in a row through this actor), else on the blocking pool.
    if state.store.local_reads() {
        match state
            .store
            .snapshot(|tx| laddnet_incidents::is_live(tx, kind, &subject))
        {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => {
                tracing::error!(error = %e, "clearing an alarm failed");
                return;
            }
        }
    }
    let st = state.clone();
    let s2 = subject.clone();
    let r = tokio::task::spawn_blocking(move || {
        if !st.store.snapshot(|tx| laddnet_incidents::is_live(tx, kind, &s2))? {
            return Ok(None);
        }
        st.store
            .transact(|tx| laddnet_incidents::clear(tx, kind, &s2, now_ms(), detail))
    })
    .await;
    match r {
        Ok(Ok(Some((i, Change::Cleared)))) => {
            tracing::info!(incident = %i.id, kind = kind.as_str(), subject = %subject, "incident resolved: the condition cleared");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "clearing an alarm failed"),
        Err(e) => tracing::error!(error = %e, "clearing an alarm failed"),
    }
}

/// What the alarm actor hears about.
pub enum AlarmMsg {
    Status {
        charger_id: String,
        connector_id: u32,
        status: ConnectorStatus,
        error_code: String,
    },
    Record {
        record: Box<SessionRecord>,
        ev_max_w: Option<u32>,
        limit_w: Option<u32>,
    },
    Attached(String),
    Detached(String),
    OfflineCheck(String),
    FlapCheck(String),
}

/// A session watched for too little power.
#[derive(Default)]
struct LowTrack {
    below_since: Option<std::time::Instant>,
    raised: bool,
    /// The first reading with a state of charge: (charger ms, %).
    first_soc: Option<(i64, u32)>,
    /// The driver's target and departure, once looked up.
    plan: Option<Option<(u32, i64)>>,
}

pub struct AlarmState {
    t: AlarmsSection,
    overloaded: HashSet<String>,
    connects: HashMap<String, VecDeque<std::time::Instant>>,
    flap_watched: HashSet<String>,
    anomalies: HashSet<String>,
    low: HashMap<String, LowTrack>,
}

pub struct AlarmActor {
    pub node: Weak<NodeState>,
}

impl Actor for AlarmActor {
    type Msg = AlarmMsg;
    type State = AlarmState;
    type Arguments = AlarmsSection;

    async fn pre_start(&self, _: ActorRef<AlarmMsg>, t: AlarmsSection) -> Result<AlarmState, ActorProcessingErr> {
        Ok(AlarmState {
            t,
            overloaded: HashSet::new(),
            connects: HashMap::new(),
            flap_watched: HashSet::new(),
            anomalies: HashSet::new(),
            low: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AlarmMsg>,
        msg: AlarmMsg,
        st: &mut AlarmState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(node) = self.node.upgrade() else {
            myself.stop(None);
            return Ok(());
        };
        match msg {
            AlarmMsg::Status {
                charger_id,
                connector_id,
                status,
                error_code,
            } => status_rule(&node, &charger_id, connector_id, status, &error_code).await,
            AlarmMsg::Record {
                record,
                ev_max_w,
                limit_w,
            } => {
                overload_rule(&node, st, &record).await;
                anomaly_rule(&node, st, &record).await;
                low_power_rule(&node, st, &record, ev_max_w, limit_w).await;
            }
            AlarmMsg::Attached(id) => {
                record_connection(&node, &id, true).await;
                flapping(&node, &myself, st, &id).await;
                clear(&node, AlarmKind::Offline, format!("charger:{id}"), "reconnected").await;
            }
            AlarmMsg::Detached(id) => {
                record_connection(&node, &id, false).await;
                myself.send_after(Duration::from_secs(st.t.offline_after_s), move || {
                    AlarmMsg::OfflineCheck(id)
                });
            }
            AlarmMsg::OfflineCheck(id) => {
                if !node.shutdown.is_cancelled() && !crate::cluster::connected_anywhere(&node, &id).await {
                    let detail = format!("no connection for {} s", st.t.offline_after_s);
                    raise(&node, AlarmKind::Offline, format!("charger:{id}"), detail).await;
                }
            }
            AlarmMsg::FlapCheck(id) => {
                let window = Duration::from_secs(st.t.flap_window_s);
                let now = std::time::Instant::now();
                let recent = st
                    .connects
                    .get(&id)
                    .map(|q| q.iter().filter(|t| now.duration_since(**t) <= window).count())
                    .unwrap_or(0);
                if recent < st.t.flap_reconnects as usize {
                    st.flap_watched.remove(&id);
                    clear(
                        &node,
                        AlarmKind::Flapping,
                        format!("charger:{id}"),
                        "the connection is stable",
                    )
                    .await;
                } else {
                    myself.send_after(window, move || AlarmMsg::FlapCheck(id));
                }
            }
        }
        Ok(())
    }
}

/// Starts the alarm actor for `node`.
pub async fn start(node: &Arc<NodeState>) -> anyhow::Result<ActorRef<AlarmMsg>> {
    let (actor, _) = Actor::spawn(
        None,
        AlarmActor {
            node: Arc::downgrade(node),
        },
        node.config.alarms.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("starting the alarm actor: {e}"))?;
    Ok(actor)
}

fn tell(state: &NodeState, msg: AlarmMsg) {
    if let Some(a) = state.alarm_actor.get() {
        let _ = a.cast(msg);
    }
}

/// A connector's status: `Faulted` raises, a working status clears.
pub fn on_status(state: &NodeState, charger_id: &str, connector_id: u32, status: ConnectorStatus, error_code: &str) {
    tell(
        state,
        AlarmMsg::Status {
            charger_id: charger_id.into(),
            connector_id,
            status,
            error_code: error_code.into(),
        },
    );
}

/// A charger (re)connected.
pub fn on_attached(state: &NodeState, charger_id: &str) {
    tell(state, AlarmMsg::Attached(charger_id.into()));
}

/// A charger's connection ended: offline unless it is back in time.
pub fn on_detached(state: &NodeState, charger_id: &str) {
    tell(state, AlarmMsg::Detached(charger_id.into()));
}

/// After a meter event.
pub fn on_record(state: &NodeState, r: &SessionRecord, ev_max_w: Option<u32>, limit_w: Option<u32>) {
    tell(
        state,
        AlarmMsg::Record {
            record: Box::new(r.clone()),
            ev_max_w,
            limit_w,
        },
    );
}

async fn status_rule(state: &Arc<NodeState>, charger_id: &str, connector_id: u32, status: ConnectorStatus, code: &str) {
    let subject = format!("connector:{charger_id}/{connector_id}");
    match status {
        ConnectorStatus::Faulted => {
            let detail = if code.is_empty() {
                "faulted (no error code)".to_string()
            } else {
                format!("faulted: {code}")
            };
            raise(state, AlarmKind::ChargerFault, subject, detail).await;
        }
        ConnectorStatus::Unavailable => {}
        _ => clear(state, AlarmKind::ChargerFault, subject, "the connector works again").await,
    }
}

/// Connection history, for availability: handed to the store without
/// waiting for it (where the store queues, in order, many in one commit),
/// so a reconnect storm does not hold the alarm actor at one flush each.
async fn record_connection(state: &Arc<NodeState>, charger_id: &str, online: bool) {
    let (id, at_ms) = (charger_id.to_string(), now_ms());
    let write = move |tx: &mut dyn laddnet_store::Transaction| {
        laddnet_actors::repo::record_connection_in(tx, &id, online, at_ms)
    };
    let logged = |r: Result<(), laddnet_actors::repo::RepoError>| {
        if let Err(e) = r {
            tracing::warn!(error = %e, "recording the connection history failed");
        }
    };
    if state.store.queues() {
        laddnet_store::submit_with(state.store.as_ref(), write, logged);
    } else {
        let store = state.store.clone();
        if let Ok(r) =
            tokio::task::spawn_blocking(move || laddnet_store::StoreExt::transact(store.as_ref(), write)).await
        {
            logged(r);
        }
    }
}

/// Power above the connector's rating (by more than 5 %) is an overload
/// until a reading is back within it.
async fn overload_rule(state: &Arc<NodeState>, st: &mut AlarmState, r: &SessionRecord) {
    if r.max_power_w == 0 || r.status != SessionStatus::Active {
        return;
    }
    let subject = format!("connector:{}/{}", r.charger_id, r.connector_id);
    let over = u64::from(r.power_w) * 100 > u64::from(r.max_power_w) * 105;
    if over && st.overloaded.insert(subject.clone()) {
        let detail = format!("{} W on a {} W connector", r.power_w, r.max_power_w);
        raise(state, AlarmKind::Overload, subject, detail).await;
    } else if !over && st.overloaded.remove(&subject) {
        clear(state, AlarmKind::Overload, subject, "power back within the rating").await;
    }
}

/// The session's anomaly flags raise an alarm, once per session.
async fn anomaly_rule(state: &Arc<NodeState>, st: &mut AlarmState, r: &SessionRecord) {
    let found: Vec<&str> = [
        FLAG_REGISTER_BACKWARDS,
        FLAG_ENERGY_EXCEEDS_CAPACITY,
        FLAG_ENERGY_POWER_MISMATCH,
    ]
    .into_iter()
    .filter(|f| r.flags.contains(*f))
    .collect();
    let new = !found.is_empty() && st.anomalies.insert(format!("{}|{}", r.transaction_id, found.join(",")));
    if r.status == SessionStatus::Ended {
        let prefix = format!("{}|", r.transaction_id);
        st.anomalies.retain(|k| !k.starts_with(&prefix));
    }
    if !new {
        return;
    }
    raise(
        state,
        AlarmKind::MeterAnomaly,
        format!("session:{}", r.transaction_id),
        format!("{} at charger {}", found.join(", "), r.charger_id),
    )
    .await;
}

/// When a session at `soc_now` % will reach `target` % at its pace since
/// `first` (charger ms, %), if that is after `departure_ms`: the estimate.
pub fn late_for_departure(first: (i64, u32), now: (i64, u32), target: u32, departure_ms: i64) -> Option<i64> {
    let (t0, s0) = first;
    let (t1, s1) = now;
    if s1 >= target || s1 <= s0 || t1 - t0 < 60_000 {
        return None;
    }
    let per_point = (t1 - t0) / i64::from(s1 - s0);
    let eta = t1 + per_point * i64::from(target - s1);
    (eta > departure_ms).then_some(eta)
}

async fn low_power_rule(
    state: &Arc<NodeState>,
    st: &mut AlarmState,
    r: &SessionRecord,
    ev_max_w: Option<u32>,
    limit_w: Option<u32>,
) {
    let subject = format!("session:{}", r.transaction_id);
    if r.status != SessionStatus::Active {
        if st.low.remove(&r.transaction_id).is_some_and(|l| l.raised) {
            clear(state, AlarmKind::LowPower, subject, "the session ended").await;
        }
        return;
    }
    let track = st.low.entry(r.transaction_id.clone()).or_default();
    // What the car, the connector and the limit allow.
    let mut allowed = r.max_power_w;
    for cap in [ev_max_w, limit_w].into_iter().flatten() {
        allowed = allowed.min(cap);
    }
    let tapering = r.soc_percent.is_some_and(|s| s >= st.t.low_power_below_soc);
    let low = allowed > 0
        && !tapering
        && r.samples > 1
        && u64::from(r.power_w) * 100 < u64::from(allowed) * u64::from(st.t.low_power_percent);
    let mut reason = None;
    if low {
        let since = *track.below_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= Duration::from_secs(st.t.low_power_after_s) {
            reason = Some(format!(
                "{} W where the car, connector and limit allow {allowed} W",
                r.power_w
            ));
        }
    } else {
        track.below_since = None;
    }
    // The driver's departure.
    if let (Some(soc), Some(driver)) = (r.soc_percent, r.driver_id.clone()) {
        let first = *track.first_soc.get_or_insert((r.last.at_ms, soc));
        if track.plan.is_none() {
            let (n2, site, after) = (state.clone(), r.site_id.clone(), r.last.at_ms);
            let plan = tokio::task::spawn_blocking(move || {
                let target = n2.hub.drivers.get(&driver).ok()?.preferences.target_soc_percent?;
                let dep = crate::drivers::departure_ms(&n2, &driver, site.as_deref(), after)?;
                Some((target, dep))
            })
            .await
            .ok()
            .flatten();
            track.plan = Some(plan);
        }
        if reason.is_none()
            && let Some(Some((target, dep))) = track.plan
            && let Some(eta) = late_for_departure(first, (r.last.at_ms, soc), target, dep)
        {
            reason = Some(format!(
                "at this pace {target} % is reached at {}, after the departure at {}",
                rfc3339(eta / 1000),
                rfc3339(dep / 1000)
            ));
        }
    }
    match reason {
        Some(detail) if !track.raised => {
            track.raised = true;
            raise(state, AlarmKind::LowPower, subject, detail).await;
        }
        None if track.raised => {
            track.raised = false;
            clear(state, AlarmKind::LowPower, subject, "the session gets its power again").await;
        }
        _ => {}
    }
}

/// Checks certificates now and then (see the module docs).
pub async fn certificate_watch(state: Arc<NodeState>, shutdown: tokio_util::sync::CancellationToken) {
    let every = Duration::from_secs(state.config.alarms.certificate_check_s);
    loop {
        let st = state.clone();
        let r = tokio::task::spawn_blocking(move || check_certificates(&st)).await;
        match r {
            Ok(Ok((raise_now, clear_now))) => {
                for (subject, detail) in raise_now {
                    raise(&state, AlarmKind::CertificateExpiring, subject, detail).await;
                }
                for subject in clear_now {
                    clear(&state, AlarmKind::CertificateExpiring, subject, "renewed or revoked").await;
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "checking certificates failed"),
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

type Subjects = (Vec<(String, String)>, Vec<String>);

fn check_certificates(state: &NodeState) -> Result<Subjects, laddnet_pki::PkiError> {
    use laddnet_pki::CertStatus;
    let now = state.ca.now();
    let horizon = i64::from(state.config.alarms.certificate_expiry_days) * 86_400;
    let (all, _) = state.ca.list(&laddnet_pki::CertFilter::default(), None, usize::MAX)?;
    let renewed: std::collections::HashSet<&str> = all.iter().filter_map(|c| c.renewed_from.as_deref()).collect();
    let (mut raise_now, mut clear_now) = (Vec::new(), Vec::new());
    for c in &all {
        let subject = format!("certificate:{}", c.serial);
        let done = renewed.contains(c.serial.as_str()) || c.status(now) == CertStatus::Revoked;
        if done {
            clear_now.push(subject);
        } else if c.status(now) == CertStatus::Valid && c.not_after - now < horizon {
            let days = (c.not_after - now).div_euclid(86_400);
            raise_now.push((
                subject,
                format!(
                    "{} certificate of {} expires in {days} days",
                    c.profile.as_str(),
                    c.subject
                ),
            ));
        }
    }
    Ok((raise_now, clear_now))
}

/// Counts this connection; raises flapping at the threshold and, a window
/// later, clears it if the charger has calmed down.
async fn flapping(state: &Arc<NodeState>, myself: &ActorRef<AlarmMsg>, st: &mut AlarmState, charger_id: &str) {
    let window = Duration::from_secs(st.t.flap_window_s);
    let now = std::time::Instant::now();
    let q = st.connects.entry(charger_id.to_string()).or_default();
    q.push_back(now);
    while q.front().is_some_and(|t| now.duration_since(*t) > window) {
        q.pop_front();
    }
    let recent = q.len();
    if recent < st.t.flap_reconnects as usize {
        return;
    }
    raise(
        state,
        AlarmKind::Flapping,
        format!("charger:{charger_id}"),
        format!("{recent} connections within {} s", window.as_secs()),
    )
    .await;
    if st.flap_watched.insert(charger_id.to_string()) {
        let id = charger_id.to_string();
        myself.send_after(window, move || AlarmMsg::FlapCheck(id));
    }
}

#[cfg(test)]
mod tests {
    use super::late_for_departure;

    #[test]
    fn the_pace_decides_whether_a_session_finishes_before_departure() {
        let min = 60_000;
        // 20 % → 30 % in 10 minutes: 80 % is 50 minutes further.
        let eta = late_for_departure((0, 20), (10 * min, 30), 80, 30 * min);
        assert_eq!(eta, Some(60 * min));
        assert_eq!(late_for_departure((0, 20), (10 * min, 30), 80, 90 * min), None);
        // Too early to tell, no progress, or already there: no verdict.
        assert_eq!(late_for_departure((0, 20), (30_000, 25), 80, 0), None);
        assert_eq!(late_for_departure((0, 20), (10 * min, 20), 80, 0), None);
        assert_eq!(late_for_departure((0, 20), (10 * min, 85), 80, 0), None);
    }
}
