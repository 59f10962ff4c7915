//! The conformance suite on every backend available here: redb always,
//! FoundationDB wherever FDB_CLUSTER_FILE points at a cluster.

use std::sync::Arc;

#[test]
fn redb_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = laddnet_store::RedbStore::open(dir.path().join("c.redb")).unwrap();
    laddnet_store::conformance::run_all(Arc::new(store));
}

/// Runs only where a cluster exists: `FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster
/// cargo test -p laddnet-store --features fdb --test conformance` (see deploy/README.md).
#[cfg(feature = "fdb")]
#[test]
fn foundationdb_conforms() {
    let Ok(cluster) = std::env::var("FDB_CLUSTER_FILE") else {
        eprintln!("FDB_CLUSTER_FILE is not set: no FoundationDB cluster to test against");
        return;
    };
    let store = laddnet_store::FdbStore::open(Some(&cluster)).unwrap();
    laddnet_store::conformance::run_all(Arc::new(store));
}
