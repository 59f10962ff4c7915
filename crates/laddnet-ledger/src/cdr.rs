//! Charge detail records: immutable, written exactly once when a session
//! ends, priced by the cost engine.
//!
//! | key | value |
//! |---|---|
//! | `("cdr", id)` | [`Cdr`] (id = the transaction id) |
//! | `("cdr-by-stop", stop_ms, id)` | empty: listing in time order |
//! | `("session-unbilled", id)` | empty: ended sessions awaiting their CDR |

use chrono_tz::Tz;
use laddnet_core::charging::{
    FLAG_ENERGY_EXCEEDS_CAPACITY, FLAG_REGISTER_BACKWARDS, SessionRecord, SessionStatus, TxEvent,
};
use laddnet_core::cost::{ChargingPeriod, CostLine, Reading, price};
use laddnet_store::{Store, StoreExt, keys};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{LedgerError, get, ledger, put, tariffs};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cdr {
    pub id: String,
    pub charger_id: String,
    pub connector_id: u32,
    pub site_id: Option<String>,
    /// Pseudonymous driver reference; none until driver accounts exist.
    pub driver_ref: Option<String>,
    /// Unix milliseconds, UTC (charger clock).
    pub start_ms: i64,
    pub stop_ms: i64,
    pub meter_start_wh: u64,
    pub meter_stop_wh: u64,
    pub energy_wh: u64,
    pub charging_s: Decimal,
    pub idle_s: Decimal,
    pub tariff_id: Option<String>,
    pub tariff_version: Option<u32>,
    pub currency: String,
    pub periods: Vec<ChargingPeriod>,
    pub lines: Vec<CostLine>,
    pub total_excl_vat: Decimal,
    pub total_incl_vat: Decimal,
    pub total_vat: Decimal,
    /// Meter anomalies and billing notes ("no-tariff").
    pub flags: Vec<String>,
    /// Held for an operator's review instead of being posted.
    pub review_required: bool,
    #[serde(default)]
    pub approved: bool,
    pub stop_reason: String,
    /// Unix seconds, node clock.
    pub created_at: i64,
    /// Hex SHA-256 of the record with this field empty.
    pub content_hash: String,
}

impl Cdr {
    fn hash(&self) -> String {
        let mut c = self.clone();
        c.content_hash.clear();
        c.approved = false;
        hex::encode(Sha256::digest(serde_json::to_vec(&c).unwrap_or_default()))
    }

    /// Sets the content hash: call once, when the record is complete.
    pub fn seal(&mut self) {
        self.content_hash = self.hash();
    }

    /// Whether the content still matches its hash.
    pub fn intact(&self) -> bool {
        self.hash() == self.content_hash
    }
}

pub fn unbilled_key(tx_id: &str) -> Vec<u8> {
    keys::pack(&("session-unbilled", tx_id))
}

pub fn get_cdr(store: &dyn Store, id: &str) -> Result<Option<Cdr>, LedgerError> {
    store.snapshot(|tx| get(tx, &keys::pack(&("cdr", id))))
}

/// Every CDR, in id order.
pub fn all(store: &dyn Store) -> Result<Vec<Cdr>, LedgerError> {
    let (b, e) = keys::tuple_range(&("cdr",));
    let mut out = Vec::new();
    let mut from = b;
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &e, 500, false).map_err(LedgerError::from))?;
        let done = rows.len() < 500;
        for (k, v) in rows {
            out.push(serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupted(e.to_string()))?);
            from = k;
            from.push(0);
        }
        if done {
            return Ok(out);
        }
    }
}

/// CDRs whose stop is in [from_ms, to_ms), oldest first.
pub fn between(store: &dyn Store, from_ms: i64, to_ms: i64) -> Result<Vec<Cdr>, LedgerError> {
    let (b, e) = (
        keys::pack(&("cdr-by-stop", from_ms)),
        keys::pack(&("cdr-by-stop", to_ms)),
    );
    let ids: Vec<String> = store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(k, _)| {
                keys::unpack::<(String, i64, String)>(&k)
                    .map(|t| t.2)
                    .map_err(|e| LedgerError::Corrupted(format!("{e:?}")))
            })
            .collect::<Result<_, LedgerError>>()
    })?;
    ids.iter().filter_map(|id| get_cdr(store, id).transpose()).collect()
}

