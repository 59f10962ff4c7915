//! Group commit never acknowledges a commit before it is durable: a child
//! process commits from many threads at once and reports each commit as
//! it returns; the parent SIGKILLs it mid-stream and finds every reported
//! commit in the reopened store.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use laddnet_store::{RedbStore, StoreExt};

const CHILD: &str = "LADDNET_GROUP_COMMIT_CHILD";

#[test]
fn every_acknowledged_commit_survives_a_sigkill() {
    if let Ok(path) = std::env::var(CHILD) {
        return child(&path);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "every_acknowledged_commit_survives_a_sigkill",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while acked.len() < 2_000 {
        let line = lines.next().expect("the child stopped early").unwrap();
        if let Some(key) = line.strip_prefix("acked ") {
            acked.push(key.to_string());
        }
    }
    // SIGKILL: no destructor, no close, whatever was in flight is cut.
    child.kill().unwrap();
    child.wait().unwrap();
    let store = RedbStore::open(&path).unwrap();
    let mut missing = 0;
    for key in &acked {
        if store.snapshot(|tx| tx.get(key.as_bytes())).unwrap().is_none() {
            missing += 1;
        }
    }
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged commits were lost",
        acked.len()
    );
}

/// Eight writers commit as fast as they can, each printing a key once its
/// commit has returned, until killed.
fn child(path: &str) {
    let store = std::sync::Arc::new(RedbStore::open(path).unwrap());
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let key = format!("w{w}-{i}");
                    store.transact(|tx| tx.set(key.as_bytes(), b"v")).unwrap();
                    println!("acked {key}");
                }
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
}
