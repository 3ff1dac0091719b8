//! Where a build's log lines go.

/// Where a build's log lines go.
pub trait BuildLog: Send + Sync {
    fn line(&self, text: &str);
}
