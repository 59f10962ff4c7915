//! The cost engine: a tariff and a session's meter readings give charging
//! periods and a cost breakdown per dimension. Pure and deterministic: the
//! same inputs always give the same cost, live or after the fact.
//!
//! - Consecutive readings make segments. A segment where energy flowed is
//!   charging (ENERGY, TIME); one where it did not is parking
//!   (PARKING_TIME). Its power is the energy over the time, its current the
//!   later reading's.
//! - Restrictions hold continuously: a segment is split wherever it
//!   crosses a boundary — a local time of day named by any element, local
//!   midnight (days, dates, DST), a duration threshold, an energy threshold
//!   — and each part is priced by the first element that matches it.
//!   Energy is spread linearly over time within a segment.
//! - Step size rounds each dimension's priced volume up once per session,
//!   at the last element that priced it. Charging time added by that
//!   rounding covers parking that falls inside it (OCPI 2.2.1's step-size
//!   example 1); parking beyond it is billed in full.
//! - `min_price` and `max_price` bound the total excl. VAT and incl. VAT
//!   each on its own. A tariff whose components carry VAT must give both
//!   (the incl. bound cannot be derived: the VAT mix changes during a
//!   session). A component without VAT has none (incl = excl).
//! - Amounts are `Decimal`; rounding to the currency's minor unit (half
//!   away from zero) happens once, on the totals.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::tariff::{DayOfWeek, Dimension, Restrictions, Tariff, currency_exponent, parse_date, parse_time};

/// One meter reading of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// Unix milliseconds, UTC.
    pub at_ms: i64,
    /// The energy register, Wh.
    pub energy_wh: u64,
    /// Sum over phases, mA.
    pub current_ma: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    #[error("readings must be in time order")]
    Unordered,
    #[error("a session needs at least one reading")]
    Empty,
}

/// A stretch of the session priced by one set of elements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargingPeriod {
    /// Unix milliseconds (fractional where an energy threshold split it).
    pub start_ms: Decimal,
    pub end_ms: Decimal,
    pub energy_wh: Decimal,
    pub charging: bool,
    /// The element pricing each dimension in this period, if any.
    pub energy_element: Option<usize>,
    pub time_element: Option<usize>,
    pub parking_element: Option<usize>,
}

/// What one dimension cost under one element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostLine {
    pub dimension: Dimension,
    pub element: usize,
    /// Measured: Wh (ENERGY), seconds (TIME, PARKING_TIME), 1 (FLAT).
    pub volume: Decimal,
    /// After step-size rounding.
    pub billed_volume: Decimal,
    pub price: Decimal,
    pub vat: Option<Decimal>,
    /// Unrounded.
    pub excl_vat: Decimal,
    pub incl_vat: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub currency: String,
    pub periods: Vec<ChargingPeriod>,
    pub lines: Vec<CostLine>,
    /// Sums of the lines, unrounded.
    pub subtotal_excl_vat: Decimal,
    pub subtotal_incl_vat: Decimal,
    /// After min/max price, rounded to the currency's minor unit.
    pub total_excl_vat: Decimal,
    pub total_incl_vat: Decimal,
    pub min_price_applied: bool,
    pub max_price_applied: bool,
}

impl Cost {
    pub fn total_vat(&self) -> Decimal {
        self.total_incl_vat - self.total_excl_vat
    }
}

/// The state a restriction is checked against.
struct State {
    local: chrono::NaiveDateTime,
    energy_kwh: Decimal,
    duration_s: Decimal,
    power_kw: Decimal,
    current_a: Decimal,
}

/// A tariff's restrictions parsed once, for the hot loop.
struct Compiled {
    elements: Vec<CompiledElement>,
}

struct CompiledElement {
    energy: bool,
    time: bool,
    parking: bool,
    flat: bool,
    rule: Option<Rule>,
}

struct Rule {
    start: Option<NaiveTime>,
    end: Option<NaiveTime>,
    start_date: Option<NaiveDate>,
    end_date: Option<NaiveDate>,
    /// Bit n: weekday n (Monday = 0); 0 = every day.
    days: u8,
    /// The numeric bounds, scaled once to what a period carries: energy in
    /// Wh, power in kW, current in mA, duration in ms.
    min_wh: Option<Decimal>,
    max_wh: Option<Decimal>,
    min_power: Option<Decimal>,
    max_power: Option<Decimal>,
    min_ma: Option<Decimal>,
    max_ma: Option<Decimal>,
    min_duration_ms: Option<Decimal>,
    max_duration_ms: Option<Decimal>,
    /// Any of the numeric bounds is set.
    numeric: bool,
}

impl Compiled {
    fn of(t: &Tariff) -> Self {
        let elements = t
            .elements
            .iter()
            .map(|e| {
                let has = |d: Dimension| e.price_components.iter().any(|c| c.dimension == d);
                CompiledElement {
                    energy: has(Dimension::Energy),
                    time: has(Dimension::Time),
                    parking: has(Dimension::ParkingTime),
                    flat: has(Dimension::Flat),
                    rule: e.restrictions.as_ref().map(Rule::of),
                }
            })
            .collect();
        Compiled { elements }
    }

    fn element_for(&self, dim: Dimension, s: &State) -> Option<usize> {
        self.elements
            .iter()
            .position(|e| e.has(dim) && e.rule.as_ref().is_none_or(|r| r.matches(s)))
    }
}

impl CompiledElement {
    fn has(&self, dim: Dimension) -> bool {
        match dim {
            Dimension::Energy => self.energy,
            Dimension::Time => self.time,
            Dimension::ParkingTime => self.parking,
            Dimension::Flat => self.flat,
        }
    }
}

impl Rule {
    fn of(r: &Restrictions) -> Self {
        const DAYS: [DayOfWeek; 7] = [
            DayOfWeek::Monday,
            DayOfWeek::Tuesday,
            DayOfWeek::Wednesday,
            DayOfWeek::Thursday,
            DayOfWeek::Friday,
            DayOfWeek::Saturday,
            DayOfWeek::Sunday,
        ];
        let days = r
            .day_of_week
            .iter()
            .fold(0u8, |m, d| m | (1 << DAYS.iter().position(|x| x == d).unwrap_or(0)));
        let numeric = r.min_kwh.is_some()
            || r.max_kwh.is_some()
            || r.min_power.is_some()
            || r.max_power.is_some()
            || r.min_current.is_some()
            || r.max_current.is_some()
            || r.min_duration.is_some()
            || r.max_duration.is_some();
        Rule {
            numeric,
            start: r.start_time.as_deref().and_then(parse_time),
            end: r.end_time.as_deref().and_then(parse_time),
            start_date: r.start_date.as_deref().and_then(parse_date),
            end_date: r.end_date.as_deref().and_then(parse_date),
            days,
            min_wh: r.min_kwh.map(thousand),
            max_wh: r.max_kwh.map(thousand),
            min_power: r.min_power,
            max_power: r.max_power,
            min_ma: r.min_current.map(thousand),
            max_ma: r.max_current.map(thousand),
            min_duration_ms: r.min_duration.map(|d| thousand(Decimal::from(d))),
            max_duration_ms: r.max_duration.map(|d| thousand(Decimal::from(d))),
        }
    }

