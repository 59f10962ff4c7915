//! Invoices per driver account and calendar month (UTC).
//!
//! An invoice gathers the month's posted CDRs of the driver (one line per
//! session and VAT rate, summing exactly to each CDR's totals), the
//! subscription fee prorated by the days subscribed, the included energy
//! and the plan's discount as credit lines, a VAT summary, and what the
//! wallet already paid. Numbers are `INV-<year>-<nnnnnn>`, taken from a
//! per-year counter in the transaction that writes the invoice, so they
//! have no gaps and no duplicates. The fee and the credits are posted to
//! the ledger in that same transaction; a CDR is on one invoice only, and a
//! second run for the same account and month returns the first invoice.
//!
//! | key | value |
//! |---|---|
//! | `("invoice", number)` | [`Invoice`] |
//! | `("invoice-seq", year)` | u64 decimal: the last number used |
//! | `("invoice-for", driver, "YYYY-MM")` | the number |
//! | `("invoice-by-driver", driver, number)` | empty |
//! | `("cdr-invoiced", cdr)` | the number |

use std::collections::BTreeMap;
use std::fmt::Write as _;

use laddnet_core::tariff::{Dimension, currency_exponent};
use laddnet_store::{Store, StoreExt, Transaction, keys};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::cdr::Cdr;
use crate::ledger::{self, Side, VAT_ACCOUNT, to_minor};
use crate::subscriptions::{self, Plan, Subscription};
use crate::{LedgerError, get, put};

pub const SUBSCRIPTION_REVENUE: &str = "revenue:subscriptions";
pub const DISCOUNTS: &str = "revenue:discounts";

/// A calendar month, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Period {
    pub year: i32,
    pub month: u8,
}