/// The session's readings, in order, read in pages (a session may be long).
pub fn readings(store: &dyn Store, tx_id: &str) -> Result<Vec<Reading>, LedgerError> {
    let (b, e) = keys::tuple_range(&("session-event", tx_id));
    let mut out = Vec::new();
    let mut from = b;
    loop {
        let rows = store.snapshot(|tx| tx.get_range(&from, &e, 5000, false).map_err(LedgerError::from))?;
        let done = rows.len() < 5000;
        for (k, v) in rows {
            let ev: TxEvent = serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupted(e.to_string()))?;
            out.push(Reading {
                at_ms: ev.at_ms,
                energy_wh: ev.meter.energy_wh,
                current_ma: ev.meter.current_ma,
            });
            from = k;
            from.push(0);
        }
        if done {
            break;
        }
    }
    // By sequence number is the charger's order; a clock that stepped back
    // must not break the engine's time order.
    out.sort_by_key(|r| r.at_ms);
    Ok(out)
}

/// Where prices come from when no tariff is assigned.
pub struct BillingDefaults {
    pub currency: String,
}

/// What prices a session: its tariff (if any assignment applies) and its
/// site's time zone.
#[derive(Debug, Clone)]
pub struct PricingContext {
    pub tariff: Option<laddnet_core::tariff::Tariff>,
    pub tz: Tz,
}

/// Finds the tariff in force when the session started, at its site's time zone.
/// A subscriber's plan with a tariff of its own prices their sessions.
pub fn pricing_context(store: &dyn Store, s: &SessionRecord, start_ms: i64) -> Result<PricingContext, LedgerError> {
    let mut ctx = context_for(store, &s.charger_id, s.site_id.as_deref(), s.connector_id, start_ms)?;
    let at = start_ms.div_euclid(1000);
    if let Some(driver) = &s.driver_id
        && let Some(plan) = crate::subscriptions::plan_at(store, driver, at)?
        && let Some(t) = plan.tariff_id
    {
        ctx.tariff = Some(tariffs::version_at(store, &t, at)?);
    }
    Ok(ctx)
}

/// The tariff in force at `at_ms` for a connector of a charger.
pub fn context_for(
    store: &dyn Store,
    charger_id: &str,
    site_id: Option<&str>,
    connector_id: u32,
    at_ms: i64,
) -> Result<PricingContext, LedgerError> {
    let site: Option<serde_json::Value> = match site_id {
        Some(id) => store.snapshot(|tx| get(tx, &keys::pack(&("site", id))))?,
        None => None,
    };
    let tz: Tz = site
        .as_ref()
        .and_then(|v| v["time_zone"].as_str())
        .and_then(|z| z.parse().ok())
        .unwrap_or(chrono_tz::UTC);
    let charger: Option<serde_json::Value> = store.snapshot(|tx| get(tx, &keys::pack(&("charger", charger_id))))?;
    let ac = charger
        .as_ref()
        .and_then(|c| {
            c["connectors"]
                .as_array()?
                .iter()
                .find(|k| connector_id == 0 || k["connector_id"] == connector_id)
                .map(|k| k["connector_type"] == "ac")
        })
        .unwrap_or(true);
    let tariff = tariffs::resolve(store, charger_id, site_id, ac, at_ms.div_euclid(1000))?;
    Ok(PricingContext { tariff, tz })
}

/// The price per kWh (excl. VAT) a session starting at `at_ms` on this
/// connector would pay for its first kWh, and the currency. None when no
/// tariff applies or it has no energy component then.
pub fn energy_price_at(
    store: &dyn Store,
    charger_id: &str,
    site_id: Option<&str>,
    connector_id: u32,
    at_ms: i64,
) -> Result<Option<(Decimal, String)>, LedgerError> {
    let ctx = context_for(store, charger_id, site_id, connector_id, at_ms)?;
    let Some(t) = ctx.tariff else { return Ok(None) };
    // One minute at 16 A delivering 1 Wh: which element prices energy now.
    let probe = [
        laddnet_core::cost::Reading {
            at_ms,
            energy_wh: 0,
            current_ma: 16_000,
        },
        laddnet_core::cost::Reading {
            at_ms: at_ms + 60_000,
            energy_wh: 1,
            current_ma: 16_000,
        },
    ];
    let periods =
        laddnet_core::cost::periods(&t, &probe, &ctx.tz, at_ms, 0).map_err(|e| LedgerError::Invalid(e.to_string()))?;
    let price = periods.first().and_then(|p| p.energy_element).and_then(|i| {
        t.elements[i]
            .price_components
            .iter()
            .find(|c| c.dimension == laddnet_core::tariff::Dimension::Energy)
            .map(|c| c.price)
    });
    Ok(price.map(|p| (p, t.currency.clone())))
}

