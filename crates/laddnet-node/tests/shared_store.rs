//! The shared store (`laddnet store serve` and the node's client) passes
//! the same conformance suite as redb and FoundationDB, over real mutual
//! TLS on loopback; and only node certificates may use it.

use std::sync::Arc;

use laddnet_core::OperatorName;
use laddnet_node::NodeConfig;
use laddnet_node::shared_store::{SharedStoreClient, serve};

async fn server(dir: &std::path::Path) -> (laddnet_node::shared_store::StoreServing, NodeConfig) {
    server_for(dir, &["node-a"]).await
}

async fn server_for(dir: &std::path::Path, nodes: &[&str]) -> (laddnet_node::shared_store::StoreServing, NodeConfig) {
    let cfg = NodeConfig::for_data_dir(dir.join("store"));
    let admin = OperatorName::new("admin").unwrap();
    let c2 = cfg.clone();
    tokio::task::spawn_blocking(move || laddnet_node::init_data_dir(&c2, &admin))
        .await
        .unwrap()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = nodes.iter().map(|n| n.to_string()).collect();
    let s = serve(cfg.clone(), "127.0.0.1:0".parse().unwrap(), clients, stop)
        .await
        .unwrap();
    (s, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (s, cfg) = server(dir.path()).await;
    let (_, crt, key) = s.clients[0].clone();
    let root = std::fs::read_to_string(cfg.ca_dir().join("root.crt")).unwrap();
    let endpoint = format!("https://{}", s.addr);
    tokio::task::spawn_blocking(move || {
        let client = SharedStoreClient::connect(
            &endpoint,
            "localhost",
            &root,
            &std::fs::read_to_string(crt).unwrap(),
            &std::fs::read_to_string(key).unwrap(),
        )
        .unwrap();
        laddnet_store::conformance::run_all(Arc::new(client));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_node_certificates_may_use_the_shared_store() {
    let dir = tempfile::tempdir().unwrap();
    let (s, cfg) = server(dir.path()).await;
    let root = std::fs::read_to_string(cfg.ca_dir().join("root.crt")).unwrap();
    // The admin operator's certificate is of this CA, but not a node's.
    let admin_crt = std::fs::read_to_string(cfg.data_dir.join("credentials/admin.crt")).unwrap();
    let admin_key = std::fs::read_to_string(cfg.data_dir.join("credentials/admin.key")).unwrap();
    let endpoint = format!("https://{}", s.addr);
    let r = tokio::task::spawn_blocking(move || {
        let client = SharedStoreClient::connect(&endpoint, "localhost", &root, &admin_crt, &admin_key)?;
        use laddnet_store::StoreExt;
        client
            .snapshot(|tx| tx.get(b"anything"))
            .map_err(|e| anyhow::anyhow!(e.to_string()))
    })
    .await
    .unwrap();
    let err = r.expect_err("an operator certificate is refused");
    assert!(err.to_string().contains("only nodes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_revoked_by_another_is_cut_off_from_the_store_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (s, cfg) = server_for(dir.path(), &["node-a", "node-b"]).await;
    let root = std::fs::read_to_string(cfg.ca_dir().join("root.crt")).unwrap();
    let endpoint = format!("https://{}", s.addr);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let ((_, a_crt, a_key), (_, b_crt, b_key)) = (s.clients[0].clone(), s.clients[1].clone());
    let a_chain = read(&a_crt);
    let a_serial = laddnet_pki::summarize_certificate(&laddnet_pki::tls::certs_from_pem(&a_chain).unwrap()[0])
        .unwrap()
        .serial;
    let b = {
        let (endpoint, root, chain, key) = (endpoint.clone(), root.clone(), read(&b_crt), read(&b_key));
        tokio::task::spawn_blocking(move || {
            Arc::new(SharedStoreClient::connect(&endpoint, "localhost", &root, &chain, &key).unwrap())
        })
        .await
        .unwrap()
    };
    // node-a's connection, one call at a time (the store client's retries
    // would hide when the refusal began).
    let tls = laddnet_pki::tls::client_config(&root, Some((&a_chain, &read(&a_key)))).unwrap();
    let mut a = laddnet_proto::v1::store_service_client::StoreServiceClient::new(
        laddnet_client::connect(&endpoint, "localhost", tls).await.unwrap(),
    );
    let get = || laddnet_proto::v1::StoreRead {
        op: Some(laddnet_proto::v1::store_read::Op::Get(b"anything".to_vec())),
    };
    a.read(get()).await.expect("node-a reads before the revocation");
    // node-b revokes node-a through the shared store. The server's re-read
    // is a minute away, so only its watch on the CRL can cut node-a's live
    // connection now.
    let policy = laddnet_node::node::load_policy(&cfg).unwrap();
    let source = laddnet_node::node::key_source(&cfg);
    let files = laddnet_pki::CaFiles::new(cfg.ca_dir());
    tokio::task::spawn_blocking(move || {
        let ca = laddnet_pki::Ca::open(&files, policy, &source, b, laddnet_pki::system_clock()).unwrap();
        ca.revoke(&a_serial, laddnet_pki::RevocationReason::KeyCompromise, "node-b")
            .unwrap();
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.read(get()).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "node-a is still served 10 s after its revocation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
