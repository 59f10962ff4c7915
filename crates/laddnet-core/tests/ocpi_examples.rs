//! Test vectors: the worked examples of the OCPI 2.2.1 tariff module
//! (mod_tariffs.asciidoc), to the cent, and hand-computed cases for power
//! restrictions, DST and step sizes.

use chrono::{NaiveDate, TimeZone};
use chrono_tz::Tz;
use laddnet_core::cost::{Reading, price};
use laddnet_core::tariff::Tariff;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

/// A session built from stretches: (minutes, kWh delivered, amps).
/// A stretch with 0 kWh is parking.
fn session(tz: Tz, y: i32, m: u32, d: u32, hh: u32, mm: u32, stretches: &[(f64, &str, u32)]) -> Vec<Reading> {
    let start = tz
        .from_local_datetime(
            &NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_hms_opt(hh, mm, 0)
                .unwrap(),
        )
        .earliest()
        .unwrap();
    let mut at = start.timestamp_millis();
    let mut wh: u64 = 1_000_000;
    let mut out = vec![Reading {
        at_ms: at,
        energy_wh: wh,
        current_ma: 0,
    }];
    for (minutes, kwh, amps) in stretches {
        at += (*minutes * 60_000.0) as i64;
        wh += (kwh.parse::<Decimal>().unwrap() * Decimal::from(1000))
            .try_into()
            .map(|v: u64| v)
            .unwrap();
        out.push(Reading {
            at_ms: at,
            energy_wh: wh,
            current_ma: amps * 1000,
        });
    }
    out
}

fn utc_day(stretches: &[(f64, &str, u32)]) -> Vec<Reading> {
    // A Wednesday, 10:00 UTC.
    session(chrono_tz::UTC, 2026, 6, 10, 10, 0, stretches)
}

fn tariff(json: &str) -> Tariff {
    Tariff::parse_json(json).unwrap_or_else(|e| panic!("{e}"))
}

fn check(t: &Tariff, r: &[Reading], tz: Tz, excl: Decimal, incl: Decimal) {
    let c = price(t, r, &tz).unwrap();
    assert_eq!(
        (c.total_excl_vat, c.total_incl_vat),
        (excl, incl),
        "lines: {:#?}",
        c.lines
    );
}

const ENERGY_025: &str = r#"{"price_components":[{"type":"ENERGY","price":0.25,"vat":10.0,"step_size":1}]}"#;
const START_050: &str = r#"{"price_components":[{"type":"FLAT","price":0.50,"vat":20.0,"step_size":1}]}"#;

#[test]
fn simple_025_per_kwh() {
    let t = tariff(&format!(r#"{{"id":"8","currency":"EUR","elements":[{ENERGY_025}]}}"#));
    check(
        &t,
        &utc_day(&[(60.0, "20", 32)]),
        chrono_tz::UTC,
        dec!(5.00),
        dec!(5.50),
    );
}

#[test]
fn energy_and_start_fee() {
    let t = tariff(&format!(
        r#"{{"id":"9","currency":"EUR","elements":[{START_050},{ENERGY_025}]}}"#
    ));
    check(
        &t,
        &utc_day(&[(60.0, "20", 32)]),
        chrono_tz::UTC,
        dec!(5.50),
        dec!(6.10),
    );
}

#[test]
fn energy_with_minimum_price() {
    let t = tariff(&format!(
        r#"{{"id":"12","currency":"EUR","min_price":{{"excl_vat":0.50,"incl_vat":0.55}},"elements":[{ENERGY_025}]}}"#
    ));
    check(
        &t,
        &utc_day(&[(60.0, "20", 32)]),
        chrono_tz::UTC,
        dec!(5.00),
        dec!(5.50),
    );
    check(&t, &utc_day(&[(10.0, "1", 32)]), chrono_tz::UTC, dec!(0.50), dec!(0.55));
}

#[test]
fn energy_parking_and_start_fee() {
    let t = tariff(&format!(
        r#"{{"id":"10","currency":"EUR","elements":[{START_050},{ENERGY_025},
        {{"price_components":[{{"type":"PARKING_TIME","price":2.00,"vat":20.0,"step_size":900}}]}}]}}"#
    ));
    check(
        &t,
        &utc_day(&[(60.0, "20", 32), (40.0, "0", 0)]),
        chrono_tz::UTC,
        dec!(7.00),
        dec!(7.90),
    );
}

#[test]
fn energy_start_fee_and_maximum_price() {
    let t = tariff(&format!(
        r#"{{"id":"6","currency":"EUR","max_price":{{"excl_vat":10.00,"incl_vat":11.00}},"elements":[{START_050},{ENERGY_025}]}}"#
    ));
    check(
        &t,
        &utc_day(&[(120.0, "50", 32)]),
        chrono_tz::UTC,
        dec!(10.00),
        dec!(11.00),
    );
    check(
        &t,
        &utc_day(&[(90.0, "30", 32)]),
        chrono_tz::UTC,
        dec!(8.00),
        dec!(8.85),
    );
}

