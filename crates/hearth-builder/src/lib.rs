//! Image builder pieces: a Dockerfile parser ([`dockerfile`]) and safe
//! extraction of code-artifact zips ([`archive`]).

pub mod archive;
pub mod dockerfile;
