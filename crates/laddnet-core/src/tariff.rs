//! Tariffs with the semantics of OCPI 2.2.1's tariff module: price
//! components ENERGY (per kWh), TIME (per hour charging), PARKING_TIME (per
//! hour connected, not charging) and FLAT (per session), each with a price
//! excluding VAT, an optional VAT percentage and a step size; elements whose
//! restrictions combine with AND; for each dimension the first matching
//! element applies; min and max price per session.
//!
//! [`Tariff::parse_json`] accepts the OCPI JSON shape (numbers or strings
//! for amounts, `restrictions` or `tariff_restrictions`) and refuses any
//! invalid definition with a message naming the field.

use std::fmt;
use std::str::FromStr;

use chrono::{NaiveDate, NaiveTime, Weekday};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Why a tariff definition was refused. `field` is a path such as
/// `elements[2].restrictions.start_time`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct TariffError {
    pub field: String,
    pub problem: String,
}

fn err<T>(field: impl Into<String>, problem: impl Into<String>) -> Result<T, TariffError> {
    Err(TariffError {
        field: field.into(),
        problem: problem.into(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Dimension {
    Energy,
    Flat,
    Time,
    ParkingTime,
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dimension::Energy => "ENERGY",
            Dimension::Flat => "FLAT",
            Dimension::Time => "TIME",
            Dimension::ParkingTime => "PARKING_TIME",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub excl_vat: Decimal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incl_vat: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceComponent {
    #[serde(rename = "type")]
    pub dimension: Dimension,
    /// Per kWh (ENERGY), per hour (TIME, PARKING_TIME) or per session (FLAT), excl. VAT.
    pub price: Decimal,
    /// VAT percentage; absent: no VAT applies (not the same as 0 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vat: Option<Decimal>,
    /// Billing granularity: Wh for ENERGY, seconds for the times.
    pub step_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DayOfWeek {
    Monday,
    Tuesday,
    Wednesday,
    Thursday,
    Friday,
    Saturday,
    Sunday,
}

impl DayOfWeek {
    pub fn matches(self, w: Weekday) -> bool {
        matches!(
            (self, w),
            (DayOfWeek::Monday, Weekday::Mon)
                | (DayOfWeek::Tuesday, Weekday::Tue)
                | (DayOfWeek::Wednesday, Weekday::Wed)
                | (DayOfWeek::Thursday, Weekday::Thu)
                | (DayOfWeek::Friday, Weekday::Fri)
                | (DayOfWeek::Saturday, Weekday::Sat)
                | (DayOfWeek::Sunday, Weekday::Sun)
        )
    }
}

/// When an element applies. Times and dates are site-local.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restrictions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_kwh: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_kwh: Option<Decimal>,
    /// Sum over phases, A.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_current: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_current: Option<Decimal>,
    /// kW.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_power: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_power: Option<Decimal>,
    /// Seconds since the session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_duration: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub day_of_week: Vec<DayOfWeek>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TariffElement {
    pub price_components: Vec<PriceComponent>,
    #[serde(default, alias = "tariff_restrictions", skip_serializing_if = "Option::is_none")]
    pub restrictions: Option<Restrictions>,
}

/// A tariff. Versions are immutable: a change is a new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tariff {
    pub id: String,
    #[serde(default)]
    pub version: u32,
    /// ISO 4217.
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_price: Option<Price>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price: Option<Price>,
    pub elements: Vec<TariffElement>,
}

/// Fields of an OCPI tariff that laddnet accepts and does not use.
const IGNORED_OCPI_FIELDS: &[&str] = &[
    "country_code",
    "party_id",
    "type",
    "tariff_alt_text",
    "tariff_alt_url",
    "energy_mix",
    "last_updated",
    "tax_included",
    "start_date_time",
    "end_date_time",
];

pub(crate) fn parse_time(s: &str) -> Option<NaiveTime> {
    let b = s.as_bytes();
    if b.len() != 5 || b[2] != b':' {
        return None;
    }
    let (h, m): (u32, u32) = (s[..2].parse().ok()?, s[3..].parse().ok()?);
    if !b[..2].iter().chain(&b[3..]).all(u8::is_ascii_digit) || h > 23 || m > 59 {
        return None;
    }
    NaiveTime::from_hms_opt(h, m, 0)
}

pub(crate) fn parse_date(s: &str) -> Option<NaiveDate> {
    if s.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

/// Minor units of a currency (ISO 4217 exponent); 2 for those not listed.
pub fn currency_exponent(code: &str) -> u32 {
    match code {
        "JPY" | "KRW" | "ISK" | "CLP" | "VND" | "HUF" => 0,
        "KWD" | "BHD" | "OMR" | "JOD" | "TND" => 3,
        _ => 2,
    }
}

impl Tariff {
    /// Parses an OCPI-shaped tariff and validates it.
    pub fn parse_json(text: &str) -> Result<Tariff, TariffError> {
        let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| TariffError {
            field: "tariff".into(),
            problem: format!("not JSON: {e}"),
        })?;
        if let Some(obj) = v.as_object_mut() {
            for f in IGNORED_OCPI_FIELDS {
                obj.remove(*f);
            }
        }
        let t: Tariff = serde_json::from_value(v).map_err(|e| TariffError {
            field: "tariff".into(),
            problem: e.to_string(),
        })?;
        t.validate()?;
        Ok(t)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), TariffError> {
        if self.id.is_empty()
            || self.id.len() > 36
            || !self.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return err("id", "must be 1 to 36 characters of A-Z a-z 0-9 - _ .");
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return err("currency", "must be an ISO 4217 code such as EUR or SEK");
        }
        if self.elements.is_empty() {
            return err("elements", "a tariff needs at least one element");
        }
        if self.elements.len() > 64 {
            return err("elements", "at most 64 elements");
        }
        for (name, p) in [("min_price", &self.min_price), ("max_price", &self.max_price)] {
            if let Some(p) = p {
                if p.excl_vat.is_sign_negative() {
                    return err(format!("{name}.excl_vat"), "must not be negative");
                }
                if p.incl_vat.is_some_and(|i| i < p.excl_vat) {
                    return err(format!("{name}.incl_vat"), "must not be below excl_vat");
                }
            }
        }
        // With VAT in play the incl.-VAT bound cannot be derived from the
        // excl. one (the VAT mix changes during a session): it must be given.
        let has_vat = self
            .elements
            .iter()
            .flat_map(|e| &e.price_components)
            .any(|c| c.vat.is_some_and(|v| !v.is_zero()));
        for (name, p) in [("min_price", &self.min_price), ("max_price", &self.max_price)] {
            if has_vat && p.as_ref().is_some_and(|p| p.incl_vat.is_none()) {
                return err(format!("{name}.incl_vat"), "required when price components carry VAT");
            }
        }
        if let (Some(min), Some(max)) = (&self.min_price, &self.max_price)
            && min.excl_vat > max.excl_vat
        {
            return err("min_price.excl_vat", "must not exceed max_price.excl_vat");
        }
        for (i, e) in self.elements.iter().enumerate() {
            let at = |f: &str| format!("elements[{i}].{f}");
            if e.price_components.is_empty() {
                return err(at("price_components"), "an element needs at least one price component");
            }
            for (j, c) in e.price_components.iter().enumerate() {
                let at = |f: &str| format!("elements[{i}].price_components[{j}].{f}");
                if c.price.is_sign_negative() {
                    return err(at("price"), "must not be negative");
                }
                if c.price.scale() > 6 {
                    return err(at("price"), "at most 6 decimals");
                }
                if let Some(v) = c.vat
                    && (v.is_sign_negative() || v > Decimal::from(100))
                {
                    return err(at("vat"), "must be a percentage from 0 to 100");
                }
                if c.dimension != Dimension::Flat && c.step_size == 0 {
                    return err(at("step_size"), "must be at least 1");
                }
                if e.price_components[..j].iter().any(|o| o.dimension == c.dimension) {
                    return err(at("type"), format!("{} appears twice in one element", c.dimension));
                }
            }
            let Some(r) = &e.restrictions else { continue };
            let at = |f: &str| format!("elements[{i}].restrictions.{f}");
            for (name, v) in [("start_time", &r.start_time), ("end_time", &r.end_time)] {
                if let Some(v) = v
                    && parse_time(v).is_none()
                {
                    return err(at(name), format!("{v:?} is not HH:MM (24 h)"));
                }
            }
            for (name, v) in [("start_date", &r.start_date), ("end_date", &r.end_date)] {
                if let Some(v) = v
                    && parse_date(v).is_none()
                {
                    return err(at(name), format!("{v:?} is not YYYY-MM-DD"));
                }
            }
            if let (Some(s), Some(e)) = (
                r.start_date.as_deref().and_then(parse_date),
                r.end_date.as_deref().and_then(parse_date),
            ) && s >= e
            {
                return err(at("end_date"), "must be after start_date (end_date is exclusive)");
            }
            for (lo, hi, lo_name, hi_name) in [
                (r.min_kwh, r.max_kwh, "min_kwh", "max_kwh"),
                (r.min_current, r.max_current, "min_current", "max_current"),
                (r.min_power, r.max_power, "min_power", "max_power"),
            ] {
                for (v, n) in [(lo, lo_name), (hi, hi_name)] {
                    if v.is_some_and(|v| v.is_sign_negative()) {
                        return err(at(n), "must not be negative");
                    }
                }
                if let (Some(lo), Some(hi)) = (lo, hi)
                    && lo >= hi
                {
                    return err(at(hi_name), format!("must be greater than {lo_name}"));
                }
            }
            if let (Some(lo), Some(hi)) = (r.min_duration, r.max_duration)
                && lo >= hi
            {
                return err(at("max_duration"), "must be greater than min_duration");
            }
        }
        Ok(())
    }
}

impl FromStr for Tariff {
    type Err = TariffError;
    fn from_str(s: &str) -> Result<Self, TariffError> {
        Tariff::parse_json(s)
    }
}
