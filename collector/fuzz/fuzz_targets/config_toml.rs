//! The collector's TOML configuration on arbitrary text: parse, validate,
//! and (when it parses) serialize back to TOML that parses to the same
//! configuration.
#![no_main]

use fathom_collector::CollectorConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<CollectorConfig>(text) else {
        return;
    };
    let _ = config.validate();
    let _ = config.store_enabled();
    let back = toml::to_string(&config).unwrap_or_else(|e| panic!("serializing {config:?}: {e}"));
    let again: CollectorConfig = toml::from_str(&back)
        .unwrap_or_else(|e| panic!("parsing the serialized config {back:?}: {e}"));
    assert_eq!(again, config, "{back}");
});
