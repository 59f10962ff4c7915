//! RELIABILITY.md 26: a node killed with SIGKILL mid-session restarts with
//! every acknowledged reading present. The node is a real `laddnet node`
//! process; the charger is a real mutual-TLS client.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::TransactionEventType as T;
use laddnet_tests::*;

fn read(dir: &Path, p: &str) -> String {
    std::fs::read_to_string(dir.join(p)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_session_loses_no_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    laddnet_init(dir.path());
    let root = read(dir.path(), "d/ca/root.crt");
    let admin = Creds {
        chain_pem: read(dir.path(), "d/credentials/admin.crt"),
        key_pem: read(dir.path(), "d/credentials/admin.key"),
        serial: String::new(),
    };

    let mut node = NodeProcess::start(dir.path(), &[]);
    let charger = node.enroll(&root, &admin, "CP-K").await;
    let ch = node.channel(&root, &charger).await;
    let mut cp = attach(ch, "CP-K").await.unwrap();
    let pid = node.child.id();
    let mut acked = Vec::new();
    for seq in 0..10_000u64 {
        let kind = if seq == 0 { T::Started } else { T::Updated };
        if seq == 40 {
            // Kill without warning while events are in flight.
            std::thread::spawn(move || {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            });
        }
        match cp
            .event(tx_event("tx-crash", seq, kind, 1000 + seq * 10, seq as i64))
            .await
        {
            Ok(true) => acked.push(seq),
            _ => break,
        }
    }
    let _ = node.child.wait();
    assert!(
        acked.len() >= 40,
        "only {} events acknowledged before the kill",
        acked.len()
    );

    let node = NodeProcess::start(dir.path(), &[]);
    let ch = node.channel(&root, &admin).await;
    let s = v1::operator_service_client::OperatorServiceClient::new(ch)
        .get_session(v1::GetSessionRequest {
            transaction_id: "tx-crash".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.samples >= acked.len() as u64,
        "{} acknowledged, {} stored",
        acked.len(),
        s.samples
    );
    assert!(s.last_seq >= *acked.last().unwrap());
    assert_eq!(s.missing_events, 0, "no hole among the acknowledged readings");
    // Interrupting what the crash left active runs beside accepting.
    let interrupted = eventually(Duration::from_secs(10), || async {
        let mut c = v1::operator_service_client::OperatorServiceClient::new(node.channel(&root, &admin).await);
        c.get_session(v1::GetSessionRequest {
            transaction_id: "tx-crash".into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == "interrupted")
    })
    .await;
    assert!(interrupted, "after a crash the session waits for its charger");
}
