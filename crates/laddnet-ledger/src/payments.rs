//! How sessions are paid: a provider interface with authorize at start,
//! capture at the end, release and refund, and the built-in provider, the
//! prepaid wallet.
//!
//! The wallet is money the operator holds for a driver: the ledger account
//! `wallet:<driver>` (credit-normal). A top-up debits
//! `cash:wallet-topups` and credits the wallet. A start places a hold; the
//! session's CDR posting captures from the wallet in the same transaction
//! (debit the wallet, credit the driver's receivable) and drops the hold,
//! so a CDR is paid exactly once, whenever and by whoever it is posted.
//! What the wallet cannot cover stays receivable and shows on the invoice.
//!
//! | key | value |
//! |---|---|
//! | `("wallet-hold", session)` | [`Hold`] |
//! | `("wallet-holds", driver, session)` | empty: a driver's holds |
//! | `("wallet-capture", session)` | decimal string: what the CDR took |
//! | `("payment-intent", session)` | [`Intent`]: card / mobile-wallet payments |

use laddnet_store::{Store, StoreExt, Transaction, keys};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::cdr::Cdr;
use crate::ledger::{self, Side, from_minor, receivable_account, to_minor};
use crate::{LedgerError, get, put};

pub const TOPUP_ACCOUNT: &str = "cash:wallet-topups";

pub fn wallet_account(driver: &str) -> String {
    format!("wallet:{driver}")
}

/// Money reserved for a session that has started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub session: String,
    pub driver: String,
    pub currency: String,
    pub amount: Decimal,
    /// Unix seconds.
    pub at: i64,
}

/// What a provider is asked at a start.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest<'a> {
    pub driver: &'a str,
    pub session: &'a str,
    pub currency: &'a str,
    /// The least the method must cover for the session to start.
    pub minimum: Decimal,
    /// What to reserve when the method can (a wallet reserves up to this).
    pub hold: Decimal,
    pub at: i64,
}

/// A payment method's provider. Calls run inside a store transaction, so
/// a provider's records and the ledger move together.
pub trait PaymentProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Reserves money for a session, or refuses with the reason
    /// ([`LedgerError::Declined`]). Authorizing a session twice returns
    /// the first hold.
    fn authorize(&self, tx: &mut dyn Transaction, req: &AuthorizeRequest<'_>) -> Result<Hold, LedgerError>;
    /// Takes what the session cost (at most what the method holds); the
    /// rest of the hold is released. Returns what was taken.
    fn capture(&self, tx: &mut dyn Transaction, cdr: &Cdr) -> Result<Decimal, LedgerError>;
    /// Drops a hold without taking anything (the session never cost).
    fn release(&self, tx: &mut dyn Transaction, session: &str) -> Result<(), LedgerError>;
    /// Gives back `amount` of what a CDR took.
    fn refund(&self, tx: &mut dyn Transaction, cdr: &Cdr, amount: Decimal, reason: &str) -> Result<(), LedgerError>;
}

fn hold_key(session: &str) -> Vec<u8> {
    keys::pack(&("wallet-hold", session))
}
fn holds_key(driver: &str, session: &str) -> Vec<u8> {
    keys::pack(&("wallet-holds", driver, session))
}
fn capture_key(session: &str) -> Vec<u8> {
    keys::pack(&("wallet-capture", session))
}

/// The wallet's balance (what the operator holds for the driver).
pub fn wallet_balance(tx: &mut dyn Transaction, driver: &str, currency: &str) -> Result<Decimal, LedgerError> {
    let minor = ledger::balance_in(tx, currency, &wallet_account(driver))?;
    // Credit-normal: the balance is credits minus debits.
    Ok(from_minor(-minor, currency))
}

/// The sum of the driver's open holds in `currency`.
pub fn held(tx: &mut dyn Transaction, driver: &str, currency: &str) -> Result<Decimal, LedgerError> {
    let (b, e) = keys::tuple_range(&("wallet-holds", driver));
    let mut sum = Decimal::ZERO;
    for (k, _) in tx.get_range(&b, &e, 0, false)? {
        let (_, _, session): (String, String, String) =
            keys::unpack(&k).map_err(|e| LedgerError::Corrupted(format!("{e:?}")))?;
        if let Some(h) = get::<Hold>(tx, &hold_key(&session))?
            && h.currency == currency
        {
            sum += h.amount;
        }
    }
    Ok(sum)
}

/// Balance less holds: what a new session may use.
pub fn available(tx: &mut dyn Transaction, driver: &str, currency: &str) -> Result<Decimal, LedgerError> {
    Ok(wallet_balance(tx, driver, currency)? - held(tx, driver, currency)?)
}

