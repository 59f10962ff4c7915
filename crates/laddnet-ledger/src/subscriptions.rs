//! Subscription plans and who is on which.
//!
//! A plan has a monthly fee (excl. VAT, with its VAT rate), energy included
//! each month, a discount on sessions, and optionally a tariff of its own
//! that prices its subscribers' sessions instead of the assigned one. Fees
//! and included energy are prorated by the days of the month a driver was
//! subscribed. Plans are never edited: a change is a new plan.
//!
//! | key | value |
//! |---|---|
//! | `("plan", id)` | [`Plan`] |
//! | `("subscription", driver)` | [`Subscription`]: the current or last one |

use laddnet_store::{Store, StoreExt, Transaction, keys};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{LedgerError, get, put};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub currency: String,
    /// Per month, excl. VAT.
    pub monthly_fee: Decimal,
    /// VAT rate on the fee, percent.
    pub vat_percent: Decimal,
    /// kWh included each month (its energy cost is credited).
    pub included_kwh: Decimal,
    /// Percent off sessions (after included energy).
    pub discount_percent: Decimal,
    /// Prices subscribers' sessions instead of the assigned tariff.
    #[serde(default)]
    pub tariff_id: Option<String>,
    pub created_at: i64,
}

impl Plan {
    pub fn validate(&self) -> Result<(), LedgerError> {
        let bad = |m: String| Err(LedgerError::Invalid(m));
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!("plan id {:?}: 1 to 64 of A-Z a-z 0-9 - _", self.id));
        }
        if laddnet_core::tariff::currency_exponent(&self.currency) > 4
            || self.currency.len() != 3
            || !self.currency.chars().all(|c| c.is_ascii_uppercase())
        {
            return bad(format!("currency {:?}: an ISO 4217 code such as EUR", self.currency));
        }
        if self.monthly_fee.is_sign_negative() {
            return bad(format!("monthly_fee {} is negative", self.monthly_fee));
        }
        if self.vat_percent.is_sign_negative() || self.vat_percent > Decimal::from(100) {
            return bad(format!("vat_percent {} is not 0 to 100", self.vat_percent));
        }
        if self.included_kwh.is_sign_negative() {
            return bad(format!("included_kwh {} is negative", self.included_kwh));
        }
        if self.discount_percent.is_sign_negative() || self.discount_percent > Decimal::from(100) {
            return bad(format!("discount_percent {} is not 0 to 100", self.discount_percent));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub driver: String,
    pub plan_id: String,
    /// Unix seconds.
    pub from: i64,
    /// Unix seconds; none: running.
    pub until: Option<i64>,
}

impl Subscription {
    pub fn active_at(&self, at: i64) -> bool {
        self.from <= at && self.until.is_none_or(|u| at < u)
    }
}

fn plan_key(id: &str) -> Vec<u8> {
    keys::pack(&("plan", id))
}
fn sub_key(driver: &str) -> Vec<u8> {
    keys::pack(&("subscription", driver))
}

/// Creates a plan; an id in use is refused (plans are never edited).
pub fn create_plan(store: &dyn Store, plan: &Plan) -> Result<(), LedgerError> {
    plan.validate()?;
    if let Some(t) = &plan.tariff_id {
        crate::tariffs::get_tariff(store, t, None)?;
    }
    store.transact(|tx| {
        if tx.get(&plan_key(&plan.id))?.is_some() {
            return Err(LedgerError::Precondition(format!(
                "plan {} exists; plans are never edited, create a new one",
                plan.id
            )));
        }
        put(tx, &plan_key(&plan.id), plan)
    })
}

pub fn get_plan(store: &dyn Store, id: &str) -> Result<Plan, LedgerError> {
    store
        .snapshot(|tx| get(tx, &plan_key(id)))?
        .ok_or_else(|| LedgerError::NotFound(format!("plan {id}")))
}

pub fn list_plans(store: &dyn Store) -> Result<Vec<Plan>, LedgerError> {
    let (b, e) = keys::tuple_range(&("plan",));
    store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupted(e.to_string())))
            .collect()
    })
}

/// Puts a driver on a plan from `from` (ending any running subscription
/// there: a plan change takes effect at once, prorated).
pub fn subscribe(store: &dyn Store, driver: &str, plan_id: &str, from: i64) -> Result<Subscription, LedgerError> {
    get_plan(store, plan_id)?;
    store.transact(|tx| {
        if let Some(old) = get::<Subscription>(tx, &sub_key(driver))?
            && old.until.is_none()
            && old.from >= from
        {
            return Err(LedgerError::Precondition(format!(
                "driver {driver} is on plan {} from a later date; end it first",
                old.plan_id
            )));
        }
        if let Some(mut old) = get::<Subscription>(tx, &sub_key(driver))?
            && old.until.is_none()
        {
            old.until = Some(from);
            put(tx, &keys::pack(&("subscription-past", driver, old.from)), &old)?;
        }
        let s = Subscription {
            driver: driver.into(),
            plan_id: plan_id.into(),
            from,
            until: None,
        };
        put(tx, &sub_key(driver), &s)?;
        Ok(s)
    })
}

/// Ends the driver's subscription at `at`.
pub fn unsubscribe(store: &dyn Store, driver: &str, at: i64) -> Result<Subscription, LedgerError> {
    store.transact(|tx| {
        let mut s: Subscription = get(tx, &sub_key(driver))?
            .filter(|s: &Subscription| s.until.is_none())
            .ok_or_else(|| LedgerError::NotFound(format!("a running subscription of {driver}")))?;
        if at < s.from {
            return Err(LedgerError::Invalid(
                "a subscription cannot end before it starts".into(),
            ));
        }
        s.until = Some(at);
        put(tx, &sub_key(driver), &s)?;
        Ok(s)
    })
}

/// Every subscription the driver had (past ones, then the current).
pub fn history(tx: &mut dyn Transaction, driver: &str) -> Result<Vec<Subscription>, LedgerError> {
    let (b, e) = keys::tuple_range(&("subscription-past", driver));
    let mut out: Vec<Subscription> = tx
        .get_range(&b, &e, 0, false)?
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupted(e.to_string())))
        .collect::<Result<_, _>>()?;
    if let Some(s) = get::<Subscription>(tx, &sub_key(driver))? {
        out.push(s);
    }
    Ok(out)
}

/// The plan a driver is on at `at` (unix seconds).
pub fn plan_at(store: &dyn Store, driver: &str, at: i64) -> Result<Option<Plan>, LedgerError> {
    let subs = store.snapshot(|tx| history(tx, driver))?;
    match subs.into_iter().find(|s| s.active_at(at)) {
        Some(s) => Ok(Some(get_plan(store, &s.plan_id)?)),
        None => Ok(None),
    }
}

/// Drivers with any subscription.
pub fn subscribers(store: &dyn Store) -> Result<Vec<String>, LedgerError> {
    let (b, e) = keys::tuple_range(&("subscription",));
    store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(k, _)| {
                keys::unpack::<(String, String)>(&k)
                    .map(|t| t.1)
                    .map_err(|e| LedgerError::Corrupted(format!("{e:?}")))
            })
            .collect()
    })
}
