//! Stored tariffs and who they apply to.
//!
//! | key | value |
//! |---|---|
//! | `("tariff", id, version)` | the [`Tariff`] |
//! | `("tariff-latest", id)` | latest version (u32 JSON) |
//! | `("tariff-created", id, version)` | when the version was created (unix s) |
//! | `("tariff-assign", scope, target, valid_from, tariff_id)` | [`Assignment`] |

use laddnet_core::tariff::Tariff;
use laddnet_store::{Store, StoreExt, keys};
use serde::{Deserialize, Serialize};

use crate::{LedgerError, get, put};

/// What an assignment covers, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    Charger,
    Site,
    /// "ac" or "dc".
    ConnectorType,
    Operator,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Charger => "charger",
            Scope::Site => "site",
            Scope::ConnectorType => "connector-type",
            Scope::Operator => "operator",
        }
    }
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        Ok(match s {
            "charger" => Scope::Charger,
            "site" => Scope::Site,
            "connector-type" => Scope::ConnectorType,
            "operator" => Scope::Operator,
            other => {
                return Err(LedgerError::Invalid(format!(
                    "unknown scope {other:?}: expected charger, site, connector-type or operator"
                )));
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub scope: Scope,
    /// Charger id, site id, "ac"/"dc", or "" for the operator.
    pub target: String,
    pub tariff_id: String,
    /// Unix seconds; the assignment holds in [valid_from, valid_to).
    pub valid_from: i64,
    #[serde(default)]
    pub valid_to: Option<i64>,
}

/// Stores `t` as the next version of its id and returns the version.
pub fn create(store: &dyn Store, t: Tariff) -> Result<Tariff, LedgerError> {
    create_at(store, t, crate::now())
}

/// As [`create`], with the creation time given (imports, tests).
pub fn create_at(store: &dyn Store, mut t: Tariff, created_at: i64) -> Result<Tariff, LedgerError> {
    t.validate()?;
    store.transact(|tx| {
        let latest: u32 = get(tx, &keys::pack(&("tariff-latest", t.id.as_str())))?.unwrap_or(0);
        t.version = latest + 1;
        put(tx, &keys::pack(&("tariff", t.id.as_str(), i64::from(t.version))), &t)?;
        put(tx, &keys::pack(&("tariff-latest", t.id.as_str())), &t.version)?;
        put(
            tx,
            &keys::pack(&("tariff-created", t.id.as_str(), i64::from(t.version))),
            &created_at,
        )?;
        Ok(t.clone())
    })
}

/// A version of a tariff (None: the latest).
pub fn get_tariff(store: &dyn Store, id: &str, version: Option<u32>) -> Result<Tariff, LedgerError> {
    store.snapshot(|tx| {
        let v = match version {
            Some(v) => v,
            None => get::<u32>(tx, &keys::pack(&("tariff-latest", id)))?
                .ok_or_else(|| LedgerError::NotFound(format!("tariff {id}")))?,
        };
        get(tx, &keys::pack(&("tariff", id, i64::from(v))))?
            .ok_or_else(|| LedgerError::NotFound(format!("tariff {id} version {v}")))
    })
}

/// The latest version of every tariff.
pub fn list(store: &dyn Store) -> Result<Vec<Tariff>, LedgerError> {
    let (b, e) = keys::tuple_range(&("tariff-latest",));
    let ids: Vec<(String, u32)> = store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(k, v)| {
                let (_, id): (String, String) =
                    keys::unpack(&k).map_err(|e| LedgerError::Corrupted(format!("{e:?}")))?;
                let ver: u32 = serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupted(e.to_string()))?;
                Ok((id, ver))
            })
            .collect::<Result<_, LedgerError>>()
    })?;
    ids.into_iter().map(|(id, v)| get_tariff(store, &id, Some(v))).collect()
}

pub fn assign(store: &dyn Store, a: &Assignment) -> Result<(), LedgerError> {
    if let Some(to) = a.valid_to
        && to <= a.valid_from
    {
        return Err(LedgerError::Invalid("valid_to must be after valid_from".into()));
    }
    if a.scope == Scope::ConnectorType && a.target != "ac" && a.target != "dc" {
        return Err(LedgerError::Invalid(
            "a connector-type assignment targets ac or dc".into(),
        ));
    }
    store.transact(|tx| {
        if get::<u32>(tx, &keys::pack(&("tariff-latest", a.tariff_id.as_str())))?.is_none() {
            return Err(LedgerError::NotFound(format!("tariff {}", a.tariff_id)));
        }
        put(
            tx,
            &keys::pack(&(
                "tariff-assign",
                a.scope.as_str(),
                a.target.as_str(),
                a.valid_from,
                a.tariff_id.as_str(),
            )),
            a,
        )
    })
}

pub fn assignments(store: &dyn Store) -> Result<Vec<Assignment>, LedgerError> {
    let (b, e) = keys::tuple_range(&("tariff-assign",));
    store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupted(e.to_string())))
            .collect()
    })
}

/// The version of `id` in force at `at`: the latest created at or before it.
pub fn version_at(store: &dyn Store, id: &str, at: i64) -> Result<Tariff, LedgerError> {
    let (b, e) = keys::tuple_range(&("tariff-created", id));
    let version = store.snapshot(|tx| {
        for (k, v) in tx.get_range(&b, &e, 0, true)? {
            let (_, _, ver): (String, String, i64) =
                keys::unpack(&k).map_err(|e| LedgerError::Corrupted(format!("{e:?}")))?;
            let created: i64 = serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupted(e.to_string()))?;
            if created <= at {
                return Ok(Some(ver));
            }
        }
        Ok::<_, LedgerError>(None)
    })?;
    match version {
        Some(v) => get_tariff(store, id, Some(v as u32)),
        // Created after the session started: the first version applies.
        None => get_tariff(store, id, Some(1)),
    }
}

/// The tariff in force at `at` for a session: the most specific
/// assignment valid at `at` wins — charger, then site, then connector
/// type, then the operator's default. The latest assignment of a scope wins.
pub fn resolve(
    store: &dyn Store,
    charger: &str,
    site: Option<&str>,
    ac: bool,
    at: i64,
) -> Result<Option<Tariff>, LedgerError> {
    let all = assignments(store)?;
    let targets = [
        (Scope::Charger, charger.to_string()),
        (Scope::Site, site.unwrap_or("").to_string()),
        (Scope::ConnectorType, if ac { "ac" } else { "dc" }.to_string()),
        (Scope::Operator, String::new()),
    ];
    for (scope, target) in targets {
        if scope == Scope::Site && site.is_none() {
            continue;
        }
        let best = all
            .iter()
            .filter(|a| {
                a.scope == scope && a.target == target && a.valid_from <= at && a.valid_to.is_none_or(|to| at < to)
            })
            .max_by_key(|a| a.valid_from);
        if let Some(a) = best {
            return Ok(Some(version_at(store, &a.tariff_id, at)?));
        }
    }
    Ok(None)
}
