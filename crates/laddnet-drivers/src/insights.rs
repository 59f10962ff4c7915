//! Habits per driver and utilisation per site, from session summaries.
//! Hours and weekdays are the site's local time.

use std::collections::BTreeMap;

use chrono::{Datelike, TimeZone, Timelike};
use chrono_tz::Tz;
use laddnet_core::charging::ConnectorType;
use rust_decimal::Decimal;
use serde::Serialize;

/// What the insights need of one session.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub started_at_ms: i64,
    /// The end, or the last reading of a session still open.
    pub ended_at_ms: i64,
    pub energy_wh: u64,
    pub connector_type: Option<ConnectorType>,
    pub site_id: Option<String>,
    pub time_zone: Tz,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DriverInsights {
    pub sessions: u64,
    /// Sessions started in each local hour, 0–23.
    pub starts_by_hour: [u64; 24],
    /// Sessions started on each weekday, Monday first.
    pub starts_by_weekday: [u64; 7],
    pub average_duration_minutes: Decimal,
    pub average_energy_kwh: Decimal,
    pub total_energy_kwh: Decimal,
    pub ac_sessions: u64,
    pub dc_sessions: u64,
    /// Energy over time plugged in, averaged over sessions.
    pub average_power_kw: Decimal,
    /// Sessions per site, most used first.
    pub sites: Vec<(String, u64)>,
}

fn local(tz: Tz, ms: i64) -> Option<chrono::DateTime<Tz>> {
    tz.timestamp_millis_opt(ms).single()
}

/// A driver's habits over `sessions`.
pub fn driver_insights(sessions: &[SessionSummary]) -> DriverInsights {
    let mut out = DriverInsights {
        sessions: sessions.len() as u64,
        starts_by_hour: [0; 24],
        starts_by_weekday: [0; 7],
        average_duration_minutes: Decimal::ZERO,
        average_energy_kwh: Decimal::ZERO,
        total_energy_kwh: Decimal::ZERO,
        ac_sessions: 0,
        dc_sessions: 0,
        average_power_kw: Decimal::ZERO,
        sites: vec![],
    };
    if sessions.is_empty() {
        return out;
    }
    let mut minutes = Decimal::ZERO;
    let mut wh: u64 = 0;
    let mut power_sum = Decimal::ZERO;
    let mut powered = 0u64;
    let mut sites: BTreeMap<String, u64> = BTreeMap::new();
    for s in sessions {
        if let Some(t) = local(s.time_zone, s.started_at_ms) {
            out.starts_by_hour[t.hour() as usize] += 1;
            out.starts_by_weekday[t.weekday().num_days_from_monday() as usize] += 1;
        }
        let dur_ms = (s.ended_at_ms - s.started_at_ms).max(0);
        minutes += Decimal::from(dur_ms) / Decimal::from(60_000);
        wh += s.energy_wh;
        if dur_ms > 0 {
            // kWh / h = Wh * 3600 / ms
            power_sum += Decimal::from(s.energy_wh) * Decimal::from(3_600) / Decimal::from(dur_ms);
            powered += 1;
        }
        match s.connector_type {
            Some(ConnectorType::Ac) => out.ac_sessions += 1,
            Some(ConnectorType::Dc) => out.dc_sessions += 1,
            None => {}
        }
        if let Some(site) = &s.site_id {
            *sites.entry(site.clone()).or_default() += 1;
        }
    }
    let n = Decimal::from(sessions.len() as u64);
    out.average_duration_minutes = (minutes / n).round_dp(1);
    out.total_energy_kwh = (Decimal::from(wh) / Decimal::from(1000)).round_dp(3);
    out.average_energy_kwh = (Decimal::from(wh) / Decimal::from(1000) / n).round_dp(3);
    if powered > 0 {
        out.average_power_kw = (power_sum / Decimal::from(powered)).round_dp(2);
    }
    let mut sites: Vec<_> = sites.into_iter().collect();
    sites.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out.sites = sites;
    out
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SiteUtilisation {
    pub connectors: u32,
    pub days: u32,
    /// Share of connector time in use, per local hour of day, 0–1.
    pub by_hour: Vec<Decimal>,
    /// Sessions started per local hour of day.
    pub starts_by_hour: [u64; 24],
}

/// How busy a site's `connectors` were per hour of day over the window
/// `[from_ms, to_ms)`.
pub fn site_utilisation(
    sessions: &[SessionSummary],
    connectors: u32,
    tz: Tz,
    from_ms: i64,
    to_ms: i64,
) -> SiteUtilisation {
    let days = ((to_ms - from_ms).max(1) + 86_399_999) / 86_400_000;
    let mut busy_ms = [0i64; 24];
    let mut starts = [0u64; 24];
    for s in sessions {
        if let Some(t) = local(tz, s.started_at_ms)
            && (from_ms..to_ms).contains(&s.started_at_ms)
        {
            starts[t.hour() as usize] += 1;
        }
        let (mut at, end) = (s.started_at_ms.max(from_ms), s.ended_at_ms.min(to_ms));
        while at < end {
            let Some(t) = local(tz, at) else { break };
            // The end of this local hour.
            let into_hour = (t.minute() as i64 * 60 + t.second() as i64) * 1000 + (at.rem_euclid(1000));
            let next = (at - into_hour + 3_600_000).min(end);
            busy_ms[t.hour() as usize] += next - at;
            at = next;
        }
    }
    let capacity = Decimal::from(connectors.max(1) as i64 * days * 3_600_000);
    SiteUtilisation {
        connectors,
        days: days as u32,
        by_hour: busy_ms
            .iter()
            .map(|b| (Decimal::from(*b) / capacity).round_dp(3))
            .collect(),
        starts_by_hour: starts,
    }
}
