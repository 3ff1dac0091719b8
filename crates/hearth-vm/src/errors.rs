//! Errors as one line of text, for logs and the reasons the API reports.

/// An error and its sources on one line (`a: b: c`), for logs and reasons.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
