//! `EnrollmentService`: new chargers trade a one-time token and a CSR for a
//! certificate. Server-side TLS only; rate-limited per source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use laddnet_proto::v1;
use laddnet_proto::v1::enrollment_service_server::EnrollmentService;
use tonic::{Request, Response, Status};

use super::{blocking, cert_info, peer, rfc3339};
use crate::state::NodeState;
use crate::status::NodeError;

/// A token bucket per source address.
pub struct RateLimiter {
    per_minute: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute: f64::from(per_minute),
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > 100_000 {
            // Forget full buckets so a scan of many addresses cannot grow this map without bound.
            let (rate, burst) = (self.per_minute, self.burst);
            b.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate / 60.0 < burst);
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_minute / 60.0).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Enrollment {
    pub state: Arc<NodeState>,
    pub limiter: RateLimiter,
}

#[tonic::async_trait]
impl EnrollmentService for Enrollment {
    async fn enroll(&self, req: Request<v1::EnrollRequest>) -> Result<Response<v1::EnrollResponse>, Status> {
        let remote = peer(&req)?.remote;
        if !self.limiter.allow(remote.ip()) {
            tracing::warn!(remote = %remote.ip(), "enrollment rate limit reached");
            return Err(
                NodeError::Exhausted("too many enrollment attempts from this address; retry later".into()).into(),
            );
        }
        let r = req.into_inner();
        let ca = self.state.ca.clone();
        let issued =
            blocking(move || ca.enroll(&r.charger_id, &r.token, r.csr_pem.as_bytes(), &remote.to_string())).await?;
        let now = self.state.ca.now();
        Ok(Response::new(v1::EnrollResponse {
            certificate: Some(cert_info(&issued.record, now)),
            chain_pem: issued.chain_pem,
            root_pem: self.state.ca.root_pem().to_string(),
        }))
    }

    async fn get_ca_chain(
        &self,
        _: Request<v1::GetCaChainRequest>,
    ) -> Result<Response<v1::GetCaChainResponse>, Status> {
        Ok(Response::new(v1::GetCaChainResponse {
            intermediate_pem: self.state.ca.intermediate_pem().to_string(),
            root_pem: self.state.ca.root_pem().to_string(),
        }))
    }

    async fn get_crl(&self, _: Request<v1::GetCrlRequest>) -> Result<Response<v1::GetCrlResponse>, Status> {
        crl_response(&self.state).await
    }
}

pub(crate) async fn crl_response(state: &Arc<NodeState>) -> Result<Response<v1::GetCrlResponse>, Status> {
    let ca = state.ca.clone();
    let crl = blocking(move || ca.crl_record()).await?;
    let crl = crl.ok_or_else(|| NodeError::Precondition("no CRL has been signed yet".into()))?;
    Ok(Response::new(v1::GetCrlResponse {
        crl_pem: crl.pem,
        crl_number: crl.number,
        this_update: rfc3339(crl.this_update),
        next_update: rfc3339(crl.next_update),
    }))
}
