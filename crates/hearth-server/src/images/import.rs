//! `hearth image import`: an operator makes a SUCCESSFUL image version from a
//! prepared root filesystem (a directory or a tar archive): the tree becomes an
//! immutable ext4 disk, a build VM boots from it, the app's command starts,
//! hearth waits until the app is ready (the `ready` hook when a hooks port is
//! given, else until the process is up and settled), and the VM's memory and
//! disk are snapshotted. The builder (Dockerfile builds) ends in the same path.
//!
//! Files: `DATA/images/<account>/<image>/<version>/{rootfs.ext4,snapshot/}`.
//! The version directory lives as long as the version: microVMs' disk overlays
//! chain to the snapshot's disk, which chains to `rootfs.ext4`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_api::{BuildErrorCode, BuildFailure};
use hearth_vm::disk::BackingFormat;
use hearth_vm::error_chain;
use hearth_vm::{ColdBoot, Driver, VmError};
use tokio::process::Command;

use crate::arn::Arn;
use crate::config::Quotas;
use crate::db::records::{NewVersion, Refusal, SnapshotSizes};
use crate::db::spec::{
    CodeArtifact, CpuConfiguration, HookState, Hooks, ImageSpec, MicrovmHooks, MicrovmImageHooks,
    Resources, RuntimeHook,
};
use crate::db::store::{Store, StoreError};
use crate::images::app::{self, AppSpec};
use crate::layout;
use crate::sizes::Size;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no root filesystem at {0}")]
    MissingRootfs(PathBuf),
    #[error("image name {0:?} is invalid: use 1-64 of A-Z a-z 0-9 - _")]
    BadName(String),
    #[error("{0}")]
    BadHooks(String),
    #[error("no account {0}")]
    NoAccount(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The build ran and failed; the version is FAILED with this reason.
    #[error("build failed: {0}")]
    Build(BuildFailure),
}

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub account_id: String,
    pub image_name: String,
    pub region: String,
    /// A directory, or a tar archive (optionally compressed).
    pub rootfs: PathBuf,
    /// The app's command; none means the snapshot holds an idle system.
    pub command: Vec<String>,
    pub workdir: String,
    pub hooks_port: Option<u16>,
    pub ready_timeout: Duration,
    /// Runtime hooks to enable: `run`, `resume`, `suspend`, `terminate`
    /// (needs `hooks_port`: the ready hook is then enabled too).
    pub microvm_hooks: Vec<String>,
    /// Their timeout, 1-60 s.
    pub hook_timeout_secs: u64,
    pub memory_mib: u32,
    pub environment: Vec<(String, String)>,
    pub description: Option<String>,
}

/// A successful import.
#[derive(Debug, Clone)]
pub struct Imported {
    pub image_arn: String,
    pub version: u32,
    pub build_id: String,
    pub snapshot_build: SnapshotSizes,
}

fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Imports `request` and records the result; `progress` hears each step.
pub async fn import_image(
    data_dir: &Path,
    store: &Store,
    driver: &dyn Driver,
    quotas: &Quotas,
    request: &ImportRequest,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Imported, ImportError> {
    if !valid_image_name(&request.image_name) {
        return Err(ImportError::BadName(request.image_name.clone()));
    }
    let mut runtime_hooks = Vec::new();
    for name in &request.microvm_hooks {
        let hook = RuntimeHook::parse(name).ok_or_else(|| {
            ImportError::BadHooks(format!(
                "unknown hook {name:?}: use run, resume, suspend or terminate"
            ))
        })?;
        runtime_hooks.push(hook);
    }
    if !request.microvm_hooks.is_empty() && request.hooks_port.is_none() {
        return Err(ImportError::BadHooks(
            "runtime hooks need a hooks port (and so the ready hook)".into(),
        ));
    }
    if !(1..=60).contains(&request.hook_timeout_secs) {
        return Err(ImportError::BadHooks(
            "hook timeouts are 1-60 seconds".into(),
        ));
    }
    if !request.rootfs.exists() {
        return Err(ImportError::MissingRootfs(request.rootfs.clone()));
    }
    if !store
        .accounts()?
        .iter()
        .any(|a| a.account_id == request.account_id)
    {
        return Err(ImportError::NoAccount(request.account_id.clone()));
    }
    let create = store
        .image(&request.account_id, &request.image_name)?
        .is_none();
    let spec = import_spec(request, &runtime_hooks);
    let started = store.start_version(
        &NewVersion {
            account_id: request.account_id.clone(),
            image_name: request.image_name.clone(),
            spec,
            memory_mib: request.memory_mib,
            architecture: "X86_64".into(),
            chipset: "INTEL".into(),
            client_token: None,
            fingerprint: String::new(),
            create,
            restartable: false,
        },
        quotas,
    )?;
    let started = match started {
        Ok(started) => started,
        Err(Refusal::Quota(m) | Refusal::Conflict(m) | Refusal::NotFound(m)) => {
            return Err(ImportError::Refused(m))
        }
    };
    store.build_started(&request.account_id, &started.build_id)?;
    progress(&format!(
        "image {} version {}.0: build {}",
        request.image_name, started.version, started.build_id
    ));
    let version_dir = layout::version_dir(
        data_dir,
        &request.account_id,
        &request.image_name,
        started.version,
    );
    let built = build(
        driver,
        request,
        &started.build_id,
        started.version,
        &version_dir,
        progress,
    )
    .await;
    match built {
        Ok(sizes) => {
            store.finish_build(
                &request.account_id,
                &started.build_id,
                Ok((layout::snapshot_dir(&version_dir), sizes)),
            )?;
            Ok(Imported {
                image_arn: Arn::image(&request.region, &request.account_id, &request.image_name)
                    .to_string(),
                version: started.version,
                build_id: started.build_id,
                snapshot_build: sizes,
            })
        }
        Err(reason) => {
            let _ = std::fs::remove_dir_all(&version_dir);
            store.finish_build(&request.account_id, &started.build_id, Err(reason.clone()))?;
            Err(ImportError::Build(reason))
        }
    }
}

/// Runs the build steps.
async fn build(
    driver: &dyn Driver,
    request: &ImportRequest,
    build_id: &str,
    version: u32,
    version_dir: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<SnapshotSizes, BuildFailure> {
    let platform = |what: &str, err: &dyn std::error::Error| {
        tracing::warn!(error = %error_chain(err), "{what}");
        BuildFailure::new(BuildErrorCode::InternalPlatformError, what)
    };
    hearth_vm::disk::create_private_dir_all(version_dir)
        .map_err(|e| platform("cannot create the version directory", &e))?;
    let rootfs = layout::imported_rootfs(version_dir);
    // The operator's import may use any baseline: the reference's rule
    // (4x memory and vCPU, one vCPU per 2 GiB of peak) gives its guests' size.
    let size = Size::reference(request.memory_mib);
    progress("making the root disk (mkfs.ext4 -d)");
    let code_size = make_root_disk(&request.rootfs, &rootfs, version_dir).await?;
    let app = AppSpec {
        argv: request.command.clone(),
        env: app_env(request, version),
        cwd: request.workdir.clone(),
        user: None,
        hooks_port: request.hooks_port,
        ready_timeout: request.ready_timeout,
    };
    app::snapshot_ready_app(
        driver,
        &layout::import_vm_name(build_id),
        size.shape(),
        &ColdBoot {
            base: rootfs,
            base_format: BackingFormat::Raw,
            overlay: None,
            egress: false,
            disk_size: Some(size.disk_bytes()),
            free_page_reporting: false,
        },
        &app,
        &layout::snapshot_dir(version_dir),
        code_size,
        progress,
    )
    .await
}

fn app_env(request: &ImportRequest, version: u32) -> Vec<(String, String)> {
    let mut env = request.environment.clone();
    env.extend(app::aws_env(
        &request.region,
        &request.account_id,
        &request.image_name,
        Some(version),
    ));
    env
}

/// Makes `out` from a directory or tar archive; returns the tree's size.
async fn make_root_disk(source: &Path, out: &Path, work: &Path) -> Result<u64, BuildFailure> {
    let platform = |what: &str| BuildFailure::new(BuildErrorCode::InternalPlatformError, what);
    let extracted;
    let tree = if source.is_dir() {
        source.to_path_buf()
    } else {
        extracted = layout::import_unpack_dir(work);
        hearth_vm::disk::create_private_dir_all(&extracted)
            .map_err(|_| platform("cannot create a work directory"))?;
        // GNU tar refuses members with `..` and strips leading `/`, so an archive
        // cannot write outside the work directory.
        let status = Command::new("tar")
            .arg("-xf")
            .arg(source)
            .arg("-C")
            .arg(&extracted)
            .arg("--no-same-owner")
            .arg("--delay-directory-restore")
            .status()
            .await
            .map_err(|_| platform("cannot run tar"))?;
        if !status.success() {
            return Err(BuildFailure::new(
                BuildErrorCode::ArchiveInvalid,
                format!("{} is not a readable tar archive", source.display()),
            ));
        }
        extracted.clone()
    };
    let size = hearth_builder::context::tree_bytes(&tree);
    // Room for the tree plus the app's writes; the disk is sparse.
    let disk_mib = ((size / (1 << 20)) * 2 + 512).max(1024);
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "hearth-root", "-d"])
        .arg(&tree)
        .arg(out)
        .arg(format!("{disk_mib}M"))
        .output()
        .await
        .map_err(|_| platform("cannot run mkfs.ext4"))?;
    if tree != source {
        let _ = std::fs::remove_dir_all(&tree);
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(BuildFailure::new(
            BuildErrorCode::DiskStorageFull,
            format!(
                "mkfs.ext4 failed: {}",
                stderr.trim().chars().take(500).collect::<String>()
            ),
        ));
    }
    let _ = std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o400));
    Ok(size)
}

