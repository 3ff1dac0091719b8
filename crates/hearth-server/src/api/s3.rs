//! The built-in S3-compatible artifact store (`hearth-s3`) on the API's
//! listener, and the artifact source the builder fetches `codeArtifact.uri`
//! from.
//!
//! A request signed for service `s3` (SigV4 credential scope
//! `AKID/date/region/s3/aws4_request`, in the `Authorization` header or a
//! presigned `X-Amz-Credential`) goes to the S3 service with its body
//! streaming (no API body cap); everything else goes on to the API. S3
//! requests sign with the same access keys as the API; buckets belong to
//! the signing key's account. Objects live under `DATA/s3`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tracing::warn;

pub use hearth_s3::{ArtifactSource, ArtifactsConfig, ExternalS3, FetchError};

use crate::api::state::AppState;
use crate::config::ServerConfig;
use crate::db::store::Store;
use crate::images::build::ArtifactFetch;
use crate::layout;

/// S3 access keys are the API's.
struct StoreAccounts(Store);

impl hearth_s3::Accounts for StoreAccounts {
    fn lookup(&self, access_key: &str) -> Option<(String, String)> {
        match self.0.lookup_key(access_key) {
            Ok(found) => found,
            Err(err) => {
                warn!(error = %err, "access key lookup failed");
                None
            }
        }
    }
}

/// Opens the built-in store under `DATA/s3`; returns the S3 service and the
/// builder's artifact source.
pub(crate) fn build(
    config: &ServerConfig,
    store: &Store,
) -> Result<(hearth_s3::S3Service, ArtifactSource), hearth_s3::StoreError> {
    let builtin = Arc::new(hearth_s3::Store::open(
        &layout::s3_dir(&config.data_dir),
        hearth_s3::StoreConfig {
            max_object_bytes: config.artifacts.max_artifact_bytes,
            ..Default::default()
        },
    )?);
    let service = hearth_s3::service(
        builtin.clone(),
        Arc::new(StoreAccounts(store.clone())),
        hearth_s3::ServiceConfig {
            region: config.region.clone(),
            ..Default::default()
        },
    );
    Ok((service, ArtifactSource::new(&config.artifacts, builtin)))
}

/// The builder's fetch: internal causes go to the log only, not to the
/// build's failure.
impl ArtifactFetch for ArtifactSource {
    fn fetch<'a>(
        &'a self,
        account: &'a str,
        uri: &'a str,
        dest: &'a std::path::Path,
        max_bytes: u64,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<u64, hearth_api::BuildFailure>> + Send + 'a>,
    > {
        Box::pin(async move {
            ArtifactSource::fetch(self, account, uri, dest, max_bytes)
                .await
                .map_err(|err| {
                    if let FetchError::Internal { .. } = err {
                        warn!(error = %hearth_vm::error_chain(&err), "artifact fetch failed");
                    }
                    hearth_api::BuildFailure::from(&err)
                })
        })
    }
}

/// Middleware in front of every route: S3-signed requests to the S3 service.
pub(crate) async fn front_door(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if hearth_s3::is_s3_request(request.headers(), request.uri()) {
        hearth_s3::handle(&state.s3, request).await.map(Body::new)
    } else {
        next.run(request).await
    }
}
