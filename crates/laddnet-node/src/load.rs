//! Site load management: a `SiteActor` per site with a grid limit shares
//! the limit among the site's active sessions ([`laddnet_core::load::plan`])
//! and sends each charger its connectors' limits (`SetChargingLimit`).
//!
//! - It re-plans at once when a session starts or ends, and every
//!   `load.replan_ms` in between (measured power changes what a session
//!   can use); a new limit goes out only when it moves by more than
//!   `load.hysteresis_w`, reductions first.
//! - A charger drawing more than its limit (plus 5 % and 200 W) for longer
//!   than `alarms.limit_grace_s` after it was sent raises `limit-ignored`.
//! - A site above its grid limit for longer than
//!   `alarms.site_overload_after_s` raises `site-overload`.
//!
//! The actor knows what the chargers report; after a node restart it
//! learns the sessions again from their next readings.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use laddnet_core::charging::{SessionRecord, SessionStatus};
use laddnet_core::load::{Demand, plan};
use laddnet_incidents::AlarmKind;
use laddnet_proto::v1;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::now_ms;
use crate::state::NodeState;

/// How long a site without a limit is remembered before it is read again.
const NO_LIMIT_RECHECK: Duration = Duration::from_secs(30);
/// A session with no reading for this long is dropped from the plan.
const STALE: Duration = Duration::from_secs(600);

/// What a meter reading tells the load manager.
#[derive(Debug, Clone)]
pub struct Reading {
    pub transaction_id: String,
    pub charger_id: String,
    pub connector_id: u32,
    pub max_w: u32,
    pub ev_max_w: Option<u32>,
    pub power_w: u32,
    pub started_ms: i64,
    pub ended: bool,
    pub driver_id: Option<String>,
}

impl Reading {
    pub fn from_record(r: &SessionRecord, ev_max_w: Option<u32>) -> Self {
        Reading {
            transaction_id: r.transaction_id.clone(),
            charger_id: r.charger_id.clone(),
            connector_id: r.connector_id,
            max_w: r.max_power_w,
            ev_max_w,
            power_w: r.power_w,
            started_ms: r.started_at_ms.unwrap_or(r.first.at_ms),
            ended: r.status == SessionStatus::Ended,
            driver_id: r.driver_id.clone(),
        }
    }
}

/// A site's load now, as `laddctl sites load` shows it.
#[derive(Debug, Clone, Default)]
pub struct SiteLoad {
    pub grid_limit_w: u32,
    pub power_w: u32,
    pub planned_at_ms: i64,
    pub sessions: Vec<(Reading, Option<u32>, Option<i64>)>,
}

pub enum SiteMsg {
    Reading(Reading),
    Departure(String, i64),
    Tick,
    Load(RpcReplyPort<SiteLoad>),
}

struct Live {
    reading: Reading,
    departure_ms: Option<i64>,
    /// The limit last sent and when.
    sent: Option<(u32, Instant)>,
    seen: Instant,
    ignoring: bool,
}

pub struct SiteState {
    site_id: String,
    limit_w: u32,
    sessions: BTreeMap<String, Live>,
    planned_at_ms: i64,
    over_since: Option<Instant>,
    site_alarm: bool,
    limit_read: Instant,
}

struct SiteActor {
    node: Weak<NodeState>,
}

impl Actor for SiteActor {
    type Msg = SiteMsg;
    type State = SiteState;
    type Arguments = (String, u32);

