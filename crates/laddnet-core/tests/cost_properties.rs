//! Properties of the cost engine over random sessions.

use chrono_tz::Tz;
use laddnet_core::cost::{Reading, periods, price, running_cost};
use laddnet_core::tariff::Tariff;
use proptest::prelude::*;

fn tariffs() -> Vec<Tariff> {
    [
        // Energy with a start fee and min/max price.
        r#"{"id":"a","currency":"EUR","min_price":{"excl_vat":1.00,"incl_vat":1.15},"max_price":{"excl_vat":40.00,"incl_vat":46.00},"elements":[
            {"price_components":[{"type":"FLAT","price":0.50,"vat":20,"step_size":1}]},
            {"price_components":[{"type":"ENERGY","price":0.25,"vat":10,"step_size":100}]}]}"#,
        // Time of day, day of week, time and parking.
        r#"{"id":"b","currency":"SEK","elements":[
            {"price_components":[{"type":"ENERGY","price":1.20,"vat":25,"step_size":1},{"type":"TIME","price":6,"vat":25,"step_size":300}],
             "restrictions":{"start_time":"07:00","end_time":"21:00","day_of_week":["MONDAY","TUESDAY","WEDNESDAY","THURSDAY","FRIDAY"]}},
            {"price_components":[{"type":"ENERGY","price":0.80,"vat":25,"step_size":1},{"type":"TIME","price":3,"vat":25,"step_size":300}]},
            {"price_components":[{"type":"PARKING_TIME","price":30,"vat":25,"step_size":300}],"restrictions":{"start_time":"08:00","end_time":"22:00"}}]}"#,
        // Energy and power tiers, duration tiers for parking.
        r#"{"id":"c","currency":"EUR","elements":[
            {"price_components":[{"type":"ENERGY","price":0.00,"step_size":1}],"restrictions":{"max_kwh":1}},
            {"price_components":[{"type":"ENERGY","price":0.35,"step_size":1}],"restrictions":{"max_power":22}},
            {"price_components":[{"type":"ENERGY","price":0.59,"step_size":1}]},
            {"price_components":[{"type":"PARKING_TIME","price":0,"step_size":60}],"restrictions":{"max_duration":3600}},
            {"price_components":[{"type":"PARKING_TIME","price":4,"step_size":60}]}]}"#,
    ]
    .iter()
    .map(|j| Tariff::parse_json(j).unwrap())
    .collect()
}

/// Random sessions: up to 40 readings, 1 s to 3 h apart, each charging at
/// up to 150 kW or parked, starting any time in 2026 (DST changes included).
fn session() -> impl Strategy<Value = Vec<Reading>> {
    (
        0i64..365 * 86_400,
        prop::collection::vec((1i64..10_800, 0u64..150_000, any::<bool>(), 0u32..250_000), 1..40),
    )
        .prop_map(|(offset, steps)| {
            let mut at = 1_767_225_600_000 + offset * 1000; // 2026-01-01
            let mut wh = 12_345_678u64;
            let mut out = vec![Reading {
                at_ms: at,
                energy_wh: wh,
                current_ma: 0,
            }];
            for (secs, power_w, charging, current_ma) in steps {
                at += secs * 1000;
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

fn tz() -> Tz {
    "Europe/Stockholm".parse().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Pricing a session in two pieces, split at any reading, gives the
    /// same charging periods (and so the same cost before step rounding)
    /// as pricing it whole: the running cost can be kept incrementally.
    #[test]
    fn splitting_at_any_reading_changes_nothing(r in session(), split in any::<prop::sample::Index>()) {
        for t in tariffs() {
            let k = split.index(r.len());
            let (start, base) = (r[0].at_ms, r[0].energy_wh);
            let whole = periods(&t, &r, &tz(), start, base).unwrap();
            let mut pieces = periods(&t, &r[..=k], &tz(), start, base).unwrap();
            pieces.extend(periods(&t, &r[k..], &tz(), start, base).unwrap());
            prop_assert_eq!(whole, pieces);
        }
    }

    /// The running cost never goes down as readings arrive. (The final cost
    /// adds OCPI's step rounding, which may move it either way: the surplus
    /// is billed at the last element's price, and charging-time surplus
    /// covers parking inside it — the spec's step-size example 1.)
    #[test]
    fn running_cost_never_decreases(r in session()) {
        for t in tariffs() {
            let mut last = None;
            for k in 1..=r.len() {
                let c = running_cost(&t, &r[..k], &tz()).unwrap();
                if let Some((excl, incl)) = last {
                    prop_assert!(c.total_excl_vat >= excl, "{} excl {} after {} at reading {}", t.id, c.total_excl_vat, excl, k);
                    prop_assert!(c.total_incl_vat >= incl, "{} incl {} after {} at reading {}", t.id, c.total_incl_vat, incl, k);
                }
                last = Some((c.total_excl_vat, c.total_incl_vat));
            }
            prop_assert!(price(&t, &r, &tz()).is_ok());
        }
    }
}
