//! Revenue reports from posted CDRs: held ones are not revenue yet, and
//! refunded ones are not revenue any more.

use std::collections::BTreeMap;

use laddnet_store::{Store, StoreExt};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{LedgerError, cdr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Operator,
    Site,
    Charger,
    Tariff,
    /// UTC calendar day of the session's stop.
    Day,
    Month,
}

impl GroupBy {
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        Ok(match s {
            "operator" => GroupBy::Operator,
            "site" => GroupBy::Site,
            "charger" => GroupBy::Charger,
            "tariff" => GroupBy::Tariff,
            "day" => GroupBy::Day,
            "month" => GroupBy::Month,
            other => {
                return Err(LedgerError::Invalid(format!(
                    "cannot group by {other:?}: expected operator, site, charger, tariff, day or month"
                )));
            }
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub key: String,
    pub currency: String,
    pub sessions: u64,
    pub energy_wh: u64,
    pub excl_vat: Decimal,
    pub vat: Decimal,
    pub incl_vat: Decimal,
}

/// Revenue of sessions that stopped in [from_ms, to_ms), grouped, per currency.
pub fn revenue(store: &dyn Store, from_ms: i64, to_ms: i64, by: GroupBy) -> Result<Vec<Row>, LedgerError> {
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for c in cdr::between(store, from_ms, to_ms)? {
        if c.review_required && !c.approved {
            continue;
        }
        let refunded = store.snapshot(|tx| {
            tx.get(&laddnet_store::keys::pack(&(
                "ledger",
                "posted",
                format!("refund:{}", c.id).as_str(),
            )))
            .map_err(LedgerError::from)
        })?;
        if refunded.is_some() {
            continue;
        }
        let stop = time::OffsetDateTime::from_unix_timestamp(c.stop_ms.div_euclid(1000))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let key = match by {
            GroupBy::Operator => "all".to_string(),
            GroupBy::Site => c.site_id.clone().unwrap_or_else(|| "(none)".into()),
            GroupBy::Charger => c.charger_id.clone(),
            GroupBy::Tariff => c
                .tariff_id
                .as_ref()
                .map(|t| format!("{t} v{}", c.tariff_version.unwrap_or(0)))
                .unwrap_or_else(|| "(none)".into()),
            GroupBy::Day => format!("{:04}-{:02}-{:02}", stop.year(), u8::from(stop.month()), stop.day()),
            GroupBy::Month => format!("{:04}-{:02}", stop.year(), u8::from(stop.month())),
        };
        let r = rows.entry((key.clone(), c.currency.clone())).or_insert_with(|| Row {
            key,
            currency: c.currency.clone(),
            ..Default::default()
        });
        r.sessions += 1;
        r.energy_wh += c.energy_wh;
        r.excl_vat += c.total_excl_vat;
        r.vat += c.total_vat;
        r.incl_vat += c.total_incl_vat;
    }
    Ok(rows.into_values().collect())
}

pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from("key,currency,sessions,energy_wh,excl_vat,vat,incl_vat\n");
    for r in rows {
        let key = if r.key.contains([',', '"']) {
            format!("\"{}\"", r.key.replace('"', "\"\""))
        } else {
            r.key.clone()
        };
        s.push_str(&format!(
            "{key},{},{},{},{},{},{}\n",
            r.currency, r.sessions, r.energy_wh, r.excl_vat, r.vat, r.incl_vat
        ));
    }
    s
}