impl Period {
    /// `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        let bad = || LedgerError::Invalid(format!("period {s:?}: expected YYYY-MM, e.g. 2026-11"));
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 || !y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u8 = m.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) || !(2000..=9999).contains(&year) {
            return Err(bad());
        }
        Ok(Period { year, month })
    }

    fn first_day(self, year: i32, month: u8) -> i64 {
        let m = time::Month::try_from(month).unwrap_or(time::Month::January);
        time::Date::from_calendar_date(year, m, 1)
            .map(|d| d.midnight().assume_utc().unix_timestamp())
            .unwrap_or(0)
    }

    /// Unix seconds of the first instant.
    pub fn start(self) -> i64 {
        self.first_day(self.year, self.month)
    }

    /// Unix seconds of the first instant of the next month.
    pub fn end(self) -> i64 {
        if self.month == 12 {
            self.first_day(self.year + 1, 1)
        } else {
            self.first_day(self.year, self.month + 1)
        }
    }

    /// The share of the month `[from, until)` covers.
    fn share(self, from: i64, until: Option<i64>) -> Decimal {
        let (s, e) = (self.start(), self.end());
        let a = from.max(s);
        let b = until.unwrap_or(e).min(e);
        if b <= a {
            return Decimal::ZERO;
        }
        Decimal::from(b - a) / Decimal::from(e - s)
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LineKind {
    Session,
    Subscription,
    IncludedEnergy,
    Discount,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLine {
    pub kind: LineKind,
    /// The CDR (session, credits) or plan (subscription).
    pub reference: String,
    pub description: String,
    pub quantity: Decimal,
    pub unit: String,
    pub vat_percent: Decimal,
    pub excl_vat: Decimal,
    pub vat: Decimal,
    pub incl_vat: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VatRow {
    pub vat_percent: Decimal,
    pub net: Decimal,
    pub vat: Decimal,
    pub gross: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub number: String,
    /// The pseudonymous account id.
    pub driver: String,
    pub period: String,
    pub currency: String,
    /// Unix seconds.
    pub issued_at: i64,
    pub lines: Vec<InvoiceLine>,
    pub vat_summary: Vec<VatRow>,
    pub total_excl_vat: Decimal,
    pub total_vat: Decimal,
    pub total_incl_vat: Decimal,
    /// Already paid (wallet captures, card payments) for these sessions.
    pub paid: Decimal,
    pub amount_due: Decimal,
}

fn round(d: Decimal, currency: &str) -> Decimal {
    d.round_dp_with_strategy(currency_exponent(currency), RoundingStrategy::MidpointAwayFromZero)
}

/// A CDR's (rate -> (excl, incl)) split, summing exactly to its totals.
fn split_by_rate(cdr: &Cdr) -> Vec<(Decimal, Decimal, Decimal)> {
    let mut by: BTreeMap<Decimal, (Decimal, Decimal)> = BTreeMap::new();
    for l in &cdr.lines {
        let e = by.entry(l.vat.unwrap_or(Decimal::ZERO).normalize()).or_default();
        e.0 += l.excl_vat;
        e.1 += l.incl_vat;
    }
    if by.is_empty() {
        by.insert(Decimal::ZERO, (cdr.total_excl_vat, cdr.total_incl_vat));
    }
    let n = by.len();
    let (mut excl_left, mut incl_left) = (cdr.total_excl_vat, cdr.total_incl_vat);
    let mut out = Vec::new();
    for (i, (rate, (excl, incl))) in by.into_iter().enumerate() {
        let (e, g) = if i + 1 == n {
            (excl_left, incl_left)
        } else {
            (round(excl, &cdr.currency), round(incl, &cdr.currency))
        };
        excl_left -= e;
        incl_left -= g;
        out.push((rate, e, g));
    }
    out
}

/// A CDR's energy cost per rate (excl, incl), unrounded.
fn energy_cost(cdr: &Cdr) -> BTreeMap<Decimal, (Decimal, Decimal)> {
    let mut by: BTreeMap<Decimal, (Decimal, Decimal)> = BTreeMap::new();
    for l in cdr.lines.iter().filter(|l| l.dimension == Dimension::Energy) {
        let e = by.entry(l.vat.unwrap_or(Decimal::ZERO).normalize()).or_default();
        e.0 += l.excl_vat;
        e.1 += l.incl_vat;
    }
    by
}

/// `amounts`: (VAT rate, excl. VAT, incl. VAT).
fn line(
    kind: LineKind,
    reference: &str,
    description: String,
    quantity: Decimal,
    unit: &str,
    (rate, excl, incl): (Decimal, Decimal, Decimal),
) -> InvoiceLine {
    InvoiceLine {
        kind,
        reference: reference.into(),
        description,
        quantity,
        unit: unit.into(),
        vat_percent: rate,
        excl_vat: excl,
        vat: incl - excl,
        incl_vat: incl,
    }
}

fn fmt_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_default()
}

/// Posted CDRs of `driver` that stopped in `period`, in stop order.
fn period_cdrs(store: &dyn Store, driver: &str, period: Period) -> Result<Vec<Cdr>, LedgerError> {
    Ok(crate::cdr::between(store, period.start() * 1000, period.end() * 1000)?
        .into_iter()
        .filter(|c| c.driver_ref.as_deref() == Some(driver))
        .filter(|c| !c.review_required || c.approved)
        .collect())
}

/// Invoices `driver` for `period`, or returns the invoice made before.
pub fn run(store: &dyn Store, driver: &str, period: Period, at: i64) -> Result<Invoice, LedgerError> {
    let cdrs = period_cdrs(store, driver, period)?;
    let subs: Vec<(Subscription, Plan)> = store
        .snapshot(|tx| subscriptions::history(tx, driver))?
        .into_iter()
        .filter(|s| period.share(s.from, s.until) > Decimal::ZERO)
        .map(|s| subscriptions::get_plan(store, &s.plan_id).map(|p| (s, p)))
        .collect::<Result<_, _>>()?;
    let p = period.to_string();
    store.transact(|tx| {
        if let Some(n) = tx.get(&keys::pack(&("invoice-for", driver, p.as_str())))? {
            let n = String::from_utf8_lossy(&n).into_owned();
            return get(tx, &keys::pack(&("invoice", n.as_str())))?
                .ok_or_else(|| LedgerError::Corrupted(format!("invoice {n} is missing")));
        }
        let currency = subs
            .first()
            .map(|(_, p)| p.currency.clone())
            .or_else(|| cdrs.first().map(|c| c.currency.clone()))
            .ok_or_else(|| LedgerError::Precondition(format!("nothing to invoice for {driver} in {p}")))?;
        let mut lines = Vec::new();
        let mut sessions = Vec::new();
        for c in cdrs.iter().filter(|c| c.currency == currency) {
            if tx.get(&keys::pack(&("cdr-invoiced", c.id.as_str())))?.is_some() {
                continue;
            }
            sessions.push(c);
            let kwh = Decimal::from(c.energy_wh) / Decimal::from(1000);
            for (rate, excl, incl) in split_by_rate(c) {
                lines.push(line(
                    LineKind::Session,
                    &c.id,
                    format!("Charging at {}, {}", c.charger_id, fmt_time(c.start_ms)),
                    kwh,
                    "kWh",
                    (rate, excl, incl),
                ));
            }
        }
        // Subscription fees, and what the plans give back.
        let (mut included_wh, mut discount) = (Decimal::ZERO, Decimal::ZERO);
        for (s, plan) in subs.iter().filter(|(_, p)| p.currency == currency) {
            let share = period.share(s.from, s.until);
            let fee = round(plan.monthly_fee * share, &currency);
            let vat = round(fee * plan.vat_percent / Decimal::from(100), &currency);
            if !fee.is_zero() {
                lines.push(line(
                    LineKind::Subscription,
                    &plan.id,
                    format!(
                        "Subscription {} ({}% of the month)",
                        plan.name,
                        (share * Decimal::from(100)).round_dp(1).normalize()
                    ),
                    share.round_dp(4),
                    "month",
                    (plan.vat_percent.normalize(), fee, fee + vat),
                ));
            }
            included_wh += plan.included_kwh * Decimal::from(1000) * share;
            discount = discount.max(plan.discount_percent);
        }
        let mut credits: Vec<InvoiceLine> = Vec::new();
        for c in &sessions {
            let mut covered = Decimal::ZERO;
            if included_wh > Decimal::ZERO && c.energy_wh > 0 {
                covered = included_wh.min(Decimal::from(c.energy_wh));
                included_wh -= covered;
                let share = covered / Decimal::from(c.energy_wh);
                for (rate, (excl, incl)) in energy_cost(c) {
                    let (e, g) = (round(excl * share, &currency), round(incl * share, &currency));
                    if !g.is_zero() {
                        credits.push(line(
                            LineKind::IncludedEnergy,
                            &c.id,
                            format!("Included energy, {}", c.charger_id),
                            (covered / Decimal::from(1000)).round_dp(3),
                            "kWh",
                            (rate, -e, -g),
                        ));
                    }
                }
            }
            if discount > Decimal::ZERO {
                let share = Decimal::ONE - covered / Decimal::from(c.energy_wh.max(1));
                let energy = energy_cost(c);
                for (rate, excl, incl) in split_by_rate(c) {
                    // The discount applies to what the included energy left.
                    let (ee, eg) = energy.get(&rate).copied().unwrap_or_default();
                    let (base_e, base_g) = (excl - ee * (Decimal::ONE - share), incl - eg * (Decimal::ONE - share));
                    let pct = discount / Decimal::from(100);
                    let (e, g) = (round(base_e * pct, &currency), round(base_g * pct, &currency));
                    if !g.is_zero() {
                        credits.push(line(
                            LineKind::Discount,
                            &c.id,
                            format!("Subscription discount {}%", discount.normalize()),
                            discount.normalize(),
                            "%",
                            (rate, -e, -g),
                        ));
                    }
                }
            }
        }
        lines.extend(credits);
        if lines.is_empty() {
            return Err(LedgerError::Precondition(format!(
                "nothing to invoice for {driver} in {p}"
            )));
        }
        let mut summary: BTreeMap<Decimal, VatRow> = BTreeMap::new();
        for l in &lines {
            let r = summary.entry(l.vat_percent).or_insert(VatRow {
                vat_percent: l.vat_percent,
                net: Decimal::ZERO,
                vat: Decimal::ZERO,
                gross: Decimal::ZERO,
            });
            r.net += l.excl_vat;
            r.vat += l.vat;
            r.gross += l.incl_vat;
        }
        let total_excl: Decimal = lines.iter().map(|l| l.excl_vat).sum();
        let total_incl: Decimal = lines.iter().map(|l| l.incl_vat).sum();
        let mut paid = Decimal::ZERO;
        for c in &sessions {
            paid += crate::payments::paid(tx, &c.id)?;
        }
        // The number: next in the year's sequence, in this transaction.
        let year = period.year.to_string();
        let seq_key = keys::pack(&("invoice-seq", year.as_str()));
        let last: u64 = tx
            .get(&seq_key)?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()))
            .unwrap_or(0);
        let number = format!("INV-{year}-{:06}", last + 1);
        tx.set(&seq_key, (last + 1).to_string().as_bytes())?;
        let inv = Invoice {
            number: number.clone(),
            driver: driver.into(),
            period: p.clone(),
            currency: currency.clone(),
            issued_at: at,
            vat_summary: summary.into_values().collect(),
            total_excl_vat: total_excl,
            total_vat: total_incl - total_excl,
            total_incl_vat: total_incl,
            paid,
            amount_due: total_incl - paid,
            lines,
        };
        post_invoice(tx, &inv)?;
        put(tx, &keys::pack(&("invoice", number.as_str())), &inv)?;
        tx.set(&keys::pack(&("invoice-for", driver, p.as_str())), number.as_bytes())?;
        tx.set(&keys::pack(&("invoice-by-driver", driver, number.as_str())), b"")?;
        for c in &sessions {
            tx.set(&keys::pack(&("cdr-invoiced", c.id.as_str())), number.as_bytes())?;
        }
        Ok(inv)
    })
}