    /// The time of day, date and weekday restrictions.
    fn local_ok(&self, local: chrono::NaiveDateTime) -> bool {
        let t = local.time();
        let in_time = match (self.start, self.end) {
            (Some(a), Some(b)) if a <= b => t >= a && t < b,
            (Some(a), Some(b)) => t >= a || t < b,
            (Some(a), None) => t >= a,
            (None, Some(b)) => t < b,
            (None, None) => true,
        };
        let d = local.date();
        let in_dates = self.start_date.is_none_or(|a| d >= a) && self.end_date.is_none_or(|b| d < b);
        let in_days = self.days == 0 || self.days & (1 << d.weekday().num_days_from_monday()) != 0;
        in_time && in_dates && in_days
    }

    /// The energy, power, current and duration restrictions at the start
    /// of a period (power only computed if asked for).
    fn numbers_ok(&self, p: &Piece, seg: &mut Segment) -> bool {
        let power_ok = if self.min_power.is_some() || self.max_power.is_some() {
            let kw = seg.power_kw();
            lo(self.min_power, kw) && hi(self.max_power, kw)
        } else {
            true
        };
        lo(self.min_wh, p.energy_wh)
            && hi(self.max_wh, p.energy_wh)
            && power_ok
            && lo(self.min_ma, seg.current_ma)
            && hi(self.max_ma, seg.current_ma)
            && lo(self.min_duration_ms, p.since_start_ms)
            && hi(self.max_duration_ms, p.since_start_ms)
    }

    fn matches(&self, s: &State) -> bool {
        let thousand_of = |d: Decimal| d * Decimal::from(1000);
        self.local_ok(s.local)
            && lo(self.min_wh, thousand_of(s.energy_kwh))
            && hi(self.max_wh, thousand_of(s.energy_kwh))
            && lo(self.min_power, s.power_kw)
            && hi(self.max_power, s.power_kw)
            && lo(self.min_ma, thousand_of(s.current_a))
            && hi(self.max_ma, thousand_of(s.current_a))
            && lo(self.min_duration_ms, thousand_of(s.duration_s))
            && hi(self.max_duration_ms, thousand_of(s.duration_s))
    }
}

/// A lower bound holds (inclusive); none always holds.
fn lo(min: Option<Decimal>, v: Decimal) -> bool {
    min.is_none_or(|m| v >= m)
}

/// An upper bound holds (exclusive); none always holds.
fn hi(max: Option<Decimal>, v: Decimal) -> bool {
    max.is_none_or(|m| v < m)
}

fn thousand(d: Decimal) -> Decimal {
    d.checked_mul(Decimal::from(1000)).unwrap_or(Decimal::MAX)
}

/// `d / 1000`, exact: the decimal point moves where the scale allows.
fn milli(d: Decimal) -> Decimal {
    let mut x = d;
    if x.set_scale(d.scale() + 3).is_ok() {
        x
    } else {
        d / Decimal::from(1000)
    }
}

fn local(tz: &Tz, ms: Decimal) -> chrono::NaiveDateTime {
    let ms = ms.floor().try_into().unwrap_or(0i64);
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(tz)
        .naive_local()
}

/// The UTC instant of a local wall-clock time; a time skipped by a DST
/// change maps to the first instant after the gap.
fn utc_of(tz: &Tz, date: NaiveDate, time: NaiveTime) -> Option<i64> {
    let mut dt = date.and_time(time);
    for _ in 0..4 {
        if let Some(t) = tz.from_local_datetime(&dt).earliest() {
            return Some(t.timestamp_millis());
        }
        dt += Duration::minutes(30);
    }
    None
}

/// Boundaries every session might cross: local times of day, durations, energies.
struct Boundaries {
    times: Vec<NaiveTime>,
    durations_ms: Vec<i64>,
    energies_wh: Vec<Decimal>,
}

impl Boundaries {
    fn of(t: &Tariff) -> Self {
        let mut times: BTreeSet<NaiveTime> = BTreeSet::new();
        times.insert(NaiveTime::MIN);
        let mut durations = BTreeSet::new();
        let mut energies = BTreeSet::new();
        for r in t.elements.iter().filter_map(|e| e.restrictions.as_ref()) {
            for s in [&r.start_time, &r.end_time].into_iter().flatten() {
                if let Some(x) = parse_time(s) {
                    times.insert(x);
                }
            }
            for d in [r.min_duration, r.max_duration].into_iter().flatten() {
                durations.insert(d.saturating_mul(1000).min(i64::MAX as u64) as i64);
            }
            for k in [r.min_kwh, r.max_kwh].into_iter().flatten() {
                energies.insert(k * Decimal::from(1000));
            }
        }
        Boundaries {
            times: times.into_iter().collect(),
            durations_ms: durations.into_iter().collect(),
            energies_wh: energies.into_iter().collect(),
        }
    }
}

/// Prices a session's readings into periods (no step rounding, no totals).
/// `start_ms` and `base_wh` are the session's start and first register
/// value, so a session priced in pieces gives the same periods.
///
/// The hot loop stays in integers where it can: a segment that crosses no
/// boundary is one period with whole-millisecond, whole-Wh ends; the
/// restrictions are compared against thresholds scaled once (Wh, ms, mA)
/// instead of dividing per period; the local-time part of every element is
/// decided once per stretch between local boundaries ("slot"), not by a
/// time-zone conversion per period; where no numeric restriction can change
/// the choice, the slot also fixes the elements, so such a period is priced
/// without looking at the elements at all. The boundaries are walked with
/// cursors (readings come in time order), not searched per segment. Only
/// segments that are cut (a boundary inside) take the exact decimal path,
/// and only slots that a DST change runs through convert each period's
/// start.
pub fn periods(
    t: &Tariff,
    readings: &[Reading],
    tz: &Tz,
    start_ms: i64,
    base_wh: u64,
) -> Result<Vec<ChargingPeriod>, CostError> {
    periods_into(t, readings, tz, start_ms, base_wh, None, false)
}

/// Appends `p` to `out`, or, where `merge` and the last period ends where
/// `p` starts and is priced alike (the same charging state and the same
/// element for every dimension), extends the last period instead.
fn push_period(out: &mut Vec<ChargingPeriod>, p: ChargingPeriod, merge: bool) {
    if merge
        && let Some(last) = out.last_mut()
        && last.end_ms == p.start_ms
        && last.charging == p.charging
        && (last.energy_element, last.time_element, last.parking_element)
            == (p.energy_element, p.time_element, p.parking_element)
    {
        last.end_ms = p.end_ms;
        last.energy_wh += p.energy_wh;
        return;
    }
    out.push(p);
}

/// Merges consecutive periods priced alike (see [`push_period`]): what a
/// CDR keeps, one period per change of what prices the session.
pub fn merge_periods(periods: &[ChargingPeriod]) -> Vec<ChargingPeriod> {
    let mut out = Vec::new();
    for p in periods {
        push_period(&mut out, p.clone(), true);
    }
    out
}

