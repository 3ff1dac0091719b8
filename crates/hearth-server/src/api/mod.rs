//! The HTTP front door: the API pipeline, the operations, hearth's extensions, rate limits and the S3 store.

pub mod extensions;
pub mod limits;
pub mod ops;
pub mod s3;