#[test]
fn two_euro_per_hour_charging() {
    let t = tariff(
        r#"{"id":"1","currency":"EUR","elements":[{"price_components":[{"type":"TIME","price":2.00,"vat":10.0,"step_size":60}]}]}"#,
    );
    check(
        &t,
        &utc_day(&[(150.0, "25", 16)]),
        chrono_tz::UTC,
        dec!(5.00),
        dec!(5.50),
    );
}

#[test]
fn three_euro_per_hour_and_five_euro_parking() {
    let t = tariff(
        r#"{"id":"13","currency":"EUR","elements":[{"price_components":[
            {"type":"TIME","price":3.00,"vat":10.0,"step_size":60},
            {"type":"PARKING_TIME","price":5.00,"vat":20.0,"step_size":300}]}]}"#,
    );
    check(
        &t,
        &utc_day(&[(150.0, "25", 16), (42.0, "0", 0)]),
        chrono_tz::UTC,
        dec!(11.25),
        dec!(12.75),
    );
}

#[test]
fn ad_hoc_per_five_minutes() {
    let t = tariff(
        r#"{"id":"2","currency":"EUR","elements":[{"price_components":[{"type":"TIME","price":1.90,"vat":5.2,"step_size":300}]}]}"#,
    );
    check(
        &t,
        &utc_day(&[(150.0, "25", 16)]),
        chrono_tz::UTC,
        dec!(4.75),
        dec!(5.00),
    );
}

const COMPLEX: &str = r#"{
  "country_code": "DE", "party_id": "ALL", "id": "14", "currency": "EUR", "type": "REGULAR",
  "elements": [
    {"price_components": [{"type": "FLAT", "price": 2.50, "vat": 15.0, "step_size": 1}]},
    {"price_components": [{"type": "TIME", "price": 1.00, "vat": 20.0, "step_size": 900}], "restrictions": {"max_current": 32.00}},
    {"price_components": [{"type": "TIME", "price": 2.00, "vat": 20.0, "step_size": 600}],
     "restrictions": {"min_current": 32.00, "day_of_week": ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY"]}},
    {"price_components": [{"type": "TIME", "price": 1.25, "vat": 20.0, "step_size": 600}],
     "restrictions": {"min_current": 32.00, "day_of_week": ["SATURDAY", "SUNDAY"]}},
    {"price_components": [{"type": "PARKING_TIME", "price": 5.00, "vat": 10.0, "step_size": 300}],
     "restrictions": {"start_time": "09:00", "end_time": "18:00", "day_of_week": ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY"]}},
    {"price_components": [{"type": "PARKING_TIME", "price": 6.00, "vat": 10.0, "step_size": 300}],
     "restrictions": {"start_time": "10:00", "end_time": "17:00", "day_of_week": ["SATURDAY"]}}
  ],
  "tax_included": "NO", "last_updated": "2015-06-29T20:39:09Z"
}"#;

#[test]
fn complex_monday_morning() {
    // Monday 09:30, 147 minutes at 16 A, then 42 minutes parked.
    let r = session(chrono_tz::UTC, 2026, 6, 8, 9, 30, &[(147.0, "9", 16), (42.0, "0", 0)]);
    check(&tariff(COMPLEX), &r, chrono_tz::UTC, dec!(8.75), dec!(10.00));
}

#[test]
fn complex_saturday_afternoon() {
    // Saturday 13:30, 114 minutes at 43 A, then 71 minutes parked.
    let r = session(
        chrono_tz::UTC,
        2026,
        6,
        13,
        13,
        30,
        &[(114.0, "55", 43), (71.0, "0", 0)],
    );
    check(&tariff(COMPLEX), &r, chrono_tz::UTC, dec!(12.50), dec!(14.13));
}

const STEP_SIZE: &str = r#"{"id":"22","currency":"EUR","elements":[
  {"price_components":[{"type":"TIME","price":1.20,"step_size":1800},{"type":"PARKING_TIME","price":1.00,"step_size":900}],
   "restrictions":{"start_time":"00:00","end_time":"17:00"}},
  {"price_components":[{"type":"TIME","price":2.40,"step_size":900},{"type":"PARKING_TIME","price":1.00,"step_size":900}],
   "restrictions":{"start_time":"17:00","end_time":"20:00"}},
  {"price_components":[{"type":"TIME","price":2.40,"step_size":900}],
   "restrictions":{"start_time":"20:00","end_time":"23:59"}}]}"#;

#[test]
fn step_size_switching_element_one() {
    let r = session(chrono_tz::UTC, 2026, 6, 10, 16, 55, &[(10.0, "2", 16), (2.0, "0", 0)]);
    check(&tariff(STEP_SIZE), &r, chrono_tz::UTC, dec!(0.50), dec!(0.50));
}

#[test]
fn step_size_switching_element_two() {
    let r = session(chrono_tz::UTC, 2026, 6, 10, 16, 35, &[(35.0, "6", 16)]);
    check(&tariff(STEP_SIZE), &r, chrono_tz::UTC, dec!(1.30), dec!(1.30));
}

#[test]
fn step_size_switching_to_free_parking() {
    let r = session(chrono_tz::UTC, 2026, 6, 10, 19, 55, &[(10.0, "2", 16), (2.0, "0", 0)]);
    check(&tariff(STEP_SIZE), &r, chrono_tz::UTC, dec!(0.60), dec!(0.60));
}

#[test]
fn max_power_restriction() {
    let t = tariff(
        r#"{"id":"mp","currency":"EUR","elements":[
        {"price_components":[{"type":"ENERGY","price":0.20,"step_size":1}],"restrictions":{"max_power":16.00}},
        {"price_components":[{"type":"ENERGY","price":0.35,"step_size":1}],"restrictions":{"max_power":32.00}},
        {"price_components":[{"type":"ENERGY","price":0.50,"step_size":1}]}]}"#,
    );
    // 1 kWh at 6 kW (10 min), 40 kWh at 48 kW (50 min), 0.5 kWh at 4 kW (7.5 min).
    check(
        &t,
        &utc_day(&[(10.0, "1", 9), (50.0, "40", 70), (7.5, "0.5", 6)]),
        chrono_tz::UTC,
        dec!(20.30),
        dec!(20.30),
    );
}

