//! Accounts, authorization reasons, the offline list, erasure and the
//! outbox, on the real embedded store.

use std::sync::Arc;

use laddnet_drivers::accounts::NewDriver;
use laddnet_drivers::authz::{AuthRequest, AuthStatus};
use laddnet_drivers::outbox::{self, Notification, NotificationKind};
use laddnet_drivers::{Drivers, PaymentKind, SiteAccess, TokenKind, TokenStatus, key, locallist};
use laddnet_store::{RedbStore, SharedStore, StoreExt};
use laddnet_vault::{LocalMasterKeys, Vault};
use rust_decimal_macros::dec;

const NOW: i64 = 1_790_000_000;

fn drivers() -> (tempfile::TempDir, Drivers) {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
    let keys = Arc::new(LocalMasterKeys::from_keys([(1, [7u8; 32])]).unwrap());
    let vault = Vault::load(store.as_ref(), keys).unwrap();
    (dir, Drivers::new(store, vault))
}

fn driver(d: &Drivers, payment: PaymentKind) -> String {
    d.create(
        NewDriver {
            name: Some("Ada Lovelace".into()),
            email: Some("ada@example.org".into()),
            payment: Some(payment),
            currency: "EUR".into(),
            max_concurrent_sessions: 1,
            ..Default::default()
        },
        NOW,
    )
    .unwrap()
    .driver_id
}

fn ask<'a>(value: &'a str) -> AuthRequest<'a> {
    AuthRequest {
        kind: TokenKind::Rfid,
        value,
        site_id: Some("S1"),
        price_per_kwh: Some((dec!(0.39), "EUR".into())),
        now: NOW,
        min_wallet_balance: dec!(5),
        session: None,
    }
}

