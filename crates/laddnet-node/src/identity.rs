//! Who is calling: derived from the client certificate, checked against the
//! CA's own record of it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures::future::BoxFuture;

use laddnet_core::{ChargerId, OperatorName, Role, SiteId};
use laddnet_pki::{AuditKind, Ca, CertStatus, Profile};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Charger {
        id: ChargerId,
        site: Option<SiteId>,
    },
    Operator {
        name: OperatorName,
        role: Role,
    },
    Node {
        name: String,
    },
    /// A driver app, for the driver's own account only.
    Driver {
        id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub serial: String,
    pub principal: Principal,
    pub not_after: i64,
}

impl Identity {
    /// "charger:CP-1", "operator:Ada", "node:node-1": the actor in audit entries.
    pub fn actor(&self) -> String {
        match &self.principal {
            Principal::Charger { id, .. } => format!("charger:{id}"),
            Principal::Operator { name, .. } => format!("operator:{name}"),
            Principal::Node { name } => format!("node:{name}"),
            Principal::Driver { id } => format!("driver:{id}"),
        }
    }
}

/// Checks a certificate that passed the TLS verifier.
pub trait IdentityCheck: Send + Sync {
    fn identify<'a>(&'a self, remote: SocketAddr, cert_der: &'a [u8]) -> BoxFuture<'a, Result<Identity, String>>;
    /// A handshake failed (bad chain, revoked, expired, no certificate).
    fn refused(&self, remote: SocketAddr, reason: &str);
    fn is_revoked(&self, serial: &str) -> bool;
}

/// The node's check: the serial must be one the CA issued, not revoked,
/// and the certificate must be byte-for-byte the one recorded.
pub struct CaIdentityCheck {
    pub ca: Arc<Ca>,
    pub revoked: Arc<RwLock<HashSet<String>>>,
    audit_budget: Mutex<(Instant, u32)>,
}

/// Refused handshakes audited per second at most; a flood of garbage must
/// not flood the audit log.
const AUDIT_REFUSALS_PER_SECOND: u32 = 20;

impl CaIdentityCheck {
    pub fn new(ca: Arc<Ca>, revoked: Arc<RwLock<HashSet<String>>>) -> Self {
        Self {
            ca,
            revoked,
            audit_budget: Mutex::new((Instant::now(), 0)),
        }
    }

    fn audit(&self, remote: SocketAddr, subject: &str, reason: &str) {
        {
            let mut b = self.audit_budget.lock().unwrap_or_else(|p| p.into_inner());
            if b.0.elapsed().as_secs() >= 1 {
                *b = (Instant::now(), 0);
            }
            if b.1 >= AUDIT_REFUSALS_PER_SECOND {
                return;
            }
            b.1 += 1;
        }
        let ca = self.ca.clone();
        let (subject, detail) = (subject.to_string(), format!("from {remote}: {reason}"));
        tokio::task::spawn_blocking(move || {
            if let Err(e) = ca.record(AuditKind::AuthRefused, "anonymous", &subject, &detail) {
                tracing::error!(error = %e, "could not write audit entry");
            }
        });
    }
}

impl IdentityCheck for CaIdentityCheck {
    fn identify<'a>(&'a self, remote: SocketAddr, cert_der: &'a [u8]) -> BoxFuture<'a, Result<Identity, String>> {
        Box::pin(async move {
            let summary = laddnet_pki::summarize_certificate(cert_der).map_err(|e| e.to_string())?;
            let refuse = |reason: String| {
                self.audit(remote, &summary.serial, &reason);
                Err(reason)
            };
            if self.is_revoked(&summary.serial) {
                return refuse(format!("certificate {} is revoked", summary.serial));
            }
            let (ca, serial) = (self.ca.clone(), summary.serial.clone());
            let record = crate::state::store_read(self.ca.store().local_reads(), move || ca.get(&serial))
                .await
                .map_err(|e| e.to_string())?;
            let record = match record {
                Ok(r) => r,
                Err(_) => return refuse(format!("certificate {} was not issued by this CA", summary.serial)),
            };
            let recorded = pem::parse(&record.certificate_pem).map_err(|e| e.to_string())?;
            if recorded.contents() != cert_der {
                return refuse(format!("certificate {} differs from the one issued", summary.serial));
            }
            // A resumed TLS session skipped the chain's validity check: the
            // record decides revocation and expiry. (Not-yet-valid cannot
            // arise from a ticket: the certificate was valid when the
            // ticket was issued; a full handshake checks it.)
            match record.status(self.ca.now()) {
                CertStatus::Valid | CertStatus::NotYetValid => {}
                CertStatus::Revoked => return refuse(format!("certificate {} is revoked", summary.serial)),
                CertStatus::Expired => return refuse(format!("certificate {} has expired", summary.serial)),
            }
            let bad = |e: String| format!("stored record of {}: {e}", record.serial);
            let principal = match record.profile {
                Profile::Charger => Principal::Charger {
                    id: ChargerId::new(record.subject.clone()).map_err(|e| bad(e.to_string()))?,
                    site: record
                        .site_id
                        .clone()
                        .map(SiteId::new)
                        .transpose()
                        .map_err(|e| bad(e.to_string()))?,
                },
                Profile::Operator => Principal::Operator {
                    name: OperatorName::new(record.subject.clone()).map_err(|e| bad(e.to_string()))?,
                    role: record.role.as_deref().unwrap_or_default().parse().map_err(bad)?,
                },
                Profile::Node => Principal::Node {
                    name: record.subject.clone(),
                },
                Profile::Driver => Principal::Driver {
                    id: record.subject.clone(),
                },
                // Code signing only (rustls refuses it too: no TLS usage).
                Profile::FirmwareSigning => {
                    return refuse(format!(
                        "certificate {} signs firmware; it cannot authenticate a connection",
                        record.serial
                    ));
                }
            };
            Ok(Identity {
                serial: record.serial,
                principal,
                not_after: record.not_after,
            })
        })
    }

    fn refused(&self, remote: SocketAddr, reason: &str) {
        self.audit(remote, "", &format!("TLS handshake refused: {reason}"));
    }

    fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }
}
