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
//! In a cluster a site's chargers may be connected to different nodes, and
//! one grid connection must still be shared as one: the site's actor lives
//! on one node, the one holding the site's lease in the store
//! ([`laddnet_actors::cluster::hold_site`]). Every other node forwards its
//! readings of the site's sessions to that node (`ClusterService.SiteReadings`,
//! batched), and the actor sends limits to chargers wherever they are
//! connected (through their node, as operator commands are). Before it
//! sends, the actor checks (at most once a second) that it still holds the
//! site; one that lost it (its node was paused past its lease) stops, and
//! the next reading finds the new manager. When the managing node dies, the
//! next reading anywhere takes the site over with a higher epoch.
//!
//! The actor starts from the site's active sessions in the store (their
//! last power; the limits it then sends cover them all) and follows them
//! by their readings.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use laddnet_actors::cluster::{self as ownership, MemberRecord, SiteHolder};
use laddnet_core::charging::{SessionRecord, SessionStatus};
use laddnet_core::load::{Demand, plan};
use laddnet_incidents::AlarmKind;
use laddnet_proto::v1;
use laddnet_proto::v1::cluster_service_client::ClusterServiceClient;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use crate::now_ms;
use crate::state::NodeState;

/// How long a site without a limit is remembered before it is read again.
const NO_LIMIT_RECHECK: Duration = Duration::from_secs(30);
/// A session with no reading for this long is dropped from the plan.
const STALE: Duration = Duration::from_secs(600);
/// How long a site managed by another node is remembered before its
/// manager is looked up again.
const REMOTE_RECHECK: Duration = Duration::from_secs(5);
/// How often a site's actor checks it still holds the site, at most.
const HOLD_RECHECK: Duration = Duration::from_secs(1);
/// Readings waiting to be forwarded to other nodes; more are dropped (the
/// next reading of the session brings the same news).
const FORWARD_QUEUE: usize = 8_192;
/// Readings sent to another node in one call, at most.
const FORWARD_BATCH: usize = 512;
/// How long a call to another node (a batch, a limit) may take.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// As forwarded to the node managing `site`.
    pub fn to_proto(&self, site: &str) -> v1::SiteReading {
        v1::SiteReading {
            site_id: site.to_string(),
            transaction_id: self.transaction_id.clone(),
            charger_id: self.charger_id.clone(),
            connector_id: self.connector_id,
            max_w: self.max_w,
            ev_max_w: self.ev_max_w.unwrap_or(0),
            power_w: self.power_w,
            started_ms: self.started_ms,
            ended: self.ended,
            driver_id: self.driver_id.clone().unwrap_or_default(),
        }
    }

    /// A forwarded reading, checked: ids must be well formed.
    pub fn from_proto(r: v1::SiteReading) -> Result<(String, Reading), String> {
        laddnet_core::SiteId::new(r.site_id.clone()).map_err(|e| format!("site_id: {e}"))?;
        laddnet_core::ChargerId::new(r.charger_id.clone()).map_err(|e| format!("charger_id: {e}"))?;
        if r.transaction_id.is_empty() || r.transaction_id.len() > 128 {
            return Err("transaction_id must be 1 to 128 bytes".into());
        }
        if r.driver_id.len() > 128 {
            return Err("driver_id is longer than 128 bytes".into());
        }
        Ok((
            r.site_id,
            Reading {
                transaction_id: r.transaction_id,
                charger_id: r.charger_id,
                connector_id: r.connector_id,
                max_w: r.max_w,
                ev_max_w: (r.ev_max_w > 0).then_some(r.ev_max_w),
                power_w: r.power_w,
                started_ms: r.started_ms,
                ended: r.ended,
                driver_id: (!r.driver_id.is_empty()).then_some(r.driver_id),
            },
        ))
    }

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
    /// The site's lease epoch this actor manages it under (0: a node not
    /// yet in the cluster).
    epoch: u64,
    /// When it last found it still holds the site.
    held_checked: Instant,
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
    type Arguments = (String, u32, u64);

    async fn pre_start(
        &self,
        myself: ActorRef<SiteMsg>,
        (site_id, limit_w, epoch): (String, u32, u64),
    ) -> Result<SiteState, ActorProcessingErr> {
        if let Some(node) = self.node.upgrade() {
            myself.send_interval(Duration::from_millis(node.config.load.replan_ms), || SiteMsg::Tick);
        }
        // What the store knows of the site's running sessions: a node that
        // takes the site over (or starts) plans for all of them from the
        // first reading on, not for the first one to report alone.
        let mut sessions = BTreeMap::new();
        if let Some(node) = self.node.upgrade() {
            let (store, id) = (node.store.clone(), site_id.clone());
            let open =
                tokio::task::spawn_blocking(move || laddnet_actors::repo::open_sessions_at_site(store.as_ref(), &id))
                    .await;
            match open {
                Ok(Ok(open)) => {
                    for r in open.into_iter().filter(|r| r.status == SessionStatus::Active) {
                        sessions.insert(
                            r.transaction_id.clone(),
                            Live {
                                reading: Reading::from_record(&r, None),
                                departure_ms: None,
                                sent: None,
                                seen: Instant::now(),
                                ignoring: false,
                            },
                        );
                    }
                }
                _ => {
                    tracing::warn!(site_id = %site_id, "the site's open sessions could not be read; they are learnt from their readings")
                }
            }
        }
        Ok(SiteState {
            site_id,
            epoch,
            held_checked: Instant::now(),
            limit_w,
            sessions,
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
        if !matches!(msg, SiteMsg::Load(_)) && !still_held(&node, st).await {
            tracing::info!(site_id = %st.site_id, epoch = st.epoch, "another node manages this site's load now; its actor here stops");
            node.load.forget(&st.site_id, &myself);
            myself.stop(None);
            return Ok(());
        }
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
    // Chargers connected here first, then those of other nodes (through
    // their node, at once).
    let mut remote = Vec::new();
    for (k, limit) in sends {
        let Some(live) = st.sessions.get_mut(&k) else { continue };
        let cmd = v1::Command {
            command_id: format!("limit-{}-{}", live.reading.transaction_id, now_ms()),
            kind: Some(v1::command::Kind::SetChargingLimit(v1::SetChargingLimit {
                connector_id: live.reading.connector_id,
                limit_w: limit,
            })),
        };
        match node.chargers.outbound(&live.reading.charger_id) {
            Some(out) => {
                if out.send_command(cmd).await {
                    live.sent = Some((limit, Instant::now()));
                }
            }
            None => remote.push((k, limit, live.reading.charger_id.clone(), cmd)),
        }
    }
    if remote.is_empty() {
        return;
    }
    let by = format!("site:{}", st.site_id);
    let results = futures::future::join_all(remote.into_iter().map(|(k, limit, charger, cmd)| {
        let by = &by;
        async move {
            let sent =
                tokio::time::timeout(REMOTE_TIMEOUT, crate::cluster::command(node, &charger, cmd, false, by)).await;
            (k, limit, matches!(sent, Ok(Ok(_))))
        }
    }))
    .await;
    for (k, limit, ok) in results {
        if ok && let Some(live) = st.sessions.get_mut(&k) {
            live.sent = Some((limit, Instant::now()));
        }
    }
}

/// Whether this actor still manages its site (checked in the store at most
/// once every [`HOLD_RECHECK`]).
async fn still_held(node: &Arc<NodeState>, st: &mut SiteState) -> bool {
    if st.held_checked.elapsed() < HOLD_RECHECK {
        return true;
    }
    let Some(me) = node.cluster.me() else { return true };
    let (store, site, epoch) = (node.store.clone(), st.site_id.clone(), st.epoch);
    let held = tokio::task::spawn_blocking(move || ownership::holds_site(store.as_ref(), &site, &me, epoch)).await;
    match held {
        Ok(Ok(held)) => {
            st.held_checked = Instant::now();
            held
        }
        // The store cannot say: keep managing (the limits stand) and ask
        // again at the next message.
        _ => true,
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
    /// Another node manages the site (as of the instant).
    Remote(MemberRecord, Instant),
}

/// Where a site's readings go.
enum Route {
    Here(ActorRef<SiteMsg>),
    There(MemberRecord),
}

/// The site actors of this node, by site id, and where the other sites'
/// readings go.
#[derive(Default)]
pub struct LoadManager {
    sites: Mutex<HashMap<String, Entry>>,
    forward: std::sync::OnceLock<mpsc::Sender<(MemberRecord, v1::SiteReading)>>,
}

impl LoadManager {
    fn lookup(&self, site: &str) -> Option<Option<Route>> {
        match self.sites.lock().unwrap_or_else(|p| p.into_inner()).get(site) {
            Some(Entry::Actor(a)) => Some(Some(Route::Here(a.clone()))),
            Some(Entry::NoLimit(at)) if at.elapsed() < NO_LIMIT_RECHECK => Some(None),
            Some(Entry::Remote(m, at)) if at.elapsed() < REMOTE_RECHECK => Some(Some(Route::There(m.clone()))),
            _ => None,
        }
    }

    /// Where the site's readings go: its actor here (started when this node
    /// takes the site), the node managing it, or nowhere (no grid limit).
    async fn route(&self, node: &Arc<NodeState>, site: &str) -> Option<Route> {
        if let Some(found) = self.lookup(site) {
            return found;
        }
        let (n2, id) = (node.clone(), site.to_string());
        let me = node.cluster.me();
        let found = tokio::task::spawn_blocking(move || {
            let Some(rec) = laddnet_actors::repo::get_site(n2.store.as_ref(), &id)? else {
                return Ok((0, None));
            };
            if rec.grid_limit_w == 0 {
                return Ok((0, None));
            }
            let holder = match &me {
                Some(me) => ownership::hold_site(n2.store.as_ref(), &id, me, now_ms())?,
                None => SiteHolder::Mine(0),
            };
            Ok::<_, laddnet_actors::repo::RepoError>((rec.grid_limit_w, Some(holder)))
        })
        .await
        .ok()?;
        let (limit, holder) = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(site_id = %site, error = %e, "the site's load manager could not be looked up");
                return None;
            }
        };
        let epoch = match holder {
            None => {
                self.sites
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(site.to_string(), Entry::NoLimit(Instant::now()));
                return None;
            }
            Some(SiteHolder::Other(m)) => {
                self.sites
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(site.to_string(), Entry::Remote(m.clone(), Instant::now()));
                return Some(Route::There(m));
            }
            Some(SiteHolder::Mine(epoch)) => epoch,
        };
        let (actor, _) = Actor::spawn(
            None,
            SiteActor {
                node: Arc::downgrade(node),
            },
            (site.to_string(), limit, epoch),
        )
        .await
        .ok()?;
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Entry::Actor(other)) = sites.get(site) {
            // Another reading started one meanwhile.
            actor.stop(None);
            return Some(Route::Here(other.clone()));
        }
        tracing::info!(site_id = %site, grid_limit_w = limit, epoch, "site load management started on this node");
        sites.insert(site.to_string(), Entry::Actor(actor.clone()));
        Some(Route::Here(actor))
    }

    /// The site's actor stopped (it no longer holds the site).
    fn forget(&self, site: &str, actor: &ActorRef<SiteMsg>) {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(sites.get(site), Some(Entry::Actor(a)) if a.get_id() == actor.get_id()) {
            sites.remove(site);
        }
    }

    /// The node believed to manage `site` does not (or cannot be reached):
    /// look it up again at the next reading.
    fn forget_remote(&self, site: &str) {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(sites.get(site), Some(Entry::Remote(..))) {
            sites.remove(site);
        }
    }

    /// A site's load, when the site is managed here.
    pub async fn site_load(&self, site: &str) -> Option<SiteLoad> {
        let Some(Some(Route::Here(actor))) = self.lookup(site) else {
            return None;
        };
        ractor::call!(actor, SiteMsg::Load).ok()
    }

    /// Readings another node forwarded: each goes to its site's actor when
    /// this node manages (or now takes) the site. Returns how many were
    /// taken and the sites this node does not manage.
    pub async fn forwarded(&self, node: &Arc<NodeState>, readings: Vec<(String, Reading)>) -> (u32, Vec<String>) {
        let mut accepted = 0;
        let mut not_here: Vec<String> = Vec::new();
        for (site, r) in readings {
            if not_here.contains(&site) {
                continue;
            }
            match self.route(node, &site).await {
                Some(Route::Here(actor)) => {
                    if actor.cast(SiteMsg::Reading(r)).is_ok() {
                        accepted += 1;
                    }
                }
                _ => not_here.push(site),
            }
        }
        (accepted, not_here)
    }

    fn forwarder(&self, node: &Arc<NodeState>) -> &mpsc::Sender<(MemberRecord, v1::SiteReading)> {
        self.forward.get_or_init(|| {
            let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
            tokio::spawn(forward_loop(Arc::downgrade(node), rx));
            tx
        })
    }

    pub fn stop_all(&self) {
        for (_, e) in self.sites.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            if let Entry::Actor(a) = e {
                a.stop(None);
            }
        }
    }
}

