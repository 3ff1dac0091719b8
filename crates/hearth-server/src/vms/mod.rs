//! The VMs behind microVM records: launch, suspend, resume, terminate, reconcile, lifecycle hooks.

pub mod engine;
pub mod hooks;
pub mod reconcile;

#[cfg(test)]
mod tests;
