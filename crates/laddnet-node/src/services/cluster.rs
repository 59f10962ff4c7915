//! `ClusterService`: what other nodes of the cluster may ask this one.
//! Only callers presenting a node certificate of the CA get in.

use std::sync::Arc;
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::cluster_service_server::ClusterService;
use tonic::{Request, Response, Status};

use super::caller;
use crate::identity::Principal;
use crate::state::NodeState;
use crate::status::NodeError;

/// Site readings in one `SiteReadings` call, at most.
const MAX_READINGS: usize = 10_000;

pub struct ClusterNode {
    pub state: Arc<NodeState>,
}

fn require_node<T>(state: &NodeState, req: &Request<T>) -> Result<String, Status> {
    let id = caller(state, req)?;
    match &id.principal {
        Principal::Node { name } => Ok(name.clone()),
        _ => Err(NodeError::Denied("only nodes of this cluster may call ClusterService".into()).into()),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterNode {
    async fn forward_command(
        &self,
        req: Request<v1::ForwardCommandRequest>,
    ) -> Result<Response<v1::CommandReply>, Status> {
        let from = require_node(&self.state, &req)?;
        let r = req.into_inner();
        let command = r
            .command
            .filter(|c| c.kind.is_some())
            .ok_or_else(|| Status::from(NodeError::Invalid("a forwarded command needs a kind".into())))?;
        if laddnet_core::ChargerId::new(r.charger_id.clone()).is_err() {
            return Err(NodeError::Invalid("charger_id is not a valid charger id".into()).into());
        }
        tracing::info!(charger_id = %r.charger_id, from = %from, on_behalf_of = %r.on_behalf_of, "forwarded command");
        let reply = crate::cluster::deliver_local(&self.state, &r.charger_id, command, r.wait_reply).await?;
        Ok(Response::new(reply))
    }

    async fn forward_diagnostics(
        &self,
        req: Request<v1::ForwardDiagnosticsRequest>,
    ) -> Result<Response<v1::ForwardDiagnosticsReply>, Status> {
        let from = require_node(&self.state, &req)?;
        let r = req.into_inner();
        if laddnet_core::ChargerId::new(r.charger_id.clone()).is_err() {
            return Err(NodeError::Invalid("charger_id is not a valid charger id".into()).into());
        }
        let wait = Duration::from_secs(u64::from(r.timeout_s.clamp(1, 3_600)));
        tracing::info!(charger_id = %r.charger_id, from = %from, on_behalf_of = %r.on_behalf_of, "forwarded diagnostics request");
        let bundle_id = crate::diagnostics::request_here(&self.state, &r.charger_id, wait).await?;
        Ok(Response::new(v1::ForwardDiagnosticsReply { bundle_id }))
    }

    async fn site_readings(
        &self,
        req: Request<v1::SiteReadingsRequest>,
    ) -> Result<Response<v1::SiteReadingsReply>, Status> {
        require_node(&self.state, &req)?;
        let r = req.into_inner();
        if r.readings.len() > MAX_READINGS {
            return Err(NodeError::Invalid(format!(
                "{} site readings in one call; at most {MAX_READINGS}",
                r.readings.len()
            ))
            .into());
        }
        let readings = r
            .readings
            .into_iter()
            .enumerate()
            .map(|(i, x)| crate::load::Reading::from_proto(x).map_err(|e| format!("reading {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::from(NodeError::Invalid(e)))?;
        let (accepted, not_managed_here) = self.state.load.forwarded(&self.state, readings).await;
        Ok(Response::new(v1::SiteReadingsReply {
            accepted,
            not_managed_here,
        }))
    }

    async fn site_load(&self, req: Request<v1::SiteLoadRequest>) -> Result<Response<v1::SiteLoadResponse>, Status> {
        require_node(&self.state, &req)?;
        let site_id = req.into_inner().site_id;
        laddnet_core::SiteId::new(site_id.clone()).map_err(|e| Status::from(NodeError::Invalid(e.to_string())))?;
        match self.state.load.site_load(&site_id).await {
            Some(l) => Ok(Response::new(super::fleet::load_proto(&self.state, site_id, l))),
            None => Err(NodeError::NotFound(format!("site {site_id} is not managed on this node")).into()),
        }
    }

    async fn members(&self, req: Request<v1::MembersRequest>) -> Result<Response<v1::MembersResponse>, Status> {
        // Operators may look too (laddctl cluster members).
        let id = caller(&self.state, &req)?;
        if matches!(id.principal, Principal::Charger { .. } | Principal::Driver { .. }) {
            return Err(NodeError::Denied("only nodes and operators may list members".into()).into());
        }
        let store = self.state.store.clone();
        let (members, counts) = tokio::task::spawn_blocking(move || {
            Ok::<_, laddnet_actors::repo::RepoError>((
                laddnet_actors::cluster::members(store.as_ref())?,
                laddnet_actors::cluster::owned_counts(store.as_ref())?,
            ))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(crate::status::to_status)?;
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        Ok(Response::new(v1::MembersResponse {
            members: members
                .into_iter()
                .map(|m| v1::Member {
                    chargers: counts.get(&(m.node.clone(), m.incarnation)).copied().unwrap_or(0),
                    alive: m.alive(now),
                    node_id: m.node,
                    incarnation: m.incarnation,
                    address: m.address,
                    lease_expires_ms: m.lease_expires_ms,
                })
                .collect(),
        }))
    }
}
