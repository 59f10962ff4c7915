//! Availability: uptime per connector, charger and site over a period,
//! with downtime by reason, from the stored history.
//!
//! | key | value |
//! |---|---|
//! | `("status-history", charger, connector, at_ms)` | [`StatusPoint`] (charger time) |
//! | `("conn-history", charger, at_ms)` | bool: connected (node time) |
//! | `("maintenance", id)` | a planned window (`starts_at`, `ends_at`, unix s) |
//!
//! Each moment of a connector counts once, by the first that applies:
//! planned maintenance, the charger offline, the connector faulted (fault)
//! or unavailable (maintenance), else up. Time before a connector's first
//! known status is not counted.

use std::collections::BTreeMap;

use laddnet_core::charging::ConnectorStatus;
use laddnet_store::{Store, StoreExt, Transaction, keys};
use serde::{Deserialize, Serialize};

use crate::repo::{self, RepoError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPoint {
    pub status: ConnectorStatus,
    #[serde(default)]
    pub error_code: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Connector,
    Charger,
    Site,
}

impl By {
    pub fn parse(s: &str) -> Result<Self, RepoError> {
        match s {
            "connector" => Ok(By::Connector),
            "charger" => Ok(By::Charger),
            "site" => Ok(By::Site),
            _ => Err(RepoError::Invalid(format!(
                "by {s:?}: expected connector, charger or site"
            ))),
        }
    }
}

/// One row of a report; durations in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Row {
    pub key: String,
    /// Time counted (known status) in the period.
    pub counted_ms: i64,
    pub up_ms: i64,
    pub fault_ms: i64,
    pub offline_ms: i64,
    pub maintenance_ms: i64,
}

impl Row {
    /// Up time over counted time, percent with two decimals.
    pub fn availability_percent(&self) -> rust_decimal::Decimal {
        let mut p = if self.counted_ms == 0 {
            rust_decimal::Decimal::ZERO
        } else {
            (rust_decimal::Decimal::from(self.up_ms) * rust_decimal::Decimal::from(100)
                / rust_decimal::Decimal::from(self.counted_ms))
            .round_dp(2)
        };
        p.rescale(2);
        p
    }

    fn add(&mut self, o: &Row) {
        self.counted_ms += o.counted_ms;
        self.up_ms += o.up_ms;
        self.fault_ms += o.fault_ms;
        self.offline_ms += o.offline_ms;
        self.maintenance_ms += o.maintenance_ms;
    }
}

/// (time, value) changes of a history range, with the value in force at
/// `from` first (if any).
fn changes<T: serde::de::DeserializeOwned>(
    tx: &mut dyn Transaction,
    prefix_begin: Vec<u8>,
    prefix_end: Vec<u8>,
    at: impl Fn(&[u8]) -> Result<i64, RepoError>,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, T)>, RepoError> {
    let mut out = Vec::new();
    for (k, v) in tx.get_range(&prefix_begin, &prefix_end, 0, false)? {
        let t = at(&k)?;
        if t >= to {
            break;
        }
        let val: T = serde_json::from_slice(&v).map_err(|e| RepoError::Corrupted(e.to_string()))?;
        if t <= from {
            // Only the latest at or before `from` matters.
            out.clear();
            out.push((from, val));
        } else {
            out.push((t, val));
        }
    }
    Ok(out)
}

fn corrupted(e: impl std::fmt::Debug) -> RepoError {
    RepoError::Corrupted(format!("{e:?}"))
}

/// Planned maintenance windows touching a charger or its site, in ms.
fn windows(tx: &mut dyn Transaction, charger: &str, site: Option<&str>) -> Result<Vec<(i64, i64)>, RepoError> {
    let (b, e) = keys::tuple_range(&("maintenance",));
    let mut out = Vec::new();
    for (_, v) in tx.get_range(&b, &e, 0, false)? {
        let w: serde_json::Value = serde_json::from_slice(&v).map_err(|e| RepoError::Corrupted(e.to_string()))?;
        let here = w["charger_id"].as_str() == Some(charger)
            || (site.is_some() && w["site_id"].as_str() == site && w["charger_id"].is_null());
        if here && let (Some(s), Some(e)) = (w["starts_at"].as_i64(), w["ends_at"].as_i64()) {
            out.push((s * 1000, e * 1000));
        }
    }
    Ok(out)
}