/// What a session costs now: the CDR's totals once billed, else the
/// running cost (before step rounding). None when no tariff applies.
pub fn estimate(store: &dyn Store, tx_id: &str) -> Result<Option<(String, Decimal, Decimal)>, LedgerError> {
    if let Some(c) = get_cdr(store, tx_id)? {
        return Ok(Some((c.currency, c.total_excl_vat, c.total_incl_vat)));
    }
    let Some(s): Option<SessionRecord> = store.snapshot(|tx| get(tx, &keys::pack(&("session", tx_id))))? else {
        return Ok(None);
    };
    let r = readings(store, tx_id)?;
    let Some(first) = r.first() else { return Ok(None) };
    let ctx = pricing_context(store, &s, first.at_ms)?;
    let Some(t) = ctx.tariff else { return Ok(None) };
    let c = laddnet_core::cost::running_cost(&t, &r, &ctx.tz).map_err(|e| LedgerError::Invalid(e.to_string()))?;
    Ok(Some((c.currency, c.total_excl_vat, c.total_incl_vat)))
}

/// Writes the CDR of an ended session and posts it, exactly once. A second
/// call (a retry, a restart) returns the CDR already written.
pub fn bill_session(store: &dyn Store, tx_id: &str, defaults: &BillingDefaults) -> Result<Cdr, LedgerError> {
    if let Some(c) = get_cdr(store, tx_id)? {
        return Ok(c);
    }
    let s: SessionRecord = store
        .snapshot(|tx| get(tx, &keys::pack(&("session", tx_id))))?
        .ok_or_else(|| LedgerError::NotFound(format!("session {tx_id}")))?;
    if s.status != SessionStatus::Ended {
        return Err(LedgerError::Precondition(format!("session {tx_id} has not ended")));
    }
    let mut r = readings(store, tx_id)?;
    // Bill to the end reading: events after the end are kept, not re-billed.
    if let Some(end) = s.ended {
        r.retain(|x| x.at_ms <= end.at_ms);
    }
    let start_ms = r.first().map_or(s.first.at_ms, |x| x.at_ms);
    let PricingContext { tariff, tz } = pricing_context(store, &s, start_ms)?;
    let mut flags: Vec<String> = s
        .flags
        .iter()
        .filter(|f| *f != laddnet_core::charging::FLAG_STUCK)
        .cloned()
        .collect();
    let anomaly = s.flags.contains(FLAG_REGISTER_BACKWARDS)
        || s.flags.contains(FLAG_ENERGY_EXCEEDS_CAPACITY)
        || s.flags.contains(laddnet_core::charging::FLAG_UNAUTHORIZED_START);
    let (currency, cost) = match &tariff {
        Some(t) => (
            t.currency.clone(),
            Some(price(t, &r, &tz).map_err(|e| LedgerError::Invalid(e.to_string()))?),
        ),
        None => {
            flags.push("no-tariff".into());
            (defaults.currency.clone(), None)
        }
    };
    let periods = cost.as_ref().map(|c| c.periods.clone()).unwrap_or_default();
    let secs = |charging: bool| {
        periods
            .iter()
            .filter(|p| p.charging == charging)
            .map(|p| (p.end_ms - p.start_ms) / Decimal::from(1000))
            .sum()
    };
    let stop = s.ended.unwrap_or(s.last);
    let mut cdr = Cdr {
        id: tx_id.to_string(),
        charger_id: s.charger_id.clone(),
        connector_id: s.connector_id,
        site_id: s.site_id.clone(),
        driver_ref: s.driver_id.clone(),
        start_ms,
        stop_ms: stop.at_ms,
        meter_start_wh: s.first.energy_wh,
        meter_stop_wh: stop.energy_wh,
        energy_wh: s.energy_wh(),
        charging_s: secs(true),
        idle_s: secs(false),
        tariff_id: tariff.as_ref().map(|t| t.id.clone()),
        tariff_version: tariff.as_ref().map(|t| t.version),
        currency,
        total_excl_vat: cost.as_ref().map_or(Decimal::ZERO, |c| c.total_excl_vat),
        total_incl_vat: cost.as_ref().map_or(Decimal::ZERO, |c| c.total_incl_vat),
        total_vat: cost.as_ref().map_or(Decimal::ZERO, |c| c.total_vat()),
        lines: cost.map(|c| c.lines).unwrap_or_default(),
        periods,
        review_required: anomaly || tariff.is_none(),
        approved: false,
        flags,
        stop_reason: s.stop_reason.clone(),
        created_at: crate::now(),
        content_hash: String::new(),
    };
    cdr.seal();
    store.transact(|tx| record(tx, &cdr))?;
    if cdr.review_required {
        tracing::warn!(transaction_id = %tx_id, flags = ?cdr.flags, "CDR held for review");
    }
    get_cdr(store, tx_id)?.ok_or_else(|| LedgerError::Corrupted("CDR vanished".into()))
}

