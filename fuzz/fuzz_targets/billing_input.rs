//! Billing input from operators: invoice periods, plan definitions (every
//! field as text, as laddctl and gRPC hand them over), and rendering an
//! invoice whose texts are arbitrary (the HTML must stay escaped).
#![no_main]
use laddnet_ledger::invoices::{Invoice, InvoiceLine, LineKind, Period, render_html};
use laddnet_ledger::subscriptions::Plan;
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = Period::parse(&text) {
        assert!(p.start() < p.end());
        assert_eq!(p.to_string(), text.trim());
    }
    let mut parts = text.split('|');
    let mut next = || parts.next().unwrap_or_default().to_string();
    let dec = |s: String| s.parse::<Decimal>().unwrap_or_default();
    let plan = Plan {
        id: next(),
        name: next(),
        currency: next(),
        monthly_fee: dec(next()),
        vat_percent: dec(next()),
        included_kwh: dec(next()),
        discount_percent: dec(next()),
        tariff_id: Some(next()),
        created_at: 0,
    };
    let _ = plan.validate();
    let inv = Invoice {
        number: plan.id.clone(),
        driver: plan.name.clone(),
        period: plan.currency.clone(),
        currency: plan.currency.clone(),
        issued_at: i64::from(data.first().copied().unwrap_or(0)) << 40,
        lines: vec![InvoiceLine {
            kind: LineKind::Session,
            reference: text.to_string(),
            description: text.to_string(),
            quantity: plan.monthly_fee,
            unit: plan.name.clone(),
            vat_percent: plan.vat_percent,
            excl_vat: plan.included_kwh,
            vat: plan.discount_percent,
            incl_vat: plan.monthly_fee,
        }],
        vat_summary: vec![],
        total_excl_vat: Decimal::ZERO,
        total_vat: Decimal::ZERO,
        total_incl_vat: Decimal::ZERO,
        paid: Decimal::ZERO,
        amount_due: Decimal::ZERO,
    };
    let html = render_html(&inv, &text);
    assert!(!html.contains("<script"), "unescaped input in the invoice page");
});
