//! Site load management, the load and power alarms, firmware campaigns
//! and diagnostics, end to end with simulated chargers over mutual TLS.

use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::fleet_service_client::FleetServiceClient;
use laddnet_proto::v1::incident_service_client::IncidentServiceClient;
use laddnet_sim::{Fault, Kind, Profile, SimHandle};
use laddnet_store::StoreExt;
use laddnet_tests::*;
use tonic::transport::Channel;

async fn token_at(node: &TestNode, charger: &str, site: &str) -> String {
    node.pki()
        .await
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
            charger_id: charger.into(),
            ttl_seconds: 0,
            site_id: site.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn site(node: &TestNode, id: &str, grid_limit_w: u32) {
    node.operator_client()
        .await
        .create_site(v1::CreateSiteRequest {
            site: Some(v1::Site {
                site_id: id.into(),
                name: id.into(),
                time_zone: "UTC".into(),
                grid_limit_w,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

fn ac(id: &str, connectors: u32, sample_ms: u64) -> Profile {
    let mut p = Profile::fleet_member(0);
    p.charger_id = id.into();
    p.kind = Kind::Ac;
    p.max_power_w = 22_000;
    p.connectors = connectors;
    p.sample_every = Duration::from_millis(sample_ms);
    p.mean_idle = Duration::from_millis(300);
    p
}

async fn sim_at(node: &TestNode, p: Profile, site_id: &str) -> SimHandle {
    let ep = node.sim_endpoints();
    let token = if site_id.is_empty() {
        node.token(&p.charger_id).await
    } else {
        token_at(node, &p.charger_id, site_id).await
    };
    let identity = laddnet_sim::enroll(&ep, &p.charger_id, &token).await.unwrap();
    laddnet_sim::spawn(ep, identity, p)
}

async fn incidents_of(c: &mut IncidentServiceClient<Channel>, kind: &str) -> Vec<v1::IncidentInfo> {
    c.list_incidents(v1::ListIncidentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .incidents
        .into_iter()
        .filter(|i| i.kind == kind)
        .collect()
}

async fn wait_incidents(
    c: &mut IncidentServiceClient<Channel>,
    kind: &str,
    what: &str,
    ok: impl Fn(&[v1::IncidentInfo]) -> bool,
) -> Vec<v1::IncidentInfo> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let of = incidents_of(c, kind).await;
        if ok(&of) {
            return of;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {of:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_share_a_site_limit_that_is_never_exceeded_beyond_the_reaction_time() {
    const LIMIT: u32 = 60_000;
    let node = TestNode::start().await;
    site(&node, "S-LOAD", LIMIT).await;
    let mut sims = Vec::new();
    for i in 0..10 {
        sims.push(sim_at(&node, ac(&format!("SIM-L{i:02}"), 2, 200), "S-LOAD").await);
    }
    let total = |sims: &[SimHandle]| -> (u32, u32) {
        sims.iter().fold((0, 0), |(p, n), s| {
            let st = s.status.borrow();
            (p + st.power_w, n + st.active_sessions)
        })
    };
    // Measure the site from the chargers' side while all 20 sessions start
    // and run: every excursion above the limit must end within the
    // reaction time (a re-plan within a second, plus one sample).
    let reaction = Duration::from_millis(1_500);
    let mut over_since: Option<tokio::time::Instant> = None;
    let mut worst = Duration::ZERO;
    let mut all_running_since: Option<tokio::time::Instant> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (power, sessions) = total(&sims);
        let now = tokio::time::Instant::now();
        if power > LIMIT {
            let since = *over_since.get_or_insert(now);
            worst = worst.max(now - since);
        } else {
            over_since = None;
        }
        if sessions == 20 {
            let since = *all_running_since.get_or_insert(now);
            if now - since > Duration::from_secs(6) {
                break;
            }
        } else {
            all_running_since = None;
        }
        assert!(now < deadline, "20 sessions never ran together ({sessions} did)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        worst <= reaction,
        "the site stayed above {LIMIT} W for {worst:?}, longer than the reaction time"
    );
    // Every session gets power, and the plan adds up.
    for s in &sims {
        let st = s.status.borrow();
        for (tx, w) in &st.sessions {
            assert!(*w > 0, "session {tx} gets no power");
        }
    }
    let mut fleet = FleetServiceClient::new(node.channel(&node.admin).await.unwrap());
    let load = fleet
        .site_load(v1::SiteLoadRequest {
            site_id: "S-LOAD".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(load.grid_limit_w, LIMIT);
    assert_eq!(load.sessions.len(), 20, "{load:#?}");
    let planned: u32 = load.sessions.iter().map(|s| s.limit_w).sum();
    assert!(planned <= LIMIT, "limits add up to {planned} W");
    assert!(load.sessions.iter().all(|s| s.limit_w >= 1_400), "{load:#?}");
    assert!(load.power_w <= LIMIT, "measured {} W", load.power_w);
    // Nothing went wrong on the way.
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    assert!(incidents_of(&mut inc, "site-overload").await.is_empty());
    assert!(incidents_of(&mut inc, "limit-ignored").await.is_empty());
    for s in &sims {
        s.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charger_ignoring_its_limit_and_the_site_over_its_limit_are_one_incident_each() {
    let node = TestNode::start_with(|c| {
        c.alarms.limit_grace_s = 1;
        c.alarms.site_overload_after_s = 1;
    })
    .await;
    site(&node, "S-SMALL", 5_000).await;
    let sim = sim_at(&node, ac("SIM-X", 1, 100), "S-SMALL").await;
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    // Obeying: the session runs at its limit, no incident.
    wait_until("the session never ran at its limit", 30, || {
        let st = sim.status.borrow();
        st.active_sessions == 1 && st.power_w > 0 && st.power_w <= 5_000
    })
    .await;
    sim.inject(Fault::IgnoreLimits(true)).await;
    let ignored = wait_incidents(&mut inc, "limit-ignored", "no limit-ignored incident", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    assert_eq!(ignored[0].subject, "connector:SIM-X/1");
    assert!(
        ignored[0].timeline[0].detail.contains("against a limit of"),
        "{ignored:?}"
    );
    let over = wait_incidents(&mut inc, "site-overload", "no site-overload incident", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    assert_eq!(over[0].subject, "site:S-SMALL");
    assert_eq!(over[0].severity, "critical");
    sim.inject(Fault::IgnoreLimits(false)).await;
    wait_incidents(&mut inc, "limit-ignored", "limit-ignored not resolved", |v| {
        v.len() == 1 && !v[0].active && v[0].state == "resolved"
    })
    .await;
    wait_incidents(&mut inc, "site-overload", "site-overload not resolved", |v| {
        v.len() == 1 && !v[0].active && v[0].state == "resolved"
    })
    .await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_power_and_a_meter_off_its_power_integral_are_detected() {
    let node = TestNode::start_with(|c| c.alarms.low_power_after_s = 1).await;
    let mut p = ac("SIM-P", 1, 1_000);
    p.mean_idle = Duration::from_millis(100);
    let sim = sim_at(&node, p, "").await;
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    wait_until("the session never charged", 30, || {
        let st = sim.status.borrow();
        st.active_sessions == 1 && st.power_w > 0
    })
    .await;
    // A broken power module: 1 kW where the car takes 7.4 kW or more.
    sim.inject(Fault::Throttle(Some(1_000))).await;
    let low = wait_incidents(&mut inc, "low-power", "no low-power incident", |v| {
        v.len() == 1 && v[0].active
    })
    .await;
    assert!(low[0].subject.starts_with("session:SIM-P-1-"), "{low:?}");
    assert!(low[0].timeline[0].detail.starts_with("1000 W where"), "{low:?}");
    sim.inject(Fault::Throttle(None)).await;
    wait_incidents(&mut inc, "low-power", "low-power not resolved", |v| {
        v.len() == 1 && !v[0].active && v[0].state == "resolved"
    })
    .await;
    // So far an honest meter: no anomaly.
    assert!(incidents_of(&mut inc, "meter-anomaly").await.is_empty());
    // A tampered meter counts three times the energy the power explains.
    sim.inject(Fault::EnergyScale(300)).await;
    let tamper = wait_incidents(&mut inc, "meter-anomaly", "no meter-anomaly incident", |v| {
        !v.is_empty()
    })
    .await;
    assert_eq!(tamper.len(), 1);
    assert!(
        tamper[0].timeline[0].detail.contains("energy-power-mismatch"),
        "{tamper:?}"
    );
    sim.stop();
}

async fn upload(fleet: &mut FleetServiceClient<Channel>, version: &str, image: &[u8]) -> v1::FirmwareImage {
    let mut parts = vec![v1::FirmwareUpload {
        part: Some(v1::firmware_upload::Part::Version(version.into())),
    }];
    parts.extend(image.chunks(100_000).map(|d| v1::FirmwareUpload {
        part: Some(v1::firmware_upload::Part::Data(d.to_vec())),
    }));
    fleet
        .upload_firmware(tokio_stream::iter(parts))
        .await
        .unwrap()
        .into_inner()
}

async fn campaign_done(fleet: &mut FleetServiceClient<Channel>, id: &str) -> v1::Campaign {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let c = fleet
            .get_campaign(v1::GetCampaignRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if c.state != "running" {
            return c;
        }
        assert!(tokio::time::Instant::now() < deadline, "campaign still running: {c:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_halts_the_campaign_and_a_tampered_image_is_refused() {
    let mut node = TestNode::start().await;
    let mut sims = Vec::new();
    for i in 1..=5 {
        let mut p = ac(&format!("SIM-F{i}"), 1, 500);
        p.mean_idle = Duration::from_secs(3_600);
        sims.push(sim_at(&node, p, "").await);
    }
    for s in &sims {
        let mut st = s.status.clone();
        tokio::time::timeout(Duration::from_secs(30), st.wait_for(|x| x.connected))
            .await
            .unwrap()
            .unwrap();
    }
    let mut fleet = FleetServiceClient::new(node.channel(&node.admin).await.unwrap());
    let image: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    let img = upload(&mut fleet, "2.0.0", &image).await;
    assert_eq!(img.size, 300_000);
    // Versions are immutable; bad versions are named.
    let again = fleet
        .upload_firmware(tokio_stream::iter(vec![
            v1::FirmwareUpload {
                part: Some(v1::firmware_upload::Part::Version("2.0.0".into())),
            },
            v1::FirmwareUpload {
                part: Some(v1::firmware_upload::Part::Data(vec![1, 2, 3])),
            },
        ]))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");

    // The canary (20 % of 5: SIM-F1, the first by id) fails to install.
    sims[0].inject(Fault::FirmwareFails(true)).await;
    let ids: Vec<String> = (1..=5).map(|i| format!("SIM-F{i}")).collect();
    let c = fleet
        .start_campaign(v1::StartCampaignRequest {
            version: "2.0.0".into(),
            charger_ids: ids.clone(),
            canary_percent: 20,
            max_failures: 0,
            charger_timeout_s: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.chargers.iter().filter(|t| t.stage == 1).count(), 1);
    let done = campaign_done(&mut fleet, &c.id).await;
    assert_eq!(done.state, "halted", "{done:#?}");
    assert_eq!(done.stage, 1);
    assert!(done.detail.contains("canary stage: 1 of 1"), "{}", done.detail);
    assert!(done.detail.contains("SIM-F1"), "{}", done.detail);
    assert_eq!(done.chargers[0].state, "failed");
    assert!(done.chargers[1..].iter().all(|t| t.state == "skipped"), "{done:#?}");
    for s in &sims[1..] {
        assert_eq!(s.status.borrow().firmware_version, "1.0.0");
    }

    // Repaired: the same rollout goes through both stages.
    sims[0].inject(Fault::FirmwareFails(false)).await;
    let c = fleet
        .start_campaign(v1::StartCampaignRequest {
            version: "2.0.0".into(),
            charger_ids: ids.clone(),
            canary_percent: 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = campaign_done(&mut fleet, &c.id).await;
    assert_eq!(done.state, "completed", "{done:#?}");
    assert!(done.chargers.iter().all(|t| t.state == "installed"), "{done:#?}");
    let mut ops = node.operator_client().await;
    for id in &ids {
        let ch = ops
            .get_charger(v1::GetChargerRequest { charger_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ch.firmware_version, "2.0.0");
    }

    // Tampering: a byte of a stored image changes behind the node's back.
    let img3: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    upload(&mut fleet, "3.0.0", &img3).await;
    for s in &sims {
        s.stop();
    }
    node.stop().await;
    {
        let store = laddnet_store::RedbStore::open(node.config.store_path()).unwrap();
        let key = laddnet_store::keys::pack(&("fw-chunk", "3.0.0", 1i64));
        store
            .transact(|tx| {
                let mut chunk = tx.get(&key)?.expect("chunk 1 of 3.0.0");
                chunk[10] ^= 0x55;
                tx.set(&key, &chunk)
            })
            .unwrap();
    }
    node.restart().await;
    let mut p = ac("SIM-T", 1, 500);
    p.mean_idle = Duration::from_secs(3_600);
    let target = "SIM-T".to_string();
    let sim = sim_at(&node, p, "").await;
    let mut st = sim.status.clone();
    tokio::time::timeout(Duration::from_secs(30), st.wait_for(|x| x.connected))
        .await
        .unwrap()
        .unwrap();
    let mut fleet = FleetServiceClient::new(node.channel(&node.admin).await.unwrap());
    let c = fleet
        .start_campaign(v1::StartCampaignRequest {
            version: "3.0.0".into(),
            charger_ids: vec![target.clone()],
            canary_percent: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = campaign_done(&mut fleet, &c.id).await;
    assert_eq!(done.state, "halted", "{done:#?}");
    assert!(
        done.chargers[0].detail.starts_with("refused by the charger"),
        "{done:#?}"
    );
    assert!(done.chargers[0].detail.contains("SHA-256"), "{done:#?}");
    assert_eq!(sim.status.borrow().firmware_refused, 1);
    assert_ne!(sim.status.borrow().firmware_version, "3.0.0");
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_are_uploaded_over_the_charger_stream_and_stored() {
    let node = TestNode::start().await;
    let sim = sim_at(&node, ac("SIM-D", 2, 200), "").await;
    let mut st = sim.status.clone();
    tokio::time::timeout(Duration::from_secs(30), st.wait_for(|x| x.connected && x.acked > 2))
        .await
        .unwrap()
        .unwrap();
    let mut fleet = FleetServiceClient::new(node.channel(&node.admin).await.unwrap());
    let b = fleet
        .request_diagnostics(v1::RequestDiagnosticsRequest {
            charger_id: "SIM-D".into(),
            timeout_s: 30,
        })
        .await
        .unwrap()
        .into_inner();
    let text = String::from_utf8(b.content.clone()).unwrap();
    assert!(text.starts_with("laddnet-sim diagnostics\ncharger SIM-D\n"), "{text}");
    assert!(text.contains("connected"), "{text}");
    assert_eq!(b.size as usize, b.content.len());
    assert_eq!(b.file_name, "SIM-D-diagnostics.log");
    // Stored: the latest is the same bundle.
    let got = fleet
        .get_diagnostics(v1::GetDiagnosticsRequest {
            charger_id: "SIM-D".into(),
            id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, b.id);
    assert_eq!(got.content, b.content);
    // Unknown chargers are named.
    let e = fleet
        .get_diagnostics(v1::GetDiagnosticsRequest {
            charger_id: "SIM-NONE".into(),
            id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_will_not_finish_before_the_drivers_departure_is_too_little_power() {
    let node = TestNode::start().await;
    node.install_tariff().await;
    // The driver wants 95 % and leaves in two to three minutes.
    let (driver, _) = node.driver("Grace Hopper", "grace@example.org", "04D3D3D3").await;
    let departs = time::OffsetDateTime::now_utc() + time::Duration::minutes(3);
    let departure = format!("{:02}:{:02}", departs.hour(), departs.minute());
    node.driver_admin()
        .await
        .set_preferences(v1::SetPreferencesRequest {
            driver_id: driver,
            preferences: Some(v1::Preferences {
                target_soc_percent: 95,
                departure: departure.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // Full power, but a car this size fills at under 0.2 % a second: at
    // least three minutes to go from 70 % or below to 95 %.
    let mut p = ac("SIM-DEP", 1, 1_000);
    p.speed = 20;
    p.tokens = vec!["04D3D3D3".into()];
    p.stay = Some(Duration::from_secs(600));
    p.mean_idle = Duration::from_millis(100);
    let sim = sim_at(&node, p, "").await;
    let mut inc = IncidentServiceClient::new(node.channel(&node.admin).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let low = loop {
        let of = incidents_of(&mut inc, "low-power").await;
        if !of.is_empty() {
            break of;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no low-power incident for the departure"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(low.len(), 1, "{low:#?}");
    assert!(low[0].subject.starts_with("session:SIM-DEP-1-"), "{low:?}");
    let detail = &low[0].timeline[0].detail;
    assert!(detail.starts_with("at this pace 95 % is reached at "), "{detail}");
    assert!(detail.contains("after the departure at "), "{detail}");
    assert!(detail.ends_with(&format!("T{departure}:00Z")), "{detail}");
    // Full power all along: not the power rule.
    assert!(sim.status.borrow().power_w >= 7_400);
    sim.stop();
}
