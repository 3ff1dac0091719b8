//! Image versions: Dockerfile builds, operator imports, and the app snapshot every build ends in.

pub mod app;
pub mod build;
pub mod import;
