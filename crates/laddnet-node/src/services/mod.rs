//! The gRPC services. Each handler reads the caller from the connection's
//! certificate ([`caller`]), checks the role or charger identity, converts
//! prost types to domain types, and runs CA and store work on blocking
//! threads.

pub mod billing;
pub mod charger;
pub mod cluster;
pub mod drivers;
pub mod enrollment;
pub mod fleet;
pub mod incidents;
pub mod operator;
pub mod pki;

use std::sync::Arc;

use laddnet_core::Role;
use laddnet_pki::CertRecord;
use laddnet_proto::v1;
use tonic::{Request, Status};

use crate::identity::{Identity, Principal};
use crate::state::NodeState;
use crate::status::NodeError;
use crate::transport::PeerInfo;

pub(crate) fn peer<T>(req: &Request<T>) -> Result<&PeerInfo, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| NodeError::Internal("request without connection info".into()).into())
}

/// The authenticated caller; refused if its certificate was revoked after
/// the connection was made.
pub(crate) fn caller<T>(state: &NodeState, req: &Request<T>) -> Result<Arc<Identity>, Status> {
    let identity = peer(req)?
        .identity
        .clone()
        .ok_or_else(|| NodeError::Unauthenticated("a client certificate is required".into()))?;
    if state.is_revoked(&identity.serial) {
        return Err(NodeError::Unauthenticated("the client certificate has been revoked".into()).into());
    }
    Ok(identity)
}

/// An operator whose role passes `allowed`.
pub(crate) fn require_role<T>(
    state: &NodeState,
    req: &Request<T>,
    what: &str,
    allowed: impl Fn(Role) -> bool,
) -> Result<(Arc<Identity>, Role), Status> {
    let id = caller(state, req)?;
    match &id.principal {
        Principal::Operator { role, .. } if allowed(*role) => {
            let role = *role;
            Ok((id, role))
        }
        Principal::Operator { role, .. } => Err(NodeError::Denied(format!("role {role} may not {what}")).into()),
        _ => Err(NodeError::Denied(format!("only operators may {what}")).into()),
    }
}

/// Page size and position from a request.
pub(crate) fn page(state: &NodeState, p: Option<&v1::PageRequest>) -> Result<(usize, Option<String>), Status> {
    let g = &state.config.grpc;
    let (size, token) = p.map(|p| (p.page_size, p.page_token.as_str())).unwrap_or((0, ""));
    let size = if size == 0 {
        g.default_page_size
    } else {
        size.min(g.max_page_size)
    } as usize;
    let after = if token.is_empty() {
        None
    } else {
        let bytes =
            hex::decode(token).map_err(|_| NodeError::Invalid("page_token is not one this server issued".into()))?;
        Some(
            String::from_utf8(bytes)
                .map_err(|_| NodeError::Invalid("page_token is not one this server issued".into()))?,
        )
    };
    Ok((size, after))
}

pub(crate) fn page_token(last: Option<&str>, more: bool) -> String {
    match (last, more) {
        (Some(k), true) => hex::encode(k),
        _ => String::new(),
    }
}

/// An invalid-argument status naming the problem.
pub(crate) fn invalid(e: impl std::fmt::Display) -> Status {
    NodeError::Invalid(e.to_string()).into()
}

/// An optional RFC 3339 time from a request field.
pub(crate) fn parse_time(s: &str, field: &str) -> Result<Option<i64>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| Some(t.unix_timestamp()))
        .map_err(|e| invalid(format!("{field}: {s:?} is not an RFC 3339 time: {e}")))
}

pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub(crate) fn cert_info(rec: &CertRecord, now: i64) -> v1::CertificateInfo {
    v1::CertificateInfo {
        serial: rec.serial.clone(),
        profile: rec.profile.as_str().into(),
        subject: rec.subject.clone(),
        organisation: rec.organisation.clone(),
        role: rec.role.clone().unwrap_or_default(),
        not_before: rfc3339(rec.not_before),
        not_after: rfc3339(rec.not_after),
        status: rec.status(now).as_str().into(),
        revocation_reason: rec
            .revoked
            .as_ref()
            .map(|r| r.reason.as_str().to_string())
            .unwrap_or_default(),
        revoked_at: rec.revoked.as_ref().map(|r| rfc3339(r.at)).unwrap_or_default(),
        renewed_from: rec.renewed_from.clone().unwrap_or_default(),
        certificate_pem: rec.certificate_pem.clone(),
        site_id: rec.site_id.clone().unwrap_or_default(),
    }
}

/// Runs CA/store work on a blocking thread and maps its error.
pub(crate) async fn blocking<T, E, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: laddnet_core::HasKind + std::fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(crate::status::to_status),
        Err(e) => Err(NodeError::Internal(format!("blocking task failed: {e}")).into()),
    }
}
