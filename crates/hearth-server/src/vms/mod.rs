//! The VMs behind microVM records: launch, suspend, resume, terminate, reconcile, lifecycle hooks,
//! the app's output (collected per microVM, stored in segments), host capacity admission, usage metering.

pub mod capacity;
pub mod engine;
pub mod hooks;
pub mod log_collector;
pub mod log_store;
pub mod meter;
pub mod pool;
pub mod reconcile;

#[cfg(test)]
mod tests;
