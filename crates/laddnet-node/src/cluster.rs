//! This node as a member of a cluster (see `laddnet_actors::cluster` for
//! the store side): it registers at start, renews its lease, reaps dead
//! members' chargers, and routes commands for chargers connected to other
//! nodes over node-to-node gRPC (mutual TLS with node certificates).
//!
//! A single node is a cluster of one: the same code runs, the lease is
//! renewed and nothing is ever forwarded.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use laddnet_actors::cluster::{self as ownership, MemberRecord, OwnerRecord};
use laddnet_proto::v1;
use laddnet_proto::v1::cluster_service_client::ClusterServiceClient;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;

use crate::state::NodeState;
use crate::status::NodeError;

/// Chargers released per reaping pass (the rest wait for the next pass).
const REAP_BATCH: usize = 1_000;

/// The node's membership and its channels to the other members.
#[derive(Default)]
pub struct Cluster {
    me: RwLock<Option<MemberRecord>>,
    /// TLS for calls to other nodes: the node's own certificate.
    pub(crate) client_tls: OnceLock<Arc<rustls::ClientConfig>>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Cluster {
    /// This node's membership (None before it joined).
    pub fn me(&self) -> Option<MemberRecord> {
        self.me.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_me(&self, m: MemberRecord) {
        *self.me.write().unwrap_or_else(|p| p.into_inner()) = Some(m);
    }

    pub(crate) async fn channel(&self, m: &MemberRecord) -> Result<Channel, Status> {
        let key = format!("{}#{}", m.address, m.incarnation);
        if let Some(c) = self.channels.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(c.clone());
        }
        let tls = self
            .client_tls
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("this node has not joined the cluster yet"))?;
        let name = if m.server_name.is_empty() {
            "localhost"
        } else {
            &m.server_name
        };
        let ch = laddnet_client::connect(&format!("https://{}", m.address), name, tls)
            .await
            .map_err(|e| Status::unavailable(format!("node {} at {}: {e}", m.node, m.address)))?;
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, ch.clone());
        Ok(ch)
    }
}

pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, laddnet_actors::repo::RepoError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))?
        .map_err(|e| NodeError::Unavailable(e.to_string()))
}

/// Registers this node (a new incarnation) and releases whatever its
/// earlier incarnation still held.
pub async fn join(state: &Arc<NodeState>, address: String) -> anyhow::Result<MemberRecord> {
    let lease = state.config.cluster.lease_ms as i64;
    let server_name = state.config.tls.server_names.first().cloned().unwrap_or_default();
    let (store, node) = (state.store.clone(), state.config.node.name.clone());
    let me =
        blocking(move || ownership::register(store.as_ref(), &node, (&address, &server_name), lease, now_ms())).await?;
    state.cluster.set_me(me.clone());
    tracing::info!(node = %me.node, incarnation = me.incarnation, address = %me.address, "joined the cluster");
    reap(state).await;
    Ok(me)
}

/// Releases dead members' chargers; each becomes offline-pending here.
async fn reap(state: &Arc<NodeState>) {
    let store = state.store.clone();
    match blocking(move || ownership::reap(store.as_ref(), now_ms(), REAP_BATCH)).await {
        Ok(r) => {
            for node in &r.dead {
                tracing::warn!(node = %node, "member's lease expired; declared dead");
            }
            for (charger, sessions) in &r.chargers {
                tracing::info!(charger_id = %charger, sessions = sessions.len(), "charger of a dead member released");
                crate::alarms::on_detached(state, charger);
            }
        }
        Err(e) => tracing::error!(error = %e, "reaping dead members failed"),
    }
}

/// Renews the lease every quarter of it; a renewal that finds this node
/// declared dead drops every charger (their ownership may have moved) and
/// joins again as a new incarnation. Reaping dead members runs in a task of
/// its own, so releasing a dead node's chargers never delays a renewal.
pub async fn heartbeat(state: Arc<NodeState>, shutdown: CancellationToken) {
    let lease = state.config.cluster.lease_ms as i64;
    let every = Duration::from_millis((lease / 4) as u64);
    let reaper = tokio::spawn({
        let (state, shutdown) = (state.clone(), shutdown.clone());
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => reap(&state).await,
                }
            }
        }
    });
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(me) = state.cluster.me() else { continue };
        let store = state.store.clone();
        let m2 = me.clone();
        let started = std::time::Instant::now();
        let renewed = blocking(move || ownership::renew(store.as_ref(), &m2, lease, now_ms())).await;
        let took = started.elapsed();
        if took > every {
            tracing::warn!(
                ms = took.as_millis() as u64,
                lease_ms = lease,
                "lease renewal was slow: the store is overloaded or far away"
            );
        }
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(node = %me.node, incarnation = me.incarnation, "this node was declared dead (its lease lapsed); dropping its chargers and joining again");
                let n = state.chargers.close_all(&state.conns);
                tracing::warn!(chargers = n, "connections closed after losing membership");
                // The sites it managed may have moved too.
                state.load.stop_all();
                if let Err(e) = join(&state, me.address.clone()).await {
                    tracing::error!(error = %e, "joining the cluster again failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "lease renewal failed"),
        }
    }
    reaper.abort();
}

/// Leaves at shutdown, so the others release what is left at once.
pub async fn leave(state: &NodeState) {
    let Some(me) = state.cluster.me() else { return };
    let store = state.store.clone();
    if let Err(e) = blocking(move || ownership::leave(store.as_ref(), &me)).await {
        tracing::warn!(error = %e, "leaving the cluster failed; the lease will lapse");
    }
}

