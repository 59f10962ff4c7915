//! `ChargerService`: the chargers' stream and certificate renewal. A
//! charger may speak only for the charger id in its own certificate.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use laddnet_pki::AuditKind;
use laddnet_proto::v1;
use laddnet_proto::v1::central_message::Payload as Out;
use laddnet_proto::v1::charger_message::Payload as In;
use laddnet_proto::v1::charger_service_server::ChargerService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, caller, cert_info, peer, rfc3339};
use crate::identity::Principal;
use crate::state::{BootInfo, NodeState};
use crate::status::NodeError;

/// How long a new stream may take to send its boot message.
const BOOT_DEADLINE: Duration = Duration::from_secs(30);

pub struct Charger {
    pub state: Arc<NodeState>,
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<v1::CentralMessage, Status>> + Send>>;

fn out(msg_id: u64, payload: Out) -> Result<v1::CentralMessage, Status> {
    Ok(v1::CentralMessage {
        msg_id,
        payload: Some(payload),
    })
}

#[tonic::async_trait]
impl ChargerService for Charger {
    type AttachStream = AttachStream;

    async fn attach(&self, req: Request<Streaming<v1::ChargerMessage>>) -> Result<Response<AttachStream>, Status> {
        let identity = caller(&self.state, &req)?;
        let closed = peer(&req)?.closed.clone();
        let Principal::Charger { id, site } = &identity.principal else {
            return Err(NodeError::Denied("only chargers may attach".into()).into());
        };
        let (id, site) = (id.clone(), site.clone());
        let mut inbound = req.into_inner();
        let first = match tokio::time::timeout(BOOT_DEADLINE, inbound.message()).await {
            Err(_) => return Err(NodeError::Precondition("no boot message within 30 s".into()).into()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Err(NodeError::Precondition("stream closed before boot".into()).into()),
            Ok(Ok(Some(m))) => m,
        };
        let Some(In::Boot(boot)) = first.payload else {
            return Err(NodeError::Precondition("the first message on the stream must be boot".into()).into());
        };
        if boot.charger_id != id.as_str() {
            let claimed: String = boot.charger_id.chars().take(64).collect();
            tracing::warn!(charger_id = %id, "charger claimed another charger's identity");
            let ca = self.state.ca.clone();
            let (actor, detail) = (
                identity.actor(),
                format!("certificate {} claimed to be charger {claimed:?}", identity.serial),
            );
            blocking(move || ca.record(AuditKind::SecurityEvent, &actor, &claimed, &detail)).await?;
            return Err(NodeError::Denied(format!(
                "this certificate is for charger {id}; it may not speak for another charger"
            ))
            .into());
        }
        let info = BootInfo {
            vendor: boot.vendor,
            model: boot.model,
            firmware_version: boot.firmware_version,
        };
        let conn = match self.state.chargers.attach(&id, &identity.serial, site, info) {
            Ok(conn) => conn,
            Err(crate::state::AlreadyAttached) => {
                let ca = self.state.ca.clone();
                let (actor, subject) = (identity.actor(), id.to_string());
                blocking(move || {
                    ca.record(
                        AuditKind::SecurityEvent,
                        &actor,
                        &subject,
                        "second connection refused: the charger is already connected",
                    )
                })
                .await?;
                return Err(NodeError::AlreadyExists(format!(
                    "charger {id} is already connected; the live connection keeps its place"
                ))
                .into());
            }
        };
        tracing::info!(charger_id = %id, "charger attached");
        let (tx, rx) = mpsc::channel(64);
        let heartbeat_interval_s = self.state.config.node.heartbeat_interval_s;
        let _ = tx
            .send(out(
                first.msg_id,
                Out::BootAccepted(v1::BootAccepted {
                    server_time: rfc3339(self.state.ca.now()),
                    heartbeat_interval_s,
                }),
            ))
            .await;
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = closed.cancelled() => {
                        let _ = tx.send(out(0, Out::Closing(v1::Closing { reason: "certificate revoked".into() }))).await;
                        break;
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => {
                            let reply = match m.payload {
                                Some(In::Heartbeat(_)) => {
                                    state.chargers.heartbeat(&id, conn);
                                    out(m.msg_id, Out::HeartbeatAck(v1::HeartbeatAck { server_time: rfc3339(state.ca.now()) }))
                                }
                                Some(In::Boot(_)) => Err(NodeError::Precondition("boot was already accepted on this stream".into()).into()),
                                None => Err(NodeError::Invalid("message without payload".into()).into()),
                            };
                            let failed = reply.is_err();
                            if tx.send(reply).await.is_err() || failed {
                                break;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            state.chargers.detach(&id, conn);
            tracing::info!(charger_id = %id, "charger detached");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew_certificate(
        &self,
        req: Request<v1::RenewCertificateRequest>,
    ) -> Result<Response<v1::RenewCertificateResponse>, Status> {
        let identity = caller(&self.state, &req)?;
        if !matches!(identity.principal, Principal::Charger { .. }) {
            return Err(NodeError::Denied("only chargers renew here; operators use laddctl pki renew".into()).into());
        }
        let csr = req.into_inner().csr_pem;
        let ca = self.state.ca.clone();
        let (serial, actor) = (identity.serial.clone(), identity.actor());
        let issued = blocking(move || ca.renew(&serial, csr.as_bytes(), &actor, true)).await?;
        Ok(Response::new(v1::RenewCertificateResponse {
            certificate: Some(cert_info(&issued.record, self.state.ca.now())),
            chain_pem: issued.chain_pem,
        }))
    }
}