/// Fees raise the receivable; credits lower it (with their VAT).
fn post_invoice(tx: &mut dyn Transaction, inv: &Invoice) -> Result<(), LedgerError> {
    let receivable = format!("receivable:{}", inv.driver);
    let c = &inv.currency;
    let sum = |kinds: &[LineKind]| -> Result<(i64, i64), LedgerError> {
        let (mut e, mut g) = (0i64, 0i64);
        for l in inv.lines.iter().filter(|l| kinds.contains(&l.kind)) {
            e += to_minor(l.excl_vat, c)?;
            g += to_minor(l.incl_vat, c)?;
        }
        Ok((e, g))
    };
    let (fe, fg) = sum(&[LineKind::Subscription])?;
    if fg != 0 {
        let memo = format!("subscription fees, invoice {}", inv.number);
        ledger::post(
            tx,
            &format!("invoice-fee:{}", inv.number),
            c,
            &[
                (receivable.clone(), Side::Debit, fg, memo.clone()),
                (SUBSCRIPTION_REVENUE.to_string(), Side::Credit, fe, memo.clone()),
                (VAT_ACCOUNT.to_string(), Side::Credit, fg - fe, memo),
            ],
            inv.issued_at,
        )?;
    }
    let (ce, cg) = sum(&[LineKind::IncludedEnergy, LineKind::Discount])?;
    if cg != 0 {
        let memo = format!("subscription credits, invoice {}", inv.number);
        ledger::post(
            tx,
            &format!("invoice-credit:{}", inv.number),
            c,
            &[
                (DISCOUNTS.to_string(), Side::Debit, -ce, memo.clone()),
                (VAT_ACCOUNT.to_string(), Side::Debit, ce - cg, memo.clone()),
                (receivable, Side::Credit, -cg, memo),
            ],
            inv.issued_at,
        )?;
    }
    Ok(())
}

