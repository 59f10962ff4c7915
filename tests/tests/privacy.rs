//! Personal data at rest, end to end (RELIABILITY.md 20 and 21): erasing a
//! driver makes every copy of their personal data unreadable while the
//! ledger still balances; the store files and the node's logs never hold
//! a name, an e-mail address or an RFID value in clear.

use std::path::Path;
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::TransactionEventType as T;
use laddnet_proto::v1::billing_service_client::BillingServiceClient;
use laddnet_proto::v1::driver_admin_service_client::DriverAdminServiceClient;
use laddnet_store::StoreExt;
use laddnet_tests::*;
use laddnet_vault::FieldRef;

/// A session with `rfid` at connector 1: start, 4 updates, end.
async fn charge(cp: &mut Attached, tx: &str, rfid: &str) {
    for (i, mut e) in session_events(tx, 4).into_iter().enumerate() {
        if i == 0 {
            e.id_token = rfid.into();
        }
        assert!(cp.event(e).await.unwrap(), "event {i} of {tx} rejected");
    }
}

#[tokio::test]
async fn erasure_leaves_the_ledger_balanced_and_every_copy_unreadable() {
    let node = TestNode::start().await;
    node.install_tariff().await;
    let (driver, _) = node.driver("Grace Hopper", "grace@example.org", "04C0FFEE42").await;
    let (_, mut cp) = node.charger("CP-E").await;
    charge(&mut cp, "tx-e1", "04C0FFEE42").await;
    let store = node.node().state.store.clone();
    let billed = eventually(Duration::from_secs(15), || async {
        laddnet_ledger::cdr::get_cdr(store.as_ref(), "tx-e1")
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    assert!(billed, "no CDR for tx-e1");

    // A copy of every sealed field, as a backup taken today would hold.
    let vault = &node.node().state.hub.drivers.vault;
    let fields = ["name", "email"];
    let copies: Vec<Vec<u8>> = fields
        .iter()
        .map(|f| {
            store
                .snapshot(|tx| tx.get(&laddnet_drivers::key::personal(&driver, f)))
                .unwrap()
                .expect("sealed field stored")
        })
        .collect();
    let open = |field: &str, blob: &[u8]| {
        store.snapshot(|tx| {
            Ok::<_, laddnet_vault::VaultError>(
                vault
                    .open_field(
                        tx,
                        &driver,
                        FieldRef {
                            table: "driver",
                            field,
                            record_id: &driver,
                        },
                        blob,
                    )
                    .map(|p| String::from_utf8_lossy(&p).into_owned()),
            )
        })
    };
    assert_eq!(open("name", &copies[0]).unwrap().unwrap(), "Grace Hopper");
    assert_eq!(open("email", &copies[1]).unwrap().unwrap(), "grace@example.org");

    let mut admin = DriverAdminServiceClient::new(node.channel(&node.admin).await.unwrap());
    let erased = admin
        .erase_driver(v1::EraseDriverRequest {
            driver_id: driver.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.status, "erased");

    // Every copy is now unreadable: the data key is gone.
    for (f, blob) in fields.iter().zip(&copies) {
        let r = open(f, blob).unwrap();
        assert!(r.is_err(), "{f} still opens after erasure: {r:?}");
    }
    let export = admin
        .export_driver(v1::ExportDriverRequest {
            driver_id: driver.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    assert!(
        !export.contains("Grace") && !export.contains("grace@") && !export.contains("C0FFEE"),
        "{export}"
    );
    // The card no longer authorizes anyone.
    let r = cp
        .request(v1::charger_message::Payload::Authorize(v1::Authorize {
            id_token: "04C0FFEE42".into(),
            token_type: v1::TokenType::Rfid as i32,
            connector_id: 1,
        }))
        .await
        .unwrap();
    let Some(v1::central_message::Payload::AuthorizeResult(a)) = r.payload else {
        panic!("{r:?}")
    };
    assert_eq!(a.status, v1::AuthorizationStatus::Unknown as i32);

    // The money is untouched: the CDR keeps its pseudonymous driver id and
    // the ledger balances.
    let cdr = laddnet_ledger::cdr::get_cdr(store.as_ref(), "tx-e1").unwrap().unwrap();
    assert_eq!(cdr.driver_ref.as_deref(), Some(driver.as_str()));
    assert!(cdr.intact());
    let mut b = BillingServiceClient::new(node.channel(&node.admin).await.unwrap());
    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!((v.cdrs, v.postings), (1, 1));
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().map_while(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_files_and_logs_never_hold_personal_data_in_clear() {
    const NAME: &str = "Hedy Lamarr";
    const EMAIL: &str = "hedy.lamarr@example.org";
    const PHONE: &str = "+4670123456789";
    const RFID: &str = "04B16B00B5";
    const STRANGER: &str = "04DEADBEEF77";
    let dir = tempfile::tempdir().unwrap();
    laddnet_init(dir.path());
    let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
    let root = read("d/ca/root.crt");
    let admin = Creds {
        chain_pem: read("d/credentials/admin.crt"),
        key_pem: read("d/credentials/admin.key"),
        serial: String::new(),
    };
    // Everything the node logs, at the most verbose level.
    let mut node = NodeProcess::start(dir.path(), &[("LADDNET_LOG", "trace")]);
    let ch = node.channel(&root, &admin).await;
    install_tariff(&mut BillingServiceClient::new(ch.clone())).await;
    let mut drivers = DriverAdminServiceClient::new(ch);
    let d = drivers
        .create_driver(v1::CreateDriverRequest {
            name: NAME.into(),
            email: EMAIL.into(),
            phone: PHONE.into(),
            payment: "card".into(),
            payment_ref: "pm_card_4242".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    drivers
        .add_token(v1::AddTokenRequest {
            driver_id: d.driver_id.clone(),
            kind: "rfid".into(),
            value: RFID.into(),
            expires_at: String::new(),
        })
        .await
        .unwrap();
    // Personal data read back (audited), exported, changed.
    let shown = drivers
        .get_driver(v1::GetDriverRequest {
            driver_id: d.driver_id.clone(),
            with_personal: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.personal.get("name").map(String::as_str), Some(NAME));
    let export = drivers
        .export_driver(v1::ExportDriverRequest {
            driver_id: d.driver_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    assert!(
        contains(export.as_bytes(), RFID.as_bytes()) && export.contains(EMAIL),
        "{export}"
    );

    // The card is used at a charger: authorized, a session, a refusal of
    // a stranger's card.
    let charger = node.enroll(&root, &admin, "CP-G").await;
    let mut cp = attach(node.channel(&root, &charger).await, "CP-G").await.unwrap();
    for token in [RFID, STRANGER] {
        cp.request(v1::charger_message::Payload::Authorize(v1::Authorize {
            id_token: token.into(),
            token_type: v1::TokenType::Rfid as i32,
            connector_id: 1,
        }))
        .await
        .unwrap();
    }
    charge(&mut cp, "tx-g1", RFID).await;
    let mut e = tx_event("tx-g2", 0, T::Started, 90_000, 0);
    e.id_token = STRANGER.into();
    e.offline = true;
    assert!(cp.event(e).await.unwrap());
    let mut b = BillingServiceClient::new(node.channel(&root, &admin).await);
    let billed = eventually(Duration::from_secs(15), || {
        let mut b = b.clone();
        async move { b.get_cdr(v1::GetCdrRequest { id: "tx-g1".into() }).await.is_ok() }
    })
    .await;
    assert!(billed, "no CDR for tx-g1");
    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{:?}", v.problems);
    drop(cp);
    node.terminate();

    let log = std::fs::read(&node.log).unwrap();
    // The grep looks at the right things: the log holds the driver's
    // pseudonymous id and the session; the store holds the session.
    assert!(
        contains(&log, d.driver_id.as_bytes()),
        "the log did not capture the node's output ({} bytes): {}",
        log.len(),
        String::from_utf8_lossy(&log[log.len().saturating_sub(3000)..])
    );
    assert!(contains(&log, b"tx-g1"));
    let mut scanned = vec![(node.log.clone(), log)];
    for f in files(&dir.path().join("d")) {
        scanned.push((f.clone(), std::fs::read(&f).unwrap()));
    }
    assert!(
        scanned
            .iter()
            .any(|(_, bytes)| contains(bytes, b"tx-g1") && contains(bytes, d.driver_id.as_bytes())),
        "no scanned file holds the session and driver ids: the store was not searched"
    );
    for (path, bytes) in &scanned {
        for needle in [NAME, "Lamarr", EMAIL, PHONE, RFID, STRANGER, "pm_card_4242"] {
            assert!(
                !contains(bytes, needle.as_bytes()),
                "{} holds {needle:?} in clear",
                path.display()
            );
        }
    }
}