/// [`periods`], adding each period to `meter` as it is priced (a period
/// between two readings in integers, without reading it back); with
/// `merge`, consecutive periods priced alike are returned as one
/// ([`merge_periods`]), a run of whole ones summed in integers.
fn periods_into(
    t: &Tariff,
    readings: &[Reading],
    tz: &Tz,
    start_ms: i64,
    base_wh: u64,
    mut meter: Option<&mut Meter>,
    merge: bool,
) -> Result<Vec<ChargingPeriod>, CostError> {
    if readings.windows(2).any(|w| w[1].at_ms < w[0].at_ms) {
        return Err(CostError::Unordered);
    }
    let mut plan = Plan::of(t, tz, readings);
    let mut out = Vec::with_capacity(if merge { 8 } else { readings.len().saturating_sub(1) });
    let mut cuts: Vec<(Decimal, Decimal)> = Vec::new();
    let start = Decimal::from(start_ms);
    // Duration thresholds as instants of this session.
    let due: Vec<i64> = plan
        .b
        .durations_ms
        .iter()
        .filter_map(|d| start_ms.checked_add(*d))
        .collect();
    // Readings come in time order, so each boundary list is walked with a
    // cursor: `lo` instants are at or before the segment's start, `hi`
    // before its end; `next_due` is the first duration instant after it.
    let (mut lo, mut hi, mut next_due) = (0usize, 0usize, 0usize);
    // The last slot's fixed elements, for charging or parking.
    let mut last_fixed: Option<(usize, bool, Option<Picks>)> = None;
    // Consecutive whole periods priced alike, summed before they reach
    // the meter: (elements, Wh, ms).
    let mut run: Option<(Picks, u64, i64)> = None;
    let flush = |meter: &mut Option<&mut Meter>, run: &mut Option<(Picks, u64, i64)>| {
        if let (Some(m), Some((picks, wh, ms))) = (meter.as_deref_mut(), run.take()) {
            m.add_whole(t, picks, wh, ms);
        }
    };
    // With `merge`: the whole periods priced alike since the last one
    // pushed, as (elements, charging, start, end, Wh).
    let mut open: Option<(Picks, bool, i64, i64, u64)> = None;
    let close = |out: &mut Vec<ChargingPeriod>, open: &mut Option<(Picks, bool, i64, i64, u64)>| {
        if let Some(((energy_element, time_element, parking_element), charging, s, e, wh)) = open.take() {
            push_period(
                out,
                ChargingPeriod {
                    start_ms: Decimal::from(s),
                    end_ms: Decimal::from(e),
                    energy_wh: Decimal::from(wh),
                    charging,
                    energy_element,
                    time_element,
                    parking_element,
                },
                true,
            );
        }
    };
    for w in readings.windows(2) {
        let (a, z) = (w[0], w[1]);
        if z.at_ms == a.at_ms {
            continue;
        }
        let de_wh = z.energy_wh.saturating_sub(a.energy_wh);
        let e0_wh = a.energy_wh.saturating_sub(base_wh);
        let charging = de_wh > 0;
        while lo < plan.instants.len() && plan.instants[lo] <= a.at_ms {
            lo += 1;
        }
        hi = hi.max(lo);
        while hi < plan.instants.len() && plan.instants[hi] < z.at_ms {
            hi += 1;
        }
        while next_due < due.len() && due[next_due] <= a.at_ms {
            next_due += 1;
        }
        let duration_cut = due.get(next_due).is_some_and(|ms| *ms < z.at_ms);
        let (e0d, e1d) = (Decimal::from(e0_wh), Decimal::from(e0_wh + de_wh));
        let energy_cut =
            charging && !plan.b.energies_wh.is_empty() && plan.b.energies_wh.iter().any(|e| *e > e0d && *e < e1d);
        if lo == hi && !duration_cut && !energy_cut {
            // The common case: one period, integer ends, in slot `lo - 1`.
            let slot = lo.checked_sub(1);
            let fixed = match (slot, last_fixed) {
                (Some(s), Some((s0, c0, f))) if s == s0 && charging == c0 => f,
                (Some(s), _) => {
                    let f = plan.fixed(s, charging);
                    last_fixed = Some((s, charging, f));
                    f
                }
                (None, _) => None,
            };
            if let Some(picks @ (energy_element, time_element, parking_element)) = fixed {
                // Its slot alone decides the elements.
                if meter.is_some() {
                    let ms = z.at_ms - a.at_ms;
                    match &mut run {
                        Some((p, wh, sum_ms))
                            if *p == picks && wh.checked_add(de_wh).is_some() && sum_ms.checked_add(ms).is_some() =>
                        {
                            *wh += de_wh;
                            *sum_ms += ms;
                        }
                        _ => {
                            flush(&mut meter, &mut run);
                            run = Some((picks, de_wh, ms));
                        }
                    }
                }
                if merge {
                    match &mut open {
                        Some((p, c, _, end, wh)) if *p == picks && *c == charging && *end == a.at_ms => {
                            if let Some(sum) = wh.checked_add(de_wh) {
                                *end = z.at_ms;
                                *wh = sum;
                                continue;
                            }
                            close(&mut out, &mut open);
                        }
                        _ => close(&mut out, &mut open),
                    }
                    open = Some((picks, charging, a.at_ms, z.at_ms, de_wh));
                    continue;
                }
                out.push(ChargingPeriod {
                    start_ms: Decimal::from(a.at_ms),
                    end_ms: Decimal::from(z.at_ms),
                    energy_wh: Decimal::from(de_wh),
                    charging,
                    energy_element,
                    time_element,
                    parking_element,
                });
                continue;
            }
            let mut seg = Segment::of(a, z);
            let piece = Piece {
                floor_ms: a.at_ms,
                s: Decimal::from(a.at_ms),
                since_start_ms: Decimal::from(a.at_ms.saturating_sub(start_ms)),
                energy_wh: e0d,
            };
            let de = seg.de;
            let p = plan.period_in(slot, &piece, &mut seg, Decimal::from(z.at_ms), de);
            flush(&mut meter, &mut run);
            if let Some(m) = meter.as_deref_mut() {
                m.add(t, &p);
            }
            close(&mut out, &mut open);
            push_period(&mut out, p, merge);
            continue;
        }
        let mut seg = Segment::of(a, z);
        // Cut: the exact decimal path (split points as (time, cumulative
        // energy), both exact where they are the boundary).
        let (t0, t1) = (Decimal::from(a.at_ms), Decimal::from(z.at_ms));
        let (dt, de, e0) = (seg.dt, seg.de, e0d);
        let energy_at = |t: Decimal| e0 + de * (t - t0) / dt;
        cuts.clear();
        cuts.push((t0, e0));
        cuts.push((t1, e0 + de));
        for ms in &plan.instants[lo..hi] {
            let ms = Decimal::from(*ms);
            cuts.push((ms, energy_at(ms)));
        }
        for d in &due {
            let ms = Decimal::from(*d);
            if ms > t0 && ms < t1 {
                cuts.push((ms, energy_at(ms)));
            }
        }
        for e in &plan.b.energies_wh {
            if *e > e0 && *e < e0 + de {
                cuts.push((t0 + dt * (*e - e0) / de, *e));
            }
        }
        cuts.sort();
        cuts.dedup_by(|x, y| x.0 == y.0);
        for c in cuts.windows(2) {
            let ((s, es), (e, ee)) = (c[0], c[1]);
            let piece = Piece {
                floor_ms: s.floor().try_into().unwrap_or(0i64),
                s,
                since_start_ms: s - start,
                energy_wh: es,
            };
            let p = plan.period(&piece, &mut seg, e, ee - es);
            flush(&mut meter, &mut run);
            if let Some(m) = meter.as_deref_mut() {
                m.add(t, &p);
            }
            close(&mut out, &mut open);
            push_period(&mut out, p, merge);
        }
    }
    flush(&mut meter, &mut run);
    close(&mut out, &mut open);
    Ok(out)
}