/// Invoices every account with posted sessions or a subscription in
/// `period`; accounts with nothing to invoice are skipped.
pub fn run_all(store: &dyn Store, period: Period, at: i64) -> Result<Vec<Invoice>, LedgerError> {
    let mut drivers: std::collections::BTreeSet<String> =
        crate::cdr::between(store, period.start() * 1000, period.end() * 1000)?
            .into_iter()
            .filter_map(|c| c.driver_ref)
            .collect();
    drivers.extend(subscriptions::subscribers(store)?);
    let mut out = Vec::new();
    for d in drivers {
        match run(store, &d, period, at) {
            Ok(i) => out.push(i),
            Err(LedgerError::Precondition(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

pub fn get_invoice(store: &dyn Store, number: &str) -> Result<Invoice, LedgerError> {
    store
        .snapshot(|tx| get(tx, &keys::pack(&("invoice", number))))?
        .ok_or_else(|| LedgerError::NotFound(format!("invoice {number}")))
}

/// Invoices, by number; only the driver's when given.
pub fn list(store: &dyn Store, driver: Option<&str>) -> Result<Vec<Invoice>, LedgerError> {
    let numbers: Vec<String> = store.snapshot(|tx| match driver {
        Some(d) => {
            let (b, e) = keys::tuple_range(&("invoice-by-driver", d));
            tx.get_range(&b, &e, 0, false)?
                .into_iter()
                .map(|(k, _)| {
                    keys::unpack::<(String, String, String)>(&k)
                        .map(|t| t.2)
                        .map_err(|e| LedgerError::Corrupted(format!("{e:?}")))
                })
                .collect()
        }
        None => {
            let (b, e) = keys::tuple_range(&("invoice",));
            tx.get_range(&b, &e, 0, false)?
                .into_iter()
                .map(|(k, _)| {
                    keys::unpack::<(String, String)>(&k)
                        .map(|t| t.1)
                        .map_err(|e| LedgerError::Corrupted(format!("{e:?}")))
                })
                .collect()
        }
    })?;
    numbers.iter().map(|n| get_invoice(store, n)).collect()
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A self-contained HTML page (no scripts, no external resources).
pub fn render_html(inv: &Invoice, seller: &str) -> String {
    let c = esc(&inv.currency);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Invoice {n}</title>\n\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}\
td,th{{border-bottom:1px solid #ccc;padding:4px 8px;text-align:left}}td.n,th.n{{text-align:right}}</style></head><body>\n\
<h1>Invoice {n}</h1>\n<p>{seller}<br>Account: {d}<br>Period: {p}<br>Issued: {issued}</p>\n\
<table><thead><tr><th>Description</th><th class=\"n\">Quantity</th><th class=\"n\">VAT %</th>\
<th class=\"n\">Net ({c})</th><th class=\"n\">VAT ({c})</th><th class=\"n\">Total ({c})</th></tr></thead><tbody>\n",
        n = esc(&inv.number),
        seller = esc(seller),
        d = esc(&inv.driver),
        p = esc(&inv.period),
        issued = esc(&fmt_time(inv.issued_at * 1000)),
    );
    for l in &inv.lines {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"n\">{} {}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&l.description),
            l.quantity.normalize(),
            esc(&l.unit),
            l.vat_percent,
            l.excl_vat,
            l.vat,
            l.incl_vat
        );
    }
    h.push_str("</tbody></table>\n<h2>VAT summary</h2>\n<table><thead><tr><th class=\"n\">VAT %</th><th class=\"n\">Net</th><th class=\"n\">VAT</th><th class=\"n\">Gross</th></tr></thead><tbody>\n");
    for r in &inv.vat_summary {
        let _ = writeln!(
            h,
            "<tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            r.vat_percent, r.net, r.vat, r.gross
        );
    }
    let _ = write!(
        h,
        "</tbody></table>\n<p>Total excl. VAT: {e} {c}<br>VAT: {v} {c}<br><strong>Total: {g} {c}</strong><br>\
Already paid: {paid} {c}<br><strong>Amount due: {due} {c}</strong></p>\n</body></html>\n",
        e = inv.total_excl_vat,
        v = inv.total_vat,
        g = inv.total_incl_vat,
        paid = inv.paid,
        due = inv.amount_due,
    );
    h
}
