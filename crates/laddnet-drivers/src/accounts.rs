//! Driver accounts and their tokens.

use std::collections::{BTreeMap, BTreeSet};

use laddnet_store::{SharedStore, StoreExt, Transaction, keys};
use laddnet_vault::{FieldRef, Vault};
use rand::RngCore;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::model::*;
use crate::{DriverError, key, load, locallist, outbox, save};

/// What a new account starts with. Personal fields are sealed before
/// anything is written.
#[derive(Debug, Clone, Default)]
pub struct NewDriver {
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub payment_ref: Option<String>,
    pub groups: BTreeSet<String>,
    pub max_concurrent_sessions: u32,
    pub payment: Option<PaymentKind>,
    pub currency: String,
    pub expires_at: Option<i64>,
}

/// Drivers over the store, personal data under the vault.
#[derive(Clone)]
pub struct Drivers {
    pub store: SharedStore,
    pub vault: Vault,
}

fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

use crate::key::personal as pii_key;
fn token_key(token: &str) -> Vec<u8> {
    keys::pack(&("token", token))
}
fn token_pii_key(token: &str) -> Vec<u8> {
    keys::pack(&("token-pii", token))
}
pub(crate) fn token_idx_key(index: &[u8]) -> Vec<u8> {
    keys::pack(&("token-idx", index))
}
fn driver_token_key(driver: &str, token: &str) -> Vec<u8> {
    keys::pack(&("driver-token", driver, token))
}
fn site_access_key(site: &str) -> Vec<u8> {
    keys::pack(&("site-access", site))
}
fn watch_key(target: &str, driver: &str) -> Vec<u8> {
    keys::pack(&("watch", target, driver))
}

fn check_personal(field: &str, value: &str) -> Result<(), DriverError> {
    if value.is_empty() || value.len() > 256 || value.chars().any(|c| c.is_control()) {
        return Err(DriverError::Invalid(format!(
            "{field} must be 1 to 256 characters without control characters"
        )));
    }
    if field == "email" && !value.contains('@') {
        return Err(DriverError::Invalid("email must contain '@'".into()));
    }
    Ok(())
}

fn check_currency(c: &str) -> Result<(), DriverError> {
    if c.len() != 3 || !c.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(DriverError::Invalid(format!("currency {c:?} is not an ISO 4217 code")));
    }
    Ok(())
}

/// The second element of each key in a `(area, a, b)` range.
fn last_elements(tx: &mut dyn Transaction, area: &str, a: &str) -> Result<Vec<String>, DriverError> {
    let (b, e) = keys::tuple_range(&(area, a));
    tx.get_range(&b, &e, 0, false)?
        .into_iter()
        .map(|(k, _)| {
            keys::unpack::<(String, String, String)>(&k)
                .map(|t| t.2)
                .map_err(|e| DriverError::Corrupted(e.to_string()))
        })
        .collect()
}

/// Everything held on a driver, for GDPR access and portability.
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    pub driver: DriverRecord,
    pub personal: BTreeMap<String, String>,
    pub tokens: Vec<ExportedToken>,
    pub sessions: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedToken {
    #[serde(flatten)]
    pub token: TokenRecord,
    pub value: String,
}

impl Drivers {
    pub fn new(store: SharedStore, vault: Vault) -> Self {
        Self { store, vault }
    }

    fn seal_personal(
        &self,
        tx: &mut dyn Transaction,
        driver: &str,
        field: &str,
        value: &str,
    ) -> Result<(), DriverError> {
        check_personal(field, value)?;
        let at = FieldRef {
            table: "driver",
            field,
            record_id: driver,
        };
        let blob = self.vault.seal_field(tx, driver, at, value.as_bytes())?;
        tx.set(&pii_key(driver, field), &blob)?;
        Ok(())
    }

    pub fn create(&self, new: NewDriver, now: i64) -> Result<DriverRecord, DriverError> {
        for g in &new.groups {
            check_name("group", g)?;
        }
        check_currency(&new.currency)?;
        let id = random_id("drv");
        self.store.transact(|tx| {
            self.vault.create_subject(tx, &id)?;
            let mut fields = BTreeSet::new();
            for (field, value) in [
                ("name", &new.name),
                ("email", &new.email),
                ("phone", &new.phone),
                ("payment-ref", &new.payment_ref),
            ] {
                if let Some(v) = value {
                    self.seal_personal(tx, &id, field, v)?;
                    fields.insert(field.to_string());
                }
            }
            let rec = DriverRecord {
                driver_id: id.clone(),
                status: AccountStatus::Active,
                expires_at: new.expires_at,
                groups: new.groups.clone(),
                max_concurrent_sessions: new.max_concurrent_sessions.max(1),
                payment: new.payment.unwrap_or(PaymentKind::None),
                currency: new.currency.clone(),
                preferences: Preferences::default(),
                watches: BTreeSet::new(),
                personal_fields: fields,
                created_at: now,
            };
            save(tx, &key::driver(&id), &rec)?;
            Ok(rec)
        })
    }

