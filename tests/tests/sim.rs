//! The fleet simulator against a real node: it enrolls, charges, drops its
//! connection, keeps queueing, reconnects and replays with no hole.

use std::time::Duration;

use laddnet_proto::v1;
use laddnet_sim::{Endpoints, Fault, Profile};
use laddnet_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_charger_drops_reconnects_and_replays_without_holes() {
    let node = TestNode::start().await;
    let ep = Endpoints {
        mtls: vec![node.mtls_endpoint()],
        enrollment: format!("https://{}", node.node().enrollment_addr),
        server_name: "localhost".into(),
        root_pem: node.root_pem.clone(),
    };
    let token = node.token("SIM-T").await;
    let identity = laddnet_sim::enroll(&ep, "SIM-T", &token).await.unwrap();
    let mut p = Profile::fleet_member(0);
    p.charger_id = "SIM-T".into();
    p.connectors = 1;
    p.sample_every = Duration::from_millis(100);
    p.mean_idle = Duration::from_millis(100);
    let sim = laddnet_sim::spawn(ep, identity, p);

    let charging = eventually(Duration::from_secs(15), || async {
        sessions(&node).await.iter().any(|s| s.samples >= 3)
    })
    .await;
    assert!(charging, "the simulated charger never charged");

    sim.inject(Fault::Disconnect).await;
    let mut status = sim.status.clone();
    let back = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            {
                let s = status.borrow();
                if s.reconnects >= 1 && s.connected && s.queued == 0 {
                    break;
                }
            }
            if status.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "did not reconnect and drain its queue: {:?}",
        *sim.status.borrow()
    );
    let all = sessions(&node).await;
    assert!(!all.is_empty());
    for s in &all {
        assert_eq!(s.missing_events, 0, "hole in {}", s.transaction_id);
        assert!(s.flags.is_empty(), "{} flagged {:?}", s.transaction_id, s.flags);
    }
    sim.stop();
}

async fn sessions(node: &TestNode) -> Vec<v1::Session> {
    node.operator_client()
        .await
        .list_sessions(v1::ListSessionsRequest {
            charger_id: "SIM-T".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions
}
