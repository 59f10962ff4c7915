//! The incident lifecycle on the real embedded store.

use std::sync::Arc;

use laddnet_incidents::*;
use laddnet_store::{RedbStore, SharedStore, StoreExt};

fn store() -> (tempfile::TempDir, SharedStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("s.redb")).unwrap();
    (dir, Arc::new(s))
}

fn raise(s: &SharedStore, kind: AlarmKind, subject: &str, at_ms: i64) -> (Incident, Change) {
    s.transact(|tx| {
        laddnet_incidents::raise(
            tx,
            &Alarm {
                kind,
                subject,
                detail: "GroundFailure",
                at_ms,
            },
        )
    })
    .unwrap()
}

fn clear(s: &SharedStore, kind: AlarmKind, subject: &str, at_ms: i64) -> Option<(Incident, Change)> {
    s.transact(|tx| laddnet_incidents::clear(tx, kind, subject, at_ms, ""))
        .unwrap()
}

#[test]
fn one_incident_per_condition_resolved_when_it_clears_and_reopened_when_it_returns() {
    let (_d, s) = store();
    let (i, c) = raise(&s, AlarmKind::ChargerFault, "connector:CP-1/1", 1_000);
    assert_eq!((c, i.state, i.severity), (Change::Opened, State::Open, Severity::Major));
    // Raised again while it holds: the same incident, nothing new.
    let (again, c) = raise(&s, AlarmKind::ChargerFault, "connector:CP-1/1", 2_000);
    assert_eq!(
        (again.id.as_str(), c, again.occurrences),
        (i.id.as_str(), Change::Unchanged, 1)
    );
    // Another subject or kind is another incident.
    let (other, _) = raise(&s, AlarmKind::ChargerFault, "connector:CP-1/2", 2_000);
    assert_ne!(other.id, i.id);
    let (offline, _) = raise(&s, AlarmKind::Offline, "charger:CP-1", 2_000);
    assert_ne!(offline.id, i.id);

    let acked = acknowledge(s.as_ref(), &i.id, "ops", 2_500).unwrap();
    assert_eq!(acked.state, State::Acknowledged);
    assert!(
        acknowledge(s.as_ref(), &i.id, "ops", 2_600).is_err(),
        "acknowledged twice"
    );
    let assigned = assign(s.as_ref(), &i.id, "Tech Tove", "ops", 2_700).unwrap();
    assert_eq!(
        (assigned.state, assigned.assignee.as_deref()),
        (State::Assigned, Some("Tech Tove"))
    );
    assert!(matches!(
        assign(s.as_ref(), &i.id, "", "ops", 2_700),
        Err(IncidentError::Invalid(_))
    ));

    // The fault clears: resolved by itself.
    let (cleared, c) = clear(&s, AlarmKind::ChargerFault, "connector:CP-1/1", 3_000).unwrap();
    assert_eq!(
        (c, cleared.state, cleared.active),
        (Change::Cleared, State::Resolved, false)
    );
    assert_eq!(
        clear(&s, AlarmKind::ChargerFault, "connector:CP-1/1", 3_100).unwrap().1,
        Change::Unchanged
    );
    // It returns: the same incident reopens, still with its technician.
    let (back, c) = raise(&s, AlarmKind::ChargerFault, "connector:CP-1/1", 4_000);
    assert_eq!(
        (back.id.as_str(), c, back.state),
        (i.id.as_str(), Change::Reopened, State::Assigned)
    );
    assert_eq!(back.occurrences, 2);
    let steps: Vec<&str> = back.timeline.iter().map(|s| s.what.as_str()).collect();
    assert_eq!(steps, ["opened", "acknowledged", "assigned", "cleared", "reopened"]);

    // Resolved by hand: a recurrence is a new incident.
    let done = resolve(s.as_ref(), &i.id, "Tech Tove", "contactor replaced", 5_000).unwrap();
    assert_eq!(done.state, State::Resolved);
    let (fresh, c) = raise(&s, AlarmKind::ChargerFault, "connector:CP-1/1", 6_000);
    assert_eq!(c, Change::Opened);
    assert_ne!(fresh.id, i.id);

    // Listing: newest first, by state.
    let all = list(s.as_ref(), None, 0).unwrap();
    assert_eq!(all.first().map(|x| x.id.as_str()), Some(fresh.id.as_str()));
    assert_eq!(list(s.as_ref(), Some(State::Resolved), 0).unwrap().len(), 1);
    assert_eq!(
        active_counts(s.as_ref()).unwrap().get(&AlarmKind::ChargerFault),
        Some(&2)
    );
    assert!(matches!(get(s.as_ref(), "inc-nope"), Err(IncidentError::NotFound(_))));
    // Clearing what never was raised does nothing.
    assert!(clear(&s, AlarmKind::MeterAnomaly, "session:x", 1).is_none());
    assert!(State::parse("closed").is_err() && AlarmKind::parse("fire").is_err());
}

