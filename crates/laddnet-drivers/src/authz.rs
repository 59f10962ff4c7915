//! The authorization decision: token, account, payment, site access,
//! concurrent sessions and the driver's price limit, in one snapshot read.

use laddnet_store::{StoreExt, Transaction};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::model::*;
use crate::{DriverError, Drivers};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthStatus {
    Accepted,
    Unknown,
    Blocked,
    Expired,
    InsufficientFunds,
    PrivateSite,
    ConcurrentLimit,
    PriceAboveMaximum,
    NoPaymentMethod,
}

impl AuthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthStatus::Accepted => "accepted",
            AuthStatus::Unknown => "unknown",
            AuthStatus::Blocked => "blocked",
            AuthStatus::Expired => "expired",
            AuthStatus::InsufficientFunds => "insufficient-funds",
            AuthStatus::PrivateSite => "private-site",
            AuthStatus::ConcurrentLimit => "concurrent-limit",
            AuthStatus::PriceAboveMaximum => "price-above-maximum",
            AuthStatus::NoPaymentMethod => "no-payment-method",
        }
    }
}

/// What is being asked: this token, at this place, now.
#[derive(Debug, Clone)]
pub struct AuthRequest<'a> {
    pub kind: TokenKind,
    pub value: &'a str,
    pub site_id: Option<&'a str>,
    /// The energy price that applies here now, and its currency.
    pub price_per_kwh: Option<(Decimal, String)>,
    pub now: i64,
    /// A prepaid wallet must hold at least this to start.
    pub min_wallet_balance: Decimal,
    /// The session being reconciled, not counted against the limit.
    pub session: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthDecision {
    pub status: AuthStatus,
    /// Why, in words an operator and a driver understand. Never contains
    /// the token value or personal data.
    pub reason: String,
    pub driver_id: Option<String>,
    pub token_id: Option<String>,
    /// Pseudonymous reference of the token (known or not).
    pub token_ref: String,
}

impl AuthDecision {
    pub fn accepted(&self) -> bool {
        self.status == AuthStatus::Accepted
    }
}

impl Drivers {
    /// Decides whether this token may start charging here now.
    pub fn authorize(&self, req: &AuthRequest<'_>) -> Result<AuthDecision, DriverError> {
        self.store.snapshot(|tx| self.authorize_in(tx, req))
    }

    pub fn authorize_in(&self, tx: &mut dyn Transaction, req: &AuthRequest<'_>) -> Result<AuthDecision, DriverError> {
        let token_ref = self.token_ref(req.kind, req.value);
        let refuse =
            |status: AuthStatus, reason: String, drv: Option<&DriverRecord>, tok: Option<&TokenRecord>| AuthDecision {
                status,
                reason,
                driver_id: drv.map(|d| d.driver_id.clone()),
                token_id: tok.map(|t| t.token_id.clone()),
                token_ref: token_ref.clone(),
            };
        let Some((tok, drv)) = self.find(tx, req.kind, req.value)? else {
            return Ok(refuse(
                AuthStatus::Unknown,
                format!("{} token is not known", req.kind.as_str()),
                None,
                None,
            ));
        };
        let (d, t) = (Some(&drv), Some(&tok));
        match tok.effective_status(req.now) {
            TokenStatus::Blocked => return Ok(refuse(AuthStatus::Blocked, "token is blocked".into(), d, t)),
            TokenStatus::Expired => return Ok(refuse(AuthStatus::Expired, "token has expired".into(), d, t)),
            TokenStatus::Active => {}
        }
        match drv.effective_status(req.now) {
            AccountStatus::Blocked => {
                return Ok(refuse(
                    AuthStatus::Blocked,
                    format!("account {} is blocked", drv.driver_id),
                    d,
                    t,
                ));
            }
            AccountStatus::Expired | AccountStatus::Erased => {
                return Ok(refuse(
                    AuthStatus::Expired,
                    format!("account {} has expired", drv.driver_id),
                    d,
                    t,
                ));
            }
            AccountStatus::Active => {}
        }
        if let Some(site) = req.site_id {
            let access = self.site_access(tx, site)?;
            if access.private && access.groups.is_disjoint(&drv.groups) {
                return Ok(refuse(
                    AuthStatus::PrivateSite,
                    format!(
                        "site {site} is private to groups {}; the account is in none of them",
                        access.groups.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    d,
                    t,
                ));
            }
        }
        let open = self
            .active_sessions(tx, &drv.driver_id)?
            .into_iter()
            .filter(|s| Some(s.as_str()) != req.session)
            .count() as u32;
        if open >= drv.max_concurrent_sessions {
            return Ok(refuse(
                AuthStatus::ConcurrentLimit,
                format!(
                    "account has {open} session(s) open; its limit is {}",
                    drv.max_concurrent_sessions
                ),
                d,
                t,
            ));
        }
        match drv.payment {
            PaymentKind::None => {
                return Ok(refuse(
                    AuthStatus::NoPaymentMethod,
                    "account has no payment method".into(),
                    d,
                    t,
                ));
            }
            PaymentKind::Wallet => {
                let avail = laddnet_ledger::payments::available(tx, &drv.driver_id, &drv.currency)?;
                if avail < req.min_wallet_balance || avail <= Decimal::ZERO {
                    return Ok(refuse(
                        AuthStatus::InsufficientFunds,
                        format!(
                            "insufficient funds: the wallet has {avail} {} available, a start needs {} {}",
                            drv.currency, req.min_wallet_balance, drv.currency
                        ),
                        d,
                        t,
                    ));
                }
            }
            _ => {}
        }
        if let (Some(max), Some((price, currency))) = (drv.preferences.max_price_per_kwh, &req.price_per_kwh)
            && price > &max
        {
            return Ok(refuse(
                AuthStatus::PriceAboveMaximum,
                format!("energy costs {price} {currency}/kWh here, above the driver's maximum of {max} {currency}/kWh"),
                d,
                t,
            ));
        }
        Ok(AuthDecision {
            status: AuthStatus::Accepted,
            reason: String::new(),
            driver_id: Some(drv.driver_id),
            token_id: Some(tok.token_id),
            token_ref,
        })
    }
}