#[test]
fn max_duration_restriction() {
    let t = tariff(
        r#"{"id":"md","currency":"EUR","elements":[
        {"price_components":[{"type":"ENERGY","price":0.00,"step_size":1}],"restrictions":{"max_duration":1800}},
        {"price_components":[{"type":"ENERGY","price":0.25,"step_size":1}],"restrictions":{"max_duration":3600}},
        {"price_components":[{"type":"ENERGY","price":0.40,"step_size":1}]}]}"#,
    );
    check(
        &t,
        &utc_day(&[(30.0, "5", 16), (10.0, "1.2", 16)]),
        chrono_tz::UTC,
        dec!(0.30),
        dec!(0.30),
    );
}

#[test]
fn free_of_charge() {
    let t = tariff(
        r#"{"id":"5","currency":"EUR","elements":[{"price_components":[{"type":"FLAT","price":0.00,"step_size":0}]}]}"#,
    );
    check(
        &t,
        &utc_day(&[(60.0, "20", 32)]),
        chrono_tz::UTC,
        dec!(0.00),
        dec!(0.00),
    );
}

// ---- hand-computed cases ----

#[test]
fn energy_step_of_100_wh_rounds_up_once() {
    // 20.45 kWh billed as 20.5 kWh at 0.25: 5.125 → 5.13 (rounded once, on the total).
    let t = tariff(
        r#"{"id":"s","currency":"EUR","elements":[{"price_components":[{"type":"ENERGY","price":0.25,"vat":10.0,"step_size":100}]}]}"#,
    );
    check(
        &t,
        &utc_day(&[(60.0, "20.45", 32)]),
        chrono_tz::UTC,
        dec!(5.13),
        dec!(5.64),
    );
}

#[test]
fn first_hour_free_and_first_kwh_free() {
    // OCPI example 7's tariff with an explicit session: 20 kWh in the first
    // hour, then parked 2.75 h. Parking 1 h–3 h at 2.00, 3 h–3.75 h at 3.00:
    // 4.00 + 2.25; energy: 19 kWh at 0.20 = 3.80. Total 10.05.
    let t = tariff(
        r#"{"id":"52","currency":"EUR","elements":[
        {"price_components":[{"type":"PARKING_TIME","price":0.0,"step_size":60}],"tariff_restrictions":{"min_duration":0,"max_duration":3600}},
        {"price_components":[{"type":"PARKING_TIME","price":2.0,"step_size":60}],"tariff_restrictions":{"min_duration":3600,"max_duration":10800}},
        {"price_components":[{"type":"PARKING_TIME","price":3.0,"step_size":60}],"tariff_restrictions":{"min_duration":10800}},
        {"price_components":[{"type":"ENERGY","price":0.0,"step_size":1}],"tariff_restrictions":{"max_kwh":1.0}},
        {"price_components":[{"type":"ENERGY","price":0.2,"step_size":1}],"tariff_restrictions":{"min_kwh":1.0}}]}"#,
    );
    check(
        &t,
        &utc_day(&[(60.0, "20", 32), (165.0, "0", 0)]),
        chrono_tz::UTC,
        dec!(10.05),
        dec!(10.05),
    );
}

