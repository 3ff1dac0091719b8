//! The HTTP front door: the API pipeline, the operations, hearth's extensions, rate limits and the S3 store.
//!
//! A request's path: [`pipeline`] reads the body (bounded), finds the operation
//! in the model (`hearth_api::model().route`), verifies the SigV4 signature
//! against the caller's sealed secret (`hearth_auth::verify`, the store),
//! parses and validates the input against the model, and hands it to the
//! operation's handler in [`ops`], which answers with JSON shaped by the
//! model's output.

pub mod app_logs;
pub mod extensions;
pub mod limits;
pub mod ops;
pub mod pipeline;
pub mod s3;
pub mod state;
pub mod usage;

pub use pipeline::app;
pub use state::AppState;