    async fn pre_start(
        &self,
        myself: ActorRef<SiteMsg>,
        (site_id, limit_w): (String, u32),
    ) -> Result<SiteState, ActorProcessingErr> {
        if let Some(node) = self.node.upgrade() {
            myself.send_interval(Duration::from_millis(node.config.load.replan_ms), || SiteMsg::Tick);
        }
        Ok(SiteState {
            site_id,
            limit_w,
            sessions: BTreeMap::new(),
            planned_at_ms: 0,
            over_since: None,
            site_alarm: false,
            limit_read: Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SiteMsg>,
        msg: SiteMsg,
        st: &mut SiteState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(node) = self.node.upgrade() else {
            myself.stop(None);
            return Ok(());
        };
        match msg {
            SiteMsg::Reading(r) => {
                let tx = r.transaction_id.clone();
                if r.ended {
                    if st.sessions.remove(&tx).is_some() {
                        replan(&node, st).await;
                    }
                } else if let Some(live) = st.sessions.get_mut(&tx) {
                    live.reading = r;
                    live.seen = Instant::now();
                    check_limit(&node, live).await;
                } else {
                    if let Some(driver) = r.driver_id.clone() {
                        let (n2, me, site, start) = (node.clone(), myself.clone(), st.site_id.clone(), r.started_ms);
                        let tx2 = tx.clone();
                        tokio::spawn(async move {
                            let n3 = n2.clone();
                            let dep = tokio::task::spawn_blocking(move || {
                                crate::drivers::departure_ms(&n3, &driver, Some(&site), start)
                            })
                            .await;
                            if let Ok(Some(ms)) = dep {
                                let _ = me.cast(SiteMsg::Departure(tx2, ms));
                            }
                        });
                    }
                    st.sessions.insert(
                        tx,
                        Live {
                            reading: r,
                            departure_ms: None,
                            sent: None,
                            seen: Instant::now(),
                            ignoring: false,
                        },
                    );
                    replan(&node, st).await;
                }
                check_site(&node, st).await;
            }
            SiteMsg::Departure(tx, ms) => {
                if let Some(live) = st.sessions.get_mut(&tx) {
                    live.departure_ms = Some(ms);
                    replan(&node, st).await;
                }
            }
            SiteMsg::Tick => {
                if node.shutdown.is_cancelled() {
                    myself.stop(None);
                    return Ok(());
                }
                if st.limit_read.elapsed() > Duration::from_secs(10) {
                    st.limit_read = Instant::now();
                    let (n2, id) = (node.clone(), st.site_id.clone());
                    let site =
                        tokio::task::spawn_blocking(move || laddnet_actors::repo::get_site(n2.store.as_ref(), &id))
                            .await;
                    if let Ok(Ok(Some(s))) = site {
                        st.limit_w = s.grid_limit_w;
                    }
                }
                st.sessions.retain(|_, l| l.seen.elapsed() < STALE);
                replan(&node, st).await;
                check_site(&node, st).await;
            }
            SiteMsg::Load(reply) => {
                let _ = reply.send(SiteLoad {
                    grid_limit_w: st.limit_w,
                    power_w: st.sessions.values().map(|l| l.reading.power_w).sum(),
                    planned_at_ms: st.planned_at_ms,
                    sessions: st
                        .sessions
                        .values()
                        .map(|l| (l.reading.clone(), l.sent.map(|s| s.0), l.departure_ms))
                        .collect(),
                });
            }
        }
        Ok(())
    }
}

/// Plans and sends what changed: reductions first, so the site never
/// goes over while limits move.
async fn replan(node: &Arc<NodeState>, st: &mut SiteState) {
    if st.limit_w == 0 {
        return;
    }
    let keys: Vec<String> = st.sessions.keys().cloned().collect();
    let demands: Vec<Demand> = keys
        .iter()
        .map(|k| {
            let l = &st.sessions[k];
            Demand {
                key: k.clone(),
                max_w: l.reading.max_w,
                ev_max_w: l.reading.ev_max_w,
                departure_ms: l.departure_ms,
                started_ms: l.reading.started_ms,
                measured_w: l.reading.power_w,
                limit_w: l.sent.map(|s| s.0),
            }
        })
        .collect();
    let limits = plan(st.limit_w, &demands, node.config.load.min_session_w);
    st.planned_at_ms = now_ms();
    let hysteresis = node.config.load.hysteresis_w;
    let mut sends: Vec<(String, u32)> = Vec::new();
    for (k, limit) in keys.iter().zip(limits) {
        let live = &st.sessions[k];
        let send = match live.sent {
            None => true,
            Some((old, _)) => limit < old || limit > old.saturating_add(hysteresis),
        };
        if send {
            sends.push((k.clone(), limit));
        }
    }
    // Reductions first.
    sends.sort_by_key(|(k, l)| i64::from(*l) - i64::from(st.sessions[k].sent.map(|s| s.0).unwrap_or(u32::MAX)));
    for (k, limit) in sends {
        let Some(live) = st.sessions.get_mut(&k) else { continue };
        let Some(out) = node.chargers.outbound(&live.reading.charger_id) else {
            continue;
        };
        let cmd = v1::Command {
            command_id: format!("limit-{}-{}", live.reading.transaction_id, now_ms()),
            kind: Some(v1::command::Kind::SetChargingLimit(v1::SetChargingLimit {
                connector_id: live.reading.connector_id,
                limit_w: limit,
            })),
        };
        if out.send_command(cmd).await {
            live.sent = Some((limit, Instant::now()));
        }
    }
}

/// The charger draws more than it was told, past the grace period.
async fn check_limit(node: &Arc<NodeState>, live: &mut Live) {
    let Some((limit, at)) = live.sent else { return };
    let tolerance = u64::from(limit) * 105 / 100 + 200;
    let over = u64::from(live.reading.power_w) > tolerance;
    let subject = format!("connector:{}/{}", live.reading.charger_id, live.reading.connector_id);
    if over && !live.ignoring && at.elapsed() > Duration::from_secs(node.config.alarms.limit_grace_s) {
        live.ignoring = true;
        let detail = format!(
            "{} W against a limit of {limit} W (session {})",
            live.reading.power_w, live.reading.transaction_id
        );
        crate::alarms::raise(node, AlarmKind::LimitIgnored, subject, detail).await;
    } else if !over && live.ignoring {
        live.ignoring = false;
        crate::alarms::clear(
            node,
            AlarmKind::LimitIgnored,
            subject,
            "the charger keeps its limit again",
        )
        .await;
    }
}

/// The site above its grid limit for longer than the reaction time.
async fn check_site(node: &Arc<NodeState>, st: &mut SiteState) {
    if st.limit_w == 0 {
        return;
    }
    let total: u64 = st.sessions.values().map(|l| u64::from(l.reading.power_w)).sum();
    let subject = format!("site:{}", st.site_id);
    if total > u64::from(st.limit_w) {
        let since = *st.over_since.get_or_insert_with(Instant::now);
        if !st.site_alarm && since.elapsed() > Duration::from_secs(node.config.alarms.site_overload_after_s) {
            st.site_alarm = true;
            let detail = format!("{total} W on a {} W grid connection", st.limit_w);
            crate::alarms::raise(node, AlarmKind::SiteOverload, subject, detail).await;
        }
    } else {
        st.over_since = None;
        if st.site_alarm {
            st.site_alarm = false;
            crate::alarms::clear(
                node,
                AlarmKind::SiteOverload,
                subject,
                "the site is within its limit again",
            )
            .await;
        }
    }
}

enum Entry {
    NoLimit(Instant),
    Actor(ActorRef<SiteMsg>),
}

/// The site actors of this node, by site id.
#[derive(Default)]
pub struct LoadManager {
    sites: Mutex<HashMap<String, Entry>>,
}

impl LoadManager {
    fn lookup(&self, site: &str) -> Option<Option<ActorRef<SiteMsg>>> {
        match self.sites.lock().unwrap_or_else(|p| p.into_inner()).get(site) {
            Some(Entry::Actor(a)) => Some(Some(a.clone())),
            Some(Entry::NoLimit(at)) if at.elapsed() < NO_LIMIT_RECHECK => Some(None),
            _ => None,
        }
    }

    /// The site's actor, started when the site has a grid limit.
    async fn actor(&self, node: &Arc<NodeState>, site: &str) -> Option<ActorRef<SiteMsg>> {
        if let Some(found) = self.lookup(site) {
            return found;
        }
        let (n2, id) = (node.clone(), site.to_string());
        let rec = tokio::task::spawn_blocking(move || laddnet_actors::repo::get_site(n2.store.as_ref(), &id))
            .await
            .ok()?
            .ok()?;
        let limit = rec.map(|r| r.grid_limit_w).unwrap_or(0);
        if limit == 0 {
            self.sites
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(site.to_string(), Entry::NoLimit(Instant::now()));
            return None;
        }
        let (actor, _) = Actor::spawn(
            None,
            SiteActor {
                node: Arc::downgrade(node),
            },
            (site.to_string(), limit),
        )
        .await
        .ok()?;
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Entry::Actor(other)) = sites.get(site) {
            // Another reading started one meanwhile.
            actor.stop(None);
            return Some(other.clone());
        }
        tracing::info!(site_id = %site, grid_limit_w = limit, "site load management started");
        sites.insert(site.to_string(), Entry::Actor(actor.clone()));
        Some(actor)
    }

    /// A site's load, when the site is managed here.
    pub async fn site_load(&self, site: &str) -> Option<SiteLoad> {
        let actor = self.lookup(site).flatten()?;
        ractor::call!(actor, SiteMsg::Load).ok()
    }

    pub fn stop_all(&self) {
        for (_, e) in self.sites.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            if let Entry::Actor(a) = e {
                a.stop(None);
            }
        }
    }
}

/// After every accepted meter event of a session at a site.
pub async fn on_reading(node: &Arc<NodeState>, record: &SessionRecord, ev_max_w: Option<u32>) {
    let Some(site) = record.site_id.as_deref() else { return };
    if let Some(actor) = node.load.actor(node, site).await {
        let _ = actor.cast(SiteMsg::Reading(Reading::from_record(record, ev_max_w)));
    }
}
