//! Progress lines on standard error, so that standard output stays the
//! command's result.

/// Prints `hearth: MESSAGE` for a wait or a step that takes a while.
pub(crate) fn progress(message: &str) {
    eprintln!("hearth: {message}");
}
