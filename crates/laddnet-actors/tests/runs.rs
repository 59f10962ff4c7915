//! A run of meter events in one transaction reads each session record
//! once and writes it once: the store must end up exactly as if every
//! event had been applied in a transaction of its own, and every event
//! must get the same answer.

mod common;

use common::event;
use laddnet_actors::repo::{self, Applied, RepoError};
use laddnet_core::charging::{FLAG_REGISTER_BACKWARDS, SessionStatus, TxEvent, TxEventKind};
use laddnet_store::{RedbStore, StoreExt};

/// Everything the store holds.
fn dump(store: &RedbStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .transact(|tx| tx.get_range(&[0x00], &[0xff], usize::MAX, false))
        .unwrap()
}

/// An answer in a comparable form: the error's kind, or the duplicate
/// flag and the record after the event.
fn answer(r: &Result<Applied, RepoError>) -> String {
    match r {
        Ok(a) => format!("dup={} {:?}", a.duplicate, a.record),
        Err(e) => format!("error {e}"),
    }
}

/// Events of two sessions of `CP-1` and one of `CP-2`, with replays,
/// events out of order, a register going backwards, an end in the middle
/// of a run, and an event after the end, shuffled by `seed`.
fn script(seed: u64) -> Vec<(&'static str, TxEvent)> {
    let mut events = Vec::new();
    for (charger, tx) in [("CP-1", "tx-a"), ("CP-1", "tx-b"), ("CP-2", "tx-c")] {
        for seq in 0..12u64 {
            let kind = match seq {
                0 => TxEventKind::Started,
                10 => TxEventKind::Ended,
                _ => TxEventKind::Updated,
            };
            // The register goes backwards at 6 in tx-b.
            let energy = if tx == "tx-b" && seq == 6 { 10 } else { 100 + seq * 30 };
            events.push((
                charger,
                event(tx, seq, kind, 1_700_000_000_000 + seq as i64 * 10_000, energy),
            ));
        }
    }
    // CP-2 claims CP-1's transaction: refused, whatever the order.
    events.push(("CP-2", event("tx-a", 20, TxEventKind::Updated, 1_700_000_300_000, 900)));
    // Replays.
    let replays: Vec<_> = events.iter().step_by(5).cloned().collect();
    events.extend(replays);
    // A deterministic shuffle of part of the order (most events stay in
    // order, as chargers send them).
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    for i in 0..events.len() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if (x >> 60) < 4 {
            let j = (x >> 20) as usize % events.len();
            events.swap(i, j);
        }
    }
    events
}

#[test]
fn a_run_leaves_the_store_and_the_answers_as_events_one_by_one_do() {
    for seed in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let alone = RedbStore::open(dir.path().join("alone.redb")).unwrap();
        let runs = RedbStore::open(dir.path().join("runs.redb")).unwrap();
        let script = script(seed);

        let one_by_one: Vec<String> = script
            .iter()
            .map(|(charger, e)| answer(&alone.transact(|tx| repo::apply_event_in(tx, charger, None, 22_000, e))))
            .collect();

        // Runs as a charger's stream gives them: consecutive events of one
        // charger, up to 7 at a time.
        let mut in_runs = Vec::new();
        let mut i = 0;
        while i < script.len() {
            let charger = script[i].0;
            let mut j = i;
            while j < script.len() && j - i < 7 && script[j].0 == charger {
                j += 1;
            }
            let events: Vec<TxEvent> = script[i..j].iter().map(|(_, e)| e.clone()).collect();
            let answers = runs
                .transact(|tx| repo::apply_run_in(tx, charger, None, 22_000, &events))
                .unwrap();
            assert_eq!(answers.len(), events.len());
            in_runs.extend(answers.iter().map(answer));
            i = j;
        }

        assert_eq!(in_runs, one_by_one, "seed {seed}: the answers differ");
        assert_eq!(dump(&runs), dump(&alone), "seed {seed}: the stores differ");
        // The energy counter each commit added to is the sessions' energy
        // (registers going backwards and replays included).
        let energy: u64 = repo::all_sessions(&runs).unwrap().iter().map(|s| s.energy_wh()).sum();
        assert!(energy > 0);
        assert_eq!(repo::energy_delivered_wh(&runs).unwrap(), energy, "seed {seed}");
        // And the script did what it says: the sessions ended, the foreign
        // claim was refused, the register going backwards was seen.
        assert!(one_by_one.iter().any(|a| a.starts_with("error")), "seed {seed}");
        assert!(one_by_one.iter().any(|a| a.starts_with("dup=true")), "seed {seed}");
        let b = repo::get_session(&runs, "tx-b").unwrap().unwrap();
        assert_eq!(b.status, SessionStatus::Ended);
        assert!(b.flags.contains(FLAG_REGISTER_BACKWARDS), "seed {seed}");
        assert_eq!(repo::get_session(&runs, "tx-c").unwrap().unwrap().samples, 12);
    }
}

#[test]
fn a_register_going_backwards_within_one_run_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
    let events: Vec<TxEvent> = [(0, 100), (1, 150), (2, 120), (3, 160)]
        .into_iter()
        .map(|(seq, wh)| {
            let kind = if seq == 0 {
                TxEventKind::Started
            } else {
                TxEventKind::Updated
            };
            event("tx-1", seq, kind, 1_700_000_000_000 + seq as i64 * 60_000, wh)
        })
        .collect();
    let answers = store
        .transact(|tx| repo::apply_run_in(tx, "CP-1", None, 22_000, &events))
        .unwrap();
    let flagged: Vec<bool> = answers
        .iter()
        .map(|a| a.as_ref().unwrap().record.flags.contains(FLAG_REGISTER_BACKWARDS))
        .collect();
    assert_eq!(flagged, [false, false, true, true]);
    let stored = repo::get_session(&store, "tx-1").unwrap().unwrap();
    assert_eq!(stored.samples, 4);
    assert_eq!(stored.last.energy_wh, 160);
}
