//! Operator input to fault management: incident states and kinds, report
//! groupings. Each gives a value or an error, never a panic, and values
//! print back as they were given.
#![no_main]
use laddnet_actors::availability::By;
use laddnet_incidents::{AlarmKind, State};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(s) = State::parse(&text) {
        assert_eq!(s.as_str(), text);
    }
    if let Ok(k) = AlarmKind::parse(&text) {
        assert_eq!(k.as_str(), text);
    }
    let _ = By::parse(&text);
});
