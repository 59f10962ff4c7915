//! What chargers and operators send to fleet operations: a firmware image
//! with its announced hash, signature and signer chain (the check a charger
//! makes must refuse, never panic); diagnostics chunks in any order and
//! size; firmware versions and file names; and the load plan, which must
//! never hand out more than the site's limit.
#![no_main]
use laddnet_core::load::{Demand, plan};
use laddnet_node::diagnostics::{Uploads, file_name_ok};
use laddnet_proto::v1;
use libfuzzer_sys::fuzz_target;

fn u32_at(d: &[u8], i: usize) -> u32 {
    let b = |k: usize| u32::from(*d.get(i + k).unwrap_or(&0));
    b(0) | (b(1) << 8) | (b(2) << 16)
}

fuzz_target!(|data: &[u8]| {
    let (head, rest) = data.split_at(data.len().min(64));
    let text = String::from_utf8_lossy(rest);
    // A charger's check of an announced image.
    let (chain_bytes, image) = rest.split_at(rest.len() / 2);
    let (root_bytes, signer_bytes) = chain_bytes.split_at(chain_bytes.len() / 2);
    let chain = String::from_utf8_lossy(chain_bytes);
    let (root, signer) = (String::from_utf8_lossy(root_bytes), String::from_utf8_lossy(signer_bytes));
    // The announced hash matches, so the chain, root and signature checks
    // are reached with whatever the input holds.
    let sha = <sha2::Sha256 as sha2::Digest>::digest(image).to_vec();
    let _ = laddnet_pki::firmware::verify_firmware(&root, &signer, &text, image, &sha, head, 1_800_000_000);
    let _ = laddnet_pki::firmware::verify_firmware(&chain, &chain, "1.0", image, &sha, image, 0);
    let _ = laddnet_pki::firmware::verify_firmware(&chain, &chain, "1.0", image, head, head, 0);
    // Versions and file names.
    if laddnet_node::firmware::check_version(&text).is_ok() {
        assert!(!text.is_empty() && text.len() <= 32);
    }
    let name = file_name_ok(&text);
    assert!(!name.is_empty() && name.len() <= 100 && !name.contains('/'));
    // Diagnostics chunks: only requested ids, in order.
    let up = Uploads::default();
    up.requested("r1");
    let mut total = 0usize;
    for (i, piece) in rest.chunks(7).enumerate() {
        let c = v1::DiagnosticsChunk {
            command_id: if piece.first().is_some_and(|b| b % 5 == 0) { "other".into() } else { "r1".into() },
            index: if piece.get(1).is_some_and(|b| b % 7 == 0) { 99 } else { i as u32 },
            data: piece.to_vec(),
            last: piece.get(2).is_some_and(|b| b % 11 == 0),
            file_name: String::new(),
        };
        match up.chunk(c) {
            Ok(Some((_, _, content))) => {
                assert!(content.len() <= total + piece.len());
                break;
            }
            Ok(None) => total += piece.len(),
            Err(_) => {}
        }
    }
    // The load plan.
    let limit = u32_at(head, 0);
    let min_w = u32_at(head, 3) % 10_000;
    let demands: Vec<Demand> = rest
        .chunks(12)
        .take(64)
        .enumerate()
        .map(|(i, c)| Demand {
            key: i.to_string(),
            max_w: u32_at(c, 0),
            ev_max_w: c.get(3).map(|b| u32::from(*b) * 1000),
            departure_ms: c.get(4).filter(|b| **b % 2 == 0).map(|b| i64::from(*b) * 60_000),
            started_ms: i as i64,
            measured_w: u32_at(c, 5),
            limit_w: c.get(8).map(|_| u32_at(c, 8)),
        })
        .collect();
    let p = plan(limit, &demands, min_w);
    assert_eq!(p.len(), demands.len());
    assert!(p.iter().map(|&w| u64::from(w)).sum::<u64>() <= u64::from(limit));
    for (d, w) in demands.iter().zip(&p) {
        assert!(*w <= d.can_take());
    }
});