/// Sends queued readings to the nodes managing their sites, in batches.
async fn forward_loop(node: Weak<NodeState>, mut rx: mpsc::Receiver<(MemberRecord, v1::SiteReading)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < FORWARD_BATCH {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let Some(node) = node.upgrade() else { return };
        if node.shutdown.is_cancelled() {
            return;
        }
        let mut groups: Vec<(MemberRecord, Vec<v1::SiteReading>)> = Vec::new();
        for (m, r) in batch {
            match groups
                .iter_mut()
                .find(|(g, _)| g.node == m.node && g.incarnation == m.incarnation)
            {
                Some((_, rs)) => rs.push(r),
                None => groups.push((m, vec![r])),
            }
        }
        for (m, readings) in groups {
            let sites: Vec<String> = {
                let mut s: Vec<String> = readings.iter().map(|r| r.site_id.clone()).collect();
                s.sort();
                s.dedup();
                s
            };
            let sent = tokio::time::timeout(REMOTE_TIMEOUT, async {
                let ch = node.cluster.channel(&m).await?;
                let mut req = tonic::Request::new(v1::SiteReadingsRequest { readings });
                req.set_timeout(REMOTE_TIMEOUT);
                ClusterServiceClient::new(ch)
                    .site_readings(req)
                    .await
                    .map(|r| r.into_inner())
            })
            .await;
            match sent {
                Ok(Ok(reply)) => {
                    for site in &reply.not_managed_here {
                        node.load.forget_remote(site);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(to = %m.node, code = ?e.code(), "forwarding site readings failed; their sites' manager is looked up again");
                    for site in &sites {
                        node.load.forget_remote(site);
                    }
                }
                Err(_) => {
                    tracing::warn!(to = %m.node, "forwarding site readings timed out; their sites' manager is looked up again");
                    for site in &sites {
                        node.load.forget_remote(site);
                    }
                }
            }
        }
    }
}

/// After every accepted meter event of a session at a site.
pub async fn on_reading(node: &Arc<NodeState>, record: &SessionRecord, ev_max_w: Option<u32>) {
    let Some(site) = record.site_id.as_deref() else { return };
    match node.load.route(node, site).await {
        Some(Route::Here(actor)) => {
            let _ = actor.cast(SiteMsg::Reading(Reading::from_record(record, ev_max_w)));
        }
        Some(Route::There(m)) => {
            let r = Reading::from_record(record, ev_max_w).to_proto(site);
            if node.load.forwarder(node).try_send((m, r)).is_err() {
                tracing::debug!(site_id = %site, "site readings queue full; a reading is not forwarded");
            }
        }
        None => {}
    }
}
