//! Node config TOML with an environment override derived from the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (file, env) = text.split_once('\u{0}').unwrap_or((text, ""));
        let env = env
            .split_once('=')
            .map(|(k, v)| vec![(format!("LADDNET_{k}"), v.to_string())])
            .unwrap_or_default();
        let _ = laddnet_node::NodeConfig::parse(file, env);
    }
});