/// Marks builds whose process died as FAILED and removes their build VMs.
pub async fn reap_interrupted_builds(
    store: &Store,
    driver: &dyn Driver,
    data_dir: &Path,
) -> Result<Vec<InterruptedBuild>, StoreError> {
    let mut restart = Vec::new();
    for build in store.unfinished_builds()? {
        let owner_alive = store
            .build_owner(&build.build_id)?
            .is_some_and(|owner| owner.is_alive());
        if owner_alive {
            continue;
        }
        if let Ok(vm) = driver.load(&layout::import_vm_name(&build.build_id)) {
            let _ = driver.remove(&vm).await;
        }
        // What the interrupted build wrote (a half-made snapshot, its fetched
        // artifact and context) goes; the step cache keeps its finished steps
        // for the next run, the build log stays.
        let _ = std::fs::remove_dir_all(layout::build_context(data_dir, &build.build_id));
        let _ = std::fs::remove_file(layout::build_artifact(data_dir, &build.build_id));
        let _ = std::fs::remove_dir_all(layout::version_dir(
            data_dir,
            &build.account_id,
            &build.image_name,
            build.version,
        ));
        let version = store.version(&build.account_id, &build.image_name, build.version)?;
        if let Some(version) = version {
            if store.requeue_build(&build.build_id)? {
                tracing::info!(build = %build.build_id, "restarting a build a restart interrupted");
                restart.push(InterruptedBuild {
                    account_id: build.account_id,
                    image_name: build.image_name,
                    version: build.version,
                    build_id: build.build_id,
                    spec: version.spec,
                    memory_mib: version.memory_mib,
                });
                continue;
            }
        }
        store.finish_build(
            &build.account_id,
            &build.build_id,
            Err(BuildFailure::new(
                BuildErrorCode::InternalPlatformError,
                "the build was interrupted by a restart of the hearth server and cannot run again \
                 (its build arguments are not stored, or it was an operator import)",
            )),
        )?;
    }
    Ok(restart)
}

/// A build [`reap_interrupted_builds`] put back to PENDING to run again.
#[derive(Debug, Clone)]
pub struct InterruptedBuild {
    pub account_id: String,
    pub image_name: String,
    pub version: u32,
    pub build_id: String,
    pub spec: crate::db::spec::ImageSpec,
    pub memory_mib: u32,
}

