//! The image builder: a Dockerfile parser ([`dockerfile`]), safe extraction
//! of code-artifact zips ([`archive`]), the build context ([`context`]), the
//! step cache ([`cache`]), step planning ([`plan`]: what each instruction does
//! and its cache key) and the executor that runs a Dockerfile in build
//! microVMs ([`run`]).

pub mod archive;
pub mod base;
pub mod cache;
pub mod config;
pub mod context;
pub mod dockerfile;
pub mod log;
pub mod oci;
pub mod plan;
pub mod run;
pub mod user;
