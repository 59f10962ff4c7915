//! The node's runtime threads (requests) ask the scheduler for a short
//! time slice, so one woken by a message preempts the store's writer
//! instead of waiting out its slice (the writer's own priority is
//! tested in laddnet-store).

use laddnet_tests::*;

/// Per thread of `pid`: its name and its scheduler slice (`se.slice` in
/// `/proc/PID/task/TID/sched`, kernels with EEVDF), if shown.
fn threads(pid: u32) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let (Ok(comm), Ok(sched)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("sched")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let slice = sched
            .lines()
            .find(|l| l.trim_start().starts_with("se.slice"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse::<u64>().ok());
        out.push((comm.trim().to_string(), slice));
    }
    out
}

#[test]
fn request_threads_take_short_slices_and_the_store_writer_does_not() {
    let dir = tempfile::tempdir().unwrap();
    laddnet_init(dir.path());
    let node = NodeProcess::start(dir.path(), &[]);
    let seen = threads(node.child.id());
    let slices = |name: &str| -> Vec<Option<u64>> { seen.iter().filter(|(n, _)| n == name).map(|(_, s)| *s).collect() };
    let workers = slices("tokio-rt-worker");
    assert!(!workers.is_empty(), "threads: {seen:?}");
    if workers.iter().any(|s| s.is_none()) {
        eprintln!("this kernel shows no scheduler slices (before EEVDF): nothing to check");
        return;
    }
    let short = laddnet_store::REQUEST_SLICE_US * 1_000;
    assert!(
        workers.iter().all(|s| *s == Some(short)),
        "every runtime thread asks for {short} ns: {seen:?}"
    );
    // The main thread (which only waits on the runtime) keeps the default.
    assert_ne!(slices("laddnet"), vec![Some(short)], "threads: {seen:?}");
}