/// Adds money to a wallet (or, negative, pays it out: at most what is
/// available). `reference` makes the top-up idempotent (a payment id).
pub fn top_up(
    tx: &mut dyn Transaction,
    driver: &str,
    currency: &str,
    amount: Decimal,
    reference: &str,
    at: i64,
) -> Result<Decimal, LedgerError> {
    if amount.is_zero() {
        return Err(LedgerError::Invalid("a top-up of zero".into()));
    }
    let minor = to_minor(amount, currency)
        .map_err(|_| LedgerError::Invalid(format!("{amount} has more decimals than {currency} allows")))?;
    if amount.is_sign_negative() {
        let avail = available(tx, driver, currency)?;
        if avail < -amount {
            return Err(LedgerError::Declined(format!(
                "the wallet has {avail} {currency} available (balance less holds), less than {}",
                -amount
            )));
        }
    }
    let memo = format!("wallet top-up {reference}");
    let (wallet_side, cash_side) = if minor > 0 {
        (Side::Credit, Side::Debit)
    } else {
        (Side::Debit, Side::Credit)
    };
    let posted = ledger::post(
        tx,
        &format!("topup:{reference}"),
        currency,
        &[
            (wallet_account(driver), wallet_side, minor.abs(), memo.clone()),
            (TOPUP_ACCOUNT.to_string(), cash_side, minor.abs(), memo),
        ],
        at,
    )?;
    if !posted {
        return Err(LedgerError::Precondition(format!(
            "top-up {reference} was booked already"
        )));
    }
    wallet_balance(tx, driver, currency)
}

/// The built-in provider: the prepaid wallet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wallet;

impl Wallet {
    /// Marks a session as paid from the wallet without reserving anything
    /// (a start the wallet could not cover, made offline): its CDR takes
    /// what the wallet has then.
    pub fn attach(
        &self,
        tx: &mut dyn Transaction,
        driver: &str,
        session: &str,
        currency: &str,
        at: i64,
    ) -> Result<(), LedgerError> {
        if get::<Hold>(tx, &hold_key(session))?.is_none() {
            let h = Hold {
                session: session.into(),
                driver: driver.into(),
                currency: currency.into(),
                amount: Decimal::ZERO,
                at,
            };
            put(tx, &hold_key(session), &h)?;
            tx.set(&holds_key(driver, session), b"")?;
        }
        Ok(())
    }
}

impl PaymentProvider for Wallet {
    fn name(&self) -> &'static str {
        "wallet"
    }

    fn authorize(&self, tx: &mut dyn Transaction, req: &AuthorizeRequest<'_>) -> Result<Hold, LedgerError> {
        if let Some(h) = get::<Hold>(tx, &hold_key(req.session))? {
            return Ok(h);
        }
        let avail = available(tx, req.driver, req.currency)?;
        if avail < req.minimum || avail <= Decimal::ZERO {
            return Err(LedgerError::Declined(format!(
                "insufficient funds: the wallet has {avail} {} available, a start needs {} {}",
                req.currency, req.minimum, req.currency
            )));
        }
        let h = Hold {
            session: req.session.into(),
            driver: req.driver.into(),
            currency: req.currency.into(),
            amount: req.hold.min(avail),
            at: req.at,
        };
        put(tx, &hold_key(req.session), &h)?;
        tx.set(&holds_key(req.driver, req.session), b"")?;
        Ok(h)
    }

    fn capture(&self, tx: &mut dyn Transaction, cdr: &Cdr) -> Result<Decimal, LedgerError> {
        let Some(h) = get::<Hold>(tx, &hold_key(&cdr.id))? else {
            return Ok(Decimal::ZERO);
        };
        self.release(tx, &cdr.id)?;
        if h.currency != cdr.currency {
            return Ok(Decimal::ZERO);
        }
        let take = cdr
            .total_incl_vat
            .min(wallet_balance(tx, &h.driver, &h.currency)?)
            .max(Decimal::ZERO);
        if take.is_zero() {
            return Ok(take);
        }
        let minor = to_minor(take, &cdr.currency)?;
        let memo = format!("session {} paid from the wallet", cdr.id);
        if ledger::post(
            tx,
            &format!("capture:{}", cdr.id),
            &cdr.currency,
            &[
                (wallet_account(&h.driver), Side::Debit, minor, memo.clone()),
                (receivable_account(cdr), Side::Credit, minor, memo),
            ],
            cdr.created_at,
        )? {
            tx.set(&capture_key(&cdr.id), take.to_string().as_bytes())?;
        }
        Ok(take)
    }

    fn release(&self, tx: &mut dyn Transaction, session: &str) -> Result<(), LedgerError> {
        if let Some(h) = get::<Hold>(tx, &hold_key(session))? {
            tx.clear(&hold_key(session))?;
            tx.clear(&holds_key(&h.driver, session))?;
        }
        Ok(())
    }

    fn refund(&self, tx: &mut dyn Transaction, cdr: &Cdr, amount: Decimal, reason: &str) -> Result<(), LedgerError> {
        let Some(driver) = &cdr.driver_ref else {
            return Err(LedgerError::Precondition(format!("CDR {} has no driver", cdr.id)));
        };
        let minor = to_minor(amount, &cdr.currency)?;
        let memo = format!("refund of {} to the wallet: {reason}", cdr.id);
        ledger::post(
            tx,
            &format!("wallet-refund:{}", cdr.id),
            &cdr.currency,
            &[
                (receivable_account(cdr), Side::Debit, minor, memo.clone()),
                (wallet_account(driver), Side::Credit, minor, memo),
            ],
            crate::now(),
        )?;
        Ok(())
    }
}

