//! The Prometheus endpoint (`GET /metrics`, plain HTTP, bound to localhost
//! by default: `metrics.listen`) and the RPC timing layer behind its
//! latency histograms.
//!
//! Series: connected chargers, active sessions, energy delivered, charger
//! events by outcome, active incidents by kind, certificates expiring within
//! 30 days, and `laddnet_rpc_duration_seconds` per gRPC method (time to the
//! response headers: for streams, until the stream is open).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use laddnet_core::charging::SessionStatus;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::NodeState;

const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];
/// Methods tracked at most (paths come from clients: bounded).
const MAX_METHODS: usize = 256;

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Latency histograms per gRPC method.
#[derive(Default)]
pub struct RpcStats {
    methods: Mutex<HashMap<String, Arc<Histogram>>>,
}

impl RpcStats {
    fn observe(&self, path: &str, d: Duration) {
        if !path.starts_with("/laddnet.v1.") && !path.starts_with("/grpc.") {
            return;
        }
        let h = {
            let mut m = self.methods.lock().unwrap_or_else(|p| p.into_inner());
            if !m.contains_key(path) && m.len() >= MAX_METHODS {
                return;
            }
            m.entry(path.to_string()).or_default().clone()
        };
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let methods: Vec<(String, Arc<Histogram>)> = {
            let m = self.methods.lock().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<_> = m.iter().map(|(k, h)| (k.clone(), h.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        out.push_str("# HELP laddnet_rpc_duration_seconds gRPC handling time per method (to the response headers).\n");
        out.push_str("# TYPE laddnet_rpc_duration_seconds histogram\n");
        for (path, h) in methods {
            let method = path.trim_start_matches('/');
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "laddnet_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"{b}\"}} {}",
                    h.buckets[i].load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "laddnet_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "laddnet_rpc_duration_seconds_sum{{method=\"{method}\"}} {}",
                h.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "laddnet_rpc_duration_seconds_count{{method=\"{method}\"}} {count}");
        }
    }
}

/// A tower layer timing every request into [`RpcStats`].
#[derive(Clone)]
pub struct RpcTimer(pub Arc<RpcStats>);

impl<S> tower::Layer<S> for RpcTimer {
    type Service = Timed<S>;
    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            stats: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    stats: Arc<RpcStats>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let started = Instant::now();
        let stats = self.stats.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            stats.observe(&path, started.elapsed());
            r
        })
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// The exposition text.
pub fn render(state: &NodeState) -> String {
    let mut out = String::new();
    gauge(
        &mut out,
        "laddnet_chargers_connected",
        "Chargers attached to this node.",
        state.chargers.len(),
    );
    // The open sessions' records and one counter: a scrape reads nothing
    // of the ended history, however long it is.
    let open = laddnet_actors::repo::open_session_records(state.store.as_ref()).unwrap_or_default();
    let active = open.iter().filter(|s| s.status == SessionStatus::Active).count();
    let power: u64 = open
        .iter()
        .filter(|s| s.status == SessionStatus::Active)
        .map(|s| u64::from(s.power_w))
        .sum();
    let energy = laddnet_actors::repo::energy_delivered_wh(state.store.as_ref()).unwrap_or_default();
    gauge(&mut out, "laddnet_sessions_active", "Sessions charging now.", active);
    gauge(&mut out, "laddnet_power_watts", "Power of the active sessions.", power);
    let _ = writeln!(
        out,
        "# HELP laddnet_energy_delivered_wh_total Energy of every session the store has recorded (kept across retention purges).\n# TYPE laddnet_energy_delivered_wh_total counter\nladdnet_energy_delivered_wh_total {energy}"
    );
    let m = &state.metrics;
    out.push_str("# HELP laddnet_charger_events_total Transaction events from chargers, by outcome.\n# TYPE laddnet_charger_events_total counter\n");
    for (outcome, c) in [
        ("accepted", &m.events_accepted),
        ("duplicate", &m.events_duplicate),
        ("rejected", &m.events_rejected),
    ] {
        let _ = writeln!(
            out,
            "laddnet_charger_events_total{{outcome=\"{outcome}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP laddnet_charger_events_in_runs_total Events stored in runs (meter updates that arrived together, one store transaction per run).\n# TYPE laddnet_charger_events_in_runs_total counter\nladdnet_charger_events_in_runs_total {}",
        m.events_in_runs.load(Ordering::Relaxed)
    );
    out.push_str("# HELP laddnet_tls_handshakes_total Mutual-TLS handshakes finished, full or resumed from a session ticket.\n# TYPE laddnet_tls_handshakes_total counter\n");
    for (kind, c) in [
        ("full", &state.conns.handshakes_full),
        ("resumed", &state.conns.handshakes_resumed),
    ] {
        let _ = writeln!(
            out,
            "laddnet_tls_handshakes_total{{kind=\"{kind}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP laddnet_panics_total Panics in this node's process (each logged with its location; a session actor's is restarted by its supervisor).\n# TYPE laddnet_panics_total counter\nladdnet_panics_total {}",
        crate::panics::count()
    );
    out.push_str("# HELP laddnet_incidents_active Incidents whose condition holds now, by kind.\n# TYPE laddnet_incidents_active gauge\n");
    let counts = laddnet_incidents::active_counts(state.store.as_ref()).unwrap_or_default();
    for kind in laddnet_incidents::KINDS {
        let _ = writeln!(
            out,
            "laddnet_incidents_active{{kind=\"{}\"}} {}",
            kind.as_str(),
            counts.get(&kind).copied().unwrap_or(0)
        );
    }
    // A range of the expiry index: a scrape reads the certificates of
    // the next 30 days, not every certificate the CA ever issued.
    let now = state.ca.now();
    let soon = state
        .ca
        .expiring_between(now, now + 30 * 86_400)
        .map(|v| {
            v.iter()
                .filter(|c| c.status(now) == laddnet_pki::CertStatus::Valid)
                .count()
        })
        .unwrap_or(0);
    gauge(
        &mut out,
        "laddnet_certificates_expiring_30d",
        "Valid certificates that expire within 30 days.",
        soon,
    );
    state.rpc.render(&mut out);
    out
}

/// Serves `GET /metrics` until the shutdown.
pub async fn serve(listener: TcpListener, state: Arc<NodeState>, shutdown: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let st = st.clone();
                async move {
                    let resp = if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                        let body = tokio::task::spawn_blocking(move || render(&st))
                            .await
                            .unwrap_or_default();
                        hyper::Response::builder()
                            .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                    } else {
                        hyper::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"only GET /metrics here\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.unwrap_or_default())
                }
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            )
            .await;
        });
    }
}
