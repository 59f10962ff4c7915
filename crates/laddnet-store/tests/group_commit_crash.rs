//! Group commit never acknowledges a commit before it is durable: a child
//! process commits from many threads at once, and through the writer's
//! queue in batches, and reports each commit as it returns; the parent
//! SIGKILLs it mid-stream and finds every reported commit in the reopened
//! store.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use laddnet_store::{RedbStore, StoreExt};

const CHILD: &str = "LADDNET_GROUP_COMMIT_CHILD";

#[test]
fn every_acknowledged_commit_survives_a_sigkill() {
    if let Ok(path) = std::env::var(CHILD) {
        return child(&path);
    }
    kill_and_check("every_acknowledged_commit_survives_a_sigkill", 'w');
}

#[test]
fn every_acknowledged_queued_commit_survives_a_sigkill() {
    if let Ok(path) = std::env::var(CHILD) {
        return queued_child(&path);
    }
    kill_and_check("every_acknowledged_queued_commit_survives_a_sigkill", 'q');
}

/// Runs this test binary's `test` as the child, kills it after 2,000
/// acknowledged commits (keys starting with `prefix`) and looks them up.
fn kill_and_check(test: &str, prefix: char) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while acked.len() < 2_000 {
        let line = lines.next().expect("the child stopped early").unwrap();
        if let Some(key) = line.strip_prefix("acked ") {
            assert!(key.starts_with(prefix), "{key}");
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

/// Four threads submit 32 jobs at a time to the store's writer and print
/// each key when its job is done, until killed.
fn queued_child(path: &str) {
    let store = std::sync::Arc::new(RedbStore::open(path).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|q| {
            let store = store.clone();
            std::thread::spawn(move || {
                for round in 0u64.. {
                    let (done, wait) = std::sync::mpsc::channel();
                    for i in 0..32 {
                        let key = format!("q{q}-{round}-{i}");
                        let done = done.clone();
                        laddnet_store::submit_with(
                            store.as_ref(),
                            {
                                let key = key.clone();
                                move |tx: &mut dyn laddnet_store::Transaction| tx.set(key.as_bytes(), b"v")
                            },
                            move |r: Result<(), laddnet_store::StoreError>| {
                                r.unwrap();
                                println!("acked {key}");
                                let _ = done.send(());
                            },
                        );
                    }
                    for _ in 0..32 {
                        wait.recv().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
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