/// One segment between two readings.
struct Segment {
    charging: bool,
    dt: Decimal,
    de: Decimal,
    current_ma: Decimal,
    /// kW = Wh / h, computed only if a restriction asks for it.
    power_kw: Option<Decimal>,
}

impl Segment {
    fn of(a: Reading, z: Reading) -> Segment {
        let de_wh = z.energy_wh.saturating_sub(a.energy_wh);
        Segment {
            charging: de_wh > 0,
            dt: Decimal::from(z.at_ms - a.at_ms),
            de: Decimal::from(de_wh),
            current_ma: Decimal::from(z.current_ma),
            power_kw: None,
        }
    }

    fn power_kw(&mut self) -> Decimal {
        *self
            .power_kw
            .get_or_insert_with(|| self.de * Decimal::from(3600) / self.dt)
    }
}

/// Where a period starts.
struct Piece {
    floor_ms: i64,
    s: Decimal,
    since_start_ms: Decimal,
    /// Energy since the session's start, Wh.
    energy_wh: Decimal,
}

/// A tariff prepared for pricing one stretch of readings.
struct Plan<'a> {
    tz: &'a Tz,
    b: Boundaries,
    compiled: Compiled,
    /// Every local time-of-day boundary (and midnight) over the readings'
    /// span as UTC instants, DST applied, sorted.
    instants: Vec<i64>,
    /// Per slot (from one instant to the next), filled on first use.
    slots: Vec<Option<Slot>>,
}

/// What one slot decides for every period in it.
#[derive(Clone, Copy)]
struct Slot {
    /// The elements whose time, date and day restrictions hold throughout
    /// the slot (bit n: element n), or `None` where they may change inside.
    mask: Option<u64>,
    /// Per dimension (ENERGY, TIME, PARKING_TIME): the element pricing every
    /// period in the slot, where no numeric restriction can change the
    /// choice; `None`: chosen period by period.
    picks: [Option<Option<usize>>; 3],
}

/// The elements pricing ENERGY, TIME and PARKING_TIME in one period.
type Picks = (Option<usize>, Option<usize>, Option<usize>);

const PICKED: [Dimension; 3] = [Dimension::Energy, Dimension::Time, Dimension::ParkingTime];

impl<'a> Plan<'a> {
    fn of(t: &Tariff, tz: &'a Tz, readings: &[Reading]) -> Self {
        let b = Boundaries::of(t);
        let mut instants: Vec<i64> = Vec::new();
        if let (Some(first), Some(last)) = (readings.first(), readings.last()) {
            let d0 = local(tz, Decimal::from(first.at_ms)).date() - Duration::days(1);
            let d1 = local(tz, Decimal::from(last.at_ms)).date() + Duration::days(1);
            let mut day = d0;
            while day <= d1 {
                for time in &b.times {
                    if let Some(ms) = utc_of(tz, day, *time) {
                        instants.push(ms);
                    }
                }
                day += Duration::days(1);
            }
            instants.sort_unstable();
            instants.dedup();
        }
        Plan {
            tz,
            compiled: Compiled::of(t),
            slots: vec![None; instants.len()],
            instants,
            b,
        }
    }

    /// The slot holding `ms`, if any.
    fn slot_of(&self, ms: i64) -> Option<usize> {
        self.instants.partition_point(|x| *x <= ms).checked_sub(1)
    }

    fn slot(&mut self, slot: usize) -> Slot {
        if let Some(known) = self.slots[slot] {
            return known;
        }
        let mask = self.uniform_slot(slot);
        let picks = PICKED.map(|dim| mask.and_then(|m| self.fixed_pick(dim, m)));
        let known = Slot { mask, picks };
        self.slots[slot] = Some(known);
        known
    }

    /// The elements (ENERGY, TIME, PARKING_TIME) pricing every charging or
    /// parking period in `slot`, where the slot alone decides them.
    fn fixed(&mut self, slot: usize, charging: bool) -> Option<Picks> {
        let [energy, time, parking] = self.slot(slot).picks;
        if charging {
            Some((energy?, time?, None))
        } else {
            Some((None, None, parking?))
        }
    }

    /// The element that prices `dim` wherever the local-time restrictions
    /// of `mask` hold, if no numeric restriction decides it first.
    fn fixed_pick(&self, dim: Dimension, mask: u64) -> Option<Option<usize>> {
        for (i, e) in self.compiled.elements.iter().enumerate() {
            if !e.has(dim) {
                continue;
            }
            match &e.rule {
                None => return Some(Some(i)),
                Some(_) if mask & (1 << i) == 0 => continue,
                Some(r) if r.numeric => return None,
                Some(_) => return Some(Some(i)),
            }
        }
        Some(None)
    }

    fn uniform_slot(&self, slot: usize) -> Option<u64> {
        if self.compiled.elements.len() > 64 {
            return None;
        }
        let x0 = self.instants[slot];
        let last = self.instants.get(slot + 1)? - 1;
        let (l0, l1) = (local_ms(self.tz, x0), local_ms(self.tz, last));
        // Local time runs on with UTC through the slot (no DST change in
        // it), on one date, and passes no boundary: every local-time
        // restriction reads the same anywhere in it.
        if (l1 - l0).num_milliseconds() != last - x0 || l0.date() != l1.date() {
            return None;
        }
        let (t0, t1) = (l0.time(), l1.time());
        if self.b.times.iter().any(|t| *t > t0 && *t <= t1) {
            return None;
        }
        let mut mask = 0u64;
        for (i, e) in self.compiled.elements.iter().enumerate() {
            if e.rule.as_ref().is_none_or(|r| r.local_ok(l0)) {
                mask |= 1 << i;
            }
        }
        Some(mask)
    }

    /// The period from `p` to `end`, with the elements pricing it.
    fn period(&mut self, p: &Piece, seg: &mut Segment, end: Decimal, energy_wh: Decimal) -> ChargingPeriod {
        let slot = self.slot_of(p.floor_ms);
        self.period_in(slot, p, seg, end, energy_wh)
    }

