//! Every notification kind from a real scenario: a simulated charger
//! serves a driver's RFID card, the car fills up, the session ends and is
//! billed, the charger faults, an operator plans maintenance. Each
//! notification reaches the driver's gRPC stream and a local webhook
//! receiver, and none is lost when the node restarts between raising it
//! and delivering it (the receiver refuses everything until then).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use laddnet_node::config::WebhookConfig;
use laddnet_proto::v1;
use laddnet_proto::v1::driver_service_client::DriverServiceClient;
use laddnet_sim::{Fault, Kind, Profile};
use laddnet_tests::*;

const KINDS: [&str; 5] = [
    "available",
    "nearly-done",
    "session-ended",
    "out-of-order",
    "maintenance-scheduled",
];
const SECRET: &str = "a-webhook-secret-of-some-length";

/// What the receiver got: notification id -> body, for POSTs it accepted.
#[derive(Default)]
struct Receiver {
    accepting: AtomicBool,
    refused: AtomicU64,
    bad_signatures: AtomicU64,
    accepted: Mutex<BTreeMap<String, serde_json::Value>>,
}

/// A plain HTTP webhook receiver on loopback (port 0) that checks each
/// POST's signature and answers 503 until told to accept.
async fn receiver() -> (SocketAddr, Arc<Receiver>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Receiver::default());
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let st = st.clone();
                    async move {
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string()
                        };
                        let (id, ts, sig) = (
                            header("x-laddnet-notification-id"),
                            header("x-laddnet-timestamp"),
                            header("x-laddnet-signature"),
                        );
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let mut signed = ts.into_bytes();
                        signed.push(b'.');
                        signed.extend_from_slice(&body);
                        let expected = format!(
                            "sha256={}",
                            hex::encode(laddnet_vault::hmac(SECRET.as_bytes(), &[&signed]))
                        );
                        let status = if sig != expected {
                            st.bad_signatures.fetch_add(1, Ordering::SeqCst);
                            401
                        } else if !st.accepting.load(Ordering::SeqCst) {
                            st.refused.fetch_add(1, Ordering::SeqCst);
                            503
                        } else {
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            st.accepted.lock().unwrap().insert(id, v);
                            200
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

/// Collects the driver's stream (from `after_seq` 0) in the background.
async fn stream(node: &TestNode, creds: &Creds) -> Arc<Mutex<Vec<v1::Notification>>> {
    let mut client = DriverServiceClient::new(node.channel(creds).await.unwrap());
    let mut s = client
        .notifications(v1::NotificationsRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok(Some(n)) = s.message().await {
            g.lock().unwrap().push(n);
        }
    });
    got
}

fn kinds(got: &Mutex<Vec<v1::Notification>>) -> BTreeSet<String> {
    got.lock().unwrap().iter().map(|n| n.kind.clone()).collect()
}

