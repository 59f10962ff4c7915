//! What a node sends the shared store and another node: `StoreCommit`,
//! `StoreRead`, `ForwardCommandRequest`, `ForwardDiagnosticsRequest` and
//! `SiteReadingsRequest` bytes. Decoding gives a message or an error; a
//! forwarded site reading is taken or refused with a reason, and one taken
//! goes back on the wire unchanged; the server's shape check and its conflict check give an
//! answer for any decoded commit, never a panic (inverted or empty ranges,
//! missing reads, versions from before the server started included).
#![no_main]
use laddnet_node::shared_store::{ConflictWindow, mutation_key, well_formed};
use laddnet_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = v1::StoreRead::decode(data);
    let _ = v1::ForwardCommandRequest::decode(data);
    let _ = v1::ForwardDiagnosticsRequest::decode(data);
    if let Ok(req) = v1::SiteReadingsRequest::decode(data) {
        for r in req.readings {
            let sent = r.clone();
            if let Ok((site, reading)) = laddnet_node::load::Reading::from_proto(r) {
                let back = reading.to_proto(&site);
                assert_eq!(back.site_id, sent.site_id);
                assert_eq!(back.transaction_id, sent.transaction_id);
                assert_eq!(back.power_w, sent.power_w);
                assert_eq!(back.ended, sent.ended);
                assert_eq!(back.ev_max_w, sent.ev_max_w);
                assert_eq!(back.driver_id, sent.driver_id);
            }
        }
    }
    let Ok(commit) = v1::StoreCommit::decode(data) else {
        return;
    };
    let shaped = well_formed(&commit);
    let now = std::time::Instant::now();
    let mut w = ConflictWindow::new(1_000);
    // The commit's own writes, then its reads checked against them.
    let keys: Vec<Vec<u8>> = commit.mutations.iter().filter_map(mutation_key).cloned().collect();
    let v = w.record(keys, now);
    let conflict = w.conflicts(&commit.checks);
    if shaped.is_ok() && commit.checks.iter().all(|c| c.version >= v) {
        // Reads at or after the only write cannot be stale.
        assert!(!conflict);
    }
    w.prune(now + std::time::Duration::from_secs(3_600));
    assert!(w.conflicts(&[v1::StoreCheck {
        read: None,
        version: 0
    }]));
});
