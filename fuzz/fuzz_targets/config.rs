#![no_main]
//! Any block as a config section: refused or accepted, never a panic, and
//! whatever is accepted encodes back to the same block.

use ksave_format::config::Config;
use ksave_format::PAGE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(block) = <[u8; PAGE]>::try_from(data) else { return };
    if let Ok(config) = Config::decode(&block) {
        let mut again = [0u8; PAGE];
        config.encode(&mut again);
        assert_eq!(Config::decode(&again), Ok(config));
    }
});
