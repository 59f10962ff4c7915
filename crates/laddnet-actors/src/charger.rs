//! One actor per connected charger. It persists what the charger reports
//! and supervises a [`SessionActor`] per open session, one-for-one with a
//! restart budget: a session that fails is restarted alone from the store;
//! a session that keeps failing escalates (this actor fails, and its
//! supervisor closes the charger's connection). A watchdog pings every
//! session: one that does not answer in time is killed and replaced, and
//! one that has had no meter data for too long is flagged stuck.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use laddnet_core::charging::{Connector, ConnectorStatus, TxEvent};
use laddnet_store::SharedStore;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::ActorConfig;
use crate::repo::{self, Applied, RepoError};
use crate::session::{SessionActor, SessionArgs, SessionFault, SessionMsg};

pub struct ChargerActor;

pub struct ChargerArgs {
    pub store: SharedStore,
    pub charger_id: String,
    pub site_id: Option<String>,
    pub connectors: Vec<Connector>,
    pub config: ActorConfig,
    /// The ownership this actor writes under (`store` is fenced by it):
    /// on detach the sessions are interrupted and the charger released in
    /// one fenced transaction. None: a store of its own (tests).
    pub fence: Option<crate::cluster::Fence>,
}

struct Live {
    actor: ActorRef<SessionMsg>,
    connector_id: u32,
    flagged_stuck: bool,
}