/// What a session's CDR took from the wallet (zero when nothing).
pub fn captured(tx: &mut dyn Transaction, session: &str) -> Result<Decimal, LedgerError> {
    Ok(tx
        .get(&capture_key(session))?
        .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(Decimal::ZERO))
}

/// What a session has paid: taken from the wallet, or captured (less
/// refunds) by the card provider.
pub fn paid(tx: &mut dyn Transaction, session: &str) -> Result<Decimal, LedgerError> {
    let card = get::<Intent>(tx, &intent_key(session))?.map_or(Decimal::ZERO, |i| i.captured - i.refunded);
    Ok(captured(tx, session)? + card)
}

/// Status of a card or mobile-wallet payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntentStatus {
    Authorized,
    Captured,
    Released,
    Refunded,
}

/// A card or mobile-wallet payment as laddnet books it: the provider's
/// opaque method reference lives (sealed) on the driver's account; this is
/// the instruction a payment-service adapter carries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub session: String,
    pub driver: String,
    pub currency: String,
    pub authorized: Decimal,
    pub captured: Decimal,
    pub refunded: Decimal,
    pub status: IntentStatus,
    pub at: i64,
}

fn intent_key(session: &str) -> Vec<u8> {
    keys::pack(&("payment-intent", session))
}

/// Cards and mobile wallets: records the authorize / capture / refund
/// instructions for the payment service provider (PSP). Talking to a PSP is
/// a network boundary that does not exist on these machines: an adapter
/// reads `("payment-intent", …)` and carries them out. Until it reports a
/// decline, a card start is accepted, as card terminals do offline.
#[derive(Debug, Clone, Copy, Default)]
pub struct CardIntents;

impl PaymentProvider for CardIntents {
    fn name(&self) -> &'static str {
        "card"
    }

    fn authorize(&self, tx: &mut dyn Transaction, req: &AuthorizeRequest<'_>) -> Result<Hold, LedgerError> {
        let i = match get::<Intent>(tx, &intent_key(req.session))? {
            Some(i) => i,
            None => {
                let i = Intent {
                    session: req.session.into(),
                    driver: req.driver.into(),
                    currency: req.currency.into(),
                    authorized: req.hold,
                    captured: Decimal::ZERO,
                    refunded: Decimal::ZERO,
                    status: IntentStatus::Authorized,
                    at: req.at,
                };
                put(tx, &intent_key(req.session), &i)?;
                i
            }
        };
        Ok(Hold {
            session: i.session,
            driver: i.driver,
            currency: i.currency,
            amount: i.authorized,
            at: i.at,
        })
    }

    fn capture(&self, tx: &mut dyn Transaction, cdr: &Cdr) -> Result<Decimal, LedgerError> {
        let Some(mut i) = get::<Intent>(tx, &intent_key(&cdr.id))? else {
            return Ok(Decimal::ZERO);
        };
        if i.status != IntentStatus::Authorized {
            return Ok(i.captured);
        }
        // A card is charged what the session cost, even above the
        // pre-authorization (the PSP adapter tops the authorization up).
        i.captured = cdr.total_incl_vat;
        i.status = IntentStatus::Captured;
        put(tx, &intent_key(&cdr.id), &i)?;
        Ok(i.captured)
    }

    fn release(&self, tx: &mut dyn Transaction, session: &str) -> Result<(), LedgerError> {
        if let Some(mut i) = get::<Intent>(tx, &intent_key(session))?
            && i.status == IntentStatus::Authorized
        {
            i.status = IntentStatus::Released;
            put(tx, &intent_key(session), &i)?;
        }
        Ok(())
    }

    fn refund(&self, tx: &mut dyn Transaction, cdr: &Cdr, amount: Decimal, _reason: &str) -> Result<(), LedgerError> {
        let mut i = get::<Intent>(tx, &intent_key(&cdr.id))?
            .ok_or_else(|| LedgerError::NotFound(format!("card payment of {}", cdr.id)))?;
        if amount > i.captured - i.refunded {
            return Err(LedgerError::Invalid(format!(
                "refund of {amount} exceeds the {} {} captured and not yet refunded",
                i.captured - i.refunded,
                i.currency
            )));
        }
        i.refunded += amount;
        i.status = IntentStatus::Refunded;
        put(tx, &intent_key(&cdr.id), &i)
    }
}

/// The card or mobile-wallet payment of a session, if any.
pub fn intent(store: &dyn Store, session: &str) -> Result<Option<Intent>, LedgerError> {
    store.snapshot(|tx| get(tx, &intent_key(session)))
}

/// Settles a posted CDR with whichever provider authorized its session:
/// called by [`ledger::post_cdr`] in the posting's transaction.
pub(crate) fn settle(tx: &mut dyn Transaction, cdr: &Cdr) -> Result<(), LedgerError> {
    Wallet.capture(tx, cdr)?;
    CardIntents.capture(tx, cdr)?;
    Ok(())
}
