//! Fault detection end to end: faults injected through the simulator open
//! exactly one incident each, which resolves when the fault clears and
//! reopens when it returns; operators acknowledge, assign and resolve.

use std::time::Duration;

use laddnet_core::Role;
use laddnet_proto::v1;
use laddnet_proto::v1::incident_service_client::IncidentServiceClient;
use laddnet_sim::{Fault, Kind, Profile};
use laddnet_tests::*;
use tonic::transport::Channel;

async fn incidents(c: &mut IncidentServiceClient<Channel>) -> Vec<v1::IncidentInfo> {
    c.list_incidents(v1::ListIncidentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .incidents
}

/// Waits until the incidents of `kind` satisfy `ok`; returns them.
async fn wait_for(
    c: &mut IncidentServiceClient<Channel>,
    kind: &str,
    what: &str,
    ok: impl Fn(&[v1::IncidentInfo]) -> bool,
) -> Vec<v1::IncidentInfo> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let of: Vec<_> = incidents(c).await.into_iter().filter(|i| i.kind == kind).collect();
        if ok(&of) {
            return of;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {of:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn profile() -> Profile {
    let mut p = Profile::fleet_member(0);
    p.charger_id = "SIM-I".into();
    p.kind = Kind::Ac;
    p.connectors = 1;
    p.sample_every = Duration::from_millis(100);
    p.mean_idle = Duration::from_millis(200);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_open_one_incident_each_and_clear_with_the_fault() {
    let node = TestNode::start_with(|c| c.alarms.offline_after_s = 3).await;
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    let ep = node.sim_endpoints();
    let identity = laddnet_sim::enroll(&ep, "SIM-I", &node.token("SIM-I").await)
        .await
        .unwrap();
    let sim = laddnet_sim::spawn(ep.clone(), identity.clone(), profile());

    // Meter tampering: the register goes backwards mid-session.
    let mut ops = node.operator_client().await;
    let charging = eventually(Duration::from_secs(20), || {
        let mut ops = ops.clone();
        async move {
            ops.list_sessions(v1::ListSessionsRequest {
                charger_id: "SIM-I".into(),
                ..Default::default()
            })
            .await
            .map(|r| {
                r.into_inner()
                    .sessions
                    .iter()
                    .any(|s| s.status == "active" && s.samples >= 2)
            })
            .unwrap_or(false)
        }
    })
    .await;
    assert!(charging, "the simulated charger never charged");
    sim.inject(Fault::MeterBackwards(5_000)).await;
    let tamper = wait_for(&mut inc, "meter-anomaly", "no meter-anomaly incident", |v| {
        !v.is_empty()
    })
    .await;
    assert_eq!(tamper.len(), 1);
    assert!(tamper[0].subject.starts_with("session:SIM-I-1-"), "{:?}", tamper[0]);
    assert_eq!(tamper[0].severity, "critical");
    assert!(
        tamper[0].timeline[0].detail.contains("register-backwards"),
        "{:?}",
        tamper[0]
    );
    // Later readings of the same session do not open more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = ops.list_sessions(v1::ListSessionsRequest::default()).await;
    assert_eq!(
        incidents(&mut inc)
            .await
            .iter()
            .filter(|i| i.kind == "meter-anomaly")
            .count(),
        1
    );

    // Overload: the connector reports 3 kW above its 22 kW rating.
    sim.inject(Fault::Overload(3_000)).await;
    let over = wait_for(&mut inc, "overload", "no overload incident", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    assert_eq!(over[0].subject, "connector:SIM-I/1");
    assert!(
        over[0].timeline[0].detail.contains("on a 22000 W connector"),
        "{:?}",
        over[0]
    );
    sim.inject(Fault::Overload(0)).await;
    wait_for(&mut inc, "overload", "overload not resolved", |v| {
        v.len() == 1 && !v[0].active && v[0].state == "resolved"
    })
    .await;

    // A connector fault: one incident, however often it is reported.
    sim.inject(Fault::ErrorCode(1, "GroundFailure".into())).await;
    sim.inject(Fault::ErrorCode(1, "GroundFailure".into())).await;
    let fault = wait_for(&mut inc, "charger-fault", "no charger-fault incident", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    let id = fault[0].id.clone();
    assert_eq!(fault[0].subject, "connector:SIM-I/1");
    assert_eq!(fault[0].timeline[0].detail, "faulted: GroundFailure");
    // Operators work it.
    let viewer = node.operator("viewer", Role::Viewer).await;
    let mut as_viewer = IncidentServiceClient::new(node.channel(&viewer).await.unwrap());
    let denied = as_viewer
        .acknowledge_incident(v1::IncidentActionRequest {
            id: id.clone(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    inc.acknowledge_incident(v1::IncidentActionRequest {
        id: id.clone(),
        note: String::new(),
    })
    .await
    .unwrap();
    let assigned = inc
        .assign_incident(v1::IncidentActionRequest {
            id: id.clone(),
            note: "Tech Tove".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (assigned.state.as_str(), assigned.assignee.as_str()),
        ("assigned", "Tech Tove")
    );
    // The fault clears: resolved by itself.
    sim.inject(Fault::ClearError(1)).await;
    wait_for(&mut inc, "charger-fault", "not resolved when the fault cleared", |v| {
        v.len() == 1 && v[0].state == "resolved" && !v[0].active
    })
    .await;
    // It returns: the same incident reopens, with its technician.
    sim.inject(Fault::ErrorCode(1, "GroundFailure".into())).await;
    let back = wait_for(&mut inc, "charger-fault", "not reopened", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    assert_eq!(
        (back[0].id.as_str(), back[0].state.as_str(), back[0].occurrences),
        (id.as_str(), "assigned", 2)
    );
    sim.inject(Fault::ClearError(1)).await;
    wait_for(&mut inc, "charger-fault", "not resolved again", |v| {
        v.len() == 1 && !v[0].active
    })
    .await;

    // A dropped connection that comes back at once is not an outage.
    sim.inject(Fault::Disconnect).await;
    let mut status = sim.status.clone();
    let back = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if status.borrow().reconnects >= 1 && status.borrow().connected {
                break;
            }
            if status.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(back.is_ok(), "the simulator did not reconnect");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        incidents(&mut inc).await.iter().all(|i| i.kind != "offline"),
        "a reconnect within alarms.offline_after_s opened an incident"
    );

    // Gone for good: offline after 3 s; back: resolved.
    sim.stop();
    let off = wait_for(&mut inc, "offline", "no offline incident", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    assert_eq!(off[0].subject, "charger:SIM-I");
    let sim = laddnet_sim::spawn(ep, identity, profile());
    wait_for(&mut inc, "offline", "offline not resolved on reconnect", |v| {
        v.len() == 1 && v[0].state == "resolved"
    })
    .await;

    // Resolved by hand; the listing filters by state.
    let closed = inc
        .resolve_incident(v1::IncidentActionRequest {
            id: tamper[0].id.clone(),
            note: "meter replaced, session refunded".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.state, "resolved");
    let open = inc
        .list_incidents(v1::ListIncidentsRequest {
            state: "open".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .incidents;
    assert!(open.iter().all(|i| i.state == "open"));
    let bad = inc
        .list_incidents(v1::ListIncidentsRequest {
            state: "burning".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("burning"));
    sim.stop();
}

/// `GET /metrics` as curl sends it; returns the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_the_fleet_series() {
    let node = TestNode::start().await;
    let addr = node.node().metrics_addr.expect("metrics on");
    assert!(addr.ip().is_loopback());
    let (_, mut cp) = node.charger("CP-M").await;
    for e in session_events("tx-m", 3) {
        assert!(cp.event(e).await.unwrap());
    }
    let mut e = tx_event("tx-m2", 0, v1::TransactionEventType::Started, 50_000, 0);
    e.connector_id = 2;
    assert!(cp.event(e).await.unwrap());
    // A fault, as an incident.
    cp.request(v1::charger_message::Payload::Status(v1::StatusNotification {
        connector_id: 1,
        status: v1::ConnectorStatus::Faulted as i32,
        error_code: "OverCurrentFailure".into(),
        timestamp_ms: 1_700_000_000_000,
    }))
    .await
    .unwrap();
    // The fault reaches the alarm monitor asynchronously: scrape until the
    // series settle (or the deadline passes and the asserts name what is off).
    let expected = [
        "laddnet_chargers_connected 1",
        "laddnet_sessions_active 1",
        "laddnet_energy_delivered_wh_total 600",
        "laddnet_charger_events_total{outcome=\"accepted\"} 6",
        "laddnet_incidents_active{kind=\"charger-fault\"} 1",
        "laddnet_incidents_active{kind=\"offline\"} 0",
        "laddnet_certificates_expiring_30d ",
        "laddnet_panics_total ",
        "laddnet_rpc_duration_seconds_count{method=\"laddnet.v1.ChargerService/Attach\"} 1",
        "laddnet_rpc_duration_seconds_bucket{method=\"laddnet.v1.PkiService/CreateEnrollmentToken\",le=\"+Inf\"} 1",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut body = scrape(addr).await;
    while !expected.iter().all(|s| body.contains(s)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        body = scrape(addr).await;
    }
    for series in expected {
        assert!(body.contains(series), "no {series:?} in\n{body}");
    }
    // Anything else is not served.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_expiry_is_an_incident_until_it_is_renewed() {
    let node = TestNode::start_with(|c| {
        c.alarms.certificate_check_s = 1;
        c.alarms.certificate_expiry_days = 14;
    })
    .await;
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    // Enrolled 355 days ago: 10 days of its 365 left.
    node.clock.advance_days(-355);
    let old = node.enroll("CP-X").await;
    node.clock.advance_days(355);
    let subject = format!("certificate:{}", old.serial);
    let s2 = subject.clone();
    let open = wait_for(&mut inc, "certificate-expiring", "no certificate incident", move |v| {
        v.iter().any(|i| i.subject == s2 && i.active)
    })
    .await;
    let mine: Vec<_> = open.iter().filter(|i| i.subject == subject).collect();
    assert_eq!(mine.len(), 1);
    assert!(
        mine[0].timeline[0]
            .detail
            .contains("charger certificate of CP-X expires in"),
        "{:?}",
        mine[0]
    );
    // The charger renews: the incident resolves, and the new one raises none.
    let (key, csr) = laddnet_pki::new_key_and_csr("CP-X").unwrap();
    let renewed = v1::charger_service_client::ChargerServiceClient::new(node.channel(&old).await.unwrap())
        .renew_certificate(v1::RenewCertificateRequest { csr_pem: csr })
        .await
        .unwrap()
        .into_inner();
    drop(key);
    let new_serial = renewed.certificate.unwrap().serial;
    let s3 = subject.clone();
    let done = wait_for(
        &mut inc,
        "certificate-expiring",
        "not resolved by the renewal",
        move |v| v.iter().any(|i| i.subject == s3 && !i.active && i.state == "resolved"),
    )
    .await;
    assert!(done.iter().all(|i| i.subject != format!("certificate:{new_serial}")));
}

#[tokio::test]
async fn availability_matches_a_hand_computed_history() {
    let node = TestNode::start().await;
    let (_, mut cp) = node.charger("CP-AV").await;
    // t0 = 2023-11-14T22:13:20Z; statuses in the charger's time.
    const T0: i64 = 1_700_000_000_000;
    const MIN: i64 = 60_000;
    async fn status(cp: &mut Attached, connector: u32, s: v1::ConnectorStatus, at: i64) {
        cp.request(v1::charger_message::Payload::Status(v1::StatusNotification {
            connector_id: connector,
            status: s as i32,
            error_code: if s == v1::ConnectorStatus::Faulted {
                "GroundFailure".into()
            } else {
                String::new()
            },
            timestamp_ms: at,
        }))
        .await
        .unwrap();
    }
    use v1::ConnectorStatus as S;
    status(&mut cp, 1, S::Available, T0).await;
    status(&mut cp, 2, S::Available, T0).await;
    status(&mut cp, 1, S::Faulted, T0 + 10 * MIN).await;
    status(&mut cp, 1, S::Available, T0 + 25 * MIN).await;
    status(&mut cp, 1, S::Unavailable, T0 + 40 * MIN).await;
    status(&mut cp, 1, S::Available, T0 + 45 * MIN).await;
    // Planned maintenance of the whole charger for the last 10 minutes.
    node.driver_admin()
        .await
        .schedule_maintenance(v1::ScheduleMaintenanceRequest {
            charger_id: "CP-AV".into(),
            site_id: String::new(),
            starts_at: "2023-11-14T23:03:20Z".into(),
            ends_at: "2023-11-14T23:13:20Z".into(),
            reason: "inspection".into(),
        })
        .await
        .unwrap();
    let mut ops = node.operator_client().await;
    let report = |by: &str| {
        let mut ops = ops.clone();
        let by = by.to_string();
        async move {
            ops.availability_report(v1::AvailabilityReportRequest {
                from: "2023-11-14T22:13:20Z".into(),
                to: "2023-11-14T23:13:20Z".into(),
                by,
            })
            .await
            .map(|r| r.into_inner().rows)
        }
    };
    // By hand: connector 1 is up 0–10, 25–40 and 45–50 (30 min), faulted
    // 10–25 (15), unavailable 40–45 plus the window 50–60 (15); connector 2
    // is up 50 min and in the window 10.
    let rows = report("connector").await.unwrap();
    let row = |k: &str| rows.iter().find(|r| r.key == k).unwrap().clone();
    let c1 = row("CP-AV/1");
    assert_eq!(
        (
            c1.availability_percent.as_str(),
            c1.counted_s,
            c1.up_s,
            c1.fault_s,
            c1.offline_s,
            c1.maintenance_s
        ),
        ("50.00", 3600, 1800, 900, 0, 900)
    );
    let c2 = row("CP-AV/2");
    assert_eq!(
        (c2.availability_percent.as_str(), c2.up_s, c2.maintenance_s),
        ("83.33", 3000, 600)
    );
    let by_charger = report("charger").await.unwrap();
    assert_eq!(by_charger.len(), 1);
    assert_eq!(
        (
            by_charger[0].key.as_str(),
            by_charger[0].availability_percent.as_str(),
            by_charger[0].counted_s
        ),
        ("CP-AV", "66.67", 7200)
    );
    assert_eq!(report("site").await.unwrap()[0].key, "(no site)");
    assert_eq!(report("planet").await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let backwards = ops
        .availability_report(v1::AvailabilityReportRequest {
            from: "2023-11-15T00:00:00Z".into(),
            to: "2023-11-14T00:00:00Z".into(),
            by: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(backwards.code(), tonic::Code::InvalidArgument, "{backwards:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_connection_is_one_incident_that_resolves_when_it_calms_down() {
    let node = TestNode::start_with(|c| {
        c.alarms.flap_reconnects = 3;
        c.alarms.flap_window_s = 6;
    })
    .await;
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    let ep = node.sim_endpoints();
    let identity = laddnet_sim::enroll(&ep, "SIM-F", &node.token("SIM-F").await)
        .await
        .unwrap();
    let mut p = profile();
    p.charger_id = "SIM-F".into();
    let sim = laddnet_sim::spawn(ep, identity, p);
    let mut status = sim.status.clone();
    // Connected once, then dropped twice: three connections.
    for n in 0..3u64 {
        let up = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if status.borrow().connected && status.borrow().reconnects >= n {
                    break;
                }
                if status.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(up.is_ok(), "connection {n} did not come up");
        if n < 2 {
            sim.inject(Fault::Disconnect).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while status.borrow().connected {
                    if status.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
    }
    let flap = wait_for(&mut inc, "flapping", "no flapping incident", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    assert_eq!(flap[0].subject, "charger:SIM-F");
    // Stable for a window: resolved.
    wait_for(&mut inc, "flapping", "flapping not resolved", |v| {
        v.len() == 1 && !v[0].active && v[0].state == "resolved"
    })
    .await;
    sim.stop();
}

#[tokio::test]
async fn watching_incidents_shows_each_change_as_it_happens() {
    let node = TestNode::start().await;
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    let mut watch = inc
        .watch_incidents(v1::WatchIncidentsRequest {})
        .await
        .unwrap()
        .into_inner();
    let (_, mut cp) = node.charger("CP-W").await;
    let status = |s: v1::ConnectorStatus| {
        v1::charger_message::Payload::Status(v1::StatusNotification {
            connector_id: 2,
            status: s as i32,
            error_code: "HighTemperature".into(),
            timestamp_ms: 1_700_000_000_000,
        })
    };
    cp.request(status(v1::ConnectorStatus::Faulted)).await.unwrap();
    let opened = next(&mut watch).await;
    assert_eq!(opened.timeline.len(), 1);
    assert_eq!(
        (
            opened.kind.as_str(),
            opened.subject.as_str(),
            opened.state.as_str(),
            opened.active
        ),
        ("charger-fault", "connector:CP-W/2", "open", true)
    );
    cp.request(status(v1::ConnectorStatus::Available)).await.unwrap();
    let resolved = next(&mut watch).await;
    assert_eq!(
        (resolved.id.as_str(), resolved.state.as_str(), resolved.active),
        (opened.id.as_str(), "resolved", false)
    );
}

async fn next(w: &mut tonic::Streaming<v1::IncidentInfo>) -> v1::IncidentInfo {
    tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("a change within 10 s")
        .unwrap()
        .unwrap()
}