/// Whether `charger` is connected to this node or to another live member.
pub async fn connected_anywhere(state: &Arc<NodeState>, charger: &str) -> bool {
    if state.chargers.connection(charger).is_some() {
        return true;
    }
    let (store, id) = (state.store.clone(), charger.to_string());
    matches!(
        blocking(move || ownership::locate(store.as_ref(), &id, now_ms())).await,
        Ok(Some(_))
    )
}

/// Sends `command` to `charger` wherever it is connected: here, or through
/// the node that owns it. With `wait_reply`, returns the charger's reply.
pub async fn command(
    state: &Arc<NodeState>,
    charger: &str,
    command: v1::Command,
    wait_reply: bool,
    on_behalf_of: &str,
) -> Result<v1::CommandReply, Status> {
    if state.chargers.outbound(charger).is_some() {
        return deliver_local(state, charger, command, wait_reply).await;
    }
    let (owner, member) = remote_owner(state, charger).await?;
    let ch = state.cluster.channel(&member).await?;
    tracing::info!(charger_id = %charger, to = %member.node, "forwarding a command to the charger's node");
    let mut client = ClusterServiceClient::new(ch);
    let mut req = tonic::Request::new(v1::ForwardCommandRequest {
        charger_id: charger.to_string(),
        command: Some(command),
        on_behalf_of: on_behalf_of.to_string(),
        epoch: owner.epoch,
        wait_reply,
    });
    req.set_timeout(Duration::from_millis(state.config.sessions.command_timeout_ms + 2_000));
    Ok(client.forward_command(req).await?.into_inner())
}

/// Has `charger` upload a diagnostics bundle, wherever it is connected:
/// here, or through the node that owns it (which stores the bundle).
/// Returns the stored bundle's id.
pub async fn diagnostics(
    state: &Arc<NodeState>,
    charger: &str,
    wait: Duration,
    on_behalf_of: &str,
) -> Result<String, Status> {
    if state.chargers.outbound(charger).is_some() {
        return crate::diagnostics::request_here(state, charger, wait).await;
    }
    let (_, member) = remote_owner(state, charger).await?;
    let ch = state.cluster.channel(&member).await?;
    tracing::info!(charger_id = %charger, to = %member.node, "forwarding a diagnostics request to the charger's node");
    let mut req = tonic::Request::new(v1::ForwardDiagnosticsRequest {
        charger_id: charger.to_string(),
        timeout_s: wait.as_secs() as u32,
        on_behalf_of: on_behalf_of.to_string(),
    });
    req.set_timeout(wait + Duration::from_secs(2));
    Ok(ClusterServiceClient::new(ch)
        .forward_diagnostics(req)
        .await?
        .into_inner()
        .bundle_id)
}

/// The live member (not this node) a charger is connected to.
async fn remote_owner(state: &Arc<NodeState>, charger: &str) -> Result<(OwnerRecord, MemberRecord), Status> {
    let (store, id) = (state.store.clone(), charger.to_string());
    let located = blocking(move || ownership::locate(store.as_ref(), &id, now_ms())).await?;
    let Some((owner, member)) = located else {
        return Err(NodeError::Precondition(format!("charger {charger} is not connected")).into());
    };
    if state
        .cluster
        .me()
        .is_some_and(|m| m.node == member.node && m.incarnation == member.incarnation)
    {
        // Owned here but its stream is gone (it is detaching right now).
        return Err(NodeError::Precondition(format!("charger {charger} is not connected")).into());
    }
    Ok((owner, member))
}

/// Delivers `command` to a charger connected to this node. Without
/// `wait_reply` it returns an accepted reply once the command is queued.
pub async fn deliver_local(
    state: &Arc<NodeState>,
    charger: &str,
    mut command: v1::Command,
    wait_reply: bool,
) -> Result<v1::CommandReply, Status> {
    let outbound = state
        .chargers
        .outbound(charger)
        .ok_or_else(|| Status::from(NodeError::Precondition(format!("charger {charger} is not connected"))))?;
    if command.command_id.is_empty() {
        command.command_id = format!("cmd-{:x}", rand::random::<u64>());
    }
    let cmd_id = command.command_id.clone();
    if !wait_reply {
        if !outbound.send_command(command).await {
            return Err(NodeError::Precondition(format!("charger {charger} disconnected")).into());
        }
        return Ok(v1::CommandReply {
            command_id: cmd_id,
            status: v1::CommandStatus::Accepted as i32,
            detail: "delivered".into(),
        });
    }
    let (tx, rx) = oneshot::channel();
    {
        let mut pending = outbound.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= state.config.sessions.max_pending_commands {
            state.metrics.commands_shed.fetch_add(1, Ordering::Relaxed);
            return Err(
                NodeError::Exhausted(format!("charger {charger} has too many commands waiting for a reply")).into(),
            );
        }
        pending.insert(cmd_id.clone(), tx);
    }
    let forget = || {
        outbound
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cmd_id);
    };
    if !outbound.send_command(command).await {
        forget();
        return Err(NodeError::Precondition(format!("charger {charger} disconnected")).into());
    }
    let wait = Duration::from_millis(state.config.sessions.command_timeout_ms);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(_)) => Err(NodeError::Precondition(format!("charger {charger} disconnected before replying")).into()),
        Err(_) => {
            forget();
            Err(Status::deadline_exceeded(format!(
                "charger {charger} did not reply within {} s",
                wait.as_secs()
            )))
        }
    }
}
