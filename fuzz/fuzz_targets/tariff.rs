//! Tariff definitions: parsing, validation, and pricing a fixed session
//! with whatever parses.
#![no_main]
use laddnet_core::cost::{Reading, price};
use laddnet_core::tariff::Tariff;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(t) = Tariff::parse_json(text) else { return };
    let readings = [
        Reading { at_ms: 1_774_738_800_000, energy_wh: 1_000, current_ma: 0 },
        Reading { at_ms: 1_774_742_400_000, energy_wh: 12_000, current_ma: 32_000 },
        Reading { at_ms: 1_774_749_600_000, energy_wh: 12_000, current_ma: 0 },
    ];
    let tz: chrono_tz::Tz = "Europe/Stockholm".parse().unwrap();
    let _ = price(&t, &readings, &tz);
});
