//! Money end to end: a tariff assigned, sessions charged over the real
//! protocol, CDRs written once, the ledger posted once and verified — also
//! across a SIGKILL between a session's end and its posting.

use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::TransactionEventType as T;
use laddnet_proto::v1::billing_service_client::BillingServiceClient;
use laddnet_tests::*;
use tonic::transport::Channel;

async fn billing(node: &TestNode) -> BillingServiceClient<Channel> {
    BillingServiceClient::new(node.channel(&node.admin).await.unwrap())
}

async fn wait_cdr(b: &mut BillingServiceClient<Channel>, id: &str, secs: u64) -> Option<v1::CdrInfo> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(c) = cdr(b, id).await {
            return Some(c);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn cdr(b: &mut BillingServiceClient<Channel>, id: &str) -> Option<v1::CdrInfo> {
    b.get_cdr(v1::GetCdrRequest { id: id.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn an_ended_session_is_billed_once_and_the_ledger_balances() {
    let node = TestNode::start().await;
    let mut b = billing(&node).await;
    install_tariff(&mut b).await;
    let (_, mut cp) = node.charger("CP-1").await;
    // 10 kWh: 0.50 + 2.50 = 3.00 excl; 0.60 + 2.75 = 3.35 incl.
    let mut events = vec![tx_event("tx-1", 0, T::Started, 20_000, 0)];
    for i in 1..=9 {
        events.push(tx_event("tx-1", i, T::Updated, 20_000 + i * 1000, i as i64 * 6));
    }
    events.push(tx_event("tx-1", 10, T::Ended, 30_000, 60));
    // The charger sees the running cost in each ack: after 6 kWh it is
    // 0.50 + 1.50 = 2.00 excl, 0.60 + 1.65 = 2.25 incl.
    for e in &events[..6] {
        assert!(cp.event(e.clone()).await.unwrap());
    }
    let ack = cp
        .request(v1::charger_message::Payload::Transaction(tx_event(
            "tx-1",
            6,
            T::Updated,
            26_000,
            36,
        )))
        .await
        .unwrap();
    let Some(v1::central_message::Payload::TransactionAck(ack)) = ack.payload else {
        panic!("{ack:?}")
    };
    assert_eq!(
        (
            ack.currency.as_str(),
            ack.running_cost_excl_vat.as_str(),
            ack.running_cost_incl_vat.as_str()
        ),
        ("EUR", "2.00", "2.25")
    );
    let live = node.session("tx-1").await.unwrap();
    assert_eq!((live.currency.as_str(), live.cost_excl_vat.as_str()), ("EUR", "2.00"));
    for e in &events[7..] {
        assert!(cp.event(e.clone()).await.unwrap());
    }
    let c = wait_cdr(&mut b, "tx-1", 10).await;
    assert!(c.is_some(), "no CDR for tx-1");
    let c = c.unwrap();
    assert_eq!(
        (
            c.total_excl_vat.as_str(),
            c.total_vat.as_str(),
            c.total_incl_vat.as_str()
        ),
        ("3.00", "0.35", "3.35")
    );
    assert_eq!(
        (c.energy_wh, c.tariff_id.as_str(), c.tariff_version),
        (10_000, "standard", 1)
    );
    assert!(!c.review_required);
    // The end event replayed, twice: still one CDR, one posting.
    assert!(cp.event(events[10].clone()).await.unwrap());
    assert!(cp.event(events[10].clone()).await.unwrap());
    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!((v.cdrs, v.postings, v.entries), (1, 1, 3));
    let bal = b
        .ledger_balances(v1::LedgerBalancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .balances;
    let get = |a: &str| {
        bal.iter()
            .find(|x| x.account == a)
            .map(|x| x.amount.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        (
            get("receivable:unassigned").as_str(),
            get("revenue:site:none").as_str(),
            get("vat:payable").as_str()
        ),
        ("3.35", "-3.00", "-0.35")
    );
    // The CDR is immutable and hash-protected; exports carry it.
    let full: serde_json::Value = serde_json::from_str(&c.json).unwrap();
    assert_eq!(full["content_hash"], c.content_hash);
    let csv = b
        .export_cdrs(v1::ExportCdrsRequest {
            from: String::new(),
            to: String::new(),
            format: "csv".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(csv.count, 1);
    assert!(csv.content.lines().nth(1).unwrap().contains(",3.00,0.35,3.35,"));
    // Revenue reports group posted CDRs.
    let rep = b
        .revenue_report(v1::RevenueReportRequest {
            from: String::new(),
            to: String::new(),
            by: "site".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rep.rows.len(), 1);
    let row = &rep.rows[0];
    assert_eq!(
        (
            row.key.as_str(),
            row.sessions,
            row.energy_wh,
            row.excl_vat.as_str(),
            row.vat.as_str(),
            row.incl_vat.as_str()
        ),
        ("(none)", 1, 10_000, "3.00", "0.35", "3.35")
    );
    assert!(rep.csv.starts_with("key,currency,sessions"));
    let by_charger = b
        .revenue_report(v1::RevenueReportRequest {
            from: String::new(),
            to: String::new(),
            by: "charger".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_charger.rows[0].key, "CP-1");
    let none = b
        .revenue_report(v1::RevenueReportRequest {
            from: "2001-01-01T00:00:00Z".into(),
            to: "2001-02-01T00:00:00Z".into(),
            by: "month".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.rows.is_empty());
    let err = b
        .revenue_report(v1::RevenueReportRequest {
            from: String::new(),
            to: String::new(),
            by: "planet".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("planet"));
    // Someone with write access to the store lowers the CDR's total: verify sees it.
    {
        use laddnet_store::StoreExt;
        let store = node.node().state.store.clone();
        let key = laddnet_store::keys::pack(&("cdr", "tx-1"));
        let original = store.snapshot(|tx| tx.get(&key)).unwrap().unwrap();
        let mut altered: serde_json::Value = serde_json::from_slice(&original).unwrap();
        altered["total_incl_vat"] = serde_json::json!("0.01");
        store
            .transact(|tx| tx.set(&key, &serde_json::to_vec(&altered).unwrap()))
            .unwrap();
        let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
        assert!(!v.ok && v.problems.iter().any(|p| p.contains("altered")), "{v:?}");
        store.transact(|tx| tx.set(&key, &original)).unwrap();
        assert!(
            b.verify_ledger(v1::VerifyLedgerRequest {})
                .await
                .unwrap()
                .into_inner()
                .ok
        );
    }
    // A refund is a reversing posting: the site's revenue returns to zero.
    b.refund_cdr(v1::RefundCdrRequest {
        id: "tx-1".into(),
        reason: "faulty cable".into(),
    })
    .await
    .unwrap();
    let err = b
        .refund_cdr(v1::RefundCdrRequest {
            id: "tx-1".into(),
            reason: "again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{:?}", v.problems);
    let bal = b
        .ledger_balances(v1::LedgerBalancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .balances;
    assert!(bal.iter().all(|x| x.amount == "0.00"), "{bal:?}");
    let rep = b
        .revenue_report(v1::RevenueReportRequest {
            from: String::new(),
            to: String::new(),
            by: "site".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rep.rows.is_empty(), "a refunded session is no revenue: {:?}", rep.rows);
}

#[tokio::test]
async fn anomalous_sessions_are_held_for_review_not_billed_blindly() {
    let node = TestNode::start().await;
    let mut b = billing(&node).await;
    install_tariff(&mut b).await;
    let (_, mut cp) = node.charger("CP-1").await;
    for (seq, wh, kind) in [
        (0, 5000, T::Started),
        (1, 9000, T::Updated),
        (2, 4000, T::Updated),
        (3, 9500, T::Ended),
    ] {
        assert!(
            cp.event(tx_event("tx-odd", seq, kind, wh, seq as i64 * 10))
                .await
                .unwrap()
        );
    }
    let c = wait_cdr(&mut b, "tx-odd", 10).await;
    assert!(c.is_some(), "no CDR for tx-odd");
    let c = c.unwrap();
    assert!(
        c.review_required && c.flags.contains(&"register-backwards".to_string()),
        "{c:?}"
    );
    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok && v.postings == 0, "{v:?}");
    let approved = b
        .approve_cdr(v1::GetCdrRequest { id: "tx-odd".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(approved.approved);
    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok && v.postings == 1, "{v:?}");
    // A viewer may not approve or read money.
    let viewer = node.operator("Vi", laddnet_core::Role::Viewer).await;
    let mut vb = BillingServiceClient::new(node.channel(&viewer).await.unwrap());
    assert_eq!(
        vb.list_cdrs(v1::ListCdrsRequest::default()).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    // A broken tariff is refused with the field named.
    let err = b.create_tariff(v1::CreateTariffRequest { tariff_json: r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"ENERGY","price":-1,"step_size":1}]}]}"#.into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("elements[0].price_components[0].price"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_session_end_and_posting_gives_one_cdr_and_one_posting() {
    let dir = tempfile::tempdir().unwrap();
    laddnet_init(dir.path());
    let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
    let root = read("d/ca/root.crt");
    let admin = Creds {
        chain_pem: read("d/credentials/admin.crt"),
        key_pem: read("d/credentials/admin.key"),
        serial: String::new(),
    };

    // First run: sessions are billed only by a sweeper that never gets to run
    // again after its first pass at start.
    let mut node = NodeProcess::start(
        dir.path(),
        &[
            ("LADDNET_BILLING__BILL_ON_END", "false"),
            ("LADDNET_BILLING__SWEEP_INTERVAL_MS", "3600000"),
        ],
    );
    let admin_ch = node.channel(&root, &admin).await;
    let mut b = BillingServiceClient::new(admin_ch.clone());
    install_tariff(&mut b).await;
    let charger = node.enroll(&root, &admin, "CP-K").await;
    let ch = node.channel(&root, &charger).await;
    let mut cp = attach(ch, "CP-K").await.unwrap();
    for e in session_events("tx-k", 8) {
        assert!(cp.event(e).await.unwrap());
    }
    // Ended and acknowledged, not billed yet: now the node dies.
    assert!(cdr(&mut b, "tx-k").await.is_none());
    node.kill9();

    // Restart normally: the sweeper bills what the crash left, once.
    let node = NodeProcess::start(dir.path(), &[]);
    let mut b = BillingServiceClient::new(node.channel(&root, &admin).await);
    let found = wait_cdr(&mut b, "tx-k", 20).await;
    assert!(
        found.is_some(),
        "no CDR for tx-k; the node's log:\n{}",
        std::fs::read_to_string(&node.log).unwrap_or_default()
    );
    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!((v.cdrs, v.postings), (1, 1));
    // 9 steps of 150 Wh after the start: 1.35 kWh → 0.50 + 0.3375 = 0.8375 → 0.84.
    assert_eq!(found.unwrap().total_excl_vat, "0.84");
}
