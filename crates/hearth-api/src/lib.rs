//! The AWS Lambda MicroVMs API model (REST-JSON, API version 2025-09-09):
//! routing of raw HTTP requests to operations, input parsing and validation
//! with AWS's messages, output shape checks, and the AWS REST-JSON error shape.
//!
//! The model is the botocore service model, embedded byte for byte from
//! `model/` (a test compares it with `shared/spec` when that is present), so
//! the server and the SDKs read one definition.

mod build_failure;
mod error;
mod model;
mod validate;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

pub use build_failure::{BuildErrorCode, BuildFailure, BuildHook};
pub use error::{ApiError, ErrorCode};
pub use model::{Location, Member, Model, Operation, Shape, ShapeKind};

/// The botocore service model, as shipped in `shared/spec`.
pub const MODEL_JSON: &str = include_str!("../model/lambda-microvms-2025-09-09.json");
/// Its paginators file.
pub const PAGINATORS_JSON: &str =
    include_str!("../model/lambda-microvms-2025-09-09.paginators.json");

/// The parsed model, built once.
///
/// # Panics
/// Only if the embedded model is invalid, which a test rules out.
pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::from_json(MODEL_JSON, PAGINATORS_JSON)
            // The embedded JSON is a build input checked by `model_parses`;
            // there is no sensible way to serve the API without it.
            .unwrap_or_else(|e| panic!("embedded API model is invalid: {e}"))
    })
}
