//! Driver records as stored. None of these types holds personal data: the
//! personal fields live sealed under their own keys.

use std::collections::BTreeSet;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::DriverError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccountStatus {
    Active,
    Blocked,
    Expired,
    /// Personal data destroyed; the pseudonymous id stays for the ledger.
    Erased,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Blocked => "blocked",
            AccountStatus::Expired => "expired",
            AccountStatus::Erased => "erased",
        }
    }
    pub fn parse(s: &str) -> Result<Self, DriverError> {
        match s {
            "active" => Ok(Self::Active),
            "blocked" => Ok(Self::Blocked),
            "expired" => Ok(Self::Expired),
            _ => Err(DriverError::Invalid(format!(
                "status {s:?}: expected active, blocked or expired"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenKind {
    /// An RFID card's UID (hex; separators and case ignored).
    Rfid,
    /// A token an app presents.
    App,
    /// An e-mobility contract id (eMAID).
    Contract,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Rfid => "rfid",
            TokenKind::App => "app",
            TokenKind::Contract => "contract",
        }
    }
    pub fn parse(s: &str) -> Result<Self, DriverError> {
        match s {
            "rfid" => Ok(Self::Rfid),
            "app" => Ok(Self::App),
            "contract" => Ok(Self::Contract),
            _ => Err(DriverError::Invalid(format!(
                "token kind {s:?}: expected rfid, app or contract"
            ))),
        }
    }

    /// The canonical form of a token value: RFID UIDs are upper-case hex
    /// without separators, contract ids upper-case without dashes.
    pub fn normalize(self, value: &str) -> Result<String, DriverError> {
        let v = value.trim();
        let out: String = match self {
            TokenKind::Rfid => {
                let hex: String = v.chars().filter(|c| !matches!(c, ':' | '-' | ' ')).collect();
                if hex.len() < 8
                    || hex.len() > 20
                    || !hex.chars().all(|c| c.is_ascii_hexdigit())
                    || !hex.len().is_multiple_of(2)
                {
                    return Err(DriverError::Invalid(
                        "an RFID UID is 4 to 10 bytes of hex (e.g. 04A1B2C3)".into(),
                    ));
                }
                hex.to_ascii_uppercase()
            }
            TokenKind::App => {
                if v.len() < 8 || v.len() > 64 || !v.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(DriverError::Invalid(
                        "an app token is 8 to 64 printable ASCII characters".into(),
                    ));
                }
                v.to_string()
            }
            TokenKind::Contract => {
                let c: String = v.chars().filter(|c| *c != '-').collect::<String>().to_ascii_uppercase();
                if c.len() < 9 || c.len() > 20 || !c.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(DriverError::Invalid(
                        "a contract id (eMAID) is 9 to 20 letters and digits".into(),
                    ));
                }
                c
            }
        };
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PaymentKind {
    None,
    /// Prepaid balance held by laddnet.
    Wallet,
    /// A card with the payment provider; the reference is sealed.
    Card,
    /// A mobile wallet (Apple Pay, Google Pay, …) through the same
    /// provider; the reference is sealed.
    MobileWallet,
    /// Post-paid, invoiced monthly (fleet accounts).
    Invoice,
}

impl PaymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentKind::None => "none",
            PaymentKind::Wallet => "wallet",
            PaymentKind::Card => "card",
            PaymentKind::MobileWallet => "mobile-wallet",
            PaymentKind::Invoice => "invoice",
        }
    }
    pub fn parse(s: &str) -> Result<Self, DriverError> {
        match s {
            "none" => Ok(Self::None),
            "wallet" => Ok(Self::Wallet),
            "card" => Ok(Self::Card),
            "mobile-wallet" => Ok(Self::MobileWallet),
            "invoice" => Ok(Self::Invoice),
            _ => Err(DriverError::Invalid(format!(
                "payment {s:?}: expected none, wallet, card, mobile-wallet or invoice"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Channel {
    /// The driver app's gRPC stream.
    Stream,
    /// The operator's webhook endpoints (which push to the app).
    Webhook,
}

impl Channel {
    pub fn parse(s: &str) -> Result<Self, DriverError> {
        match s {
            "stream" => Ok(Self::Stream),
            "webhook" => Ok(Self::Webhook),
            _ => Err(DriverError::Invalid(format!(
                "channel {s:?}: expected stream or webhook"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Stream => "stream",
            Channel::Webhook => "webhook",
        }
    }
}

/// What the driver asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preferences {
    /// Charging is "nearly done" within 5 points of this state of charge.
    pub target_soc_percent: Option<u32>,
    /// Local "HH:MM": charging is "nearly done" 10 minutes before.
    pub departure: Option<String>,
    /// A start above this energy price is refused.
    pub max_price_per_kwh: Option<Decimal>,
    pub channels: BTreeSet<Channel>,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            target_soc_percent: None,
            departure: None,
            max_price_per_kwh: None,
            channels: [Channel::Stream, Channel::Webhook].into_iter().collect(),
        }
    }
}

impl Preferences {
    pub fn validate(&self) -> Result<(), DriverError> {
        if let Some(t) = self.target_soc_percent
            && !(10..=100).contains(&t)
        {
            return Err(DriverError::Invalid(format!(
                "target state of charge {t} is not 10 to 100 percent"
            )));
        }
        if let Some(d) = &self.departure
            && parse_hhmm(d).is_none()
        {
            return Err(DriverError::Invalid(format!("departure {d:?} is not HH:MM")));
        }
        if let Some(p) = self.max_price_per_kwh
            && p <= Decimal::ZERO
        {
            return Err(DriverError::Invalid("maximum price per kWh must be positive".into()));
        }
        Ok(())
    }
}

/// Minutes after midnight of "HH:MM".
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverRecord {
    /// Pseudonymous: what sessions, CDRs and the ledger carry.
    pub driver_id: String,
    pub status: AccountStatus,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub groups: BTreeSet<String>,
    pub max_concurrent_sessions: u32,
    pub payment: PaymentKind,
    pub currency: String,
    pub preferences: Preferences,
    /// "charger:ID" / "site:ID".
    pub watches: BTreeSet<String>,
    /// Which personal fields are held (sealed), by name.
    pub personal_fields: BTreeSet<String>,
    pub created_at: i64,
}

impl DriverRecord {
    pub fn effective_status(&self, now: i64) -> AccountStatus {
        match self.status {
            AccountStatus::Active if self.expires_at.is_some_and(|e| e <= now) => AccountStatus::Expired,
            s => s,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenStatus {
    Active,
    Blocked,
    Expired,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Blocked => "blocked",
            TokenStatus::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Result<Self, DriverError> {
        match s {
            "active" => Ok(Self::Active),
            "blocked" => Ok(Self::Blocked),
            "expired" => Ok(Self::Expired),
            _ => Err(DriverError::Invalid(format!(
                "token status {s:?}: expected active, blocked or expired"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token_id: String,
    pub driver_id: String,
    pub kind: TokenKind,
    pub status: TokenStatus,
    pub expires_at: Option<i64>,
    /// Hex of the blind index (HMAC): pseudonymous, safe to show.
    pub index: String,
    /// Hex of the charger-side list hash.
    pub list_hash: String,
    pub created_at: i64,
}

impl TokenRecord {
    pub fn effective_status(&self, now: i64) -> TokenStatus {
        match self.status {
            TokenStatus::Active if self.expires_at.is_some_and(|e| e <= now) => TokenStatus::Expired,
            s => s,
        }
    }
    /// A short pseudonymous reference for sessions and logs.
    pub fn token_ref(&self) -> String {
        self.index.chars().take(16).collect()
    }
}

/// Who may charge at a site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteAccess {
    pub private: bool,
    /// Drivers in any of these groups may charge at a private site.
    pub groups: BTreeSet<String>,
}

/// The personal fields a driver account can hold.
pub const PERSONAL_FIELDS: [&str; 4] = ["name", "email", "phone", "payment-ref"];

/// A group or watch target name: short, printable, no spaces.
pub fn check_name(what: &str, s: &str) -> Result<(), DriverError> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err(DriverError::Invalid(format!(
            "{what} {s:?} must be 1 to 64 letters, digits, '-', '_', '.' or ':'"
        )));
    }
    Ok(())
}
