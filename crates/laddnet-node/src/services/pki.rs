//! `PkiService`: the security team's operations. Every call needs the
//! `security-admin` or `admin` role.

use std::sync::Arc;

use laddnet_core::{ChargerId, OperatorName, Role, SiteId};
use laddnet_pki::{CertFilter, Profile, RevocationReason, Subject};
use laddnet_proto::v1;
use laddnet_proto::v1::pki_service_server::PkiService;
use tonic::{Request, Response, Status};

use super::{blocking, cert_info, page, page_token, require_role, rfc3339};
use crate::state::NodeState;
use crate::status::NodeError;

pub struct Pki {
    pub state: Arc<NodeState>,
}

fn invalid(e: impl std::fmt::Display) -> Status {
    NodeError::Invalid(e.to_string()).into()
}

const WHAT: &str = "use the PKI (needs security-admin or admin)";

#[tonic::async_trait]
impl PkiService for Pki {
    async fn create_enrollment_token(
        &self,
        req: Request<v1::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<v1::CreateEnrollmentTokenResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let r = req.into_inner();
        let id = ChargerId::new(r.charger_id).map_err(invalid)?;
        let site = if r.site_id.is_empty() {
            None
        } else {
            Some(SiteId::new(r.site_id).map_err(invalid)?)
        };
        let ca = self.state.ca.clone();
        let actor = who.actor();
        let t = blocking(move || ca.create_token(&id, site.as_ref(), r.ttl_seconds, &actor)).await?;
        Ok(Response::new(v1::CreateEnrollmentTokenResponse {
            token: t.token,
            charger_id: t.charger_id.to_string(),
            expires_at: rfc3339(t.expires_at),
        }))
    }

    async fn list_certificates(
        &self,
        req: Request<v1::ListCertificatesRequest>,
    ) -> Result<Response<v1::ListCertificatesResponse>, Status> {
        require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let r = req.into_inner();
        let (limit, after) = page(&self.state, r.page.as_ref())?;
        let filter = CertFilter {
            profile: if r.profile.is_empty() {
                None
            } else {
                Some(Profile::parse(&r.profile).map_err(crate::status::to_status)?)
            },
            subject: (!r.subject.is_empty()).then_some(r.subject),
            status: match r.status.as_str() {
                "" => None,
                s @ ("valid" | "expired" | "revoked" | "not-yet-valid") => Some(s.to_string()),
                other => {
                    return Err(invalid(format!(
                        "unknown status {other:?}: expected valid, expired, revoked or not-yet-valid"
                    )));
                }
            },
        };
        let ca = self.state.ca.clone();
        let (rows, more) = blocking(move || ca.list(&filter, after.as_deref(), limit)).await?;
        let now = self.state.ca.now();
        Ok(Response::new(v1::ListCertificatesResponse {
            next_page_token: page_token(rows.last().map(|r| r.serial.as_str()), more),
            certificates: rows.iter().map(|r| cert_info(r, now)).collect(),
        }))
    }

    async fn get_certificate(
        &self,
        req: Request<v1::GetCertificateRequest>,
    ) -> Result<Response<v1::CertificateInfo>, Status> {
        require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let serial = normalize_serial(&req.get_ref().serial)?;
        let ca = self.state.ca.clone();
        let rec = blocking(move || ca.get(&serial)).await?;
        Ok(Response::new(cert_info(&rec, self.state.ca.now())))
    }