async fn has_kind(got: &Arc<Mutex<Vec<v1::Notification>>>, kind: &str, secs: u64) -> bool {
    eventually(Duration::from_secs(secs), || async { kinds(got).contains(kind) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_kind_reaches_stream_and_webhook_across_a_restart() {
    let (addr, hook) = receiver().await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_dir.path().join("webhook.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut node = TestNode::start_with(|c| {
        c.notifications.webhooks = vec![WebhookConfig {
            name: "app".into(),
            url: format!("http://{addr}/laddnet"),
            secret_file: secret_file.clone(),
        }];
        c.notifications.retry_initial_ms = 100;
        c.notifications.retry_max_ms = 400;
        c.notifications.max_attempts = 10_000;
    })
    .await;
    node.install_tariff().await;

    // A driver who wants 60 % and watches the charger they use.
    let (driver, _) = node.driver("Ada Lovelace", "ada@example.org", "04AD4AD4").await;
    let mut admin = node.driver_admin().await;
    admin
        .set_preferences(v1::SetPreferencesRequest {
            driver_id: driver.clone(),
            preferences: Some(v1::Preferences {
                target_soc_percent: 60,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    admin
        .watch(v1::WatchRequest {
            driver_id: driver.clone(),
            target: "charger:SIM-N".into(),
            stop: false,
        })
        .await
        .unwrap();
    let app = node.driver_credential(&driver).await;
    let live = stream(&node, &app).await;

    // The simulated DC charger: the driver's card, one car, quickly full.
    let ep = node.sim_endpoints();
    let identity = laddnet_sim::enroll(&ep, "SIM-N", &node.token("SIM-N").await)
        .await
        .unwrap();
    let mut p = Profile::fleet_member(3);
    p.charger_id = "SIM-N".into();
    p.kind = Kind::Dc;
    p.max_power_w = 150_000;
    p.connectors = 1;
    p.sample_every = Duration::from_millis(100);
    p.speed = 600;
    p.mean_idle = Duration::from_secs(3_600);
    p.tokens = vec!["04AD4AD4".into()];
    let sim = laddnet_sim::spawn(ep, identity, p);

    // The car passes 55 % (nearly done), fills up, leaves: the session is
    // billed (session ended) and the connector is free (available).
    for kind in ["nearly-done", "session-ended", "available"] {
        assert!(
            has_kind(&live, kind, 60).await,
            "no {kind} on the stream; got {:?}",
            kinds(&live)
        );
    }
    // The charger faults.
    sim.inject(Fault::ErrorCode(1, "GroundFailure".into())).await;
    assert!(has_kind(&live, "out-of-order", 30).await, "{:?}", kinds(&live));
    // The operator plans maintenance there.
    let start = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let fmt = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap();
    let planned = admin
        .schedule_maintenance(v1::ScheduleMaintenanceRequest {
            charger_id: "SIM-N".into(),
            site_id: String::new(),
            starts_at: fmt(start),
            ends_at: fmt(start + time::Duration::hours(2)),
            reason: "connector replacement".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(planned.notified, 1);
    assert!(has_kind(&live, "maintenance-scheduled", 30).await);

    let ended = live
        .lock()
        .unwrap()
        .iter()
        .find(|n| n.kind == "session-ended")
        .cloned()
        .unwrap();
    assert!(!ended.amount.is_empty() && ended.currency == "EUR", "{ended:?}");
    assert!(!ended.transaction_id.is_empty());

    // Every kind reached the webhook, and was refused: nothing delivered yet.
    assert!(
        eventually(Duration::from_secs(30), || async {
            hook.refused.load(Ordering::SeqCst) >= 5
        })
        .await,
        "the webhook was not tried"
    );
    assert!(hook.accepted.lock().unwrap().is_empty());
    assert_eq!(hook.bad_signatures.load(Ordering::SeqCst), 0);

    // The node restarts with all of it undelivered; the receiver recovers.
    sim.stop();
    let before: BTreeMap<String, String> = live
        .lock()
        .unwrap()
        .iter()
        .map(|n| (n.id.clone(), n.kind.clone()))
        .collect();
    node.restart().await;
    hook.accepting.store(true, Ordering::SeqCst);

    let delivered = eventually(Duration::from_secs(60), || async {
        let got = hook.accepted.lock().unwrap();
        before.keys().all(|id| got.contains_key(id))
    })
    .await;
    let got = hook.accepted.lock().unwrap().clone();
    assert!(
        delivered,
        "undelivered after the restart: {:?}",
        before.keys().filter(|id| !got.contains_key(*id)).collect::<Vec<_>>()
    );
    for kind in KINDS {
        let n = got
            .values()
            .find(|v| v["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} by webhook"));
        assert_eq!(n["driver_id"], driver.as_str());
    }
    assert_eq!(hook.bad_signatures.load(Ordering::SeqCst), 0);

    // The app reconnects to the restarted node and gets the same
    // notifications, with the same ids, from the start.
    let replay = stream(&node, &app).await;
    let replayed = eventually(Duration::from_secs(20), || async {
        let r = replay.lock().unwrap();
        before.keys().all(|id| r.iter().any(|n| &n.id == id))
    })
    .await;
    assert!(replayed, "the stream did not replay everything after the restart");
    let r: BTreeMap<String, String> = replay
        .lock()
        .unwrap()
        .iter()
        .map(|n| (n.id.clone(), n.kind.clone()))
        .collect();
    for (id, kind) in &before {
        assert_eq!(r.get(id), Some(kind));
    }
    assert_eq!(kinds(&replay), KINDS.iter().map(|k| k.to_string()).collect());
}