/// One connector's row over `[from, to)`.
fn connector_row(
    tx: &mut dyn Transaction,
    charger: &str,
    connector: u32,
    online: &[(i64, bool)],
    planned: &[(i64, i64)],
    from: i64,
    to: i64,
) -> Result<Row, RepoError> {
    let (b, e) = keys::tuple_range(&("status-history", charger, i64::from(connector)));
    let statuses: Vec<(i64, StatusPoint)> = changes(
        tx,
        b,
        e,
        |k| {
            keys::unpack::<(String, String, i64, i64)>(k)
                .map(|t| t.3)
                .map_err(corrupted)
        },
        from,
        to,
    )?;
    let mut cuts: Vec<i64> = statuses.iter().map(|s| s.0).collect();
    cuts.extend(online.iter().map(|o| o.0));
    for (s, e) in planned {
        cuts.push((*s).clamp(from, to));
        cuts.push((*e).clamp(from, to));
    }
    cuts.push(to);
    cuts.retain(|t| *t >= from && *t <= to);
    cuts.sort_unstable();
    cuts.dedup();
    let mut row = Row {
        key: format!("{charger}/{connector}"),
        ..Default::default()
    };
    let mut start = match statuses.first() {
        Some(s) => s.0,
        None => return Ok(row),
    };
    for cut in cuts {
        if cut <= start {
            continue;
        }
        let len = cut - start;
        let status = statuses.iter().rev().find(|s| s.0 <= start).map(|s| s.1.status);
        let connected = online.iter().rev().find(|o| o.0 <= start).is_none_or(|o| o.1);
        let in_window = planned.iter().any(|(s, e)| *s <= start && start < *e);
        row.counted_ms += len;
        if in_window {
            row.maintenance_ms += len;
        } else if !connected {
            row.offline_ms += len;
        } else {
            match status {
                Some(ConnectorStatus::Faulted) => row.fault_ms += len,
                Some(ConnectorStatus::Unavailable) => row.maintenance_ms += len,
                _ => row.up_ms += len,
            }
        }
        start = cut;
    }
    Ok(row)
}

/// The report over `[from_ms, to_ms)`, by connector, charger or site.
pub fn report(store: &dyn Store, from_ms: i64, to_ms: i64, by: By) -> Result<Vec<Row>, RepoError> {
    if to_ms <= from_ms {
        return Err(RepoError::Invalid("the period must end after it starts".into()));
    }
    let (chargers, _) = repo::list_chargers(store, None, usize::MAX)?;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for c in chargers {
        let rows_here = store.snapshot(|tx| {
            let (b, e) = keys::tuple_range(&("conn-history", c.charger_id.as_str()));
            let online: Vec<(i64, bool)> = changes(
                tx,
                b,
                e,
                |k| keys::unpack::<(String, String, i64)>(k).map(|t| t.2).map_err(corrupted),
                from_ms,
                to_ms,
            )?;
            let planned = windows(tx, &c.charger_id, c.site_id.as_deref())?;
            let mut out = Vec::new();
            for k in &c.connectors {
                out.push(connector_row(
                    tx,
                    &c.charger_id,
                    k.connector_id,
                    &online,
                    &planned,
                    from_ms,
                    to_ms,
                )?);
            }
            Ok::<_, RepoError>(out)
        })?;
        for r in rows_here {
            let key = match by {
                By::Connector => r.key.clone(),
                By::Charger => c.charger_id.clone(),
                By::Site => c.site_id.clone().unwrap_or_else(|| "(no site)".into()),
            };
            rows.entry(key.clone())
                .or_insert_with(|| Row {
                    key,
                    ..Default::default()
                })
                .add(&r);
        }
    }
    Ok(rows.into_values().collect())
}