#[test]
fn a_flapping_condition_keeps_a_bounded_timeline() {
    let (_d, s) = store();
    for n in 0..500 {
        raise(&s, AlarmKind::Offline, "charger:CP-F", n * 10);
        clear(&s, AlarmKind::Offline, "charger:CP-F", n * 10 + 5);
    }
    let all = list(s.as_ref(), None, 0).unwrap();
    assert_eq!(all.len(), 1, "one incident for one flapping charger");
    assert_eq!(all[0].occurrences, 500);
    assert!(all[0].timeline.len() <= 200);
    assert_eq!(all[0].timeline[0].what, "opened");
}

#[test]
fn active_incidents_are_counted_from_their_index_built_once_for_older_stores() {
    let (_d, s) = store();
    for c in 1..=5 {
        raise(&s, AlarmKind::Offline, &format!("charger:CP-{c}"), 1_000);
    }
    for c in 1..=3 {
        raise(&s, AlarmKind::ChargerFault, &format!("connector:CP-{c}/1"), 1_000);
    }
    clear(&s, AlarmKind::Offline, "charger:CP-1", 2_000);
    clear(&s, AlarmKind::Offline, "charger:CP-2", 2_000);
    raise(&s, AlarmKind::Offline, "charger:CP-2", 3_000); // reopened
    let (fault, _) = raise(&s, AlarmKind::ChargerFault, "connector:CP-3/1", 1_000);
    resolve(s.as_ref(), &fault.id, "operator:Ada", "replaced the contactor", 4_000).unwrap();
    let expected = std::collections::BTreeMap::from([(AlarmKind::Offline, 4), (AlarmKind::ChargerFault, 2)]);

    // A store from before the index (as every store is until a node of
    // this version starts on it) holding a record that does not decode:
    // counting walks every incident, and that one stops it.
    let garbage = |s: &SharedStore| {
        s.transact(|tx| {
            tx.set(&laddnet_store::keys::pack(&("incident", "inc-garbage")), b"not json")?;
            tx.set(
                &laddnet_store::keys::pack(&("incident-by-time", 5_000i64, "inc-garbage")),
                b"",
            )
        })
        .unwrap()
    };
    garbage(&s);
    assert!(active_counts(s.as_ref()).is_err(), "the old count reads every record");

    // Indexed once (the bad record passed over), then counted from the index.
    assert_eq!(index_active_once(s.as_ref()).unwrap(), 9);
    assert_eq!(index_active_once(s.as_ref()).unwrap(), 0, "once");
    assert_eq!(active_counts(s.as_ref()).unwrap(), expected);

    // Every later change keeps the index in step.
    clear(&s, AlarmKind::Offline, "charger:CP-3", 6_000);
    raise(&s, AlarmKind::Overload, "connector:CP-9/1", 6_000);
    let (fault, _) = raise(&s, AlarmKind::ChargerFault, "connector:CP-1/1", 6_000);
    resolve(s.as_ref(), &fault.id, "operator:Ada", "", 7_000).unwrap();
    assert_eq!(
        active_counts(s.as_ref()).unwrap(),
        std::collections::BTreeMap::from([
            (AlarmKind::Offline, 3),
            (AlarmKind::ChargerFault, 1),
            (AlarmKind::Overload, 1)
        ])
    );
}
