//! hearth's artifact store: an S3-compatible service served on the API's
//! listener, and the fetch of `codeArtifact.uri` for image builds.
//!
//! - [`store`]: the filesystem-backed store (buckets owned by accounts,
//!   objects named by a hash of their key, multipart uploads; crash-safe
//!   writes by temp file, fsync and rename).
//! - [`service`]: the S3 protocol over the store. The protocol itself (REST
//!   routing, XML, SigV4 header/presigned/streaming-chunk verification, error
//!   documents) is the `s3s` crate's: a maintained S3 server framework that
//!   gives an `S3` trait, an `S3Auth` hook returning the secret for an access
//!   key, and a hyper/tower service. `object_store` was the other candidate but
//!   is a client only. `s3s-fs` (its filesystem example) maps keys to paths
//!   (so `a` and `a/b` clash, long keys overflow file names), keeps no owner
//!   and does not fsync, so the store here is hearth's own.
//! - [`artifact`]: [`ArtifactSource::fetch`] for the builder, from the
//!   built-in store, an external S3-compatible store, or (when enabled) a
//!   `file://` path, with the reference's build error codes.

pub mod artifact;
pub mod service;
pub mod store;

pub use artifact::{ArtifactSource, ArtifactStore, ArtifactsConfig, ExternalS3, FetchError};
pub use s3s::service::S3Service;
pub use service::{handle, is_s3_request, service, Accounts, ServiceConfig};
pub use store::{Store, StoreConfig, StoreError};
