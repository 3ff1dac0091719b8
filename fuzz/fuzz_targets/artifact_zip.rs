//! Code-artifact extraction on arbitrary bytes with small limits: never a
//! panic, nothing written outside the destination, work bounded by the limits.
#![no_main]

use hearth_builder::archive::{extract, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let dest = dir.path().join("ctx");
    if std::fs::create_dir(&dest).is_err() {
        return;
    }
    let limits = Limits {
        max_file_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
        max_entries: 256,
        max_depth: 16,
        max_name_len: 255,
    };
    let _ = extract(std::io::Cursor::new(data), &dest, &limits);
    // Nothing may appear beside the destination.
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(beside, vec![std::ffi::OsString::from("ctx")]);
});