    /// [`Plan::period`] for a period starting in `slot`.
    fn period_in(
        &mut self,
        slot: Option<usize>,
        p: &Piece,
        seg: &mut Segment,
        end: Decimal,
        energy_wh: Decimal,
    ) -> ChargingPeriod {
        let known = slot.map(|s| self.slot(s));
        let mask = known.and_then(|k| k.mask);
        let mut local_at: Option<chrono::NaiveDateTime> = None;
        let tz = self.tz;
        let mut pick = |d: usize, seg: &mut Segment| {
            if let Some(fixed) = known.and_then(|k| k.picks[d]) {
                return fixed;
            }
            self.compiled.elements.iter().enumerate().position(|(i, e)| {
                if !e.has(PICKED[d]) {
                    return false;
                }
                let Some(r) = &e.rule else { return true };
                let local_ok = match mask {
                    Some(m) => m & (1 << i) != 0,
                    None => r.local_ok(*local_at.get_or_insert_with(|| local(tz, p.s))),
                };
                local_ok && r.numbers_ok(p, seg)
            })
        };
        let (energy_element, time_element, parking_element) = if seg.charging {
            (pick(0, seg), pick(1, seg), None)
        } else {
            (None, None, pick(2, seg))
        };
        ChargingPeriod {
            start_ms: p.s,
            end_ms: end,
            energy_wh,
            charging: seg.charging,
            energy_element,
            time_element,
            parking_element,
        }
    }
}

fn local_ms(tz: &Tz, ms: i64) -> chrono::NaiveDateTime {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(tz)
        .naive_local()
}

/// The final cost of a session that has ended: step sizes round each
/// dimension up once, at the last element that priced it.
pub fn price(t: &Tariff, readings: &[Reading], tz: &Tz) -> Result<Cost, CostError> {
    price_with(t, readings, tz, true)
}

/// The running cost of a session still in progress: what has been consumed
/// so far, before step rounding (which happens once, when the session
/// ends). It never decreases as readings arrive. (Rounding a session still
/// in progress would not be monotone: OCPI bills the step surplus at the
/// last element's price, and moving into a cheaper element lowers it.)
pub fn running_cost(t: &Tariff, readings: &[Reading], tz: &Tz) -> Result<Cost, CostError> {
    price_with(t, readings, tz, false)
}

fn price_with(t: &Tariff, readings: &[Reading], tz: &Tz, ended: bool) -> Result<Cost, CostError> {
    let first = *readings.first().ok_or(CostError::Empty)?;
    let mut meter = Meter::start(t, first, tz);
    // A CDR keeps one period per change of what prices the session, not
    // one per reading.
    let periods = periods_into(t, readings, tz, first.at_ms, first.energy_wh, Some(&mut meter), true)?;
    let mut cost = meter.cost(t, ended);
    cost.periods = periods;
    Ok(cost)
}

/// A session's cost as it accumulates: periods are added as they are
/// priced, so a live session's running cost costs O(1) per reading.
///
/// While it accumulates, a line's volume is kept in the unit periods carry
/// (Wh for ENERGY, ms for TIME and PARKING_TIME): whole amounts add up as
/// integers in `whole`, fractions (where a threshold split a period) in the
/// line's decimal volume. [`Meter::cost`] joins the two and converts once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    lines: Vec<CostLine>,
    whole: Vec<i64>,
    /// The last line of each dimension (FLAT, ENERGY, TIME, PARKING_TIME).
    last: [Option<usize>; 4],
}

/// `d` as an integer, if it is one with no decimal places (what a period
/// between two readings carries).
fn whole(d: Decimal) -> Option<i64> {
    if d.scale() == 0 {
        i64::try_from(d.mantissa()).ok()
    } else {
        None
    }
}

impl Meter {
    /// A meter for a session starting at `first` (FLAT is decided here).
    pub fn start(t: &Tariff, first: Reading, tz: &Tz) -> Meter {
        let mut meter = Meter {
            lines: Vec::new(),
            whole: Vec::new(),
            last: [None; 4],
        };
        let start_state = State {
            local: local(tz, Decimal::from(first.at_ms)),
            energy_kwh: Decimal::ZERO,
            duration_s: Decimal::ZERO,
            power_kw: Decimal::ZERO,
            current_a: Decimal::from(first.current_ma) / Decimal::from(1000),
        };
        if let Some(i) = Compiled::of(t).element_for(Dimension::Flat, &start_state) {
            meter.push(t, Dimension::Flat, i, Decimal::ONE);
        }
        meter
    }

    /// Adds one priced period.
    pub fn add(&mut self, t: &Tariff, p: &ChargingPeriod) {
        if let Some(i) = p.energy_element {
            self.push(t, Dimension::Energy, i, p.energy_wh);
        }
        if p.time_element.is_none() && p.parking_element.is_none() {
            return;
        }
        let ms = match (whole(p.start_ms), whole(p.end_ms)) {
            (Some(s), Some(e)) => e.checked_sub(s).map_or_else(|| p.end_ms - p.start_ms, Decimal::from),
            _ => p.end_ms - p.start_ms,
        };
        if let Some(i) = p.time_element {
            self.push(t, Dimension::Time, i, ms);
        }
        if let Some(i) = p.parking_element {
            self.push(t, Dimension::ParkingTime, i, ms);
        }
    }

    /// Periods between readings, priced by `picks`: `wh` and `ms` in all.
    fn add_whole(&mut self, t: &Tariff, (energy, time, parking): Picks, wh: u64, ms: i64) {
        if let Some(i) = energy {
            match i64::try_from(wh) {
                Ok(wh) => self.push_whole(t, Dimension::Energy, i, wh),
                Err(_) => self.push(t, Dimension::Energy, i, Decimal::from(wh)),
            }
        }
        if let Some(i) = time {
            self.push_whole(t, Dimension::Time, i, ms);
        }
        if let Some(i) = parking {
            self.push_whole(t, Dimension::ParkingTime, i, ms);
        }
    }

    /// Adds `volume` (Wh, ms or 1) to the line of `dim` under `element`.
    fn push(&mut self, t: &Tariff, dim: Dimension, element: usize, volume: Decimal) {
        match whole(volume) {
            Some(v) => self.push_whole(t, dim, element, v),
            None => {
                let at = self.line(t, dim, element);
                self.lines[at].volume += volume;
            }
        }
    }

    fn push_whole(&mut self, t: &Tariff, dim: Dimension, element: usize, volume: i64) {
        let at = self.line(t, dim, element);
        match self.whole[at].checked_add(volume) {
            Some(sum) => self.whole[at] = sum,
            None => self.lines[at].volume += Decimal::from(volume),
        }
    }

    /// The line `dim` under `element` adds to: the dimension's last line if
    /// it is that element's, else a new one. Lines of one dimension stay
    /// together in time order; interleaving with other dimensions is fine
    /// because step rounding looks per dimension.
    fn line(&mut self, t: &Tariff, dim: Dimension, element: usize) -> usize {
        let d = match dim {
            Dimension::Flat => 0,
            Dimension::Energy => 1,
            Dimension::Time => 2,
            Dimension::ParkingTime => 3,
        };
        if let Some(i) = self.last[d]
            && self.lines[i].element == element
        {
            return i;
        }
        let c = component(t, dim, element);
        self.lines.push(CostLine {
            dimension: dim,
            element,
            volume: Decimal::ZERO,
            billed_volume: Decimal::ZERO,
            price: c.map_or(Decimal::ZERO, |c| c.price),
            vat: c.and_then(|c| c.vat),
            excl_vat: Decimal::ZERO,
            incl_vat: Decimal::ZERO,
        });
        self.whole.push(0);
        self.last[d] = Some(self.lines.len() - 1);
        self.lines.len() - 1
    }