#[test]
fn every_authorization_outcome_has_its_reason() {
    let (_d, d) = drivers();
    let id = driver(&d, PaymentKind::Card);
    let tok = d.add_token(&id, TokenKind::Rfid, "04:a1:b2:c3", None, NOW).unwrap();

    // Accepted, whatever the UID's spelling.
    let ok = d.authorize(&ask("04A1B2C3")).unwrap();
    assert_eq!(ok.status, AuthStatus::Accepted, "{ok:?}");
    assert_eq!(ok.driver_id.as_deref(), Some(id.as_str()));

    // Unknown.
    let r = d.authorize(&ask("DEADBEEF")).unwrap();
    assert_eq!(
        (r.status, r.reason.as_str()),
        (AuthStatus::Unknown, "rfid token is not known")
    );
    assert!(r.driver_id.is_none());

    // Blocked token, then blocked account.
    d.set_token_status(&tok.token_id, TokenStatus::Blocked, NOW).unwrap();
    let r = d.authorize(&ask("04A1B2C3")).unwrap();
    assert_eq!((r.status, r.reason.as_str()), (AuthStatus::Blocked, "token is blocked"));
    d.set_token_status(&tok.token_id, TokenStatus::Active, NOW).unwrap();
    d.update(&id, NOW, |r| {
        r.status = laddnet_drivers::AccountStatus::Blocked;
        Ok(())
    })
    .unwrap();
    let r = d.authorize(&ask("04A1B2C3")).unwrap();
    assert_eq!(r.status, AuthStatus::Blocked);
    assert!(r.reason.contains("account") && r.reason.contains("blocked"), "{r:?}");

    // Expired account (by date).
    d.update(&id, NOW, |r| {
        r.status = laddnet_drivers::AccountStatus::Active;
        r.expires_at = Some(NOW - 1);
        Ok(())
    })
    .unwrap();
    let r = d.authorize(&ask("04A1B2C3")).unwrap();
    assert_eq!(r.status, AuthStatus::Expired);
    assert!(r.reason.contains("expired"));
    d.update(&id, NOW, |r| {
        r.expires_at = None;
        Ok(())
    })
    .unwrap();

    // Private site: refused until the driver is in one of its groups.
    d.set_site_access(
        "S1",
        &SiteAccess {
            private: true,
            groups: ["fleet-a".to_string()].into(),
        },
    )
    .unwrap();
    let r = d.authorize(&ask("04A1B2C3")).unwrap();
    assert_eq!(r.status, AuthStatus::PrivateSite);
    assert!(r.reason.contains("S1") && r.reason.contains("fleet-a"), "{r:?}");
    d.update(&id, NOW, |r| {
        r.groups.insert("fleet-a".into());
        Ok(())
    })
    .unwrap();
    assert!(d.authorize(&ask("04A1B2C3")).unwrap().accepted());

    // Concurrent limit: one open session, limit one. The session being
    // reconciled itself does not count.
    d.store
        .transact(|tx| tx.set(&key::active_session(&id, "tx-open"), b""))
        .unwrap();
    let r = d.authorize(&ask("04A1B2C3")).unwrap();
    assert_eq!(r.status, AuthStatus::ConcurrentLimit);
    assert!(r.reason.contains("limit is 1"), "{r:?}");
    let mut same = ask("04A1B2C3");
    same.session = Some("tx-open");
    assert!(d.authorize(&same).unwrap().accepted());
    d.store
        .transact(|tx| tx.clear(&key::active_session(&id, "tx-open")))
        .unwrap();

    // Price above the driver's maximum.
    d.update(&id, NOW, |r| {
        r.preferences.max_price_per_kwh = Some(dec!(0.35));
        Ok(())
    })
    .unwrap();
    let r = d.authorize(&ask("04A1B2C3")).unwrap();
    assert_eq!(r.status, AuthStatus::PriceAboveMaximum);
    assert!(r.reason.contains("0.39") && r.reason.contains("0.35"), "{r:?}");

    // Insufficient funds on a prepaid wallet; a top-up fixes it.
    d.set_site_access("S1", &SiteAccess::default()).unwrap();
    let w = driver(&d, PaymentKind::Wallet);
    d.add_token(&w, TokenKind::Rfid, "11223344", None, NOW).unwrap();
    let r = d.authorize(&ask("11223344")).unwrap();
    assert_eq!(r.status, AuthStatus::InsufficientFunds);
    assert!(r.reason.contains("0 EUR") && r.reason.contains("5 EUR"), "{r:?}");
    d.adjust_wallet(&w, dec!(20.00), "pay-1", NOW).unwrap();
    assert!(d.authorize(&ask("11223344")).unwrap().accepted());

    // No payment method at all.
    let n = driver(&d, PaymentKind::None);
    d.add_token(&n, TokenKind::Rfid, "55667788", None, NOW).unwrap();
    assert_eq!(
        d.authorize(&ask("55667788")).unwrap().status,
        AuthStatus::NoPaymentMethod
    );

    // A value is bound once only.
    assert!(d.add_token(&n, TokenKind::Rfid, "04a1b2c3", None, NOW).is_err());
    // Reasons never carry the token value.
    for v in ["04A1B2C3", "11223344", "DEADBEEF"] {
        assert!(!d.authorize(&ask(v)).unwrap().reason.contains(v));
    }
}

