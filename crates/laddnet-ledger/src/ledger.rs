//! The double-entry revenue ledger.
//!
//! | key | value |
//! |---|---|
//! | `("ledger", "entry", posting, n)` | [`Entry`] |
//! | `("ledger", "balance", currency, account)` | i64 (little endian, atomic add) |
//! | `("ledger", "posted", posting)` | empty: the posting's idempotency key |
//!
//! A CDR posts: debit the driver's receivable (incl. VAT), credit the
//! site's revenue (excl. VAT), credit VAT payable (the difference). Balances
//! are debits minus credits, so every currency's balances sum to zero.

use std::collections::BTreeMap;

use laddnet_core::tariff::currency_exponent;
use laddnet_store::{Store, StoreExt, Transaction, keys};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::cdr::Cdr;
use crate::{LedgerError, get, put};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Debit,
    Credit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub posting: String,
    pub n: u32,
    pub account: String,
    pub currency: String,
    pub side: Side,
    /// Minor units, positive.
    pub amount: i64,
    pub at: i64,
    pub memo: String,
}

/// An amount in the currency's minor units (it is already rounded there).
pub fn to_minor(d: Decimal, currency: &str) -> Result<i64, LedgerError> {
    let scaled = d * Decimal::from(10i64.pow(currency_exponent(currency)));
    if scaled.fract() != Decimal::ZERO {
        return Err(LedgerError::Invalid(format!(
            "{d} has more decimals than {currency} allows"
        )));
    }
    i64::try_from(scaled).map_err(|_| LedgerError::Invalid(format!("{d} is out of range")))
}

pub fn from_minor(m: i64, currency: &str) -> Decimal {
    Decimal::new(m, currency_exponent(currency))
}

pub(crate) fn post(
    tx: &mut dyn Transaction,
    posting: &str,
    currency: &str,
    lines: &[(String, Side, i64, String)],
    at: i64,
) -> Result<bool, LedgerError> {
    if !tx.claim_once(&keys::pack(&("ledger", "posted", posting)))? {
        return Ok(false);
    }
    let (debits, credits): (i64, i64) = lines.iter().fold((0, 0), |(d, c), l| match l.1 {
        Side::Debit => (d + l.2, c),
        Side::Credit => (d, c + l.2),
    });
    if debits != credits {
        return Err(LedgerError::Corrupted(format!(
            "posting {posting} does not balance: {debits} ≠ {credits}"
        )));
    }
    for (n, (account, side, amount, memo)) in lines.iter().enumerate() {
        if *amount == 0 {
            continue;
        }
        let e = Entry {
            posting: posting.into(),
            n: n as u32,
            account: account.clone(),
            currency: currency.into(),
            side: *side,
            amount: *amount,
            at,
            memo: memo.clone(),
        };
        put(tx, &keys::pack(&("ledger", "entry", posting, n as i64)), &e)?;
        let delta = if *side == Side::Debit { *amount } else { -*amount };
        tx.atomic_add(&keys::pack(&("ledger", "balance", currency, account.as_str())), delta)?;
    }
    Ok(true)
}

/// An account's balance inside a transaction (debits minus credits,
/// minor units).
pub fn balance_in(tx: &mut dyn Transaction, currency: &str, account: &str) -> Result<i64, LedgerError> {
    Ok(tx
        .get(&keys::pack(&("ledger", "balance", currency, account)))?
        .map(|v| {
            let mut buf = [0u8; 8];
            buf[..v.len().min(8)].copy_from_slice(&v[..v.len().min(8)]);
            i64::from_le_bytes(buf)
        })
        .unwrap_or(0))
}

pub fn receivable_account(cdr: &Cdr) -> String {
    format!("receivable:{}", cdr.driver_ref.as_deref().unwrap_or("unassigned"))
}

pub fn revenue_account(cdr: &Cdr) -> String {
    format!("revenue:site:{}", cdr.site_id.as_deref().unwrap_or("none"))
}

pub const VAT_ACCOUNT: &str = "vat:payable";

/// Posts a CDR inside `tx`, once. Returns false if it was posted before.
pub fn post_cdr(tx: &mut dyn Transaction, cdr: &Cdr) -> Result<bool, LedgerError> {
    let c = &cdr.currency;
    let (incl, excl) = (to_minor(cdr.total_incl_vat, c)?, to_minor(cdr.total_excl_vat, c)?);
    let memo = format!("session {} at {}", cdr.id, cdr.charger_id);
    let posted = post(
        tx,
        &format!("cdr:{}", cdr.id),
        c,
        &[
            (receivable_account(cdr), Side::Debit, incl, memo.clone()),
            (revenue_account(cdr), Side::Credit, excl, memo.clone()),
            (VAT_ACCOUNT.to_string(), Side::Credit, incl - excl, memo),
        ],
        cdr.created_at,
    )?;
    if posted {
        // Paid by whatever authorized the session, in this transaction.
        crate::payments::settle(tx, cdr)?;
    }
    Ok(posted)
}

