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

/// Counts the TLS 1.3 tickets a client is given (and keeps them, as the
/// default store does).
#[derive(Debug)]
struct CountingTickets {
    inner: Arc<dyn rustls::client::ClientSessionStore>,
    tickets: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingTickets {
    fn set_kx_hint(&self, s: rustls_pki_types::ServerName<'static>, g: rustls::NamedGroup) {
        self.inner.set_kx_hint(s, g)
    }
    fn kx_hint(&self, s: &rustls_pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(s)
    }
    fn set_tls12_session(&self, s: rustls_pki_types::ServerName<'static>, v: rustls::client::Tls12ClientSessionValue) {
        self.inner.set_tls12_session(s, v)
    }
    fn tls12_session(&self, s: &rustls_pki_types::ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(s)
    }
    fn remove_tls12_session(&self, s: &rustls_pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(s)
    }
    fn insert_tls13_ticket(
        &self,
        s: rustls_pki_types::ServerName<'static>,
        v: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(s, v)
    }
    fn take_tls13_ticket(
        &self,
        s: &rustls_pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(s)
    }
}

/// A handshake runs TLS 1.3 with AES-128-GCM over SHA-256 (its key
/// schedule in hardware where SHA-384's is not) whatever order the client
/// offers, and gives the charger one ticket, not rustls's default two.
#[tokio::test]
async fn a_charger_gets_aes_128_over_sha_256_and_one_ticket_per_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start().await;
    let creds = node.enroll("CP-SUITE").await;
    let mut cfg = (*node.tls(Some(&creds))).clone();
    let store = Arc::new(CountingTickets {
        inner: Arc::new(rustls::client::ClientSessionMemoryCache::new(8)),
        tickets: Default::default(),
    });
    cfg.resumption = rustls::client::Resumption::store(store.clone());
    // The client prefers AES-256 (rustls's own default order does).
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(node.node().mtls_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("mutual TLS handshake");
    let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    // HTTP/2's preface and an empty SETTINGS frame; the node's SETTINGS
    // come after its tickets, so once they are read every ticket is in.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut head))
        .await
        .expect("the node's SETTINGS within 10 s")
        .unwrap();
    assert_eq!(head[3], 0x4, "the node's first frame is SETTINGS");
    assert_eq!(
        store.tickets.load(Ordering::SeqCst),
        1,
        "tickets given on one connection"
    );
}