impl From<VmError> for ImportError {
    fn from(err: VmError) -> Self {
        ImportError::Build(BuildFailure::new(
            BuildErrorCode::InternalPlatformError,
            error_chain(&err),
        ))
    }
}

/// The version spec an import records: what CreateMicrovmImage would have
/// asked for to make the same version.
fn import_spec(request: &ImportRequest, runtime_hooks: &[RuntimeHook]) -> ImageSpec {
    let hooks = request.hooks_port.map(|port| {
        let timeout = Some(request.hook_timeout_secs);
        let state = |hook| runtime_hooks.contains(&hook).then_some(HookState::Enabled);
        let timeout_of = |hook| runtime_hooks.contains(&hook).then_some(timeout).flatten();
        Hooks {
            port: Some(port),
            microvm_image_hooks: Some(MicrovmImageHooks {
                ready: Some(HookState::Enabled),
                ready_timeout_in_seconds: Some(request.ready_timeout.as_secs()),
                ..Default::default()
            }),
            microvm_hooks: (!runtime_hooks.is_empty()).then(|| MicrovmHooks {
                run: state(RuntimeHook::Run),
                run_timeout_in_seconds: timeout_of(RuntimeHook::Run),
                resume: state(RuntimeHook::Resume),
                resume_timeout_in_seconds: timeout_of(RuntimeHook::Resume),
                suspend: state(RuntimeHook::Suspend),
                suspend_timeout_in_seconds: timeout_of(RuntimeHook::Suspend),
                terminate: state(RuntimeHook::Terminate),
                terminate_timeout_in_seconds: timeout_of(RuntimeHook::Terminate),
            }),
        }
    });
    ImageSpec {
        base_image_arn: Arn::managed_image(&request.region, "imported-rootfs").to_string(),
        build_role_arn: format!(
            "arn:aws:iam::{}:role/hearth-operator-import",
            request.account_id
        ),
        description: request.description.clone(),
        code_artifact: CodeArtifact {
            uri: format!("file://{}", request.rootfs.display()),
        },
        cpu_configurations: Some(vec![CpuConfiguration {
            architecture: "X86_64".into(),
        }]),
        resources: Some(vec![Resources {
            minimum_memory_in_mib: request.memory_mib,
        }]),
        hooks,
        environment_variables: (!request.environment.is_empty())
            .then(|| request.environment.iter().cloned().collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod reap_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::db::resources::BuildState;
    use crate::db::spec::ImageSpec;

    fn start(store: &Store, account: &str, image: &str) -> String {
        store
            .start_version(
                &NewVersion {
                    account_id: account.into(),
                    image_name: image.into(),
                    spec: ImageSpec::default(),
                    memory_mib: 256,
                    architecture: "X86_64".into(),
                    chipset: "INTEL".into(),
                    client_token: None,
                    fingerprint: String::new(),
                    create: true,
                    restartable: false,
                },
                &Quotas::default(),
            )
            .unwrap()
            .unwrap()
            .build_id
    }

    #[tokio::test]
    async fn an_interrupted_build_runs_again_only_if_its_request_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let account = store.create_account("a").unwrap().account_id;
        let fake = hearth_vm::testing::FakeDriver::without_agent(&dir.path().join("vmm"));
        // No owner process (it died before marking the build started).
        let whole = start(&store, &account, "whole");
        store.allow_build_restart(&whole).unwrap();
        let with_args = start(&store, &account, "args");

        let again = reap_interrupted_builds(&store, &fake, dir.path())
            .await
            .unwrap();
        assert_eq!(
            again
                .iter()
                .map(|b| b.build_id.as_str())
                .collect::<Vec<_>>(),
            vec![whole.as_str()]
        );
        let requeued = store.build(&account, &whole).unwrap().unwrap();
        assert_eq!(requeued.state, BuildState::Pending);
        let failed = store.build(&account, &with_args).unwrap().unwrap();
        assert_eq!(failed.state, BuildState::Failed);
        let reason = failed.state_reason.unwrap_or_default();
        assert!(reason.contains("restart"), "{reason}");
    }
}
