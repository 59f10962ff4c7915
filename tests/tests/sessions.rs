//! RELIABILITY.md 22–25 and 28–30, and interrupted and stuck sessions:
//! chargers and sessions as supervised actors over the real protocol.

use std::time::{Duration, Instant};

use laddnet_actors::SessionFault;
use laddnet_proto::v1;
use laddnet_proto::v1::TransactionEventType as T;
use laddnet_tests::*;

#[tokio::test]
async fn a_replayed_event_applies_once() {
    let node = TestNode::start().await;
    let (_, mut cp) = node.charger("CP-1").await;
    let e = tx_event("tx-once", 0, T::Started, 1000, 0);
    assert!(cp.event(e.clone()).await.unwrap());
    // The charger never saw the ack (lost on the wire) and sends it again.
    assert!(cp.event(e).await.unwrap(), "a replay is acknowledged");
    assert!(cp.event(tx_event("tx-once", 1, T::Updated, 1100, 1)).await.unwrap());
    let s = node.session("tx-once").await.unwrap();
    assert_eq!((s.samples, s.energy_wh, s.status.as_str()), (2, 100, "active"));
    let m = &node.node().state.metrics;
    assert_eq!(m.events_duplicate.load(std::sync::atomic::Ordering::Relaxed), 1);
}

fn comparable(s: &v1::Session) -> (u64, u64, u64, u64, String, Vec<String>, u64, u64, String, u64) {
    (
        s.energy_wh,
        s.samples,
        s.last_seq,
        s.missing_events,
        s.status.clone(),
        s.flags.clone(),
        s.meter_start_wh,
        s.meter_stop_wh,
        s.stop_reason.clone(),
        s.duration_s,
    )
}

#[tokio::test]
async fn offline_queue_replayed_twice_shuffled_with_gaps_gives_the_same_session() {
    let node = TestNode::start().await;
    let (_, mut a) = node.charger("CP-A").await;
    for e in session_events("tx-inorder", 30) {
        assert!(a.event(e).await.unwrap());
    }
    let (_, mut b) = node.charger("CP-B").await;
    let events = session_events("tx-replayed", 30);
    // First replay: a deterministic shuffle, with every fifth event missing.
    let mut first: Vec<_> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 != 3)
        .map(|(_, e)| e.clone())
        .collect();
    first.sort_by_key(|e| (e.seq * 7919) % 31);
    for mut e in first {
        e.offline = true;
        assert!(b.event(e).await.unwrap());
    }
    let partial = node.session("tx-replayed").await.unwrap();
    assert!(partial.missing_events > 0, "the gaps show");
    // Second replay: everything, reversed.
    for mut e in events.into_iter().rev() {
        e.offline = true;
        assert!(b.event(e).await.unwrap());
    }
    let inorder = node.session("tx-inorder").await.unwrap();
    let replayed = node.session("tx-replayed").await.unwrap();
    assert_eq!(comparable(&inorder), comparable(&replayed));
    assert_eq!(replayed.missing_events, 0);
    assert_eq!(replayed.energy_wh, 150 * 31);
}

