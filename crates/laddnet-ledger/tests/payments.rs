//! Payments, subscriptions and invoices on the real embedded store: wallet
//! holds, captures and releases through the CDR posting; subscription fees,
//! included energy and discounts; invoices numbered without gaps with an
//! exact VAT summary; the ledger verified clean after each.

use std::sync::Arc;

use laddnet_core::cost::CostLine;
use laddnet_core::tariff::Dimension;
use laddnet_ledger::cdr::{self, Cdr};
use laddnet_ledger::invoices::{self, LineKind, Period};
use laddnet_ledger::payments::{self, AuthorizeRequest, CardIntents, PaymentProvider, Wallet};
use laddnet_ledger::subscriptions::{self, Plan};
use laddnet_ledger::{LedgerError, ledger};
use laddnet_store::{RedbStore, SharedStore, StoreExt};
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn store() -> (tempfile::TempDir, SharedStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("s.redb")).unwrap();
    (dir, Arc::new(s))
}

// 2026-11-10 12:00 UTC.
const NOV_10: i64 = 1_794_830_400;

/// A CDR of `kwh` at 0.25/kWh (10 % VAT) plus 0.50 flat (20 % VAT).
fn cdr(id: &str, driver: &str, kwh: u64, stop_s: i64) -> Cdr {
    let energy_excl = Decimal::from(kwh) * d("0.25");
    let lines = vec![
        CostLine {
            dimension: Dimension::Flat,
            element: 0,
            volume: Decimal::ONE,
            billed_volume: Decimal::ONE,
            price: d("0.50"),
            vat: Some(d("20")),
            excl_vat: d("0.50"),
            incl_vat: d("0.60"),
        },
        CostLine {
            dimension: Dimension::Energy,
            element: 1,
            volume: Decimal::from(kwh * 1000),
            billed_volume: Decimal::from(kwh * 1000),
            price: d("0.25"),
            vat: Some(d("10")),
            excl_vat: energy_excl,
            incl_vat: energy_excl * d("1.1"),
        },
    ];
    let excl = d("0.50") + energy_excl;
    let incl = (d("0.60") + energy_excl * d("1.1"))
        .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
    let mut c = Cdr {
        id: id.into(),
        charger_id: "CP-1".into(),
        connector_id: 1,
        site_id: Some("s1".into()),
        driver_ref: Some(driver.into()),
        start_ms: (stop_s - 3600) * 1000,
        stop_ms: stop_s * 1000,
        meter_start_wh: 0,
        meter_stop_wh: kwh * 1000,
        energy_wh: kwh * 1000,
        charging_s: Decimal::from(3600),
        idle_s: Decimal::ZERO,
        tariff_id: Some("standard".into()),
        tariff_version: Some(1),
        currency: "EUR".into(),
        periods: vec![],
        lines,
        total_excl_vat: excl.round_dp(2),
        total_incl_vat: incl,
        total_vat: incl - excl.round_dp(2),
        flags: vec![],
        review_required: false,
        approved: false,
        stop_reason: "ev-disconnected".into(),
        created_at: stop_s,
        content_hash: String::new(),
    };
    c.seal();
    c
}

