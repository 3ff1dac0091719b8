//! OCI image references (from FROM lines) on arbitrary text: never a panic,
//! and what parses prints back to something that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(reference) = hearth_oci::parse_reference(text) {
        let again = hearth_oci::parse_reference(&reference.to_string());
        assert!(again.is_ok(), "{reference} does not parse again");
    }
});
