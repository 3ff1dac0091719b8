//! The Dockerfile parser, stage split and variable expansion on arbitrary
//! text: never a panic, never unbounded work (the Dockerfile is the tenant's).
#![no_main]

use std::collections::HashMap;

use hearth_builder::dockerfile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = dockerfile::parse(text) else {
        return;
    };
    let vars = HashMap::from([("A".to_string(), "x".to_string())]);
    for instruction in &parsed.instructions {
        let _ = instruction.expanded(&vars, parsed.escape);
    }
    if let Ok(stages) = parsed.stages() {
        let _ = stages.global_arg_values(&vars, parsed.escape);
    }
});