/// Refunds a posted CDR in full with a reversing posting (never an edit).
pub fn refund(store: &dyn Store, cdr_id: &str, reason: &str) -> Result<(), LedgerError> {
    store.transact(|tx| {
        let cdr: Cdr =
            get(tx, &keys::pack(&("cdr", cdr_id)))?.ok_or_else(|| LedgerError::NotFound(format!("CDR {cdr_id}")))?;
        if tx
            .get(&keys::pack(&("ledger", "posted", format!("cdr:{cdr_id}").as_str())))?
            .is_none()
        {
            return Err(LedgerError::Precondition(format!(
                "CDR {cdr_id} was never posted (held for review?)"
            )));
        }
        let c = &cdr.currency;
        let (incl, excl) = (to_minor(cdr.total_incl_vat, c)?, to_minor(cdr.total_excl_vat, c)?);
        let memo = format!("refund of {cdr_id}: {reason}");
        let posted = post(
            tx,
            &format!("refund:{cdr_id}"),
            c,
            &[
                (receivable_account(&cdr), Side::Credit, incl, memo.clone()),
                (revenue_account(&cdr), Side::Debit, excl, memo.clone()),
                (VAT_ACCOUNT.to_string(), Side::Debit, incl - excl, memo),
            ],
            crate::now(),
        )?;
        if !posted {
            return Err(LedgerError::Precondition(format!("CDR {cdr_id} is already refunded")));
        }
        Ok(())
    })
}

/// Every balance: (currency, account, minor units; debits minus credits).
pub fn balances(store: &dyn Store) -> Result<Vec<(String, String, i64)>, LedgerError> {
    let (b, e) = keys::tuple_range(&("ledger", "balance"));
    store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(k, v)| {
                let (_, _, cur, acct): (String, String, String, String) =
                    keys::unpack(&k).map_err(|e| LedgerError::Corrupted(format!("{e:?}")))?;
                let mut buf = [0u8; 8];
                buf[..v.len().min(8)].copy_from_slice(&v[..v.len().min(8)]);
                Ok((cur, acct, i64::from_le_bytes(buf)))
            })
            .collect()
    })
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub entries: u64,
    pub postings: u64,
    pub cdrs: u64,
    pub problems: Vec<String>,
}

/// Proves the ledger: debits equal credits in every currency and every
/// posting, each balance equals its entries, every CDR not held for review
/// is posted exactly once (and nothing else is), and no CDR was altered.
pub fn verify(store: &dyn Store) -> Result<Verdict, LedgerError> {
    let mut v = Verdict::default();
    let (b, e) = keys::tuple_range(&("ledger", "entry"));
    let mut per_account: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut per_posting: BTreeMap<String, i64> = BTreeMap::new();
    let mut from = b;
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &e, 1000, false).map_err(LedgerError::from))?;
        let done = rows.len() < 1000;
        for (k, val) in rows {
            let en: Entry = serde_json::from_slice(&val).map_err(|e| LedgerError::Corrupted(e.to_string()))?;
            let signed = if en.side == Side::Debit { en.amount } else { -en.amount };
            *per_account
                .entry((en.currency.clone(), en.account.clone()))
                .or_default() += signed;
            *per_posting.entry(en.posting.clone()).or_default() += signed;
            v.entries += 1;
            from = k;
            from.push(0);
        }
        if done {
            break;
        }
    }
    for (p, sum) in &per_posting {
        if *sum != 0 {
            v.problems.push(format!("posting {p} does not balance by {sum}"));
        }
    }
    let mut per_currency: BTreeMap<String, i64> = BTreeMap::new();
    for (cur, acct, bal) in balances(store)? {
        *per_currency.entry(cur.clone()).or_default() += bal;
        let from_entries = per_account.remove(&(cur.clone(), acct.clone())).unwrap_or(0);
        if from_entries != bal {
            v.problems
                .push(format!("{cur} {acct}: balance {bal} but entries sum to {from_entries}"));
        }
    }
    for ((cur, acct), sum) in per_account {
        if sum != 0 {
            v.problems
                .push(format!("{cur} {acct}: entries sum to {sum} with no balance"));
        }
    }
    for (cur, acct, bal) in balances(store)? {
        if acct.starts_with("wallet:") && bal > 0 {
            v.problems.push(format!("{cur} {acct} is overdrawn by {bal}"));
        }
    }
    for (cur, sum) in per_currency {
        if sum != 0 {
            v.problems.push(format!("{cur}: debits and credits differ by {sum}"));
        }
    }
    // Every CDR posted once; every posting of a CDR has its CDR.
    let (pb, pe) = keys::tuple_range(&("ledger", "posted"));
    let posted: std::collections::BTreeSet<String> = store.snapshot(|tx| {
        tx.get_range(&pb, &pe, 0, false)?
            .into_iter()
            .map(|(k, _)| {
                keys::unpack::<(String, String, String)>(&k)
                    .map(|t| t.2)
                    .map_err(|e| LedgerError::Corrupted(format!("{e:?}")))
            })
            .collect::<Result<_, LedgerError>>()
    })?;
    v.postings = posted.len() as u64;
    for cdr in crate::cdr::all(store)? {
        v.cdrs += 1;
        if !cdr.intact() {
            v.problems
                .push(format!("CDR {} does not match its content hash (altered)", cdr.id));
        }
        let key = format!("cdr:{}", cdr.id);
        match (cdr.review_required, posted.contains(&key)) {
            (false, false) => v.problems.push(format!("CDR {} is not posted", cdr.id)),
            (true, true) if !cdr.approved => v.problems.push(format!("CDR {} is held for review but posted", cdr.id)),
            _ => {}
        }
        if !per_posting.contains_key(&key) && posted.contains(&key) && !cdr.total_incl_vat.is_zero() {
            v.problems
                .push(format!("CDR {} is marked posted but has no entries", cdr.id));
        }
    }
    for p in posted.iter().filter_map(|p| p.strip_prefix("cdr:")) {
        if crate::cdr::get_cdr(store, p)?.is_none() {
            v.problems.push(format!("posting cdr:{p} has no CDR"));
        }
    }
    Ok(v)
}