#[tokio::test]
async fn events_for_another_chargers_transaction_are_refused() {
    let node = TestNode::start().await;
    let (_, mut a) = node.charger("CP-A").await;
    let (_, mut b) = node.charger("CP-B").await;
    assert!(a.event(tx_event("tx-a", 0, T::Started, 5000, 0)).await.unwrap());
    assert!(
        !b.event(tx_event("tx-a", 1, T::Updated, 999_999, 1)).await.unwrap(),
        "refused"
    );
    assert!(
        !b.event(tx_event("tx-a", 2, T::Ended, 999_999, 2)).await.unwrap(),
        "refused"
    );
    let s = node.session("tx-a").await.unwrap();
    assert_eq!(
        (s.charger_id.as_str(), s.samples, s.status.as_str()),
        ("CP-A", 1, "active")
    );
    // Recorded as a security event against CP-B.
    let audit = node
        .pki()
        .await
        .list_audit_entries(v1::ListAuditEntriesRequest {
            page: Some(v1::PageRequest {
                page_size: 1000,
                page_token: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        audit
            .entries
            .iter()
            .any(|e| e.kind == "security-event" && e.actor == "charger:CP-B" && e.subject == "tx-a")
    );
    // A still owns it.
    assert!(a.event(tx_event("tx-a", 1, T::Updated, 5100, 1)).await.unwrap());
}

#[tokio::test]
async fn meter_anomalies_are_flagged() {
    let node = TestNode::start().await;
    let (_, mut cp) = node.charger("CP-1").await;
    for (seq, wh) in [(0, 5000), (1, 5150), (2, 4000)] {
        assert!(
            cp.event(tx_event(
                "tx-back",
                seq,
                if seq == 0 { T::Started } else { T::Updated },
                wh,
                seq as i64
            ))
            .await
            .unwrap()
        );
    }
    assert!(
        node.session("tx-back")
            .await
            .unwrap()
            .flags
            .contains(&"register-backwards".to_string())
    );
    // 22 kW connector, one minute: at most ~400 Wh; 50 kWh is impossible.
    assert!(cp.event(tx_event("tx-jump", 0, T::Started, 1000, 0)).await.unwrap());
    assert!(cp.event(tx_event("tx-jump", 1, T::Updated, 51_000, 1)).await.unwrap());
    let s = node.session("tx-jump").await.unwrap();
    // … and far from what its 11 kW readings integrate to.
    assert_eq!(
        s.flags,
        vec![
            "energy-exceeds-capacity".to_string(),
            "energy-power-mismatch".to_string()
        ]
    );
    // Malformed events get a precise rejection and store nothing.
    let mut bad = tx_event("tx-bad", 0, T::Started, 1, 0);
    bad.connector_id = 0;
    assert!(!cp.event(bad).await.unwrap());
    let mut bad = tx_event("tx-bad", 0, T::Started, 1, 0);
    bad.meter = None;
    assert!(!cp.event(bad).await.unwrap());
    assert!(node.session("tx-bad").await.is_none());
}

async fn actor_of(node: &TestNode, charger: &str, tx: &str) -> Option<ractor::ActorId> {
    let (live, _) = node.node().state.chargers.handle(charger)?.inspect().await.ok()?;
    live.into_iter().find(|(t, _)| t == tx).map(|(_, id)| id)
}

#[tokio::test]
async fn a_panicking_session_restarts_alone_and_resumes_from_the_store() {
    let node = TestNode::start().await;
    let (_, mut a) = node.charger("CP-A").await;
    let (_, mut b) = node.charger("CP-B").await;
    for e in session_events("tx-a", 3).into_iter().take(3) {
        assert!(a.event(e).await.unwrap());
    }
    assert!(b.event(tx_event("tx-b", 0, T::Started, 100, 0)).await.unwrap());
    let a_before = actor_of(&node, "CP-A", "tx-a").await.unwrap();
    let b_before = actor_of(&node, "CP-B", "tx-b").await.unwrap();
    let handle = node.node().state.chargers.handle("CP-A").unwrap();
    assert!(handle.inject_fault("tx-a", SessionFault::Panic).await);
    let replaced = eventually(Duration::from_secs(5), || async {
        actor_of(&node, "CP-A", "tx-a").await.is_some_and(|id| id != a_before)
    })
    .await;
    assert!(replaced, "the session actor was not restarted");
    // It continues from the store: the next event counts on top of the first three.
    assert!(a.event(tx_event("tx-a", 3, T::Updated, 10_450, 3)).await.unwrap());
    assert_eq!(node.session("tx-a").await.unwrap().samples, 4);
    // Nothing else was touched.
    assert_eq!(actor_of(&node, "CP-B", "tx-b").await.unwrap(), b_before);
    b.heartbeat().await.unwrap();
}

#[tokio::test]
async fn a_restart_loop_escalates_and_closes_the_chargers_connection() {
    let node = TestNode::start().await;
    let (_, mut a) = node.charger("CP-A").await;
    assert!(a.event(tx_event("tx-a", 0, T::Started, 100, 0)).await.unwrap());
    let handle = node.node().state.chargers.handle("CP-A").unwrap();
    // The budget is 3 restarts in 10 s; the 4th failure escalates.
    for _ in 0..4 {
        let before = actor_of(&node, "CP-A", "tx-a").await;
        if !handle.inject_fault("tx-a", SessionFault::Panic).await {
            break;
        }
        eventually(Duration::from_secs(5), || async {
            actor_of(&node, "CP-A", "tx-a").await != before
        })
        .await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = a.rx.message().await {}
    })
    .await;
    assert!(closed.is_ok(), "the charger's stream should be closed after escalation");
    assert!(!handle.is_alive(), "the charger actor failed upward");
    // The session itself is intact in the store for when the charger returns.
    assert_eq!(node.session("tx-a").await.unwrap().samples, 1);
}

#[tokio::test]
async fn a_hung_session_is_replaced_by_the_watchdog() {
    let node = TestNode::start_with(|c| {
        c.sessions.watchdog_interval_ms = 100;
        c.sessions.ping_timeout_ms = 200;
    })
    .await;
    let (_, mut a) = node.charger("CP-A").await;
    assert!(a.event(tx_event("tx-a", 0, T::Started, 100, 0)).await.unwrap());
    let before = actor_of(&node, "CP-A", "tx-a").await.unwrap();
    let handle = node.node().state.chargers.handle("CP-A").unwrap();
    let started = Instant::now();
    assert!(handle.inject_fault("tx-a", SessionFault::Hang).await);
    let replaced = eventually(Duration::from_secs(5), || async {
        actor_of(&node, "CP-A", "tx-a").await.is_some_and(|id| id != before)
    })
    .await;
    assert!(replaced, "hung actor not replaced");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "replaced after {:?}",
        started.elapsed()
    );
    assert!(a.event(tx_event("tx-a", 1, T::Updated, 200, 1)).await.unwrap());
    assert_eq!(node.session("tx-a").await.unwrap().samples, 2);
}

#[tokio::test]
async fn a_silent_session_is_flagged_stuck() {
    let node = TestNode::start_with(|c| {
        c.sessions.watchdog_interval_ms = 100;
        c.sessions.stuck_after_s = 1;
    })
    .await;
    let (_, mut a) = node.charger("CP-A").await;
    assert!(a.event(tx_event("tx-a", 0, T::Started, 100, 0)).await.unwrap());
    let stuck = eventually(Duration::from_secs(10), || async {
        node.session("tx-a")
            .await
            .is_some_and(|s| s.flags.contains(&"stuck".to_string()))
    })
    .await;
    assert!(stuck);
    // The stuck session is an incident, which resolves with meter data.
    let inc = laddnet_proto::v1::incident_service_client::IncidentServiceClient::new(
        node.channel(&node.admin).await.unwrap(),
    );
    let list = |inc: laddnet_proto::v1::incident_service_client::IncidentServiceClient<tonic::transport::Channel>| async move {
        let mut inc = inc;
        inc.list_incidents(laddnet_proto::v1::ListIncidentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .incidents
            .into_iter()
            .filter(|i| i.kind == "stuck-session")
            .collect::<Vec<_>>()
    };
    let open = eventually(Duration::from_secs(10), || {
        let inc = inc.clone();
        async move { list(inc).await.iter().any(|i| i.active && i.subject == "session:tx-a") }
    })
    .await;
    assert!(open, "no stuck-session incident");
    assert!(a.event(tx_event("tx-a", 1, T::Updated, 200, 1)).await.unwrap());
    let resolved = list(inc.clone()).await;
    assert_eq!(resolved.len(), 1);
    assert_eq!(
        (resolved[0].state.as_str(), resolved[0].active),
        ("resolved", false),
        "{resolved:?}"
    );
}

#[tokio::test]
async fn a_flood_from_one_charger_is_bounded_and_others_keep_their_latency() {
    let node = TestNode::start_with(|c| {
        c.sessions.max_messages_per_second = 300;
        c.sessions.burst = 50;
    })
    .await;
    let (_, mut quiet) = node.charger("CP-QUIET").await;
    let (_, flood) = node.charger("CP-FLOOD").await;
    let mut baseline = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        quiet.heartbeat().await.unwrap();
        baseline.push(t.elapsed());
    }
    // The flooding charger pushes 900 messages without waiting for answers.
    let tx = flood.tx.clone();
    let flooder = tokio::spawn(async move {
        for i in 0..900u64 {
            let m = v1::ChargerMessage {
                msg_id: 1000 + i,
                payload: Some(v1::charger_message::Payload::Heartbeat(v1::Heartbeat {})),
            };
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut rx = flood.rx;
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = rx.message().await {} });
    let mut during = Vec::new();
    for _ in 0..40 {
        let t = Instant::now();
        quiet.heartbeat().await.unwrap();
        during.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flooder.await.unwrap();
    drain.abort();
    during.sort();
    let p99 = during[during.len() * 99 / 100 - 1];
    assert!(
        p99 < Duration::from_millis(250),
        "the quiet charger's p99 went to {p99:?} (baseline {baseline:?})"
    );
    let waits = node
        .node()
        .state
        .metrics
        .charger_backpressure
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(waits > 0, "the flood was not paced");
}

#[tokio::test]
async fn an_interrupted_session_resumes_when_the_charger_returns() {
    let node = TestNode::start().await;
    let (creds, mut a) = node.charger("CP-A").await;
    assert!(a.event(tx_event("tx-a", 0, T::Started, 100, 0)).await.unwrap());
    drop(a);
    let interrupted = eventually(Duration::from_secs(10), || async {
        node.session("tx-a").await.is_some_and(|s| s.status == "interrupted")
    })
    .await;
    assert!(interrupted);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = None;
    while back.is_none() && Instant::now() < deadline {
        match attach(node.channel(&creds).await.unwrap(), "CP-A").await {
            Ok(a) => back = Some(a),
            // The node may not have noticed the old stream is gone yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut a = back.expect("reconnected");
    assert!(a.event(tx_event("tx-a", 1, T::Updated, 250, 1)).await.unwrap());
    let s = node.session("tx-a").await.unwrap();
    assert_eq!((s.status.as_str(), s.samples, s.energy_wh), ("active", 2, 150));
}

#[tokio::test]
async fn an_interrupted_session_is_closed_after_the_timeout() {
    let node = TestNode::start_with(|c| c.sessions.interrupted_timeout_s = 1).await;
    let (_, mut a) = node.charger("CP-A").await;
    assert!(a.event(tx_event("tx-a", 0, T::Started, 100, 0)).await.unwrap());
    assert!(a.event(tx_event("tx-a", 1, T::Updated, 300, 1)).await.unwrap());
    drop(a);
    let closed = eventually(Duration::from_secs(15), || async {
        node.session("tx-a")
            .await
            .is_some_and(|s| s.status == "ended" && s.stop_reason == "interrupted")
    })
    .await;
    assert!(closed);
    assert_eq!(
        node.session("tx-a").await.unwrap().energy_wh,
        200,
        "billed up to the last reading"
    );
}

#[tokio::test]
async fn commands_reach_the_charger_and_replies_come_back() {
    let node = TestNode::start().await;
    let (_, mut a) = node.charger("CP-A").await;
    let mut op = node.operator_client().await;
    let send = tokio::spawn(async move {
        op.send_command(v1::SendCommandRequest {
            charger_id: "CP-A".into(),
            command: Some(v1::Command {
                command_id: String::new(),
                kind: Some(v1::command::Kind::Reset(v1::Reset { hard: false })),
            }),
        })
        .await
    });
    let cmd = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), a.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(v1::central_message::Payload::Command(c)) = m.payload {
            break c;
        }
    };
    assert!(matches!(cmd.kind, Some(v1::command::Kind::Reset(_))));
    a.tx.send(v1::ChargerMessage {
        msg_id: 99,
        payload: Some(v1::charger_message::Payload::CommandReply(v1::CommandReply {
            command_id: cmd.command_id.clone(),
            status: v1::CommandStatus::Accepted as i32,
            detail: "resetting".into(),
        })),
    })
    .await
    .unwrap();
    let reply = send.await.unwrap().unwrap().into_inner();
    assert_eq!(reply.status, v1::CommandStatus::Accepted as i32);
    // A charger that is not connected gets a precise error.
    let err = node
        .operator_client()
        .await
        .send_command(v1::SendCommandRequest {
            charger_id: "CP-NOPE".into(),
            command: Some(v1::Command {
                command_id: String::new(),
                kind: Some(v1::command::Kind::Reset(v1::Reset { hard: true })),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not connected"));
}

#[tokio::test]
async fn sites_and_chargers_are_managed_and_viewers_cannot_change_them() {
    let node = TestNode::start().await;
    let (_, mut a) = node.charger("CP-A").await;
    a.request(v1::charger_message::Payload::Status(v1::StatusNotification {
        connector_id: 1,
        status: v1::ConnectorStatus::Faulted as i32,
        error_code: "GroundFailure".into(),
        timestamp_ms: 0,
    }))
    .await
    .unwrap();
    let mut op = node.operator_client().await;
    let site = v1::Site {
        site_id: "depot-1".into(),
        name: "Depot".into(),
        address: "Hamngatan 1".into(),
        time_zone: "Europe/Stockholm".into(),
        grid_limit_w: 100_000,
    };
    op.create_site(v1::CreateSiteRequest {
        site: Some(site.clone()),
    })
    .await
    .unwrap();
    let err = op
        .create_site(v1::CreateSiteRequest { site: Some(site) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let c = op
        .set_charger_site(v1::SetChargerSiteRequest {
            charger_id: "CP-A".into(),
            site_id: "depot-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.site_id, "depot-1");
    assert!(c.connected);
    assert_eq!(c.connectors[0].status, v1::ConnectorStatus::Faulted as i32);
    assert_eq!(c.connectors[0].error_code, "GroundFailure");
    let err = op
        .set_charger_site(v1::SetChargerSiteRequest {
            charger_id: "CP-A".into(),
            site_id: "nowhere".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let viewer = node.operator("Vic Viewer", laddnet_core::Role::Viewer).await;
    let mut v =
        laddnet_proto::v1::operator_service_client::OperatorServiceClient::new(node.channel(&viewer).await.unwrap());
    assert_eq!(
        v.list_sites(v1::ListSitesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sites
            .len(),
        1
    );
    let err = v
        .create_site(v1::CreateSiteRequest {
            site: Some(v1::Site {
                site_id: "x".into(),
                name: "x".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn the_site_an_operator_sets_survives_a_reboot() {
    let node = TestNode::start().await;
    // Enrolled for depot-0 by its token.
    let token = node
        .pki()
        .await
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
            charger_id: "CP-S".into(),
            ttl_seconds: 0,
            site_id: "depot-0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let (key, csr) = laddnet_pki::new_key_and_csr("CP-S").unwrap();
    let r = node
        .enrollment()
        .await
        .enroll(v1::EnrollRequest {
            charger_id: "CP-S".into(),
            token,
            csr_pem: csr,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.certificate.as_ref().unwrap().site_id, "depot-0");
    let creds = Creds {
        chain_pem: r.chain_pem,
        key_pem: key.to_string(),
        serial: String::new(),
    };
    let a = attach(node.channel(&creds).await.unwrap(), "CP-S").await.unwrap();
    let mut op = node.operator_client().await;
    let c = op
        .get_charger(v1::GetChargerRequest {
            charger_id: "CP-S".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.site_id, "depot-0");
    let site = v1::Site {
        site_id: "depot-1".into(),
        name: "Depot one".into(),
        ..Default::default()
    };
    op.create_site(v1::CreateSiteRequest { site: Some(site) })
        .await
        .unwrap();
    op.set_charger_site(v1::SetChargerSiteRequest {
        charger_id: "CP-S".into(),
        site_id: "depot-1".into(),
    })
    .await
    .unwrap();
    // The charger reboots and boots again with its certificate.
    drop(a);
    assert!(
        eventually(Duration::from_secs(10), || async {
            node.node().state.chargers.connection("CP-S").is_none()
        })
        .await
    );
    let _a = attach(node.channel(&creds).await.unwrap(), "CP-S").await.unwrap();
    let c = op
        .get_charger(v1::GetChargerRequest {
            charger_id: "CP-S".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.site_id.as_str(), c.connected), ("depot-1", true));
}

/// Meter updates a charger sends ahead (or flushes after an outage) are
/// stored in runs, one store transaction each, and answered one by one in
/// the order sent; an invalid event inside a run is refused alone, a
/// replay inside it acknowledged once.
#[tokio::test]
async fn meter_updates_sent_ahead_are_stored_in_runs_and_answered_in_order() {
    let node = TestNode::start().await;
    let (_, mut cp) = node.charger("CP-RUN").await;
    assert!(cp.event(tx_event("tx-run", 0, T::Started, 1_000, 0)).await.unwrap());
    let msg = |id: u64, e: v1::TransactionEvent| v1::ChargerMessage {
        msg_id: id,
        payload: Some(v1::charger_message::Payload::Transaction(e)),
    };
    let mut sent = Vec::new();
    for seq in 1..=150u64 {
        let mut e = tx_event("tx-run", seq, T::Updated, 1_000 + seq * 100, seq as i64);
        match seq {
            // Refused when decoded, before the actor.
            40 => e.meter.as_mut().unwrap().soc_percent = Some(150),
            // Refused by the session actor, inside the run.
            80 => e.seq = 1 << 41,
            _ => {}
        }
        sent.push((10_000 + seq, seq));
        cp.tx.send(msg(10_000 + seq, e)).await.unwrap();
    }
    // A replay of an event already in this burst.
    cp.tx
        .send(msg(20_000, tx_event("tx-run", 100, T::Updated, 11_000, 100)))
        .await
        .unwrap();
    sent.push((20_000, 100));
    for (id, seq) in sent {
        let m = tokio::time::timeout(Duration::from_secs(15), cp.rx.message())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("the stream is open");
        assert_eq!(m.msg_id, id, "replies come in the order sent");
        match m.payload {
            Some(v1::central_message::Payload::TransactionAck(a)) => {
                assert!(seq != 40 && seq != 80, "event {seq} should have been refused");
                assert_eq!(a.seq, seq);
            }
            Some(v1::central_message::Payload::Rejected(r)) => {
                assert!(seq == 40 || seq == 80, "event {seq} refused: {}", r.reason)
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    let s = node.session("tx-run").await.unwrap();
    assert_eq!(s.samples, 149, "the start and 148 valid updates, the replay once");
    assert_eq!(
        s.energy_wh, 15_000,
        "from 1,000 Wh at the start to 16,000 Wh at seq 150"
    );
    let m = &node.node().state.metrics;
    assert!(
        m.events_in_runs.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "events sent ahead were stored in runs"
    );
    assert_eq!(m.events_duplicate.load(std::sync::atomic::Ordering::Relaxed), 1);
}

async fn next(watch: &mut tonic::Streaming<v1::Session>) -> v1::Session {
    tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("the watch sends within 20 s")
        .expect("the watch stream")
        .expect("the watch stream goes on")
}

#[tokio::test]
async fn watching_sessions_shows_each_change_and_a_session_s_end_once() {
    let node = TestNode::start().await;
    let mut watch = node
        .operator_client()
        .await
        .watch_sessions(v1::WatchSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (_, mut cp) = node.charger("CP-W").await;
    assert!(cp.event(tx_event("tx-w", 0, T::Started, 1_000, 0)).await.unwrap());
    assert!(cp.event(tx_event("tx-w", 1, T::Updated, 1_500, 1)).await.unwrap());
    let mut s = next(&mut watch).await;
    while s.energy_wh < 500 {
        s = next(&mut watch).await;
    }
    assert_eq!((s.transaction_id.as_str(), s.status.as_str()), ("tx-w", "active"));
    assert!(cp.event(tx_event("tx-w", 2, T::Ended, 2_000, 2)).await.unwrap());
    // The end comes through once, with the session's last figures.
    let mut s = next(&mut watch).await;
    while s.status == "active" {
        s = next(&mut watch).await;
    }
    assert_eq!(
        (s.transaction_id.as_str(), s.status.as_str(), s.energy_wh),
        ("tx-w", "ended", 1_000)
    );
    // Then nothing more of it: the next message is another session's.
    assert!(cp.event(tx_event("tx-w2", 0, T::Started, 5_000, 3)).await.unwrap());
    let s = next(&mut watch).await;
    assert_eq!(s.transaction_id, "tx-w2", "the ended session was sent once");
}