#[test]
fn offline_list_is_versioned_and_sent_as_a_difference() {
    let (_d, d) = drivers();
    let id = driver(&d, PaymentKind::Card);
    let a = d.add_token(&id, TokenKind::Rfid, "AABBCCDD", None, NOW).unwrap();
    let full = d.store.snapshot(|tx| locallist::since(tx, 0)).unwrap();
    assert!(full.full);
    assert_eq!(full.changes.len(), 1);
    assert_eq!(full.changes[0].hash, a.list_hash);
    assert_eq!(full.changes[0].hash, hex::encode(d.vault.list_hash("AABBCCDD")));
    let v1 = full.version;
    let b = d.add_token(&id, TokenKind::App, "app-token-123", None, NOW).unwrap();
    d.set_token_status(&a.token_id, TokenStatus::Blocked, NOW).unwrap();
    let diff = d.store.snapshot(|tx| locallist::since(tx, v1)).unwrap();
    assert!(!diff.full);
    assert_eq!(diff.changes.len(), 2, "{diff:?}");
    assert_eq!(diff.changes[0].hash, b.list_hash);
    assert_eq!(
        diff.changes[1].entry.as_ref().unwrap().status,
        locallist::ListStatus::Blocked
    );
    // Blocking the account changes every token of it; nothing new for an
    // up-to-date charger otherwise.
    let up = d.store.snapshot(|tx| locallist::since(tx, diff.version)).unwrap();
    assert!(up.changes.is_empty());
    d.update(&id, NOW, |r| {
        r.status = laddnet_drivers::AccountStatus::Blocked;
        Ok(())
    })
    .unwrap();
    let diff2 = d.store.snapshot(|tx| locallist::since(tx, diff.version)).unwrap();
    assert_eq!(
        diff2.changes.len(),
        1,
        "the already blocked token does not change: {diff2:?}"
    );
    d.remove_token(&b.token_id).unwrap();
    let diff3 = d.store.snapshot(|tx| locallist::since(tx, diff2.version)).unwrap();
    assert_eq!(
        diff3.changes,
        vec![locallist::ListChange {
            hash: b.list_hash,
            entry: None
        }]
    );
}

#[test]
fn erasure_destroys_personal_data_and_tokens_but_keeps_the_pseudonym() {
    let (_d, d) = drivers();
    let id = driver(&d, PaymentKind::Card);
    d.add_token(&id, TokenKind::Rfid, "04A1B2C3", None, NOW).unwrap();
    d.store.transact(|tx| tx.set(&key::history(&id, "tx-1"), b"")).unwrap();
    let ex = d.export(&id).unwrap();
    assert_eq!(ex.personal["name"], "Ada Lovelace");
    assert_eq!(ex.personal["email"], "ada@example.org");
    assert_eq!(ex.tokens[0].value, "04A1B2C3");
    assert_eq!(ex.sessions, vec!["tx-1".to_string()]);
    d.erase(&id, NOW).unwrap();
    let rec = d.get(&id).unwrap();
    assert_eq!(rec.status, laddnet_drivers::AccountStatus::Erased);
    let ex = d.export(&id).unwrap();
    assert!(ex.personal.is_empty() && ex.tokens.is_empty());
    assert_eq!(ex.sessions, vec!["tx-1".to_string()], "pseudonymous history stays");
    assert_eq!(d.authorize(&ask("04A1B2C3")).unwrap().status, AuthStatus::Unknown);
    assert!(d.personal(&id).unwrap().is_empty());
    assert!(
        d.set_personal(&id, "name", "x").is_err(),
        "an erased account takes no new data"
    );
}

