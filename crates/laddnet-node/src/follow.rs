//! Following a store key that other processes write, by the store's watch
//! instead of polling: a revocation made on one node reaches every other
//! node as soon as it commits.
//!
//! The watch runs on a thread of its own (the store's trait is
//! synchronous) in slices of [`WATCH_SLICE`]: between slices the thread
//! checks `stop`, so a stopping node lets go of its store within a slice.

use std::sync::Arc;
use std::time::Duration;

use laddnet_store::{SharedStore, StoreExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The longest one watch call lasts, and so how long a stopping node's
/// watcher may still hold the store.
pub const WATCH_SLICE: Duration = Duration::from_secs(1);
/// The pause after a failed watch (store unreachable) before the next.
const AFTER_ERROR: Duration = Duration::from_secs(2);

/// Notifies `changed` each time the value at `key` changes, until `stop`.
/// `what` names the key in logs.
pub fn follow_key(
    store: SharedStore,
    key: Vec<u8>,
    what: &'static str,
    changed: Arc<Notify>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("watch-{what}"))
        .spawn(move || {
            // The value the last slice watched from, kept across slices:
            // re-reading it at each slice would miss a change made between
            // two slices. None: read it afresh (after a change or error).
            let mut seen: Option<Option<Vec<u8>>> = None;
            let mut failing = false;
            while !stop.is_cancelled() {
                let current = match &seen {
                    Some(v) => Ok(v.clone()),
                    None => store.snapshot(|tx| tx.get(&key)),
                };
                let result = current.and_then(|value| {
                    let changed = store.watch(&key, value.as_deref(), WATCH_SLICE)?;
                    if changed {
                        seen = None;
                    } else {
                        seen = Some(value);
                    }
                    Ok(changed)
                });
                match result {
                    // Also after a failure: a store that came back may
                    // have changed meanwhile.
                    Ok(changed_now) if changed_now || failing => {
                        failing = false;
                        changed.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        seen = None;
                        if !failing {
                            tracing::warn!(error = %e, key = what, "store watch failed; retrying");
                        }
                        failing = true;
                        std::thread::sleep(AFTER_ERROR);
                    }
                }
            }
        })
        .map(|_| ())
}
