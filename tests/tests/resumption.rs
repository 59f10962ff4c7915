//! TLS session resumption: a reconnecting charger presents the ticket its
//! last connection got and skips the full handshake, on any node sharing
//! the store (here: the same node restarted, which keeps only the store),
//! and a resumed connection is checked like a new one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use laddnet_tests::*;
use rustls::ClientConfig;

/// (full, resumed) mutual-TLS handshakes the node has finished.
fn handshakes(node: &TestNode) -> (u64, u64) {
    let c = &node.node().state.conns;
    (
        c.handshakes_full.load(Ordering::SeqCst),
        c.handshakes_resumed.load(Ordering::SeqCst),
    )
}

/// Drops `conn` and waits until the node has let the charger go (a
/// reconnect before that is refused as a second connection, rightly).
async fn disconnect(node: &TestNode, conn: Attached, id: &str) {
    drop(conn);
    let gone = eventually(Duration::from_secs(10), || async {
        node.node().state.chargers.connection(id).is_none()
    })
    .await;
    assert!(gone, "the node still holds {id}'s connection");
}

/// Connects with `tls` (one charger's client config, which keeps its
/// tickets between connections) and attaches as `id`.
async fn connect(node: &TestNode, tls: &Arc<ClientConfig>, id: &str) -> Result<Attached, String> {
    let channel = laddnet_node::client::connect(&node.mtls_endpoint(), "localhost", tls.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut a = attach(channel, id).await.map_err(|e| e.to_string())?;
    // A heartbeat answered: the node's tickets (sent after the handshake)
    // have been read by now.
    a.heartbeat().await.map_err(|e| e.to_string())?;
    Ok(a)
}

#[tokio::test]
async fn a_charger_resumes_after_a_restart_and_a_revoked_one_cannot() {
    let mut node = TestNode::start().await;
    let creds = node.enroll("CP-RESUME").await;
    let tls = node.tls(Some(&creds));

    let first = connect(&node, &tls, "CP-RESUME").await.expect("first connection");
    let (_, resumed) = handshakes(&node);
    assert_eq!(resumed, 0, "nothing to resume on a first connection");
    drop(first);

    // The restarted node holds nothing but the store: the ticket key is
    // read from it, so the charger's ticket still opens.
    node.restart().await;
    let again = connect(&node, &tls, "CP-RESUME").await.expect("reconnects");
    assert_eq!(handshakes(&node), (0, 1), "the reconnect resumed");
    drop(again);

    // Revoked: the ticket still resumes the TLS session, but the identity
    // check after it refuses the certificate.
    node.revoke(&creds.serial).await;
    let refused = eventually(Duration::from_secs(10), || async {
        let before = handshakes(&node).1;
        connect(&node, &tls, "CP-RESUME").await.is_err() && handshakes(&node).1 > before
    })
    .await;
    assert!(refused, "a resumed connection with a revoked certificate is refused");
}

#[tokio::test]
async fn an_expired_certificate_cannot_resume() {
    // No key rotation while the CA's clock jumps ahead (the poll is what
    // rotates), so the ticket stays openable and the resumption happens.
    let node = TestNode::start_with(|c| c.tls.crl_poll_ms = 3_600_000).await;
    let creds = node.enroll("CP-EXPIRES").await;
    let tls = node.tls(Some(&creds));
    let first = connect(&node, &tls, "CP-EXPIRES").await.expect("first connection");
    disconnect(&node, first, "CP-EXPIRES").await;

    // Ten years on, by the CA's clock: rustls would not look at the dates
    // of a resumed session, the identity check does.
    node.clock.advance_days(3650);
    let (_, before) = handshakes(&node);
    let err = connect(&node, &tls, "CP-EXPIRES").await.err().expect("refused");
    assert_eq!(
        handshakes(&node).1,
        before + 1,
        "the refused connection had resumed: {err}"
    );
}

#[tokio::test]
async fn without_session_tickets_every_handshake_is_full() {
    let mut node = TestNode::start_with(|c| c.tls.session_tickets = false).await;
    let creds = node.enroll("CP-FULL").await;
    let tls = node.tls(Some(&creds));
    let (full, _) = handshakes(&node);
    let first = connect(&node, &tls, "CP-FULL").await.expect("first connection");
    disconnect(&node, first, "CP-FULL").await;
    let again = connect(&node, &tls, "CP-FULL").await.expect("reconnects");
    disconnect(&node, again, "CP-FULL").await;
    assert_eq!(handshakes(&node), (full + 2, 0), "no session cache either");
    node.restart().await;
    drop(
        connect(&node, &tls, "CP-FULL")
            .await
            .expect("reconnects after a restart"),
    );
    assert_eq!(handshakes(&node), (1, 0));
}