#[test]
fn a_night_rate_across_the_spring_dst_change() {
    // Stockholm, 29 March 2026: clocks jump 02:00 → 03:00. Night rate
    // 0.20/kWh 22:00–06:00, else 0.40. Charging at 10 kW from 04:00 to
    // 08:00 local is 4 real hours: 2 at night (20 kWh = 4.00), 2 by day
    // (20 kWh = 8.00).
    let tz: Tz = "Europe/Stockholm".parse().unwrap();
    let t = tariff(
        r#"{"id":"night","currency":"SEK","elements":[
        {"price_components":[{"type":"ENERGY","price":0.20,"step_size":1}],"restrictions":{"start_time":"22:00","end_time":"06:00"}},
        {"price_components":[{"type":"ENERGY","price":0.40,"step_size":1}]}]}"#,
    );
    check(
        &t,
        &session(tz, 2026, 3, 29, 4, 0, &[(240.0, "40", 16)]),
        tz,
        dec!(12.00),
        dec!(12.00),
    );
    // Across the gap itself: 01:00 to 04:00 local is 2 real hours, all night.
    check(
        &t,
        &session(tz, 2026, 3, 29, 1, 0, &[(120.0, "20", 16)]),
        tz,
        dec!(4.00),
        dec!(4.00),
    );
}

#[test]
fn time_is_billed_in_real_hours_across_the_autumn_change() {
    // Stockholm, 25 October 2026: 03:00 → 02:00. From 01:30 local for 3 real
    // hours at 1.00/h = 3.00, though the wall clock only moved 2 hours.
    let tz: Tz = "Europe/Stockholm".parse().unwrap();
    let t = tariff(
        r#"{"id":"t","currency":"SEK","elements":[{"price_components":[{"type":"TIME","price":1.00,"step_size":1}]}]}"#,
    );
    check(
        &t,
        &session(tz, 2026, 10, 25, 1, 30, &[(180.0, "30", 16)]),
        tz,
        dec!(3.00),
        dec!(3.00),
    );
}

#[test]
fn a_period_crossing_a_time_boundary_is_split_exactly() {
    // 0.30/kWh before 18:00, 0.50 after; 17:30–18:30 at a steady 10 kW:
    // 5 kWh × 0.30 + 5 kWh × 0.50 = 4.00.
    let t = tariff(
        r#"{"id":"peak","currency":"EUR","elements":[
        {"price_components":[{"type":"ENERGY","price":0.30,"step_size":1}],"restrictions":{"end_time":"18:00"}},
        {"price_components":[{"type":"ENERGY","price":0.50,"step_size":1}]}]}"#,
    );
    let r = session(chrono_tz::UTC, 2026, 6, 10, 17, 30, &[(60.0, "10", 16)]);
    check(&t, &r, chrono_tz::UTC, dec!(4.00), dec!(4.00));
    let c = price(&t, &r, &chrono_tz::UTC).unwrap();
    assert_eq!(c.periods.len(), 2);
}

#[test]
fn invalid_definitions_name_the_field() {
    let cases = [
        (r#"{"id":"x","currency":"euro","elements":[]}"#, "currency"),
        (r#"{"id":"x","currency":"EUR","elements":[]}"#, "elements"),
        (
            r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"ENERGY","price":-1,"step_size":1}]}]}"#,
            "elements[0].price_components[0].price",
        ),
        (
            r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"TIME","price":1,"step_size":0}]}]}"#,
            "elements[0].price_components[0].step_size",
        ),
        (
            r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"TIME","price":1,"vat":120,"step_size":1}]}]}"#,
            "elements[0].price_components[0].vat",
        ),
        (
            r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"TIME","price":1,"step_size":1}],"restrictions":{"start_time":"25:00"}}]}"#,
            "elements[0].restrictions.start_time",
        ),
        (
            r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"TIME","price":1,"step_size":1}],"restrictions":{"min_kwh":5,"max_kwh":2}}]}"#,
            "elements[0].restrictions.max_kwh",
        ),
        (
            r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"TIME","price":1,"step_size":1}],"restrictions":{"start_date":"2026-02-30"}}]}"#,
            "elements[0].restrictions.start_date",
        ),
        (
            r#"{"id":"x","currency":"EUR","elements":[{"price_components":[{"type":"HOURS","price":1,"step_size":1}]}]}"#,
            "tariff",
        ),
        (
            r#"{"id":"x","currency":"EUR","surprise":1,"elements":[{"price_components":[{"type":"TIME","price":1,"step_size":1}]}]}"#,
            "tariff",
        ),
    ];
    for (json, field) in cases {
        let e = Tariff::parse_json(json).unwrap_err();
        assert_eq!(e.field, field, "{json}: {e}");
    }
}
