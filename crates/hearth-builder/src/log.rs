//! Where a build's log lines go.

/// Where a build's log lines go.
pub trait BuildLog: Send + Sync {
    fn line(&self, text: &str);
    /// How many build VMs this build holds now (one per stage that is running
    /// or that a later `COPY --from` still needs): the server counts each
    /// against the account's memory quota.
    fn vms_live(&self, _count: usize) {}
}
