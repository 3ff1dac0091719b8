//! Line logging for the agent. As PID 1 the lines go to `/dev/console` (the serial
//! console the host records); otherwise to standard error.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

static CONSOLE: Mutex<Option<File>> = Mutex::new(None);

/// Sends every later log line to `console` instead of standard error.
pub fn use_console(console: File) {
    let mut slot = CONSOLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *slot = Some(console);
}

/// Writes one `hearth-agent: ...` line. Never fails: losing a log line must not
/// take the agent down.
pub fn write_line(args: fmt::Arguments<'_>) {
    // One write per line so concurrent lines do not interleave mid-line.
    let line = format!("hearth-agent: {args}\n");
    let mut slot = CONSOLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match slot.as_mut() {
        Some(console) => {
            let _ = console.write_all(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// Logs a formatted line with the `hearth-agent:` prefix.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::write_line(format_args!($($arg)*))
    };
}