fn verify_clean(s: &SharedStore) {
    let v = ledger::verify(s.as_ref()).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

fn authorize(
    s: &SharedStore,
    p: &dyn PaymentProvider,
    driver: &str,
    session: &str,
) -> Result<payments::Hold, LedgerError> {
    s.transact(|tx| {
        p.authorize(
            tx,
            &AuthorizeRequest {
                driver,
                session,
                currency: "EUR",
                minimum: d("5"),
                hold: d("20"),
                at: NOV_10,
            },
        )
    })
}

fn available(s: &SharedStore, driver: &str) -> Decimal {
    s.snapshot(|tx| payments::available(tx, driver, "EUR")).unwrap()
}

#[test]
fn the_wallet_holds_at_start_captures_with_the_cdr_and_releases() {
    let (_d, s) = store();
    // Empty wallet: refused with the reason.
    let e = authorize(&s, &Wallet, "drv-a", "tx-0").unwrap_err();
    assert!(
        matches!(&e, LedgerError::Declined(m) if m.contains("insufficient funds")),
        "{e}"
    );
    // Top-ups are idempotent by reference.
    let bal = s
        .transact(|tx| payments::top_up(tx, "drv-a", "EUR", d("30"), "pay-1", NOV_10))
        .unwrap();
    assert_eq!(bal, d("30"));
    assert!(
        s.transact(|tx| payments::top_up(tx, "drv-a", "EUR", d("30"), "pay-1", NOV_10))
            .is_err()
    );
    let bad = s.transact(|tx| payments::top_up(tx, "drv-a", "EUR", d("0.001"), "pay-x", NOV_10));
    assert!(matches!(bad, Err(LedgerError::Invalid(_))), "{bad:?}");

    // A start holds 20; a second start can only hold the 10 left; a third
    // is refused (less than the 5 minimum available).
    assert_eq!(authorize(&s, &Wallet, "drv-a", "tx-1").unwrap().amount, d("20"));
    assert_eq!(
        authorize(&s, &Wallet, "drv-a", "tx-1").unwrap().amount,
        d("20"),
        "idempotent"
    );
    assert_eq!(authorize(&s, &Wallet, "drv-a", "tx-2").unwrap().amount, d("10"));
    assert_eq!(available(&s, "drv-a"), Decimal::ZERO);
    assert!(matches!(
        authorize(&s, &Wallet, "drv-a", "tx-3"),
        Err(LedgerError::Declined(_))
    ));
    // Paying out more than is available is refused.
    assert!(matches!(
        s.transact(|tx| payments::top_up(tx, "drv-a", "EUR", d("-1"), "out-1", NOV_10)),
        Err(LedgerError::Declined(_))
    ));

    // tx-1 ends: 10 kWh = 0.60 + 2.75 = 3.35, taken from the wallet as the
    // CDR posts; the rest of its hold is free again.
    let c1 = cdr("tx-1", "drv-a", 10, NOV_10);
    assert_eq!(c1.total_incl_vat, d("3.35"));
    assert!(s.transact(|tx| cdr::record(tx, &c1)).unwrap());
    assert!(!s.transact(|tx| cdr::record(tx, &c1)).unwrap(), "recorded once");
    let bal = s.snapshot(|tx| payments::wallet_balance(tx, "drv-a", "EUR")).unwrap();
    assert_eq!(bal, d("26.65"));
    assert_eq!(available(&s, "drv-a"), d("16.65"), "26.65 less tx-2's hold of 10");
    assert_eq!(s.snapshot(|tx| payments::captured(tx, "tx-1")).unwrap(), d("3.35"));
    // tx-2 never cost anything: released.
    s.transact(|tx| Wallet.release(tx, "tx-2")).unwrap();
    assert_eq!(available(&s, "drv-a"), d("26.65"));
    // The receivable of tx-1 is settled; the wallet is a liability.
    let bals = ledger::balances(s.as_ref()).unwrap();
    let of = |acct: &str| bals.iter().find(|b| b.1 == acct).map(|b| b.2).unwrap_or(0);
    assert_eq!(of("receivable:drv-a"), 0);
    assert_eq!(of("wallet:drv-a"), -2665);
    verify_clean(&s);

    // A refund to the wallet: a reversing posting, then money back.
    ledger::refund(s.as_ref(), "tx-1", "charger fault").unwrap();
    s.transact(|tx| Wallet.refund(tx, &c1, c1.total_incl_vat, "charger fault"))
        .unwrap();
    assert_eq!(
        s.snapshot(|tx| payments::wallet_balance(tx, "drv-a", "EUR")).unwrap(),
        d("30")
    );
    verify_clean(&s);
}

#[test]
fn a_wallet_short_of_the_cost_pays_what_it_has_and_the_rest_stays_receivable() {
    let (_d, s) = store();
    s.transact(|tx| payments::top_up(tx, "drv-b", "EUR", d("6"), "pay-1", NOV_10))
        .unwrap();
    authorize(&s, &Wallet, "drv-b", "tx-big").unwrap();
    // 40 kWh: 0.60 + 11.00 = 11.60.
    s.transact(|tx| cdr::record(tx, &cdr("tx-big", "drv-b", 40, NOV_10)))
        .unwrap();
    let bals = ledger::balances(s.as_ref()).unwrap();
    let of = |acct: &str| bals.iter().find(|b| b.1 == acct).map(|b| b.2).unwrap_or(0);
    assert_eq!(of("wallet:drv-b"), 0);
    assert_eq!(of("receivable:drv-b"), 560);
    verify_clean(&s);
}

#[test]
fn card_payments_are_recorded_for_the_payment_provider() {
    let (_d, s) = store();
    let h = authorize(&s, &CardIntents, "drv-c", "tx-card").unwrap();
    assert_eq!(h.amount, d("20"));
    s.transact(|tx| cdr::record(tx, &cdr("tx-card", "drv-c", 10, NOV_10)))
        .unwrap();
    let i = payments::intent(s.as_ref(), "tx-card").unwrap().unwrap();
    assert_eq!((i.status, i.captured), (payments::IntentStatus::Captured, d("3.35")));
    let c = cdr::get_cdr(s.as_ref(), "tx-card").unwrap().unwrap();
    let too_much = s.transact(|tx| CardIntents.refund(tx, &c, d("5"), "x"));
    assert!(matches!(too_much, Err(LedgerError::Invalid(_))));
    s.transact(|tx| CardIntents.refund(tx, &c, d("1"), "x")).unwrap();
    verify_clean(&s);
}

fn plan(id: &str) -> Plan {
    Plan {
        id: id.into(),
        name: "Commuter".into(),
        currency: "EUR".into(),
        monthly_fee: d("9.90"),
        vat_percent: d("25"),
        included_kwh: d("20"),
        discount_percent: d("10"),
        tariff_id: None,
        created_at: 0,
    }
}

#[test]
fn plans_are_validated_and_never_edited() {
    let (_d, s) = store();
    let mut p = plan("commuter");
    p.discount_percent = d("120");
    let e = subscriptions::create_plan(s.as_ref(), &p).unwrap_err();
    assert!(e.to_string().contains("discount_percent 120"), "{e}");
    p = plan("bad id!");
    assert!(
        subscriptions::create_plan(s.as_ref(), &p)
            .unwrap_err()
            .to_string()
            .contains("plan id")
    );
    p = plan("commuter");
    p.tariff_id = Some("nope".into());
    assert!(matches!(
        subscriptions::create_plan(s.as_ref(), &p),
        Err(LedgerError::NotFound(_))
    ));
    subscriptions::create_plan(s.as_ref(), &plan("commuter")).unwrap();
    assert!(matches!(
        subscriptions::create_plan(s.as_ref(), &plan("commuter")),
        Err(LedgerError::Precondition(_))
    ));
    assert!(matches!(
        subscriptions::subscribe(s.as_ref(), "drv-x", "gold", NOV_10),
        Err(LedgerError::NotFound(_))
    ));
}

#[test]
fn invoices_prorate_fees_credit_included_energy_and_discounts_with_an_exact_vat_summary() {
    let (_d, s) = store();
    subscriptions::create_plan(s.as_ref(), &plan("commuter")).unwrap();
    let nov = Period::parse("2026-11").unwrap();
    // Subscribed from 16 November: 15 of 30 days.
    let from = nov.start() + 15 * 86_400;
    subscriptions::subscribe(s.as_ref(), "drv-s", "commuter", from).unwrap();
    // Two sessions: 15 kWh and 10 kWh (20 kWh included × ½ month = 10 kWh).
    s.transact(|tx| cdr::record(tx, &cdr("tx-s1", "drv-s", 15, from + 86_400)))
        .unwrap();
    s.transact(|tx| cdr::record(tx, &cdr("tx-s2", "drv-s", 10, from + 2 * 86_400)))
        .unwrap();
    // Another month's session is not on it.
    s.transact(|tx| cdr::record(tx, &cdr("tx-dec", "drv-s", 10, nov.end() + 3600)))
        .unwrap();

    let inv = invoices::run(s.as_ref(), "drv-s", nov, NOV_10).unwrap();
    assert_eq!(inv.number, "INV-2026-000001");
    let amounts = |k: LineKind| -> Vec<(Decimal, Decimal, Decimal)> {
        inv.lines
            .iter()
            .filter(|l| l.kind == k)
            .map(|l| (l.vat_percent, l.excl_vat, l.incl_vat))
            .collect()
    };
    // tx-s1: 0.50 + 3.75 = 4.25 excl; 0.60 + 4.125 → 4.73 incl (split by rate).
    // tx-s2: 0.50 + 2.50 = 3.00 excl; 0.60 + 2.75 = 3.35 incl.
    assert_eq!(
        amounts(LineKind::Session),
        vec![
            (d("10"), d("3.75"), d("4.13")),
            (d("20"), d("0.50"), d("0.60")),
            (d("10"), d("2.50"), d("2.75")),
            (d("20"), d("0.50"), d("0.60")),
        ]
    );
    // Fee: 9.90 × ½ = 4.95 + 25 % = 6.19 (1.2375 VAT → 1.24).
    assert_eq!(amounts(LineKind::Subscription), vec![(d("25"), d("4.95"), d("6.19"))]);
    // Included: 10 kWh of tx-s1's 15 → ⅔ of its energy: 2.50 / 2.75.
    assert_eq!(
        amounts(LineKind::IncludedEnergy),
        vec![(d("10"), d("-2.50"), d("-2.75"))]
    );
    // 10 % off what is left: tx-s1 (10 %: 1.25 net / 1.375 gross; 20 %:
    // 0.50 / 0.60), tx-s2 (2.50 / 2.75; 0.50 / 0.60).
    assert_eq!(
        amounts(LineKind::Discount),
        vec![
            (d("10"), d("-0.13"), d("-0.14")),
            (d("20"), d("-0.05"), d("-0.06")),
            (d("10"), d("-0.25"), d("-0.28")),
            (d("20"), d("-0.05"), d("-0.06")),
        ]
    );
    // The VAT summary adds up to the lines, per rate and in total.
    let sum = |f: fn(&invoices::VatRow) -> Decimal| inv.vat_summary.iter().map(f).sum::<Decimal>();
    assert_eq!(sum(|r| r.net), inv.total_excl_vat);
    assert_eq!(sum(|r| r.gross), inv.total_incl_vat);
    assert_eq!(sum(|r| r.vat), inv.total_vat);
    let ten = inv.vat_summary.iter().find(|r| r.vat_percent == d("10")).unwrap();
    assert_eq!((ten.net, ten.gross), (d("3.37"), d("3.71")));
    assert_eq!(
        inv.total_incl_vat,
        d("4.73") + d("3.35") + d("6.19") - d("2.75") - d("0.54")
    );
    assert_eq!(inv.amount_due, inv.total_incl_vat, "nothing was paid by wallet");
    // The fee and credits are in the ledger; the receivable is what is due.
    verify_clean(&s);
    let bals = ledger::balances(s.as_ref()).unwrap();
    let rec = bals.iter().find(|b| b.1 == "receivable:drv-s").unwrap().2;
    // December's session is receivable too, but not on this invoice.
    let dec = cdr::get_cdr(s.as_ref(), "tx-dec").unwrap().unwrap();
    assert_eq!(Decimal::new(rec, 2), inv.amount_due + dec.total_incl_vat);

    // Running it again gives the same invoice and posts nothing more.
    let again = invoices::run(s.as_ref(), "drv-s", nov, NOV_10 + 60).unwrap();
    assert_eq!(again, inv);
    verify_clean(&s);
    let html = invoices::render_html(&inv, "Laddnet Demo CPO <b>AB</b>");
    assert!(html.contains("INV-2026-000001") && html.contains("Laddnet Demo CPO &lt;b&gt;AB&lt;/b&gt;"));
    assert!(html.contains("Amount due"));
}

#[test]
fn invoice_numbers_have_no_gaps_and_nothing_is_invoiced_twice() {
    let (_d, s) = store();
    let nov = Period::parse("2026-11").unwrap();
    for i in 0..5 {
        let drv = format!("drv-{i}");
        s.transact(|tx| cdr::record(tx, &cdr(&format!("tx-{i}"), &drv, 5, NOV_10 + i)))
            .unwrap();
    }
    // An account with nothing to invoice takes no number.
    assert!(matches!(
        invoices::run(s.as_ref(), "drv-none", nov, NOV_10),
        Err(LedgerError::Precondition(_))
    ));
    let all = invoices::run_all(s.as_ref(), nov, NOV_10).unwrap();
    let numbers: Vec<String> = all.iter().map(|i| i.number.clone()).collect();
    assert_eq!(numbers, (1..=5).map(|n| format!("INV-2026-{n:06}")).collect::<Vec<_>>());
    // A second run changes nothing; the next year starts at 1.
    assert_eq!(invoices::run_all(s.as_ref(), nov, NOV_10).unwrap(), all);
    let jan = Period::parse("2027-01").unwrap();
    s.transact(|tx| cdr::record(tx, &cdr("tx-jan", "drv-0", 5, jan.start() + 10)))
        .unwrap();
    assert_eq!(
        invoices::run(s.as_ref(), "drv-0", jan, jan.start()).unwrap().number,
        "INV-2027-000001"
    );
    assert_eq!(invoices::list(s.as_ref(), Some("drv-0")).unwrap().len(), 2);
    assert_eq!(invoices::list(s.as_ref(), None).unwrap().len(), 6);
    for bad in ["2026-13", "26-11", "2026/11", "", "2026-1x", "2026-+1", "+202-11"] {
        assert!(Period::parse(bad).is_err(), "{bad}");
    }
    verify_clean(&s);
}

#[test]
fn wallet_payments_show_on_the_invoice() {
    let (_d, s) = store();
    s.transact(|tx| payments::top_up(tx, "drv-w", "EUR", d("50"), "p", NOV_10))
        .unwrap();
    authorize(&s, &Wallet, "drv-w", "tx-w").unwrap();
    s.transact(|tx| cdr::record(tx, &cdr("tx-w", "drv-w", 10, NOV_10)))
        .unwrap();
    let inv = invoices::run(s.as_ref(), "drv-w", Period::parse("2026-11").unwrap(), NOV_10).unwrap();
    assert_eq!(
        (inv.total_incl_vat, inv.paid, inv.amount_due),
        (d("3.35"), d("3.35"), Decimal::ZERO)
    );
}
