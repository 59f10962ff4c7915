//! `IncidentService`: incidents over gRPC.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;

use laddnet_core::Role;
use laddnet_incidents::{self as inc, Incident, State};
use laddnet_proto::v1;
use laddnet_proto::v1::incident_service_server::IncidentService;
use tonic::{Request, Response, Status};

use super::{blocking, invalid, require_role, rfc3339};
use crate::now_ms;
use crate::state::NodeState;

pub struct Incidents {
    pub state: Arc<NodeState>,
}

const ACT: &str = "act on incidents (needs operator or admin)";

fn at(ms: i64) -> String {
    rfc3339(ms.div_euclid(1000))
}

fn info(i: &Incident) -> v1::IncidentInfo {
    v1::IncidentInfo {
        id: i.id.clone(),
        kind: i.kind.as_str().into(),
        subject: i.subject.clone(),
        severity: i.severity.as_str().into(),
        state: i.state.as_str().into(),
        active: i.active,
        assignee: i.assignee.clone().unwrap_or_default(),
        occurrences: i.occurrences,
        opened_at: at(i.opened_at_ms),
        timeline: i
            .timeline
            .iter()
            .map(|s| v1::IncidentStep {
                at: at(s.at_ms),
                what: s.what.clone(),
                by: s.by.clone(),
                detail: s.detail.clone(),
            })
            .collect(),
    }
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid(format!("{id:?} is not an incident id")));
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::IncidentInfo, Status>> + Send>>;

/// What an operator sees change: state, activity, assignee, steps.
fn fingerprint(i: &Incident) -> (State, bool, Option<String>, usize, u32) {
    (i.state, i.active, i.assignee.clone(), i.timeline.len(), i.occurrences)
}

#[tonic::async_trait]
impl IncidentService for Incidents {
    type WatchIncidentsStream = WatchStream;

    async fn watch_incidents(&self, req: Request<v1::WatchIncidentsRequest>) -> Result<Response<WatchStream>, Status> {
        require_role(&self.state, &req, "read incidents", |_| true)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (store, shutdown) = (self.state.store.clone(), self.state.shutdown.clone());
        tokio::spawn(async move {
            let mut seen: HashMap<String, (State, bool, Option<String>, usize, u32)> = HashMap::new();
            let mut first = true;
            loop {
                let s2 = store.clone();
                let Ok(Ok(all)) = tokio::task::spawn_blocking(move || inc::list(s2.as_ref(), None, 1_000)).await else {
                    return;
                };
                // Oldest first, so a client sees changes in order.
                for i in all.iter().rev() {
                    let fp = fingerprint(i);
                    let changed = seen.get(&i.id) != Some(&fp);
                    let show = if first {
                        i.state != State::Resolved || i.active
                    } else {
                        changed
                    };
                    seen.insert(i.id.clone(), fp);
                    if show && tx.send(Ok(info(i))).await.is_err() {
                        return;
                    }
                }
                first = false;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_incidents(
        &self,
        req: Request<v1::ListIncidentsRequest>,
    ) -> Result<Response<v1::ListIncidentsResponse>, Status> {
        require_role(&self.state, &req, "read incidents", |_| true)?;
        let r = req.into_inner();
        let state = if r.state.is_empty() {
            None
        } else {
            Some(State::parse(&r.state).map_err(|e| invalid(e.to_string()))?)
        };
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000) as usize
        };
        let store = self.state.store.clone();
        let all = blocking(move || inc::list(store.as_ref(), state, limit)).await?;
        Ok(Response::new(v1::ListIncidentsResponse {
            incidents: all.iter().map(info).collect(),
        }))
    }

    async fn get_incident(&self, req: Request<v1::GetIncidentRequest>) -> Result<Response<v1::IncidentInfo>, Status> {
        require_role(&self.state, &req, "read incidents", |_| true)?;
        let id = req.into_inner().id;
        check_id(&id)?;
        let store = self.state.store.clone();
        let i = blocking(move || inc::get(store.as_ref(), &id)).await?;
        Ok(Response::new(info(&i)))
    }

    async fn acknowledge_incident(
        &self,
        req: Request<v1::IncidentActionRequest>,
    ) -> Result<Response<v1::IncidentInfo>, Status> {
        self.act(req, |store, id, _, by| inc::acknowledge(store, id, by, now_ms()))
            .await
    }

    async fn assign_incident(
        &self,
        req: Request<v1::IncidentActionRequest>,
    ) -> Result<Response<v1::IncidentInfo>, Status> {
        self.act(req, |store, id, technician, by| {
            inc::assign(store, id, technician, by, now_ms())
        })
        .await
    }

    async fn resolve_incident(
        &self,
        req: Request<v1::IncidentActionRequest>,
    ) -> Result<Response<v1::IncidentInfo>, Status> {
        self.act(req, |store, id, note, by| inc::resolve(store, id, by, note, now_ms()))
            .await
    }
}

impl Incidents {
    /// An operator's step on an incident: `f(store, id, note, who)`.
    async fn act(
        &self,
        req: Request<v1::IncidentActionRequest>,
        f: impl FnOnce(&dyn laddnet_store::Store, &str, &str, &str) -> Result<Incident, inc::IncidentError> + Send + 'static,
    ) -> Result<Response<v1::IncidentInfo>, Status> {
        let (who, _) = require_role(&self.state, &req, ACT, Role::can_operate)?;
        let r = req.into_inner();
        check_id(&r.id)?;
        if r.note.len() > 1_000 {
            return Err(invalid("note: at most 1000 characters"));
        }
        let (store, by) = (self.state.store.clone(), who.actor());
        let i = blocking(move || f(store.as_ref(), &r.id, &r.note, &by)).await?;
        Ok(Response::new(info(&i)))
    }
}
