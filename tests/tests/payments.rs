//! Paying for sessions over the real protocol: a prepaid wallet topped up,
//! a start refused when the wallet cannot cover it (with the reason), a
//! hold at the start, the cost captured with the CDR; a subscription with
//! its prorated fee; invoices with what the wallet paid; the ledger clean.

use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::billing_service_client::BillingServiceClient;
use laddnet_tests::*;

async fn authorize(cp: &mut Attached, token: &str) -> v1::AuthorizeResult {
    let r = cp
        .request(v1::charger_message::Payload::Authorize(v1::Authorize {
            id_token: token.into(),
            token_type: v1::TokenType::Rfid as i32,
            connector_id: 1,
        }))
        .await
        .unwrap();
    match r.payload {
        Some(v1::central_message::Payload::AuthorizeResult(a)) => a,
        other => panic!("unexpected {other:?}"),
    }
}

async fn wallet_driver(node: &TestNode, rfid: &str, top_up: &str) -> String {
    let mut admin = node.driver_admin().await;
    let d = admin
        .create_driver(v1::CreateDriverRequest {
            payment: "wallet".into(),
            currency: "EUR".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .add_token(v1::AddTokenRequest {
            driver_id: d.driver_id.clone(),
            kind: "rfid".into(),
            value: rfid.into(),
            expires_at: String::new(),
        })
        .await
        .unwrap();
    admin
        .adjust_wallet(v1::AdjustWalletRequest {
            driver_id: d.driver_id.clone(),
            amount: top_up.into(),
            reference: format!("pay-{rfid}"),
        })
        .await
        .unwrap();
    d.driver_id
}

async fn wallet(node: &TestNode, id: &str) -> (String, String) {
    let d = node
        .driver_admin()
        .await
        .get_driver(v1::GetDriverRequest {
            driver_id: id.into(),
            with_personal: false,
        })
        .await
        .unwrap()
        .into_inner();
    (d.wallet_balance, d.wallet_available)
}

#[tokio::test]
async fn a_wallet_pays_for_its_session_and_the_invoice_shows_it() {
    let node = TestNode::start().await;
    node.install_tariff().await;
    let rich = wallet_driver(&node, "0A0A0A0A", "10.00").await;
    let poor = wallet_driver(&node, "0B0B0B0B", "2.00").await;
    // The same payment booked twice is refused.
    let again = node
        .driver_admin()
        .await
        .adjust_wallet(v1::AdjustWalletRequest {
            driver_id: rich.clone(),
            amount: "10.00".into(),
            reference: "pay-0A0A0A0A".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    let (_, mut cp) = node.charger("CP-W").await;

    // The wallet that cannot cover a start is refused, with the reason.
    let no = authorize(&mut cp, "0B0B0B0B").await;
    assert_eq!(no.status, v1::AuthorizationStatus::InsufficientFunds as i32);
    assert_eq!(
        no.reason,
        "insufficient funds: the wallet has 2.00 EUR available, a start needs 5.00 EUR"
    );
    assert_eq!(
        authorize(&mut cp, "0A0A0A0A").await.status,
        v1::AuthorizationStatus::Accepted as i32
    );

    // The start holds what the wallet has (up to 20.00).
    let mut events = session_events("tx-w", 8);
    events[0].id_token = "0A0A0A0A".into();
    assert!(cp.event(events[0].clone()).await.unwrap());
    assert_eq!(wallet(&node, &rich).await, ("10.00".into(), "0.00".into()));
    // While it charges, the card cannot start a second session.
    let busy = authorize(&mut cp, "0A0A0A0A").await;
    assert_eq!(busy.status, v1::AuthorizationStatus::ConcurrentLimit as i32);
    for e in &events[1..] {
        assert!(cp.event(e.clone()).await.unwrap());
    }
    // The CDR (0.50 + 1.35 kWh × 0.25 → 0.60 + 0.37 = 0.97) is paid from
    // the wallet as it posts; the hold is gone.
    let mut b = BillingServiceClient::new(node.channel(&node.admin).await.unwrap());
    let paid = eventually(Duration::from_secs(15), || {
        let node = &node;
        let rich = rich.clone();
        async move { wallet(node, &rich).await.1 != "0.00" }
    })
    .await;
    assert!(paid, "the session was not captured");
    let cdr = b
        .get_cdr(v1::GetCdrRequest { id: "tx-w".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cdr.total_incl_vat, "0.97");
    assert_eq!(wallet(&node, &rich).await, ("9.03".into(), "9.03".into()));

    // A plan, a subscriber from mid-month, and the month's invoices.
    b.create_plan(v1::CreatePlanRequest {
        id: "commuter".into(),
        name: "Commuter".into(),
        currency: "EUR".into(),
        monthly_fee: "10.00".into(),
        vat_percent: "25".into(),
        included_kwh: "0".into(),
        discount_percent: "0".into(),
        tariff_id: String::new(),
    })
    .await
    .unwrap();
    let bad = b
        .create_plan(v1::CreatePlanRequest {
            id: "gold".into(),
            name: "Gold".into(),
            monthly_fee: "ten".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(bad.message().contains("monthly_fee \"ten\""), "{bad:?}");
    // Sessions in the harness stop in November 2023.
    b.subscribe(v1::SubscribeRequest {
        driver_id: poor.clone(),
        plan_id: "commuter".into(),
        from: "2023-11-16T00:00:00Z".into(),
    })
    .await
    .unwrap();
    let run = b
        .run_invoices(v1::RunInvoicesRequest {
            period: "2023-11".into(),
            driver_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .invoices;
    assert_eq!(run.len(), 2, "{run:?}");
    let of = |d: &str| run.iter().find(|i| i.driver_id == d).unwrap().clone();
    let mut numbers: Vec<&str> = run.iter().map(|i| i.number.as_str()).collect();
    numbers.sort();
    assert_eq!(numbers, ["INV-2023-000001", "INV-2023-000002"]);
    let w = of(&rich);
    assert_eq!(
        (w.total_incl_vat.as_str(), w.paid.as_str(), w.amount_due.as_str()),
        ("0.97", "0.97", "0.00")
    );
    // 15 of 30 days: 5.00 + 25 % VAT.
    let s = of(&poor);
    assert_eq!(
        (
            s.total_excl_vat.as_str(),
            s.total_incl_vat.as_str(),
            s.amount_due.as_str()
        ),
        ("5.00", "6.25", "6.25")
    );
    // Running the month again changes nothing.
    let rerun = b
        .run_invoices(v1::RunInvoicesRequest {
            period: "2023-11".into(),
            driver_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .invoices;
    assert_eq!(
        rerun.iter().map(|i| i.number.clone()).collect::<Vec<_>>(),
        run.iter().map(|i| i.number.clone()).collect::<Vec<_>>()
    );
    let page = b
        .get_invoice(v1::GetInvoiceRequest {
            number: w.number.clone(),
            html: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.html.starts_with("<!doctype html>") && page.html.contains(&w.number));
    let e = b
        .run_invoices(v1::RunInvoicesRequest {
            period: "2023-13".into(),
            driver_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("2023-13"));

    // A plan with a tariff of its own prices its subscribers' sessions.
    b.create_tariff(v1::CreateTariffRequest {
        tariff_json: r#"{"id":"members","currency":"EUR","elements":[
          {"price_components":[{"type":"ENERGY","price":0.10,"vat":25.0,"step_size":1}]}]}"#
            .into(),
    })
    .await
    .unwrap();
    b.create_plan(v1::CreatePlanRequest {
        id: "member".into(),
        name: "Member".into(),
        currency: "EUR".into(),
        tariff_id: "members".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // … who pays with a mobile wallet: the payment provider is asked to
    // pre-authorize at the start and to capture the CDR's total.
    let mut admin = node.driver_admin().await;
    let member = admin
        .create_driver(v1::CreateDriverRequest {
            payment: "mobile-wallet".into(),
            payment_ref: "pm_mobile_7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .driver_id;
    admin
        .add_token(v1::AddTokenRequest {
            driver_id: member.clone(),
            kind: "rfid".into(),
            value: "0C0C0C0C".into(),
            expires_at: String::new(),
        })
        .await
        .unwrap();
    b.subscribe(v1::SubscribeRequest {
        driver_id: member.clone(),
        plan_id: "member".into(),
        from: "2023-11-01T00:00:00Z".into(),
    })
    .await
    .unwrap();
    let mut events = session_events("tx-m", 8);
    events[0].id_token = "0C0C0C0C".into();
    for e in events {
        assert!(cp.event(e).await.unwrap());
    }
    let mut got = None;
    for _ in 0..300 {
        if let Ok(c) = b.get_cdr(v1::GetCdrRequest { id: "tx-m".into() }).await {
            got = Some(c.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = got.expect("a CDR for tx-m");
    // 1.35 kWh × 0.10 = 0.135 → 0.14 excl, 0.17 incl (25 %).
    assert_eq!((m.tariff_id.as_str(), m.total_incl_vat.as_str()), ("members", "0.17"));
    let intent = laddnet_ledger::payments::intent(node.node().state.store.as_ref(), "tx-m")
        .unwrap()
        .expect("a payment intent for the mobile wallet");
    assert_eq!(
        (
            intent.status,
            intent.authorized.to_string(),
            intent.captured.to_string()
        ),
        (
            laddnet_ledger::payments::IntentStatus::Captured,
            "20.00".into(),
            "0.17".into()
        )
    );

    let v = b.verify_ledger(v1::VerifyLedgerRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{:?}", v.problems);
    let bals = b
        .ledger_balances(v1::LedgerBalancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .balances;
    let bal = |acct: &str| {
        bals.iter()
            .find(|x| x.account == acct)
            .map(|x| x.amount.clone())
            .unwrap_or_default()
    };
    assert_eq!(bal(&format!("receivable:{rich}")), "0.00", "{bals:?}");
    assert_eq!(bal(&format!("receivable:{poor}")), "6.25", "{bals:?}");
}
