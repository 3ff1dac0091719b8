//! Persistent state: the SQLite store, resource rows and state machines, typed specs, sealed secrets, identifiers.

pub mod ids;
pub mod records;
pub mod resources;
pub mod secrets;
pub mod spec;
pub mod store;
pub mod usage;