    /// The cost so far (`ended`: with step rounding, as the final cost).
    /// The result's `periods` is empty; [`price`] fills it.
    pub fn cost(&self, t: &Tariff, ended: bool) -> Cost {
        let mut lines = self.lines.clone();
        for (l, w) in lines.iter_mut().zip(&self.whole) {
            let raw = l.volume + Decimal::from(*w);
            l.volume = match l.dimension {
                Dimension::Time | Dimension::ParkingTime => milli(raw),
                Dimension::Energy | Dimension::Flat => raw,
            };
            l.billed_volume = l.volume;
        }
        // Step size: once per dimension, on the last line that priced it.
        let mut time_surplus = Decimal::ZERO;
        let dims: &[Dimension] = if ended {
            &[Dimension::Energy, Dimension::Time, Dimension::ParkingTime]
        } else {
            &[]
        };
        for &dim in dims {
            let total: Decimal = lines.iter().filter(|l| l.dimension == dim).map(|l| l.volume).sum();
            let Some(last) = lines.iter_mut().rev().find(|l| l.dimension == dim) else {
                continue;
            };
            let step = Decimal::from(component(t, dim, last.element).map_or(1, |c| c.step_size.max(1)));
            let billed = (total / step).ceil() * step;
            if dim == Dimension::ParkingTime && total > Decimal::ZERO && total <= time_surplus {
                for l in lines.iter_mut().filter(|l| l.dimension == dim) {
                    l.billed_volume = Decimal::ZERO;
                }
                continue;
            }
            last.billed_volume += billed - total;
            if dim == Dimension::Time {
                time_surplus = billed - total;
            }
        }
        let (mut excl, mut incl) = (Decimal::ZERO, Decimal::ZERO);
        for l in &mut lines {
            let units = match l.dimension {
                Dimension::Energy => l.billed_volume / Decimal::from(1000),
                Dimension::Time | Dimension::ParkingTime => l.billed_volume / Decimal::from(3600),
                Dimension::Flat => l.billed_volume,
            };
            // One canonical form for the volumes (periods add up in ms).
            l.volume = l.volume.normalize();
            l.billed_volume = l.billed_volume.normalize();
            l.excl_vat = units * l.price;
            l.incl_vat = match l.vat {
                Some(v) => l.excl_vat * (Decimal::ONE + v / Decimal::from(100)),
                None => l.excl_vat,
            };
            excl += l.excl_vat;
            incl += l.incl_vat;
        }
        let (subtotal_excl_vat, subtotal_incl_vat) = (excl, incl);
        // Each bound holds on its own; validation guarantees an incl.-VAT bound
        // wherever VAT applies, so without one incl equals excl.
        let (mut min_applied, mut max_applied) = (false, false);
        if let Some(min) = &t.min_price {
            let min_incl = min.incl_vat.unwrap_or(min.excl_vat);
            if excl < min.excl_vat || incl < min_incl {
                min_applied = true;
            }
            excl = excl.max(min.excl_vat);
            incl = incl.max(min_incl);
        }
        if let Some(max) = &t.max_price {
            let max_incl = max.incl_vat.unwrap_or(max.excl_vat);
            if excl > max.excl_vat || incl > max_incl {
                max_applied = true;
            }
            excl = excl.min(max.excl_vat);
            incl = incl.min(max_incl);
        }
        let dp = currency_exponent(&t.currency);
        let round = |d: Decimal| d.round_dp_with_strategy(dp, RoundingStrategy::MidpointAwayFromZero);
        Cost {
            currency: t.currency.clone(),
            periods: Vec::new(),
            lines,
            subtotal_excl_vat,
            subtotal_incl_vat,
            total_excl_vat: round(excl),
            total_incl_vat: round(incl),
            min_price_applied: min_applied,
            max_price_applied: max_applied,
        }
    }
}

fn component(t: &Tariff, dim: Dimension, element: usize) -> Option<&crate::tariff::PriceComponent> {
    t.elements
        .get(element)?
        .price_components
        .iter()
        .find(|c| c.dimension == dim)
}

#[cfg(test)]
mod reference {
    //! The engine as it was before the integer fast path: the property
    //! test below holds the two to the same periods.
    use super::*;

    /// The measured volumes of `periods` as the meter summed them before
    /// it kept whole amounts in integers: (dimension, element, volume in
    /// Wh or seconds), one per line, in line order. FLAT is left out.
    pub(super) fn volumes(periods: &[ChargingPeriod]) -> Vec<(Dimension, usize, Decimal)> {
        let mut lines: Vec<(Dimension, usize, Decimal)> = Vec::new();
        let mut push = |dim: Dimension, element: usize, v: Decimal| {
            if let Some(l) = lines.iter_mut().rev().find(|l| l.0 == dim)
                && l.1 == element
            {
                l.2 += v;
                return;
            }
            lines.push((dim, element, v));
        };
        for p in periods {
            if let Some(i) = p.energy_element {
                push(Dimension::Energy, i, p.energy_wh);
            }
            let secs = milli(p.end_ms - p.start_ms);
            if let Some(i) = p.time_element {
                push(Dimension::Time, i, secs);
            }
            if let Some(i) = p.parking_element {
                push(Dimension::ParkingTime, i, secs);
            }
        }
        lines.into_iter().map(|(d, e, v)| (d, e, v.normalize())).collect()
    }

