//! The shared store (`laddnet store serve` and the node's client) passes
//! the same conformance suite as redb and FoundationDB, over real mutual
//! TLS on loopback; and only node certificates may use it.

use std::sync::Arc;

use laddnet_core::OperatorName;
use laddnet_node::NodeConfig;
use laddnet_node::shared_store::{SharedStoreClient, serve};

async fn server(dir: &std::path::Path) -> (laddnet_node::shared_store::StoreServing, NodeConfig) {
    let cfg = NodeConfig::for_data_dir(dir.join("store"));
    let admin = OperatorName::new("admin").unwrap();
    let c2 = cfg.clone();
    tokio::task::spawn_blocking(move || laddnet_node::init_data_dir(&c2, &admin))
        .await
        .unwrap()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = serve(cfg.clone(), "127.0.0.1:0".parse().unwrap(), vec!["node-a".into()], stop)
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