#[test]
fn outbox_deduplicates_respects_channels_and_backs_off() {
    let (_d, d) = drivers();
    let id = driver(&d, PaymentKind::Card);
    let hooks = vec!["app".to_string()];
    let n = || Notification::new(NotificationKind::SessionEnded, &id, NOW, "Charging ended".into());
    let first = d
        .store
        .transact(|tx| outbox::raise(tx, "ended/tx-1", n(), &hooks, 1000))
        .unwrap()
        .unwrap();
    assert_eq!(first.id, "ntf-0000000000000001");
    let again = d
        .store
        .transact(|tx| outbox::raise(tx, "ended/tx-1", n(), &hooks, 1000))
        .unwrap();
    assert!(again.is_none(), "raised once per dedup key");
    let stream = d.store.snapshot(|tx| outbox::for_driver(tx, &id, 0, 10)).unwrap();
    assert_eq!(stream, vec![first.clone()]);
    assert!(
        d.store
            .snapshot(|tx| outbox::for_driver(tx, &id, 1, 10))
            .unwrap()
            .is_empty()
    );
    // Due now; after a failure, due again only after the backoff.
    assert_eq!(
        d.store.snapshot(|tx| outbox::due(tx, "app", 1000, 10)).unwrap().len(),
        1
    );
    d.store
        .transact(|tx| outbox::failed(tx, "app", 1, 1000, "connection refused", 500, 5))
        .unwrap();
    assert!(
        d.store
            .snapshot(|tx| outbox::due(tx, "app", 1499, 10))
            .unwrap()
            .is_empty()
    );
    let due = d.store.snapshot(|tx| outbox::due(tx, "app", 1500, 10)).unwrap();
    assert_eq!((due[0].attempts, due[0].last_error.as_str()), (1, "connection refused"));
    d.store.transact(|tx| outbox::delivered(tx, "app", 1)).unwrap();
    assert_eq!(d.store.snapshot(|tx| outbox::pending(tx, "app")).unwrap(), 0);
    assert_eq!(outbox::backoff_ms(0, 500, 60_000), 500);
    assert_eq!(outbox::backoff_ms(3, 500, 60_000), 4_000);
    assert_eq!(outbox::backoff_ms(20, 500, 60_000), 60_000);
    // Webhook turned off: only the stream gets the next one.
    d.update(&id, NOW, |r| {
        r.preferences.channels = [laddnet_drivers::Channel::Stream].into();
        Ok(())
    })
    .unwrap();
    d.store
        .transact(|tx| outbox::raise(tx, "ended/tx-2", n(), &hooks, 1000))
        .unwrap()
        .unwrap();
    assert_eq!(d.store.snapshot(|tx| outbox::pending(tx, "app")).unwrap(), 0);
    assert_eq!(
        d.store.snapshot(|tx| outbox::for_driver(tx, &id, 0, 10)).unwrap().len(),
        2
    );
}

#[test]
fn insights_and_utilisation_use_site_local_time() {
    use laddnet_drivers::insights::{SessionSummary, driver_insights, site_utilisation};
    let tz: chrono_tz::Tz = "Europe/Stockholm".parse().unwrap();
    // 2026-01-05 (a Monday) 17:00 UTC = 18:00 in Stockholm, one hour, 11 kWh AC.
    let t0 = 1_767_632_400_000i64;
    let s = |start: i64, mins: i64, wh: u64, ct| SessionSummary {
        started_at_ms: start,
        ended_at_ms: start + mins * 60_000,
        energy_wh: wh,
        connector_type: Some(ct),
        site_id: Some("S1".into()),
        time_zone: tz,
    };
    use laddnet_core::charging::ConnectorType::{Ac, Dc};
    let sessions = vec![s(t0, 60, 11_000, Ac), s(t0 + 86_400_000, 30, 25_000, Dc)];
    let i = driver_insights(&sessions);
    assert_eq!(i.sessions, 2);
    assert_eq!(i.starts_by_hour[18], 2);
    assert_eq!(i.starts_by_weekday[0..2], [1, 1]);
    assert_eq!((i.ac_sessions, i.dc_sessions), (1, 1));
    assert_eq!(i.total_energy_kwh, dec!(36));
    assert_eq!(i.average_duration_minutes, dec!(45));
    assert_eq!(i.average_power_kw, dec!(30.5), "(11 kW + 50 kW) / 2");
    assert_eq!(i.sites, vec![("S1".to_string(), 2)]);
    // Two connectors over two days: 18:00–19:00 busy 1.5 of 4 connector-hours.
    let u = site_utilisation(&sessions, 2, tz, t0 - 18 * 3_600_000, t0 + 30 * 3_600_000);
    assert_eq!(u.days, 2);
    assert_eq!(u.by_hour[18], dec!(0.375));
    assert_eq!(u.by_hour[19], dec!(0));
    assert_eq!(u.starts_by_hour[18], 2);
}
