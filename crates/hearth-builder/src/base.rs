//! What a build starts from: a FROM image resolved to a base disk, by whom
//! ([`BaseResolver`]), and why it could not be had ([`BaseError`]).

use std::path::PathBuf;

use hearth_api::BuildErrorCode;
use hearth_oci::OciError;
use hearth_vm::disk::{BackingFormat, DiskError};

use crate::config::ImageConfig;
use crate::log::BuildLog;

/// A disk a stage starts from or ends at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub format: BackingFormat,
}

/// A resolved FROM image.
#[derive(Debug, Clone)]
pub struct Base {
    pub disk: Disk,
    /// Names the base's content for the step cache (e.g. `debian-12@<sha256>`).
    pub identity: String,
    pub config: ImageConfig,
}

/// Where FROM images come from (managed images, registries).
#[allow(async_fn_in_trait)]
pub trait BaseResolver {
    /// The base for `image` as written in FROM.
    async fn resolve(&self, image: &str, log: &dyn BuildLog) -> Result<Base, BaseError>;
}

/// Why a FROM image could not be had: from the operator's managed base
/// images (the server's resolver) or from a registry (here).
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("{image} is not a managed base image of this host (try FROM {suggestion}), and no registry is configured")]
    NotManaged { image: String, suggestion: String },
    #[error("{0}")]
    Reference(String, #[source] OciError),
    #[error("pulling {0}")]
    Pull(String, #[source] OciError),
    #[error("cannot create the image cache")]
    CacheDir(#[source] DiskError),
    #[error("cannot create a pull directory")]
    PullDir(#[source] DiskError),
    #[error("cannot create an unpack directory")]
    UnpackDir(#[source] std::io::Error),
    #[error("cannot run mkfs.ext4")]
    RunMkfs(#[source] std::io::Error),
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
    #[error("cannot write debugfs commands")]
    DebugfsCommands(#[source] std::io::Error),
    #[error("cannot run debugfs")]
    RunDebugfs(#[source] std::io::Error),
    #[error("debugfs could not set owners")]
    Debugfs,
    #[error("cannot place the image disk")]
    PlaceDisk(#[source] std::io::Error),
}

impl BaseError {
    /// The build error code: the image's own failures are the build's
    /// (CONTAINER_BUILD_FAILED), the host's are the platform's.
    pub fn code(&self) -> BuildErrorCode {
        match self {
            BaseError::NotManaged { .. } | BaseError::Reference(..) | BaseError::Pull(..) => {
                BuildErrorCode::ContainerBuildFailed
            }
            // mkfs fails when the image does not fit the disk it sizes.
            BaseError::Mkfs(_) => BuildErrorCode::DiskStorageFull,
            BaseError::CacheDir(_)
            | BaseError::PullDir(_)
            | BaseError::UnpackDir(_)
            | BaseError::RunMkfs(_)
            | BaseError::DebugfsCommands(_)
            | BaseError::RunDebugfs(_)
            | BaseError::Debugfs
            | BaseError::PlaceDisk(_) => BuildErrorCode::InternalPlatformError,
        }
    }
}
