//! Charger events for the store-level tests.

use laddnet_core::charging::{MeterSample, TxEvent, TxEventKind};

/// Event `seq` of transaction `tx` at `at_ms`, the meter at `energy_wh`
/// (11 kW, 16 A, 230 V).
pub fn event(tx: &str, seq: u64, kind: TxEventKind, at_ms: i64, energy_wh: u64) -> TxEvent {
    TxEvent {
        transaction_id: tx.into(),
        seq,
        kind,
        connector_id: 1,
        at_ms,
        meter: MeterSample {
            energy_wh,
            power_w: 11_000,
            current_ma: 16_000,
            voltage_mv: 230_000,
            soc_percent: None,
        },
        offline: false,
        stop_reason: String::new(),
        driver_id: None,
        token_ref: None,
    }
}