pub struct ChargerState {
    args: ChargerArgs,
    sessions: HashMap<String, Live>,
    by_actor: HashMap<ActorId, String>,
    failures: VecDeque<Instant>,
    restarts: u64,
    /// The session watchdog's timer: runs only while sessions are open, so
    /// an idle charger holds no timer task.
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

pub enum ChargerMsg {
    /// Transaction events in order; one result each.
    Event(Vec<TxEvent>, RpcReplyPort<Vec<Result<Applied, RepoError>>>),
    Status {
        connector_id: u32,
        status: ConnectorStatus,
        error_code: String,
        /// When the charger saw it (unix ms), for the status history.
        at_ms: i64,
        reply: RpcReplyPort<Result<(), RepoError>>,
    },
    Heartbeat,
    Watchdog,
    /// The charger's stream ended: sessions become interrupted, the actor stops.
    Detach(RpcReplyPort<()>),
    /// Test support: inject a fault into a session's actor.
    InjectFault(String, SessionFault, RpcReplyPort<bool>),
    /// Test support: the session actors alive now, and restarts so far.
    Inspect(RpcReplyPort<(Vec<(String, ActorId)>, u64)>),
}

/// Whether the stored session has ended (its actor stops normally then; a
/// failure for any other reason goes through supervision and its budget).
async fn session_ended(store: &SharedStore, tx_id: &str) -> bool {
    let (store, id) = (store.clone(), tx_id.to_string());
    matches!(
        tokio::task::spawn_blocking(move || repo::get_session(store.as_ref(), &id)).await,
        Ok(Ok(Some(r))) if r.status == laddnet_core::charging::SessionStatus::Ended
    )
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl ChargerActor {
    async fn spawn_session(
        myself: &ActorRef<ChargerMsg>,
        state: &mut ChargerState,
        tx_id: &str,
        connector_id: u32,
    ) -> Result<ActorRef<SessionMsg>, ActorProcessingErr> {
        let max_power_w = state
            .args
            .connectors
            .iter()
            .find(|c| c.connector_id == connector_id)
            .map_or(0, |c| c.max_power_w);
        let args = SessionArgs {
            store: state.args.store.clone(),
            transaction_id: tx_id.to_string(),
            charger_id: state.args.charger_id.clone(),
            site_id: state.args.site_id.clone(),
            max_power_w,
            bill_in: state.args.config.bill_on_end.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await?;
        if state.watchdog.is_none() {
            state.watchdog = Some(myself.send_interval(state.args.config.watchdog_interval, || ChargerMsg::Watchdog));
        }
        state.by_actor.insert(actor.get_id(), tx_id.to_string());
        state.sessions.insert(
            tx_id.to_string(),
            Live {
                actor: actor.clone(),
                connector_id,
                flagged_stuck: false,
            },
        );
        Ok(actor)
    }

    /// Hands a run of one transaction's events to its session actor
    /// (spawned if needed) and returns one result per event.
    async fn session_run(
        myself: &ActorRef<ChargerMsg>,
        state: &mut ChargerState,
        run: Vec<TxEvent>,
    ) -> Result<Vec<Result<Applied, RepoError>>, ActorProcessingErr> {
        let (tx_id, connector_id, n) = (run[0].transaction_id.clone(), run[0].connector_id, run.len());
        let all = |e: &dyn Fn() -> RepoError| (0..n).map(|_| Err(e())).collect::<Vec<_>>();
        let actor = match state.sessions.get(&tx_id) {
            Some(live) => live.actor.clone(),
            None => Self::spawn_session(myself, state, &tx_id, connector_id).await?,
        };
        let timeout = state.args.config.call_timeout;
        let retry = run.clone();
        Ok(match actor.call(|r| SessionMsg::Event(run, r), Some(timeout)).await {
            Ok(CallResult::Success(r)) => r,
            // The actor stopped under us (its session had just ended):
            // a fresh one, from the store, takes the events.
            Ok(CallResult::SenderError) | Err(_) if session_ended(&state.args.store, &tx_id).await => {
                state.sessions.remove(&tx_id);
                state.by_actor.remove(&actor.get_id());
                let fresh = Self::spawn_session(myself, state, &tx_id, connector_id).await?;
                match fresh.call(|r| SessionMsg::Event(retry, r), Some(timeout)).await {
                    Ok(CallResult::Success(r)) => r,
                    _ => all(&|| RepoError::Gone("session actor failed while handling the event".into())),
                }
            }
            Ok(CallResult::Timeout) => {
                // A hung handler: replace it; the charger resends the unacknowledged events.
                actor.kill();
                state.sessions.remove(&tx_id);
                state.by_actor.remove(&actor.get_id());
                Self::replace(myself, state, &tx_id, connector_id, "event handler timed out").await?;
                all(&|| RepoError::Timeout)
            }
            Ok(CallResult::SenderError) | Err(_) => {
                all(&|| RepoError::Gone("session actor failed while handling the event".into()))
            }
        })
    }

    /// Counts a failure against the budget; Err escalates.
    fn charge_budget(state: &mut ChargerState, why: &str) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        let window = state.args.config.restart_window;
        state.failures.push_back(now);
        while state.failures.front().is_some_and(|t| now.duration_since(*t) > window) {
            state.failures.pop_front();
        }
        if state.failures.len() as u32 > state.args.config.max_restarts {
            tracing::error!(charger_id = %state.args.charger_id, reason = why, "session restart budget exhausted; escalating");
            return Err(format!("session restart budget exhausted ({why})").into());
        }
        state.restarts += 1;
        Ok(())
    }

    /// Starts a fresh actor for a session whose actor failed. It reads
    /// nothing now: its first event reloads what it needs from the store.
    async fn replace(
        myself: &ActorRef<ChargerMsg>,
        state: &mut ChargerState,
        tx_id: &str,
        connector_id: u32,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        Self::charge_budget(state, why)?;
        Self::spawn_session(myself, state, tx_id, connector_id).await?;
        tracing::info!(charger_id = %state.args.charger_id, transaction_id = %tx_id, reason = why, "session actor restarted from the store");
        Ok(())
    }
}

impl Actor for ChargerActor {
    type Msg = ChargerMsg;
    type State = ChargerState;
    type Arguments = ChargerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ChargerMsg>,
        args: ChargerArgs,
    ) -> Result<ChargerState, ActorProcessingErr> {
        Ok(ChargerState {
            args,
            sessions: HashMap::new(),
            by_actor: HashMap::new(),
            failures: VecDeque::new(),
            restarts: 0,
            watchdog: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ChargerMsg>,
        msg: ChargerMsg,
        state: &mut ChargerState,
    ) -> Result<(), ActorProcessingErr> {
        // Boxed: the large handling future exists only while a message is
        // handled, not in every idle charger's actor task.
        Box::pin(Self::handle_msg(myself, msg, state)).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ChargerMsg>,
        evt: SupervisionEvent,
        state: &mut ChargerState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(tx_id) = state.by_actor.remove(&cell.get_id())
                    && state
                        .sessions
                        .get(&tx_id)
                        .is_some_and(|l| l.actor.get_id() == cell.get_id())
                {
                    state.sessions.remove(&tx_id);
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(tx_id) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                let mut connector_id = 1;
                if let Some(l) = state.sessions.get(&tx_id)
                    && l.actor.get_id() == cell.get_id()
                {
                    connector_id = l.connector_id;
                    state.sessions.remove(&tx_id);
                }
                tracing::warn!(charger_id = %state.args.charger_id, transaction_id = %tx_id, error = %err, "session actor failed");
                Self::replace(&myself, state, &tx_id, connector_id, "session actor panicked").await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Typed access to a charger actor.
#[derive(Clone)]
pub struct ChargerHandle {
    pub(crate) actor: ActorRef<ChargerMsg>,
    pub(crate) timeout: Duration,
}

impl ChargerHandle {
    async fn ask<T: Send + 'static>(&self, f: impl FnOnce(RpcReplyPort<T>) -> ChargerMsg) -> Result<T, RepoError> {
        // The charger actor may itself wait on a session (call_timeout) and
        // then replace it: give it room for both.
        match self.actor.call(f, Some(self.timeout * 3)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => Err(RepoError::Timeout),
            Ok(CallResult::SenderError) | Err(_) => Err(RepoError::Gone("charger actor stopped".into())),
        }
    }

    /// Accepts a transaction event; Ok means it is durably stored.
    pub async fn event(&self, e: TxEvent) -> Result<Applied, RepoError> {
        self.events(vec![e])
            .await?
            .pop()
            .unwrap_or_else(|| Err(RepoError::Gone("no result for the event".into())))
    }

    /// Accepts a run of events in order (those of one transaction stored in
    /// one transaction); one result each, Ok meaning durably stored.
    pub async fn events(&self, events: Vec<TxEvent>) -> Result<Vec<Result<Applied, RepoError>>, RepoError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.ask(|r| ChargerMsg::Event(events, r)).await
    }

    pub async fn status(
        &self,
        connector_id: u32,
        status: ConnectorStatus,
        error_code: String,
        at_ms: i64,
    ) -> Result<(), RepoError> {
        self.ask(|reply| ChargerMsg::Status {
            connector_id,
            status,
            error_code,
            at_ms,
            reply,
        })
        .await?
    }

    pub fn heartbeat(&self) {
        let _ = self.actor.cast(ChargerMsg::Heartbeat);
    }

    /// The stream ended. Returns once sessions are marked interrupted.
    pub async fn detach(&self) {
        let _ = self.ask(ChargerMsg::Detach).await;
    }

    pub async fn inject_fault(&self, transaction_id: &str, fault: SessionFault) -> bool {
        self.ask(|r| ChargerMsg::InjectFault(transaction_id.to_string(), fault, r))
            .await
            .unwrap_or(false)
    }

    /// Live session actors (transaction id, actor id) and restarts so far.
    pub async fn inspect(&self) -> Result<(Vec<(String, ActorId)>, u64), RepoError> {
        self.ask(ChargerMsg::Inspect).await
    }

    pub fn is_alive(&self) -> bool {
        !matches!(
            self.actor.get_status(),
            ractor::ActorStatus::Stopped | ractor::ActorStatus::Stopping
        )
    }
}

impl ChargerActor {
    async fn handle_msg(
        myself: ActorRef<ChargerMsg>,
        msg: ChargerMsg,
        state: &mut ChargerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ChargerMsg::Event(events, reply) => {
                // Runs of one transaction each, in order.
                let mut results = Vec::with_capacity(events.len());
                let mut rest = events.into_iter().peekable();
                while let Some(first) = rest.next() {
                    let mut run = vec![first];
                    while let Some(e) = rest.next_if(|e| e.transaction_id == run[0].transaction_id) {
                        run.push(e);
                    }
                    results.extend(Self::session_run(&myself, state, run).await?);
                }
                let _ = reply.send(results);
            }
            ChargerMsg::Status {
                connector_id,
                status,
                error_code,
                at_ms,
                reply,
            } => {
                let (store, id) = (state.args.store.clone(), state.args.charger_id.clone());
                let r = tokio::task::spawn_blocking(move || {
                    repo::set_connector_status(store.as_ref(), &id, connector_id, status, &error_code, now(), at_ms)
                })
                .await
                .map_err(|e| RepoError::Gone(e.to_string()))
                .and_then(|r| r);
                let _ = reply.send(r);
            }
            ChargerMsg::Heartbeat => {
                let (store, id) = (state.args.store.clone(), state.args.charger_id.clone());
                let _ = tokio::task::spawn_blocking(move || repo::touch_charger(store.as_ref(), &id, now())).await;
            }
            ChargerMsg::Watchdog => {
                if state.sessions.is_empty() {
                    if let Some(timer) = state.watchdog.take() {
                        timer.abort();
                    }
                    return Ok(());
                }
                let cfg = state.args.config.clone();
                let ids: Vec<String> = state.sessions.keys().cloned().collect();
                for tx_id in ids {
                    let Some(live) = state.sessions.get(&tx_id) else {
                        continue;
                    };
                    let (actor, connector_id) = (live.actor.clone(), live.connector_id);
                    match actor.call(SessionMsg::Ping, Some(cfg.ping_timeout)).await {
                        Ok(CallResult::Success(last_event)) => {
                            let live = state.sessions.get_mut(&tx_id);
                            if let Some(live) = live
                                && !live.flagged_stuck
                                && last_event.elapsed() > cfg.stuck_after
                            {
                                live.flagged_stuck = true;
                                let _ = live.actor.cast(SessionMsg::MarkStuck);
                            }
                        }
                        Ok(CallResult::Timeout) => {
                            tracing::warn!(charger_id = %state.args.charger_id, transaction_id = %tx_id, "session actor did not answer the watchdog; replacing it");
                            actor.kill();
                            state.sessions.remove(&tx_id);
                            state.by_actor.remove(&actor.get_id());
                            Self::replace(&myself, state, &tx_id, connector_id, "watchdog ping timed out").await?;
                        }
                        _ => {}
                    }
                }
            }
            ChargerMsg::Detach(reply) => {
                for live in state.sessions.values() {
                    live.actor.stop(Some("charger detached".into()));
                }
                state.sessions.clear();
                let (store, id, fence) = (
                    state.args.store.clone(),
                    state.args.charger_id.clone(),
                    state.args.fence.clone(),
                );
                let released = tokio::task::spawn_blocking(move || match fence {
                    Some(f) => crate::cluster::release(store.as_ref(), &f, now()),
                    None => repo::interrupt_sessions(store.as_ref(), &id, now()),
                });
                match released.await {
                    Ok(Ok(ids)) if !ids.is_empty() => {
                        tracing::info!(charger_id = %state.args.charger_id, sessions = ids.len(), "charger dropped mid-session; sessions interrupted")
                    }
                    Ok(Err(RepoError::Store(laddnet_store::StoreError::Fenced(why)))) => {
                        tracing::info!(charger_id = %state.args.charger_id, reason = %why, "another node owns the charger now; its sessions are left to it")
                    }
                    Ok(Err(e)) => {
                        tracing::error!(charger_id = %state.args.charger_id, error = %e, "could not mark sessions interrupted")
                    }
                    _ => {}
                }
                let _ = reply.send(());
                myself.stop(Some("detached".into()));
            }
            ChargerMsg::InjectFault(tx_id, fault, reply) => {
                let found = state
                    .sessions
                    .get(&tx_id)
                    .map(|l| l.actor.cast(SessionMsg::Fault(fault)).is_ok())
                    .unwrap_or(false);
                let _ = reply.send(found);
            }
            ChargerMsg::Inspect(reply) => {
                let v = state
                    .sessions
                    .iter()
                    .map(|(k, l)| (k.clone(), l.actor.get_id()))
                    .collect();
                let _ = reply.send((v, state.restarts));
            }
        }
        Ok(())
    }
}
