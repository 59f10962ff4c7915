//! Several `laddnet node` processes over one shared store (the harness in
//! `laddnet_tests::cluster`): routing between nodes, fencing of a frozen
//! node, and failover of a killed one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use laddnet_proto::v1;
use laddnet_proto::v1::TransactionEventType as T;
use laddnet_proto::v1::billing_service_client::BillingServiceClient;
use laddnet_proto::v1::charger_message::Payload as In;
use laddnet_proto::v1::cluster_service_client::ClusterServiceClient;
use laddnet_proto::v1::fleet_service_client::FleetServiceClient;
use laddnet_proto::v1::operator_service_client::OperatorServiceClient;
use laddnet_sim::{Identity, Profile, SimHandle};
use laddnet_tests::cluster::Cluster;
use laddnet_tests::*;

fn identity(c: Creds) -> Identity {
    Identity {
        chain_pem: c.chain_pem,
        key_pem: c.key_pem,
    }
}

async fn session(op: &mut OperatorServiceClient<tonic::transport::Channel>, tx: &str) -> Option<v1::Session> {
    op.get_session(v1::GetSessionRequest {
        transaction_id: tx.into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner())
}

/// Every stored session (`status`: "" for all), by transaction id.
async fn all_sessions(
    op: &mut OperatorServiceClient<tonic::transport::Channel>,
    status: &str,
) -> BTreeMap<String, v1::Session> {
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = op
            .list_sessions(v1::ListSessionsRequest {
                page: Some(v1::PageRequest {
                    page_size: 500,
                    page_token: token.clone(),
                }),
                status: status.into(),
                charger_id: String::new(),
            })
            .await
            .expect("sessions listed")
            .into_inner();
        out.extend(page.sessions.into_iter().map(|s| (s.transaction_id.clone(), s)));
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

fn remote_start(charger: &str) -> v1::SendCommandRequest {
    v1::SendCommandRequest {
        charger_id: charger.into(),
        command: Some(v1::Command {
            command_id: String::new(),
            kind: Some(v1::command::Kind::RemoteStart(v1::RemoteStart {
                connector_id: 1,
                id_token: String::new(),
            })),
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_to_node_1_reaches_a_charger_on_node_3_and_the_reply_comes_back() {
    let c = Cluster::start(3, 3_000);
    let creds = c.node(2).enroll(&c.root_pem, &c.admin, "SIM-R").await;
    let mut ep = c.sim_endpoints(2);
    ep.mtls.truncate(1); // node 3 only
    let mut p = Profile::fleet_member(0);
    p.charger_id = "SIM-R".into();
    p.connectors = 1;
    // No car of its own for hours.
    p.mean_idle = Duration::from_secs(86_400);
    p.first_car_within = Duration::from_secs(86_400);
    let sim = laddnet_sim::spawn(ep, identity(creds), p);
    let mut status = sim.status.clone();
    assert!(
        eventually(Duration::from_secs(30), || {
            let s = status.borrow_and_update().clone();
            async move { s.connected }
        })
        .await,
        "the simulated charger connects to node 3"
    );

    // Node 1 has no connection to SIM-R: it forwards to node 3.
    let mut op = OperatorServiceClient::new(c.admin_channel(0).await);
    let reply = op
        .send_command(remote_start("SIM-R"))
        .await
        .expect("node 1 routes the command")
        .into_inner();
    assert_eq!(reply.status, v1::CommandStatus::Accepted as i32, "{reply:?}");
    assert_eq!(reply.detail, "started", "the charger's own reply comes back");
    let mut status = sim.status.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = status.borrow_and_update().clone();
            async move { s.sessions.iter().any(|(tx, _)| tx.starts_with("SIM-R-1-")) }
        })
        .await,
        "the charger acted on the command: {:?}\n{}",
        sim.status.borrow().clone(),
        c.log(2)
    );
    // A second start on the busy connector: the charger's refusal comes back too.
    let again = op.send_command(remote_start("SIM-R")).await.unwrap().into_inner();
    assert_eq!(again.status, v1::CommandStatus::Rejected as i32);
    assert_eq!(again.detail, "connector busy or unknown");

    // Node 1 says where the charger is: connected, to node 3.
    let seen = op
        .get_charger(v1::GetChargerRequest {
            charger_id: "SIM-R".into(),
        })
        .await
        .expect("node 1 reads the charger")
        .into_inner();
    assert!(seen.connected, "{seen:?}");
    assert_eq!(seen.node_id, "node-3");
    assert!(!seen.connected_since.is_empty(), "{seen:?}");

    // Diagnostics asked of node 1: node 3 has the charger upload them,
    // and the bundle comes back through node 1.
    let bundle = FleetServiceClient::new(c.admin_channel(0).await)
        .request_diagnostics(v1::RequestDiagnosticsRequest {
            charger_id: "SIM-R".into(),
            timeout_s: 30,
        })
        .await
        .expect("node 1 routes the diagnostics request")
        .into_inner();
    let text = String::from_utf8_lossy(&bundle.content);
    assert!(text.starts_with("laddnet-sim diagnostics\ncharger SIM-R\n"), "{text}");
    assert_eq!(bundle.size as usize, bundle.content.len());

    // Node 2 watches the sessions: the session on node 3 is in its stream.
    let mut watch = OperatorServiceClient::new(c.admin_channel(1).await)
        .watch_sessions(v1::WatchSessionsRequest::default())
        .await
        .expect("node 2 watches")
        .into_inner();
    let watched = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(s) = watch.message().await.expect("the watch stream") {
            if s.charger_id == "SIM-R" {
                return s;
            }
        }
        panic!("the watch stream ended")
    })
    .await
    .expect("the session on node 3 is watched through node 2");
    assert_eq!(watched.status, "active");

    // A charger connected nowhere is named as such, from any node.
    let err = op
        .send_command(v1::SendCommandRequest {
            charger_id: "NOWHERE-1".into(),
            command: Some(v1::Command {
                command_id: String::new(),
                kind: Some(v1::command::Kind::Reset(v1::Reset::default())),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not connected"), "{}", err.message());

    // Every node sees every member; an operator may list them.
    let members = ClusterServiceClient::new(c.admin_channel(1).await)
        .members(v1::MembersRequest {})
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.iter().filter(|m| m.alive).count(), 3, "{members:?}");
    let node3 = members.iter().find(|m| m.node_id == "node-3").unwrap();
    assert_eq!(node3.chargers, 1, "node 3 owns SIM-R");

    // ClusterService is for nodes: a charger's certificate is refused.
    let charger = c.node(0).enroll(&c.root_pem, &c.admin, "CP-X").await;
    let ch = c.node(0).channel(&c.root_pem, &charger).await;
    let denied = ClusterServiceClient::new(ch)
        .forward_command(v1::ForwardCommandRequest {
            charger_id: "SIM-R".into(),
            command: None,
            on_behalf_of: String::new(),
            epoch: 0,
            wait_reply: true,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_lease_cannot_write_for_a_charger_it_no_longer_owns() {
    let mut c = Cluster::start(2, 2_000);
    let creds = c.node(0).enroll(&c.root_pem, &c.admin, "CP-F").await;
    // The charger on node 1: a session with acknowledged readings.
    let mut on_a = attach(c.node(0).channel(&c.root_pem, &creds).await, "CP-F")
        .await
        .expect("attached to node 1");
    for seq in 0..5u64 {
        let kind = if seq == 0 { T::Started } else { T::Updated };
        assert!(
            on_a.event(tx_event("tx-f", seq, kind, 1_000 + seq * 100, seq as i64))
                .await
                .unwrap()
        );
    }

    // Node 1 freezes. A reading it will find when it wakes is already in its socket.
    c.freeze(0);
    on_a.tx
        .send(v1::ChargerMessage {
            msg_id: 900,
            payload: Some(In::Transaction(tx_event("tx-f", 99, T::Updated, 99_999, 99))),
        })
        .await
        .unwrap();

    // The charger gives up on node 1 and goes to node 2, which takes it
    // over once node 1's lease has lapsed.
    let started = Instant::now();
    let mut hinted = None;
    let mut on_b = loop {
        match attach(c.node(1).channel(&c.root_pem, &creds).await, "CP-F").await {
            Ok(a) => break a,
            Err(s) if s.code() == tonic::Code::AlreadyExists && started.elapsed() < Duration::from_secs(30) => {
                // The refusal says when node 1's lease would lapse.
                let ms: u64 = s
                    .metadata()
                    .get(laddnet_proto::RETRY_AFTER_MS)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no retry-after-ms on {s:?}"));
                assert!(ms <= 2_000 + 250, "retry after {ms} ms, beyond the 2 s lease");
                hinted.get_or_insert(ms);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("node 2 never took the charger over: {s}"),
        }
    };
    assert!(
        hinted.is_some(),
        "node 2 refused at least once while node 1's lease ran"
    );
    for seq in 5..10u64 {
        let r = on_b
            .event(tx_event("tx-f", seq, T::Updated, 1_000 + seq * 100, seq as i64))
            .await;
        assert!(matches!(r, Ok(true)), "node 2 stores the readings: {r:?}\n{}", c.log(1));
    }

    // Node 1 wakes up with the stale reading and its charger actor.
    c.thaw(0);
    let answer = tokio::time::timeout(Duration::from_secs(30), on_a.rx.message()).await;
    match answer {
        Ok(Ok(Some(m))) => panic!("node 1 answered as if it still owned CP-F: {m:?}"),
        // Refused with a status (its write was fenced) or cut off (it found
        // itself declared dead and dropped its chargers): either way, no ack.
        Ok(Err(_)) | Ok(Ok(None)) => {}
        Err(_) => panic!("node 1 neither refused nor closed the stream:\n{}", c.log(0)),
    }

    // Node 1 has let go of its side of the connection (its detach ran:
    // without fencing it would have marked the session interrupted).
    assert!(
        eventually(Duration::from_secs(15), || {
            let log = c.log(0);
            async move { log.contains("charger detached") }
        })
        .await,
        "node 1 detached CP-F:\n{}",
        c.log(0)
    );

    // Nothing of node 1's is in the store: no seq 99, and the session
    // node 2 runs was not marked interrupted by node 1's detach.
    let mut op = OperatorServiceClient::new(c.admin_channel(1).await);
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut op = op.clone();
            async move {
                session(&mut op, "tx-f")
                    .await
                    .is_some_and(|s| s.last_seq == 9 && s.samples == 10)
            }
        })
        .await,
        "the session holds node 2's readings only: {:?}",
        session(&mut op, "tx-f").await
    );
    let s = session(&mut op, "tx-f").await.unwrap();
    assert_eq!(s.status, "active", "node 1 did not interrupt node 2's session");
    assert!(on_b.event(tx_event("tx-f", 10, T::Updated, 2_000, 10)).await.unwrap());
    let log = c.log(0);
    assert!(
        log.contains("declared dead") || log.contains("owned by node-2"),
        "node 1 knows it lost the charger:\n{log}"
    );
    c.kill(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_chargers_reconnect_and_their_sessions_continue() {
    const CHARGERS: usize = 300;
    let mut c = Cluster::start(3, 10_000);

    // 300 simulated chargers, a third starting on each node; every one
    // knows all three. Every other one has long sessions that span the
    // kill; the rest have short ones, so sessions end and are billed.
    let mut pki: Vec<_> = Vec::new();
    for n in 0..3 {
        pki.push(v1::pki_service_client::PkiServiceClient::new(c.admin_channel(n).await));
    }
    // Enrolled as chargers do (a token, a key, a CSR), 25 at a time.
    let mut identities = Vec::new();
    for chunk in (0..CHARGERS).collect::<Vec<_>>().chunks(25) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let id = format!("SIM-{:04}", i + 1);
            let mut pki = pki[i % 3].clone();
            let ep = c.sim_endpoints(i % 3);
            set.spawn(async move {
                let token = pki
                    .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
                        charger_id: id.clone(),
                        ttl_seconds: 600,
                        site_id: String::new(),
                    })
                    .await
                    .expect("token")
                    .into_inner()
                    .token;
                (i, laddnet_sim::enroll(&ep, &id, &token).await.expect("enrolled"))
            });
        }
        while let Some(r) = set.join_next().await {
            identities.push(r.unwrap());
        }
    }
    identities.sort_by_key(|(i, _)| *i);
    let mut sims: Vec<SimHandle> = Vec::new();
    for (i, ident) in identities {
        let id = format!("SIM-{:04}", i + 1);
        let mut p = Profile::fleet_member(i);
        p.charger_id = id;
        p.sample_every = Duration::from_secs(3);
        p.mean_idle = Duration::from_secs(2);
        p.stay = Some(if i % 2 == 0 {
            Duration::from_secs(600)
        } else {
            Duration::from_secs(6)
        });
        sims.push(laddnet_sim::spawn(c.sim_endpoints(i % 3), ident, p));
    }
    let all_connected = |sims: &Vec<SimHandle>| sims.iter().all(|s| s.status.borrow().connected);
    let t0 = Instant::now();
    // Connected, and every long-stay charger has its session going.
    let long_ones_charging =
        |sims: &Vec<SimHandle>| sims.iter().step_by(2).all(|s| s.status.borrow().active_sessions > 0);
    while !(all_connected(&sims) && long_ones_charging(&sims)) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "not every charger connected with a session: {} connected",
            sims.iter().filter(|s| s.status.borrow().connected).count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("{CHARGERS} chargers connected and charging after {:?}", t0.elapsed());
    // Which chargers node 2 holds, and the sessions live now.
    let mut op = OperatorServiceClient::new(c.admin_channel(0).await);
    let before: BTreeMap<String, u64> = sims.iter().flat_map(|s| s.status.borrow().acked_seq.clone()).collect();
    let live: Vec<String> = sims
        .iter()
        .flat_map(|s| {
            s.status
                .borrow()
                .sessions
                .iter()
                .map(|x| x.0.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let reconnects: Vec<u64> = sims.iter().map(|s| s.status.borrow().reconnects).collect();

    c.kill(1);
    let killed = Instant::now();
    let moved: Vec<usize> = loop {
        // Chargers that were on node 2 have reconnected (once more than before).
        let waiting: Vec<usize> = (0..CHARGERS)
            .filter(|&i| i % 3 == 1)
            .filter(|&i| {
                let s = sims[i].status.borrow();
                !(s.connected && s.reconnects > reconnects[i])
            })
            .collect();
        if waiting.is_empty() && all_connected(&sims) {
            break (0..CHARGERS).filter(|&i| i % 3 == 1).collect();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "{} chargers not back within 30 s, e.g. SIM-{:04}",
            waiting.len(),
            waiting.first().map_or(0, |i| i + 1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let back_in = killed.elapsed();
    assert_eq!(moved.len(), CHARGERS / 3);

    // Every session live at the kill continues: new readings arrive (or it
    // has ended normally since).
    let t1 = Instant::now();
    loop {
        let stored = all_sessions(&mut op, "").await;
        let pending: Vec<&String> = live
            .iter()
            .filter(|tx| {
                !stored.get(*tx).is_some_and(|s| {
                    s.missing_events == 0
                        && (s.status == "ended"
                            || (s.status == "active" && s.last_seq > before.get(*tx).copied().unwrap_or(0)))
                })
            })
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "{} sessions did not continue, e.g. {:?}",
            pending.len(),
            stored.get(pending[0])
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    eprintln!("sessions continued {:?} after the kill", killed.elapsed());
    // No acknowledged reading is missing; no session is doubled.
    // What the chargers hold as acknowledged first, then the store: the
    // sims keep running, so the store can only be further along.
    let acked: Vec<(String, u64)> = sims.iter().flat_map(|s| s.status.borrow().acked_seq.clone()).collect();
    let stored = all_sessions(&mut op, "").await;
    {
        for (tx, seq) in acked {
            let s = stored.get(&tx).expect("every acknowledged session is stored");
            assert!(
                s.last_seq >= seq,
                "{tx}: acknowledged {seq}, stored up to {}",
                s.last_seq
            );
            assert_eq!(s.missing_events, 0, "{tx}: a hole among acknowledged readings");
        }
    }
    let active = all_sessions(&mut op, "active").await;
    let mut per_connector = BTreeMap::new();
    for s in active.values() {
        *per_connector.entry((s.charger_id.clone(), s.connector_id)).or_insert(0) += 1;
    }
    assert!(
        per_connector.values().all(|&n| n == 1),
        "one active session per connector at most"
    );

    // The ledger of everything billed across the failover verifies.
    let v = BillingServiceClient::new(c.admin_channel(2).await)
        .verify_ledger(v1::VerifyLedgerRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "ledger problems: {:?}", v.problems);
    assert!(v.cdrs > 0, "sessions ended and were billed during the test");
    eprintln!(
        "{} chargers back within {:?}; {} sessions continued; {} CDRs",
        moved.len(),
        back_in,
        live.len(),
        v.cdrs
    );
    for s in &sims {
        s.stop();
    }
}

/// The site's power as its chargers deliver it, and its running sessions.
fn site_power(sims: &[SimHandle]) -> (u32, u32) {
    sims.iter().fold((0, 0), |(p, n), s| {
        let st = s.status.borrow();
        (p + st.power_w, n + st.active_sessions)
    })
}

/// Watches the site from the chargers' side until `sessions` sessions have
/// run together for `settled`: every excursion above `limit` must end within
/// `reaction`. Returns the longest excursion.
async fn hold_limit(sims: &[SimHandle], limit: u32, sessions: u32, settled: Duration, within: Duration) -> Duration {
    let mut over_since: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    let mut together_since: Option<Instant> = None;
    let deadline = Instant::now() + within;
    loop {
        let (power, running) = site_power(sims);
        let now = Instant::now();
        if power > limit {
            worst = worst.max(now - *over_since.get_or_insert(now));
        } else {
            over_since = None;
        }
        if running >= sessions {
            if now - *together_since.get_or_insert(now) > settled {
                return worst;
            }
        } else {
            together_since = None;
        }
        assert!(now < deadline, "{sessions} sessions never ran together ({running} did)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn site_load(c: &Cluster, node: usize, site: &str) -> v1::SiteLoadResponse {
    FleetServiceClient::new(c.admin_channel(node).await)
        .site_load(v1::SiteLoadRequest { site_id: site.into() })
        .await
        .expect("site load")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_s_grid_limit_is_shared_by_its_chargers_on_three_nodes_and_survives_its_manager_s_death() {
    const LIMIT: u32 = 30_000;
    const SITE: &str = "S-SHARED";
    let mut c = Cluster::start(3, 3_000);
    OperatorServiceClient::new(c.admin_channel(0).await)
        .create_site(v1::CreateSiteRequest {
            site: Some(v1::Site {
                site_id: SITE.into(),
                name: SITE.into(),
                time_zone: "UTC".into(),
                grid_limit_w: LIMIT,
                ..Default::default()
            }),
        })
        .await
        .expect("site created");
    // Six 22 kW chargers at the site, two starting on each node (132 kW
    // wanted of 30 kW): each node alone would give its two the whole limit.
    let mut sims = Vec::new();
    for i in 0..6 {
        let id = format!("SIM-S{i}");
        let creds = c.node(i % 3).enroll_at(&c.root_pem, &c.admin, &id, SITE).await;
        let mut p = Profile::fleet_member(0);
        p.charger_id = id;
        p.connectors = 1;
        p.max_power_w = 22_000;
        p.sample_every = Duration::from_millis(200);
        p.mean_idle = Duration::from_millis(300);
        p.first_car_within = Duration::from_secs(1);
        p.stay = Some(Duration::from_secs(3_600));
        sims.push(laddnet_sim::spawn(c.sim_endpoints(i % 3), identity(creds), p));
    }
    let reaction = Duration::from_millis(2_500);
    let worst = hold_limit(&sims, LIMIT, 6, Duration::from_secs(6), Duration::from_secs(60)).await;
    assert!(
        worst <= reaction,
        "the site stayed above {LIMIT} W for {worst:?}: {:?}",
        site_power(&sims)
    );
    // The chargers are spread over the three nodes.
    let mut op = OperatorServiceClient::new(c.admin_channel(0).await);
    let mut nodes = std::collections::BTreeSet::new();
    for i in 0..6 {
        let ch = op
            .get_charger(v1::GetChargerRequest {
                charger_id: format!("SIM-S{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        nodes.insert(ch.node_id);
    }
    assert_eq!(nodes.len(), 3, "chargers on {nodes:?}");
    // Every node answers for the site with one plan of all six sessions,
    // made by one manager.
    let mut managers = std::collections::BTreeSet::new();
    for n in 0..3 {
        let load = site_load(&c, n, SITE).await;
        assert_eq!(load.sessions.len(), 6, "through node {}: {load:#?}", n + 1);
        let planned: u32 = load.sessions.iter().map(|s| s.limit_w).sum();
        assert!(planned <= LIMIT, "limits add up to {planned} W");
        assert!(load.sessions.iter().all(|s| s.limit_w > 0), "{load:#?}");
        managers.insert(load.managed_by);
    }
    assert_eq!(managers.len(), 1, "one manager: {managers:?}");
    let manager = managers.into_iter().next().unwrap();
    let killed: usize = manager.trim_start_matches("node-").parse::<usize>().unwrap() - 1;

    // The manager dies: its chargers move, another node takes the site
    // over, and the limit holds again.
    c.kill(killed);
    let survivor = (killed + 1) % 3;
    let deadline = Instant::now() + Duration::from_secs(40);
    let taken = loop {
        let load = FleetServiceClient::new(c.admin_channel(survivor).await)
            .site_load(v1::SiteLoadRequest { site_id: SITE.into() })
            .await;
        if let Ok(l) = load
            && !l.get_ref().managed_by.is_empty()
            && l.get_ref().managed_by != manager
            && l.get_ref().sessions.len() == 6
        {
            break l.into_inner();
        }
        assert!(Instant::now() < deadline, "no node took the site over from {manager}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        taken.sessions.iter().map(|s| s.limit_w).sum::<u32>() <= LIMIT,
        "{taken:#?}"
    );
    let worst = hold_limit(&sims, LIMIT, 6, Duration::from_secs(5), Duration::from_secs(40)).await;
    assert!(
        worst <= reaction,
        "after the takeover the site stayed above {LIMIT} W for {worst:?}"
    );
    for s in &sims {
        s.stop();
    }
}