    /// Prices a session's readings into periods (no step rounding, no totals).
    /// `start_ms` and `base_wh` are the session's start and first register
    /// value, so a session priced in pieces gives the same periods.
    pub(super) fn periods(
        t: &Tariff,
        readings: &[Reading],
        tz: &Tz,
        start_ms: i64,
        base_wh: u64,
    ) -> Result<Vec<ChargingPeriod>, CostError> {
        if readings.windows(2).any(|w| w[1].at_ms < w[0].at_ms) {
            return Err(CostError::Unordered);
        }
        let b = Boundaries::of(t);
        let compiled = Compiled::of(t);
        let mut out = Vec::new();
        // Every local time-of-day boundary (and midnight) over the session's
        // span as UTC instants, DST applied, sorted: each segment takes its own
        // by binary search instead of converting time zones again.
        let mut instants: Vec<i64> = Vec::new();
        if let (Some(first), Some(last)) = (readings.first(), readings.last()) {
            let d0 = local(tz, Decimal::from(first.at_ms)).date() - Duration::days(1);
            let d1 = local(tz, Decimal::from(last.at_ms)).date() + Duration::days(1);
            let mut day = d0;
            while day <= d1 {
                for time in &b.times {
                    if let Some(ms) = utc_of(tz, day, *time) {
                        instants.push(ms);
                    }
                }
                day += Duration::days(1);
            }
            instants.sort_unstable();
            instants.dedup();
        }
        for w in readings.windows(2) {
            let (a, z) = (w[0], w[1]);
            if z.at_ms == a.at_ms {
                continue;
            }
            let (t0, t1) = (Decimal::from(a.at_ms), Decimal::from(z.at_ms));
            let dt = t1 - t0;
            let de = Decimal::from(z.energy_wh.saturating_sub(a.energy_wh));
            let e0 = Decimal::from(a.energy_wh.saturating_sub(base_wh));
            let charging = de > Decimal::ZERO;
            // kW = Wh / h.
            let power_kw = de * Decimal::from(3600) / dt;
            let current_a = Decimal::from(z.current_ma) / Decimal::from(1000);
            // Split points as (time, cumulative energy), both exact where they are the boundary.
            let mut cuts: Vec<(Decimal, Decimal)> = vec![(t0, e0), (t1, e0 + de)];
            let energy_at = |t: Decimal| e0 + de * (t - t0) / dt;
            // Local-time boundaries of the whole session, found once (above).
            let lo = instants.partition_point(|x| *x <= a.at_ms);
            let hi = instants.partition_point(|x| *x < z.at_ms);
            for ms in &instants[lo..hi] {
                let ms = Decimal::from(*ms);
                cuts.push((ms, energy_at(ms)));
            }
            for d in &b.durations_ms {
                let ms = Decimal::from(start_ms) + Decimal::from(*d);
                if ms > t0 && ms < t1 {
                    cuts.push((ms, energy_at(ms)));
                }
            }
            for e in &b.energies_wh {
                if *e > e0 && *e < e0 + de {
                    cuts.push((t0 + dt * (*e - e0) / de, *e));
                }
            }
            cuts.sort();
            cuts.dedup_by(|x, y| x.0 == y.0);
            for c in cuts.windows(2) {
                let ((s, es), (e, ee)) = (c[0], c[1]);
                let state = State {
                    local: local(tz, s),
                    energy_kwh: es / Decimal::from(1000),
                    duration_s: (s - Decimal::from(start_ms)) / Decimal::from(1000),
                    power_kw,
                    current_a,
                };
                out.push(ChargingPeriod {
                    start_ms: s,
                    end_ms: e,
                    energy_wh: ee - es,
                    charging,
                    energy_element: if charging {
                        compiled.element_for(Dimension::Energy, &state)
                    } else {
                        None
                    },
                    time_element: if charging {
                        compiled.element_for(Dimension::Time, &state)
                    } else {
                        None
                    },
                    parking_element: if charging {
                        None
                    } else {
                        compiled.element_for(Dimension::ParkingTime, &state)
                    },
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tariff::{PriceComponent, TariffElement};
    use proptest::prelude::*;

    fn restrictions() -> impl Strategy<Value = Option<Restrictions>> {
        let time = prop::option::of((0u32..24, prop::sample::select(vec![0u32, 15, 30, 45])))
            .prop_map(|t| t.map(|(h, m)| format!("{h:02}:{m:02}")));
        let kwh = prop::option::of((1i64..60).prop_map(|x| Decimal::new(x, 1)));
        let power = prop::option::of((1i64..200).prop_map(Decimal::from));
        let current = prop::option::of((1i64..100).prop_map(Decimal::from));
        let duration = prop::option::of(60u64..20_000);
        let days = prop::collection::vec(0usize..7, 0..3);
        prop::option::of((
            (time.clone(), time),
            (kwh.clone(), kwh),
            (power, current, duration),
            days,
        ))
        .prop_map(|r| {
            r.map(|((start_time, end_time), (a, b), (power, current, duration), days)| {
                const DAYS: [DayOfWeek; 7] = [
                    DayOfWeek::Monday,
                    DayOfWeek::Tuesday,
                    DayOfWeek::Wednesday,
                    DayOfWeek::Thursday,
                    DayOfWeek::Friday,
                    DayOfWeek::Saturday,
                    DayOfWeek::Sunday,
                ];
                let mut days: Vec<DayOfWeek> = days.into_iter().map(|d| DAYS[d]).collect();
                days.dedup();
                let (min_kwh, max_kwh) = match (a, b) {
                    (Some(a), Some(b)) if a < b => (Some(a), Some(b)),
                    (Some(a), Some(_)) => (None, Some(a)),
                    other => other,
                };
                Restrictions {
                    start_time,
                    end_time,
                    min_kwh,
                    max_kwh,
                    max_power: power,
                    min_current: current,
                    min_duration: duration,
                    day_of_week: days,
                    ..Default::default()
                }
            })
        })
    }

    fn tariff() -> impl Strategy<Value = Tariff> {
        let dims = prop::sample::select(vec![Dimension::Energy, Dimension::Time, Dimension::ParkingTime]);
        prop::collection::vec((dims, restrictions()), 1..6).prop_map(|els| Tariff {
            elements: els
                .into_iter()
                .map(|(dim, restrictions)| TariffElement {
                    price_components: vec![PriceComponent {
                        dimension: dim,
                        price: Decimal::new(37, 2),
                        vat: None,
                        step_size: 1,
                    }],
                    restrictions,
                })
                .collect(),
            ..Tariff::parse_json(r#"{"id":"p","currency":"EUR","elements":[{"price_components":[{"type":"FLAT","price":1,"step_size":1}]}]}"#)
                .expect("base tariff")
        })
    }

    /// Sessions of up to 60 readings, 1 s to 3 h apart, starting around
    /// the 2026 DST changes or anywhere in the year.
    fn session() -> impl Strategy<Value = Vec<Reading>> {
        let starts = prop::sample::select(vec![
            1_774_742_400_000i64, // 2026-03-29 00:00 UTC (EU spring)
            1_792_886_400_000,    // 2026-10-25 00:00 UTC (EU autumn)
            1_772_928_000_000,    // 2026-03-08 00:00 UTC (US spring)
            1_793_577_600_000,    // 2026-11-02 00:00 UTC (US autumn)
            1_775_347_200_000,    // 2026-04-05 00:00 UTC (Lord Howe, half an hour)
            1_767_225_600_000,    // 2026-01-01
        ]);
        (
            starts,
            -86_400i64..86_400,
            prop::collection::vec((1i64..10_800, 0u64..150_000, any::<bool>(), 0u32..120_000), 1..60),
        )
            .prop_map(|(base, offset, steps)| {
                let mut at = base + offset * 1000;
                let mut wh = 5_000u64;
                let mut out = vec![Reading {
                    at_ms: at,
                    energy_wh: wh,
                    current_ma: 0,
                }];
                for (secs, power_w, charging, current_ma) in steps {
                    at += secs * 1000 + (secs % 7) * 111;
                    if charging {
                        wh += power_w * secs as u64 / 3600;
                    }
                    out.push(Reading {
                        at_ms: at,
                        energy_wh: wh,
                        current_ma,
                    });
                }
                out
            })
    }

    /// The hour repeated when clocks go back: a boundary inside it is
    /// passed twice, and only its first instant is a cut, so the periods
    /// after the second pass read local time period by period.
    #[test]
    fn a_boundary_in_the_repeated_hour_prices_as_the_reference() {
        let t = Tariff::parse_json(
            r#"{"id":"n","currency":"EUR","elements":[
            {"price_components":[{"type":"ENERGY","price":0.20,"step_size":1}],"restrictions":{"start_time":"02:30","end_time":"05:00"}},
            {"price_components":[{"type":"ENERGY","price":0.40,"step_size":1}]}]}"#,
        )
        .unwrap();
        let tz: Tz = "Europe/Stockholm".parse().unwrap();
        // 2026-10-25 00:00 → 03:00 UTC: 02:00 CEST → 02:00 CET → 04:00 CET.
        let r: Vec<Reading> = (0..=36)
            .map(|i| Reading {
                at_ms: 1_792_886_400_000 + i * 300_000,
                energy_wh: 1_000 + i as u64 * 900,
                current_ma: 16_000,
            })
            .collect();
        let fast = periods(&t, &r, &tz, r[0].at_ms, r[0].energy_wh).unwrap();
        assert_eq!(
            fast,
            reference::periods(&t, &r, &tz, r[0].at_ms, r[0].energy_wh).unwrap()
        );
        // 01:10 UTC is 02:10 CET, in the second pass: not yet 02:30.
        let at = |ms: i64| fast.iter().find(|p| p.start_ms == Decimal::from(ms)).unwrap();
        assert_eq!(at(1_792_886_400_000 + 14 * 300_000).energy_element, Some(1));
        assert_eq!(at(1_792_886_400_000 + 6 * 300_000).energy_element, Some(0));
    }

    /// A CDR keeps one period per change of what prices the session: 480
    /// readings a minute apart make three periods (day rate, night rate,
    /// parking), with the energy and times of the readings they join.
    #[test]
    fn a_priced_session_keeps_one_period_per_change_of_price() {
        let t = Tariff::parse_json(
            r#"{"id":"b","currency":"EUR","elements":[
            {"price_components":[{"type":"FLAT","price":0.50,"step_size":1}]},
            {"price_components":[{"type":"ENERGY","price":0.45,"step_size":1}],"restrictions":{"start_time":"07:00","end_time":"21:00"}},
            {"price_components":[{"type":"ENERGY","price":0.32,"step_size":1}]},
            {"price_components":[{"type":"PARKING_TIME","price":6.00,"step_size":300}],"restrictions":{"min_duration":3600}}]}"#,
        )
        .unwrap();
        let tz: Tz = "Europe/Stockholm".parse().unwrap();
        // From 17:00 local (CEST), one reading a minute for 8 hours;
        // charging at 180 Wh a minute until 22:00, then parked.
        let start = 1_781_190_000_000i64;
        let r: Vec<Reading> = (0..480)
            .map(|i| Reading {
                at_ms: start + i * 60_000,
                energy_wh: 1_000 + (i.min(300) as u64) * 180,
                current_ma: 16_000,
            })
            .collect();
        let c = price(&t, &r, &tz).unwrap();
        let h = |hours: i64| Decimal::from(start + hours * 3_600_000);
        let got: Vec<_> = c
            .periods
            .iter()
            .map(|p| {
                (
                    p.start_ms,
                    p.end_ms,
                    p.charging,
                    p.energy_element,
                    p.parking_element,
                    p.energy_wh,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (h(0), h(4), true, Some(1), None, Decimal::from(240 * 180)),
                (h(4), h(5), true, Some(2), None, Decimal::from(60 * 180)),
                (h(5), Decimal::from(r[479].at_ms), false, None, Some(3), Decimal::ZERO),
            ]
        );
        // The periods a live session prices one reading at a time merge to
        // the same.
        assert_eq!(merge_periods(&periods(&t, &r, &tz, start, 1_000).unwrap()), c.periods);
        assert_eq!(periods(&t, &r, &tz, start, 1_000).unwrap().len(), 479);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The fast path prices every period exactly as the decimal engine
        /// did: same cuts, same elements, in every time zone and across DST.
        #[test]
        fn fast_periods_equal_the_reference(
            t in tariff(),
            r in session(),
            tz in prop::sample::select(vec!["Europe/Stockholm", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]),
            piece in 0usize..60,
        ) {
            let tz: Tz = tz.parse().unwrap();
            let (start, base) = (r[0].at_ms, r[0].energy_wh);
            let fast = periods(&t, &r, &tz, start, base);
            prop_assert_eq!(&fast, &reference::periods(&t, &r, &tz, start, base));
            // The meter fed period by period (as a live session is) and
            // `price` (whole periods summed in runs) agree exactly.
            let fast = fast.unwrap();
            let mut meter = Meter::start(&t, r[0], &tz);
            for p in &fast {
                meter.add(&t, p);
            }
            let live = meter.cost(&t, true);
            let priced = price(&t, &r, &tz).unwrap();
            prop_assert_eq!(&live.lines, &priced.lines);
            // A CDR's periods: the same periods, those priced alike merged
            // (energies to 1e-12: a run of whole periods is summed first,
            // then added to a fractional one before it, which can round
            // the 28th digit differently).
            let shape = |v: &[ChargingPeriod]| -> Vec<_> {
                v.iter()
                    .map(|p| (p.start_ms, p.end_ms, p.charging, p.energy_element, p.time_element, p.parking_element, p.energy_wh.round_dp(12).normalize()))
                    .collect()
            };
            prop_assert_eq!(shape(&priced.periods), shape(&merge_periods(&fast)));
            prop_assert!(priced.periods.windows(2).all(|w| w[0].end_ms != w[1].start_ms
                || w[0].charging != w[1].charging
                || (w[0].energy_element, w[0].time_element, w[0].parking_element)
                    != (w[1].energy_element, w[1].time_element, w[1].parking_element)));
            prop_assert_eq!(live.total_incl_vat, priced.total_incl_vat);
            // And the volumes are those summed one decimal at a time:
            // exactly where every period is whole, else to 1e-15 (the
            // old sums rounded at the 28th digit on each addition; whole
            // amounts now add up exactly).
            let lines: Vec<_> = live
                .lines
                .iter()
                .filter(|l| l.dimension != Dimension::Flat)
                .map(|l| (l.dimension, l.element, l.volume))
                .collect();
            let old = reference::volumes(&fast);
            let whole = fast.iter().all(|p| p.start_ms.scale() == 0 && p.end_ms.scale() == 0 && p.energy_wh.scale() == 0);
            if whole {
                prop_assert_eq!(lines, old);
            } else {
                let near = |v: Vec<(Dimension, usize, Decimal)>| -> Vec<(Dimension, usize, Decimal)> {
                    v.into_iter().map(|(d, e, x)| (d, e, x.round_dp(15).normalize())).collect()
                };
                prop_assert_eq!(near(lines), near(old));
            }
            // Live, in pieces: from some reading on, against the session's start.
            let k = piece.min(r.len() - 1);
            prop_assert_eq!(periods(&t, &r[k..], &tz, start, base), reference::periods(&t, &r[k..], &tz, start, base));
        }
    }
}