    pub fn get(&self, id: &str) -> Result<DriverRecord, DriverError> {
        self.store.snapshot(|tx| get_driver(tx, id))
    }

    /// Drivers in id order after `after`, at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<DriverRecord>, DriverError> {
        self.store.snapshot(|tx| {
            let (mut b, e) = keys::tuple_range(&("driver",));
            if let Some(a) = after {
                b = key::driver(a);
                b.push(0);
            }
            tx.get_range(&b, &e, limit, false)?
                .into_iter()
                .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| DriverError::Corrupted(e.to_string())))
                .collect()
        })
    }

    /// Changes an account; the offline list follows its status.
    pub fn update(
        &self,
        id: &str,
        now: i64,
        mut f: impl FnMut(&mut DriverRecord) -> Result<(), DriverError>,
    ) -> Result<DriverRecord, DriverError> {
        self.store.transact(|tx| {
            let mut rec = get_driver(tx, id)?;
            if rec.status == AccountStatus::Erased {
                return Err(DriverError::Precondition(format!("driver {id} was erased")));
            }
            f(&mut rec)?;
            for g in &rec.groups {
                check_name("group", g)?;
            }
            rec.preferences.validate()?;
            save(tx, &key::driver(id), &rec)?;
            for t in last_elements(tx, "driver-token", id)? {
                if let Some(tok) = load::<TokenRecord>(tx, &token_key(&t))? {
                    locallist::record(tx, &tok, &rec, now)?;
                }
            }
            Ok(rec)
        })
    }

    pub fn set_personal(&self, id: &str, field: &str, value: &str) -> Result<(), DriverError> {
        if !PERSONAL_FIELDS.contains(&field) {
            return Err(DriverError::Invalid(format!(
                "personal field {field:?}: expected one of {}",
                PERSONAL_FIELDS.join(", ")
            )));
        }
        self.store.transact(|tx| {
            let mut rec = get_driver(tx, id)?;
            if rec.status == AccountStatus::Erased {
                return Err(DriverError::Precondition(format!("driver {id} was erased")));
            }
            self.seal_personal(tx, id, field, value)?;
            rec.personal_fields.insert(field.into());
            save(tx, &key::driver(id), &rec)
        })
    }

    /// The driver's personal data, decrypted. Callers check the reader's
    /// role and write the read to the audit log.
    pub fn personal(&self, id: &str) -> Result<BTreeMap<String, String>, DriverError> {
        self.store.snapshot(|tx| self.personal_in(tx, id))
    }

    fn personal_in(&self, tx: &mut dyn Transaction, id: &str) -> Result<BTreeMap<String, String>, DriverError> {
        let rec = get_driver(tx, id)?;
        let mut out = BTreeMap::new();
        for field in &rec.personal_fields {
            let Some(blob) = tx.get(&pii_key(id, field))? else {
                continue;
            };
            let at = FieldRef {
                table: "driver",
                field,
                record_id: id,
            };
            let clear = self.vault.open_field(tx, id, at, &blob)?;
            out.insert(field.clone(), String::from_utf8_lossy(&clear).into_owned());
        }
        Ok(out)
    }

    /// Binds a token to a driver. A value already bound anywhere is refused.
    pub fn add_token(
        &self,
        driver: &str,
        kind: TokenKind,
        value: &str,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<TokenRecord, DriverError> {
        let value = kind.normalize(value)?;
        let index = self.vault.blind_index(kind.as_str(), &value);
        let list_hash = hex::encode(self.vault.list_hash(&value));
        let token_id = random_id("tok");
        self.store.transact(|tx| {
            let drv = get_driver(tx, driver)?;
            if drv.status == AccountStatus::Erased {
                return Err(DriverError::Precondition(format!("driver {driver} was erased")));
            }
            if tx.get(&token_idx_key(&index))?.is_some() {
                return Err(DriverError::AlreadyExists("a token with this value".into()));
            }
            let tok = TokenRecord {
                token_id: token_id.clone(),
                driver_id: driver.into(),
                kind,
                status: TokenStatus::Active,
                expires_at,
                index: hex::encode(index),
                list_hash: list_hash.clone(),
                created_at: now,
            };
            let at = FieldRef {
                table: "token",
                field: "value",
                record_id: &token_id,
            };
            let blob = self.vault.seal_field(tx, driver, at, value.as_bytes())?;
            tx.set(&token_pii_key(&token_id), &blob)?;
            tx.set(&token_idx_key(&index), token_id.as_bytes())?;
            tx.set(&driver_token_key(driver, &token_id), b"")?;
            save(tx, &token_key(&token_id), &tok)?;
            locallist::record(tx, &tok, &drv, now)?;
            Ok(tok)
        })
    }

    pub fn token(&self, token_id: &str) -> Result<TokenRecord, DriverError> {
        self.store.snapshot(|tx| {
            load(tx, &token_key(token_id))?.ok_or_else(|| DriverError::NotFound(format!("token {token_id}")))
        })
    }

    pub fn tokens(&self, driver: &str) -> Result<Vec<TokenRecord>, DriverError> {
        self.store.snapshot(|tx| tokens_in(tx, driver))
    }

    pub fn set_token_status(&self, token_id: &str, status: TokenStatus, now: i64) -> Result<TokenRecord, DriverError> {
        self.store.transact(|tx| {
            let mut tok: TokenRecord =
                load(tx, &token_key(token_id))?.ok_or_else(|| DriverError::NotFound(format!("token {token_id}")))?;
            tok.status = status;
            save(tx, &token_key(token_id), &tok)?;
            let drv = get_driver(tx, &tok.driver_id)?;
            locallist::record(tx, &tok, &drv, now)?;
            Ok(tok)
        })
    }

    pub fn remove_token(&self, token_id: &str) -> Result<(), DriverError> {
        self.store.transact(|tx| {
            let tok: TokenRecord =
                load(tx, &token_key(token_id))?.ok_or_else(|| DriverError::NotFound(format!("token {token_id}")))?;
            delete_token(tx, &tok)
        })
    }

    /// Finds the token and its driver by the token's value, through the
    /// blind index.
    pub fn find(
        &self,
        tx: &mut dyn Transaction,
        kind: TokenKind,
        value: &str,
    ) -> Result<Option<(TokenRecord, DriverRecord)>, DriverError> {
        let Ok(value) = kind.normalize(value) else {
            return Ok(None);
        };
        let index = self.vault.blind_index(kind.as_str(), &value);
        let Some(id) = tx.get(&token_idx_key(&index))? else {
            return Ok(None);
        };
        let id = String::from_utf8(id).map_err(|e| DriverError::Corrupted(e.to_string()))?;
        let Some(tok) = load::<TokenRecord>(tx, &token_key(&id))? else {
            return Ok(None);
        };
        let drv = get_driver(tx, &tok.driver_id)?;
        Ok(Some((tok, drv)))
    }

    /// The pseudonymous reference of a token value, known or not: what a
    /// session records instead of the value.
    pub fn token_ref(&self, kind: TokenKind, value: &str) -> String {
        let v = kind.normalize(value).unwrap_or_else(|_| value.to_string());
        hex::encode(self.vault.blind_index(kind.as_str(), &v))[..16].to_string()
    }

    /// Adds to (or, negative, pays out of) a prepaid wallet: a ledger
    /// posting idempotent by `reference` (the payment's id). Returns the
    /// new balance.
    pub fn adjust_wallet(&self, id: &str, amount: Decimal, reference: &str, now: i64) -> Result<Decimal, DriverError> {
        self.store.transact(|tx| {
            let r = get_driver(tx, id)?;
            if r.payment != PaymentKind::Wallet {
                return Err(DriverError::Precondition(format!(
                    "driver {id} pays by {}, not by wallet",
                    r.payment.as_str()
                )));
            }
            Ok(laddnet_ledger::payments::top_up(
                tx,
                id,
                &r.currency,
                amount,
                reference,
                now,
            )?)
        })
    }

    /// The wallet's balance and what is available (balance less holds).
    pub fn wallet(&self, id: &str) -> Result<(Decimal, Decimal), DriverError> {
        self.store.snapshot(|tx| {
            let r = get_driver(tx, id)?;
            Ok((
                laddnet_ledger::payments::wallet_balance(tx, id, &r.currency)?,
                laddnet_ledger::payments::available(tx, id, &r.currency)?,
            ))
        })
    }

    /// Watches (or stops watching) "charger:ID" or "site:ID".
    pub fn watch(&self, id: &str, target: &str, on: bool, now: i64) -> Result<DriverRecord, DriverError> {
        let ok = target
            .split_once(':')
            .is_some_and(|(k, v)| matches!(k, "charger" | "site") && !v.is_empty());
        if !ok {
            return Err(DriverError::Invalid(format!(
                "watch target {target:?}: expected charger:ID or site:ID"
            )));
        }
        check_name("watch target", target)?;
        let rec = self.update(id, now, |r| {
            if on {
                r.watches.insert(target.into());
            } else {
                r.watches.remove(target);
            }
            Ok(())
        })?;
        self.store.transact(|tx| {
            if on {
                tx.set(&watch_key(target, id), b"")?;
            } else {
                tx.clear(&watch_key(target, id))?;
            }
            Ok::<_, DriverError>(())
        })?;
        Ok(rec)
    }

    /// Drivers watching `target` ("charger:ID" or "site:ID").
    pub fn watchers(&self, tx: &mut dyn Transaction, target: &str) -> Result<Vec<String>, DriverError> {
        last_elements(tx, "watch", target)
    }

    pub fn set_site_access(&self, site: &str, access: &SiteAccess) -> Result<(), DriverError> {
        for g in &access.groups {
            check_name("group", g)?;
        }
        self.store.transact(|tx| save(tx, &site_access_key(site), access))
    }

    pub fn site_access(&self, tx: &mut dyn Transaction, site: &str) -> Result<SiteAccess, DriverError> {
        Ok(load(tx, &site_access_key(site))?.unwrap_or_default())
    }

    /// Open sessions of the driver, by transaction id.
    pub fn active_sessions(&self, tx: &mut dyn Transaction, driver: &str) -> Result<Vec<String>, DriverError> {
        last_elements(tx, "driver-session", driver)
    }

    /// Every session of the driver still within retention.
    pub fn history(&self, driver: &str) -> Result<Vec<String>, DriverError> {
        self.store.snapshot(|tx| last_elements(tx, "driver-history", driver))
    }

    /// Everything held on a driver (GDPR access and portability). The
    /// caller audits the read.
    pub fn export(&self, id: &str) -> Result<Export, DriverError> {
        self.store.snapshot(|tx| {
            let driver = get_driver(tx, id)?;
            let personal = if driver.status == AccountStatus::Erased {
                BTreeMap::new()
            } else {
                self.personal_in(tx, id)?
            };
            let mut tokens = Vec::new();
            for t in tokens_in(tx, id)? {
                let value = match tx.get(&token_pii_key(&t.token_id))? {
                    Some(blob) => {
                        let at = FieldRef {
                            table: "token",
                            field: "value",
                            record_id: &t.token_id,
                        };
                        String::from_utf8_lossy(&self.vault.open_field(tx, id, at, &blob)?).into_owned()
                    }
                    None => String::new(),
                };
                tokens.push(ExportedToken { token: t, value });
            }
            let sessions = last_elements(tx, "driver-history", id)?;
            Ok(Export {
                driver,
                personal,
                tokens,
                sessions,
            })
        })
    }

    /// Erases a driver: the data keys are destroyed (every copy of the
    /// personal data, backups included, becomes unreadable), the sealed
    /// fields, tokens and watches are deleted, queued notifications are
    /// dropped. The pseudonymous id, its sessions, CDRs and ledger entries
    /// stay, so the books still balance.
    pub fn erase(&self, id: &str, now: i64) -> Result<DriverRecord, DriverError> {
        self.store.transact(|tx| {
            let mut rec = get_driver(tx, id)?;
            self.vault.shred(tx, id)?;
            for f in PERSONAL_FIELDS {
                tx.clear(&pii_key(id, f))?;
            }
            for t in tokens_in(tx, id)? {
                delete_token(tx, &t)?;
            }
            for w in &rec.watches {
                tx.clear(&watch_key(w, id))?;
            }
            outbox::forget_driver(tx, id)?;
            rec.status = AccountStatus::Erased;
            rec.personal_fields.clear();
            rec.watches.clear();
            rec.groups.clear();
            rec.preferences = Preferences::default();
            rec.expires_at = Some(now);
            save(tx, &key::driver(id), &rec)?;
            Ok(rec)
        })
    }
}

pub(crate) fn get_driver(tx: &mut dyn Transaction, id: &str) -> Result<DriverRecord, DriverError> {
    load(tx, &key::driver(id))?.ok_or_else(|| DriverError::NotFound(format!("driver {id}")))
}

fn tokens_in(tx: &mut dyn Transaction, driver: &str) -> Result<Vec<TokenRecord>, DriverError> {
    let mut out = Vec::new();
    for t in last_elements(tx, "driver-token", driver)? {
        if let Some(tok) = load(tx, &token_key(&t))? {
            out.push(tok);
        }
    }
    Ok(out)
}

fn delete_token(tx: &mut dyn Transaction, tok: &TokenRecord) -> Result<(), DriverError> {
    let index = hex::decode(&tok.index).map_err(|e| DriverError::Corrupted(e.to_string()))?;
    tx.clear(&token_idx_key(&index))?;
    tx.clear(&token_pii_key(&tok.token_id))?;
    tx.clear(&token_key(&tok.token_id))?;
    tx.clear(&driver_token_key(&tok.driver_id, &tok.token_id))?;
    locallist::remove(tx, &tok.list_hash)
}