    async fn renew_certificate(
        &self,
        req: Request<v1::PkiRenewRequest>,
    ) -> Result<Response<v1::PkiRenewResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let r = req.into_inner();
        let serial = normalize_serial(&r.serial)?;
        let ca = self.state.ca.clone();
        let actor = who.actor();
        // A security admin may renew early (e.g. before revoking a suspect key).
        let issued = blocking(move || ca.renew(&serial, r.csr_pem.as_bytes(), &actor, false)).await?;
        Ok(Response::new(v1::PkiRenewResponse {
            certificate: Some(cert_info(&issued.record, self.state.ca.now())),
            chain_pem: issued.chain_pem,
        }))
    }

    async fn revoke_certificate(
        &self,
        req: Request<v1::RevokeCertificateRequest>,
    ) -> Result<Response<v1::CertificateInfo>, Status> {
        let (who, _) = require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let r = req.into_inner();
        let serial = normalize_serial(&r.serial)?;
        let reason = RevocationReason::parse(&r.reason).map_err(crate::status::to_status)?;
        let ca = self.state.ca.clone();
        let actor = who.actor();
        let s = serial.clone();
        let rec = blocking(move || ca.revoke(&s, reason, &actor)).await?;
        self.state.apply_revocations().await;
        Ok(Response::new(cert_info(&rec, self.state.ca.now())))
    }

    async fn get_crl(&self, req: Request<v1::GetCrlRequest>) -> Result<Response<v1::GetCrlResponse>, Status> {
        require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        super::enrollment::crl_response(&self.state).await
    }

    async fn list_audit_entries(
        &self,
        req: Request<v1::ListAuditEntriesRequest>,
    ) -> Result<Response<v1::ListAuditEntriesResponse>, Status> {
        require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let (limit, after) = page(&self.state, req.get_ref().page.as_ref())?;
        let after: u64 = match after {
            None => 0,
            Some(s) => s
                .parse()
                .map_err(|_| invalid("page_token is not one this server issued"))?,
        };
        let store = self.state.store.clone();
        let rows = blocking(move || laddnet_pki::audit::list(store.as_ref(), after, limit + 1)).await?;
        let more = rows.len() > limit;
        let rows: Vec<_> = rows.into_iter().take(limit).collect();
        let last = rows.last().map(|e| e.seq.to_string());
        Ok(Response::new(v1::ListAuditEntriesResponse {
            next_page_token: page_token(last.as_deref(), more),
            entries: rows
                .into_iter()
                .map(|e| v1::AuditEntry {
                    seq: e.seq,
                    at: rfc3339(e.at),
                    kind: e.kind.as_str().into(),
                    actor: e.actor,
                    subject: e.subject,
                    detail: e.detail,
                    hash: e.hash,
                })
                .collect(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<v1::VerifyAuditRequest>,
    ) -> Result<Response<v1::VerifyAuditResponse>, Status> {
        require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let store = self.state.store.clone();
        let v = blocking(move || laddnet_pki::audit::verify(store.as_ref())).await?;
        Ok(Response::new(v1::VerifyAuditResponse {
            ok: v.problem.is_none(),
            entries: v.entries,
            first_bad_seq: v.problem.as_ref().map(|p| p.0).unwrap_or(0),
            problem: v.problem.map(|p| p.1).unwrap_or_default(),
        }))
    }

    async fn vault_status(
        &self,
        req: Request<v1::VaultStatusRequest>,
    ) -> Result<Response<v1::VaultStatusResponse>, Status> {
        require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let st = self.state.clone();
        let s = blocking(move || {
            st.hub
                .drivers
                .vault
                .status(st.store.as_ref())
                .map_err(laddnet_drivers::DriverError::from)
        })
        .await?;
        let current = s.current_master;
        let rewrap = s.rewrap.filter(|c| c.target == current);
        let all_current = s.wrapped_by_master.iter().all(|(v, _)| *v == current);
        Ok(Response::new(v1::VaultStatusResponse {
            current_master: current,
            by_master: s
                .wrapped_by_master
                .into_iter()
                .map(|(version, wrapped_keys)| v1::MasterKeyUse { version, wrapped_keys })
                .collect(),
            subjects: s.subjects,
            rewrap_finished: all_current || rewrap.as_ref().is_some_and(|c| c.finished),
            rewrap_moved: rewrap.map(|c| c.moved).unwrap_or(0),
        }))
    }

    async fn issue_operator_certificate(
        &self,
        req: Request<v1::IssueOperatorCertificateRequest>,
    ) -> Result<Response<v1::IssueOperatorCertificateResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, WHAT, Role::can_manage_pki)?;
        let r = req.into_inner();
        let name = OperatorName::new(r.name).map_err(invalid)?;
        let role: Role = r.role.parse().map_err(invalid)?;
        let ca = self.state.ca.clone();
        let actor = who.actor();
        let issued =
            blocking(move || ca.issue(&Subject::Operator { name, role }, r.csr_pem.as_bytes(), &actor)).await?;
        Ok(Response::new(v1::IssueOperatorCertificateResponse {
            certificate: Some(cert_info(&issued.record, self.state.ca.now())),
            chain_pem: issued.chain_pem,
            root_pem: self.state.ca.root_pem().to_string(),
        }))
    }
}

/// Serials are lowercase hex; accept upper case and colons as openssl prints them.
fn normalize_serial(s: &str) -> Result<String, Status> {
    let clean: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if clean.is_empty() || clean.len() > 40 || !clean.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!("serial {s:?} is not a hex certificate serial")));
    }
    Ok(clean)
}