/// Writes a sealed CDR and, unless it is held for review, posts it (and
/// settles its payment), all in `tx`; once per id. Returns false when the
/// CDR was written before.
pub fn record(tx: &mut dyn laddnet_store::Transaction, cdr: &Cdr) -> Result<bool, LedgerError> {
    if !tx.claim_once(&keys::pack(&("cdr-written", cdr.id.as_str())))? {
        return Ok(false);
    }
    put(tx, &keys::pack(&("cdr", cdr.id.as_str())), cdr)?;
    tx.set(&keys::pack(&("cdr-by-stop", cdr.stop_ms, cdr.id.as_str())), b"")?;
    tx.clear(&unbilled_key(&cdr.id))?;
    if cdr.driver_ref.is_some() {
        // The node raises the driver's session-ended notification from
        // this marker (and clears it in the same transaction).
        tx.set(&keys::pack(&("cdr-notify", cdr.id.as_str())), b"")?;
    }
    if !cdr.review_required {
        ledger::post_cdr(tx, cdr)?;
    }
    Ok(true)
}

/// An operator approves a held CDR: it is posted as it stands.
pub fn approve(store: &dyn Store, id: &str) -> Result<Cdr, LedgerError> {
    store.transact(|tx| {
        let mut cdr: Cdr =
            get(tx, &keys::pack(&("cdr", id)))?.ok_or_else(|| LedgerError::NotFound(format!("CDR {id}")))?;
        if !cdr.review_required {
            return Err(LedgerError::Precondition(format!("CDR {id} is not held for review")));
        }
        if cdr.approved {
            return Ok(cdr);
        }
        cdr.approved = true;
        put(tx, &keys::pack(&("cdr", id)), &cdr)?;
        ledger::post_cdr(tx, &cdr)?;
        Ok(cdr)
    })
}

/// Ended sessions still without a CDR (a crash between the end and billing).
pub fn unbilled(store: &dyn Store) -> Result<Vec<String>, LedgerError> {
    let (b, e) = keys::tuple_range(&("session-unbilled",));
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

/// CSV export of CDRs (one row each; amounts as decimal strings).
pub fn to_csv(cdrs: &[Cdr]) -> String {
    let mut s = String::from(
        "id,charger_id,connector_id,site_id,start_ms,stop_ms,energy_wh,charging_s,idle_s,tariff_id,tariff_version,currency,total_excl_vat,total_vat,total_incl_vat,review_required,flags,content_hash\n",
    );
    let q = |v: &str| {
        if v.contains([',', '"', '\n']) {
            format!("\"{}\"", v.replace('"', "\"\""))
        } else {
            v.to_string()
        }
    };
    for c in cdrs {
        s.push_str(
            &[
                q(&c.id),
                q(&c.charger_id),
                c.connector_id.to_string(),
                q(c.site_id.as_deref().unwrap_or("")),
                c.start_ms.to_string(),
                c.stop_ms.to_string(),
                c.energy_wh.to_string(),
                c.charging_s.round_dp(3).to_string(),
                c.idle_s.round_dp(3).to_string(),
                q(c.tariff_id.as_deref().unwrap_or("")),
                c.tariff_version.map(|v| v.to_string()).unwrap_or_default(),
                c.currency.clone(),
                c.total_excl_vat.to_string(),
                c.total_vat.to_string(),
                c.total_incl_vat.to_string(),
                c.review_required.to_string(),
                q(&c.flags.join(";")),
                c.content_hash.clone(),
            ]
            .join(","),
        );
        s.push('\n');
    }
    s
}
