//! Dockerfile builds: what CreateMicrovmImage and UpdateMicrovmImage start.
//!
//! A build runs as a task of the server: it marks the build IN_PROGRESS,
//! fetches the code artifact (`s3://bucket/key`, from the built-in store or
//! the operator's), extracts it safely, runs the Dockerfile in build microVMs
//! ([`hearth_builder::run`]), boots the result, starts the app, waits for it
//! to be ready, snapshots it ([`crate::images::app`]), optionally calls `/validate` on
//! a clone of the snapshot, and records the outcome: the version SUCCESSFUL
//! (image CREATED/UPDATED) or FAILED with the reference's error code in the
//! build's `stateReason`.
//!
//! Each build keeps a log at `DATA/builds/<build id>/build.log` (capped),
//! served by the `hearth image logs` extension route.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_api::{BuildErrorCode, BuildFailure, BuildHook};
use hearth_builder::archive;
use hearth_builder::oci::BaseError;
use hearth_builder::run::{Base, BaseResolver, BuildLog, BuildRequest, Builder, Disk};
use hearth_vm::disk::BackingFormat;
use hearth_vm::{error_chain, Assets, ColdBoot, Driver};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::arn::Arn;
use crate::db::records::SnapshotSizes;
use crate::db::spec::{ImageHook, ImageSpec};
use crate::db::store::{unix_now_ms, Store, StoreError};
use crate::images::app::{aws_env, snapshot_ready_app, AppSpec};
use crate::layout;
use crate::sizes::{Size, Sizes};
use crate::vms::{hooks, meter};

/// Largest build log kept; later lines are dropped with a note.
const MAX_LOG_BYTES: u64 = 8 * 1024 * 1024;
/// Longest one RUN step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest the Dockerfile steps of one build may take together.
const BUILD_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
/// Builds running at once on this host (each is one or more VMs under TCG).
const PARALLEL_BUILDS: usize = 2;

/// Where code artifacts come from: the built-in S3 store or the operator's.
pub trait ArtifactFetch: Send + Sync + fmt::Debug {
    /// Copies `uri`, as `account` may see it, into the new file `dest`, at
    /// most `max_bytes`; fails with the reference's code (S3_NO_SUCH_KEY,
    /// S3_ACCESS_DENIED, ...).
    fn fetch<'a>(
        &'a self,
        account: &'a str,
        uri: &'a str,
        dest: &'a Path,
        max_bytes: u64,
    ) -> Pin<Box<dyn Future<Output = Result<u64, BuildFailure>> + Send + 'a>>;
}

/// The extension header carrying build arguments (`ARG` values): base64 of a
/// JSON object of strings. They live only as long as the build task (never
/// in the database) and are masked in the build log.
pub const BUILD_ARGS_HEADER: &str = "x-hearth-build-args";
/// Where the parsed header travels in the operation's input (no model member
/// can have this name).
pub const BUILD_ARGS_MEMBER: &str = "__hearthBuildArgs";
const MAX_BUILD_ARGS: usize = 64;
const MAX_BUILD_ARG_VALUE: usize = 4096;

/// Reads [`BUILD_ARGS_HEADER`]; a malformed one is a ValidationException.
pub fn build_args_header(headers: &http::HeaderMap) -> Result<Option<Value>, hearth_api::ApiError> {
    use base64::Engine as _;
    let Some(raw) = headers.get(BUILD_ARGS_HEADER) else {
        return Ok(None);
    };
    let bad = |why: &str| hearth_api::ApiError::validation(format!("{BUILD_ARGS_HEADER}: {why}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.as_bytes())
        .map_err(|_| bad("not base64"))?;
    let map: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| bad("not a JSON object"))?;
    if map.len() > MAX_BUILD_ARGS {
        return Err(bad("too many build arguments"));
    }
    for (name, value) in &map {
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.len() <= 256
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(bad("argument names are letters, digits and _"));
        }
        if value.as_str().is_none_or(|v| v.len() > MAX_BUILD_ARG_VALUE) {
            return Err(bad("argument values are strings of at most 4096 bytes"));
        }
    }
    Ok(Some(Value::Object(map)))
}

/// A build to run (its rows exist, PENDING).
#[derive(Debug, Clone)]
pub struct BuildJob {
    pub account_id: String,
    pub image_name: String,
    pub version: u32,
    pub build_id: String,
    /// The version's frozen request.
    pub spec: ImageSpec,
    pub memory_mib: u32,
    /// `ARG` values for this build only (not persisted; masked in the log).
    pub build_args: Vec<(String, String)>,
    /// Run again after a server restart interrupted it.
    pub restarted: bool,
}

/// The operator's settings for builds.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub region: String,
    /// Largest code artifact fetched.
    pub max_artifact_bytes: u64,
    /// Where FROM may pull images that are not managed base images.
    pub registry: Option<hearth_oci::RegistryConfig>,
    /// Step-cache entries unused this long are dropped at the next start.
    pub cache_max_age: Duration,
    /// What each `minimumMemoryInMiB` gives the build's VMs.
    pub sizes: Sizes,
}

/// Runs builds.
pub struct Builds {
    store: Store,
    builder: Builder,
    assets: Assets,
    data_dir: PathBuf,
    region: String,
    artifacts: Arc<dyn ArtifactFetch>,
    limits: archive::Limits,
    max_artifact_bytes: u64,
    registry: Option<hearth_oci::RegistryConfig>,
    cache_max_age: Duration,
    sizes: Sizes,
    slots: Semaphore,
}

impl fmt::Debug for Builds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builds")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildsError {
    #[error("cannot set up the builder")]
    Builder(#[source] hearth_builder::run::BuildError),
}

impl Builds {
    pub fn new(
        store: Store,
        driver: Arc<dyn Driver>,
        assets: Assets,
        data_dir: &Path,
        artifacts: Arc<dyn ArtifactFetch>,
        settings: BuildSettings,
    ) -> Result<Builds, BuildsError> {
        let BuildSettings {
            region,
            max_artifact_bytes,
            registry,
            cache_max_age,
            sizes,
        } = settings;
        // The step cache lives with the data: image versions chain to its layers.
        let builder =
            Builder::new(driver, &layout::build_cache(data_dir)).map_err(BuildsError::Builder)?;
        Ok(Builds {
            store,
            builder,
            assets,
            data_dir: data_dir.to_path_buf(),
            region,
            artifacts,
            limits: archive::Limits::default(),
            max_artifact_bytes,
            registry,
            cache_max_age,
            sizes,
            slots: Semaphore::new(PARALLEL_BUILDS),
        })
    }

    /// Removes step-cache files nothing needs (see `LayerCache::sweep`): the
    /// roots are every image version's snapshot disk and every VM's disk.
    /// Only while no build runs: the server calls it at start.
    pub fn sweep_cache(&self) -> usize {
        let mut roots = layout::snapshot_disks(&self.data_dir);
        if let Ok(vms) = self.builder.driver().list() {
            roots.extend(vms.into_iter().map(|vm| vm.disk));
        }
        let removed = self.builder.cache().sweep(&roots, self.cache_max_age);
        if removed > 0 {
            tracing::info!(removed, "step cache: removed files no build or image needs");
        }
        removed
    }

    fn work_dir(&self, build_id: &str) -> PathBuf {
        layout::build_dir(&self.data_dir, build_id)
    }

    /// The build's log file.
    pub fn log_path(&self, build_id: &str) -> PathBuf {
        layout::build_log(&self.data_dir, build_id)
    }

    /// Starts `job` in the background.
    pub fn spawn(self: &Arc<Self>, job: BuildJob) {
        let builds = self.clone();
        tokio::spawn(async move {
            if let Err(err) = builds.run(&job).await {
                tracing::error!(build = %job.build_id, error = %error_chain(&err), "build bookkeeping failed");
            }
        });
    }

    async fn run(&self, job: &BuildJob) -> Result<(), StoreError> {
        let work = self.work_dir(&job.build_id);
        let _ = hearth_vm::disk::create_private_dir_all(&work);
        let mut log = FileLog::create(&self.log_path(&job.build_id));
        log.secrets = job
            .build_args
            .iter()
            .map(|(_, v)| v.clone())
            .filter(|v| v.len() >= 3)
            .collect();
        log.live_vms = Some((self.store.clone(), job.build_id.clone()));
        if job.restarted {
            log.line("the hearth server restarted during this build: running it again (finished steps come from the step cache)");
        }
        log.line(&format!(
            "build {} of {} version {}.0",
            job.build_id, job.image_name, job.version
        ));
        let _slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                log.line("waiting for a free build slot");
                match self.slots.acquire().await {
                    Ok(slot) => slot,
                    Err(_) => return Ok(()),
                }
            }
        };
        self.store.build_started(&job.account_id, &job.build_id)?;
        let started = Instant::now();
        let started_ms = unix_now_ms();
        let outcome = self.execute(job, &log).await;
        // A build is billed the baseline of its size for as long as it ran.
        meter::build_usage(
            &self.store,
            &job.account_id,
            &job.image_name,
            self.size(job).shape(),
            started_ms,
            unix_now_ms(),
        );
        let _ = std::fs::remove_dir_all(layout::build_context(&self.data_dir, &job.build_id));
        let _ = std::fs::remove_file(layout::build_artifact(&self.data_dir, &job.build_id));
        match &outcome {
            Ok(_) => log.line(&format!(
                "build SUCCESSFUL in {:.1} s",
                started.elapsed().as_secs_f64()
            )),
            Err(reason) => {
                log.line(&format!("build FAILED: {reason}"));
                let _ = std::fs::remove_dir_all(self.version_dir(job));
            }
        }
        self.store
            .finish_build(&job.account_id, &job.build_id, outcome)
    }

    /// The job's size (validated when the version was made; one an operator
    /// has since removed from the table follows the reference's rule).
    fn size(&self, job: &BuildJob) -> Size {
        self.sizes
            .get(job.memory_mib)
            .unwrap_or_else(|| Size::reference(job.memory_mib))
    }

    fn version_dir(&self, job: &BuildJob) -> PathBuf {
        layout::version_dir(
            &self.data_dir,
            &job.account_id,
            &job.image_name,
            job.version,
        )
    }

    /// The build's steps.
    async fn execute(
        &self,
        job: &BuildJob,
        log: &FileLog,
    ) -> Result<(PathBuf, SnapshotSizes), BuildFailure> {
        let platform =
            |detail: &str| BuildFailure::new(BuildErrorCode::InternalPlatformError, detail);
        let uri = &job.spec.code_artifact.uri;
        log.line(&format!("fetching {uri}"));
        let artifact = layout::build_artifact(&self.data_dir, &job.build_id);
        let _ = std::fs::remove_file(&artifact);
        self.artifacts
            .fetch(&job.account_id, uri, &artifact, self.max_artifact_bytes)
            .await?;
        log.line("extracting the code artifact");
        let context = layout::build_context(&self.data_dir, &job.build_id);
        let _ = std::fs::remove_dir_all(&context);
        hearth_vm::disk::create_private_dir_all(&context)
            .map_err(|_| platform("cannot create the build context"))?;
        let limits = self.limits;
        let (zip, dest) = (artifact.clone(), context.clone());
        let extracted = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&zip)
                .map_err(|_| platform("the fetched artifact is unreadable"))?;
            archive::extract(std::io::BufReader::new(file), &dest, &limits)
                .map_err(|e| BuildFailure::from(&e))
        })
        .await
        .map_err(|_| platform("extraction stopped"))??;
        log.line(&format!(
            "{} files, {} bytes",
            extracted.files, extracted.bytes
        ));
        let dockerfile = std::fs::read_to_string(context.join("Dockerfile")).map_err(|_| {
            BuildFailure::new(
                BuildErrorCode::ArchiveDockerfileNotFound,
                "the artifact has no readable Dockerfile at its root",
            )
        })?;

        let resolver = ManagedBases {
            assets: &self.assets,
            region: &self.region,
            registry: self.registry.as_ref(),
            cache_dir: layout::build_cache(&self.data_dir),
            default_base: job.spec.base_image_name().unwrap_or_default(),
        };
        let prefix = layout::build_vm_prefix(&job.build_id);
        let size = self.size(job);
        let shape = size.shape();
        let egress = job.spec.internet_egress();
        let request = BuildRequest {
            context: context.clone(),
            dockerfile,
            build_args: job.build_args.iter().cloned().collect::<HashMap<_, _>>(),
            vm_prefix: prefix.clone(),
            shape,
            network: egress,
            cache_scope: job.account_id.clone(),
            step_timeout: STEP_TIMEOUT,
            build_timeout: BUILD_TIMEOUT,
        };
        let steps_started = Instant::now();
        let built = self
            .builder
            .build(&request, &resolver, log)
            .await
            .map_err(|e| BuildFailure::from(&e))?;
        log.line(&format!(
            "steps: {} run, {} from the cache, in {:.2} s",
            built.steps_run,
            built.steps_cached,
            steps_started.elapsed().as_secs_f64()
        ));

        let hooks = job.spec.hooks.clone().unwrap_or_default();
        let image_hook = |hook| hooks.image_enabled(hook);
        let hook_timeout = |hook| hooks.image_timeout(hook);
        let port = hooks.port;
        let mut env = built.config.process_env();
        for (k, v) in job.spec.environment() {
            match env.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v.to_string(),
                None => env.push((k.to_string(), v.to_string())),
            }
        }
        env.extend(aws_env(
            &self.region,
            &job.account_id,
            &job.image_name,
            Some(job.version),
        ));
        let app = AppSpec {
            argv: built.config.command(),
            env,
            cwd: built.config.cwd(),
            user: built.config.user.clone(),
            hooks_port: if image_hook(ImageHook::Ready) {
                port
            } else {
                None
            },
            ready_timeout: hook_timeout(ImageHook::Ready),
        };
        let version_dir = self.version_dir(job);
        let _ = std::fs::remove_dir_all(&version_dir);
        hearth_vm::disk::create_private_dir_all(&version_dir)
            .map_err(|_| platform("cannot create the version directory"))?;
        let snapshot_dir = layout::snapshot_dir(&version_dir);
        let progress = |text: &str| log.line(text);
        let sizes = snapshot_ready_app(
            self.builder.driver(),
            &format!("{prefix}-app"),
            shape,
            &ColdBoot {
                base: built.disk.path.clone(),
                base_format: built.disk.format,
                overlay: None,
                egress: false,
                disk_size: Some(size.disk_bytes()),
                // Its snapshot is cloned: see `ColdBoot::free_page_reporting`.
                free_page_reporting: false,
            },
            &app,
            &snapshot_dir,
            extracted.bytes,
            &progress,
        )
        .await?;
        if image_hook(ImageHook::Validate) {
            let port = port.ok_or_else(|| {
                BuildFailure::new(
                    BuildErrorCode::ContainerBuildFailed,
                    "the validate hook needs hooks.port",
                )
            })?;
            self.validate(
                &snapshot_dir,
                &format!("{prefix}-val"),
                port,
                hook_timeout(ImageHook::Validate).as_secs(),
                log,
            )
            .await?;
        }
        Ok((snapshot_dir, sizes))
    }

    /// Launches a clone of the new snapshot and calls its `/validate` hook
    /// until 200 (503: not yet), up to `timeout_secs`.
    async fn validate(
        &self,
        snapshot_dir: &Path,
        name: &str,
        port: u16,
        timeout_secs: u64,
        log: &FileLog,
    ) -> Result<(), BuildFailure> {
        let platform = |what: &str, err: &dyn std::error::Error| {
            BuildFailure::new(
                BuildErrorCode::InternalPlatformError,
                format!("{what}: {}", error_chain(err)),
            )
        };
        log.line(&format!(
            "validating: a clone of the snapshot, /validate on port {port}"
        ));
        let driver = self.builder.driver();
        let snapshot = hearth_vm::Snapshot::open(snapshot_dir, hearth_vm::Verify::Sizes)
            .map_err(|e| platform("the new snapshot does not open", &e))?;
        let (vm, agent) = driver
            .launch_with_agent(&snapshot, name)
            .await
            .map_err(|e| platform("the validation clone did not start", &e))?;
        let deadline = Instant::now() + Duration::from_secs(timeout_secs);
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(BuildFailure::hook_timed_out(
                    BuildHook::Validate,
                    Duration::from_secs(timeout_secs),
                ));
            }
            match hooks::call(
                &agent,
                port,
                "validate",
                None,
                left.min(Duration::from_secs(10)),
            )
            .await
            {
                Ok(200) => break Ok(()),
                Ok(503) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(status) => {
                    break Err(BuildFailure::new(
                        BuildErrorCode::ContainerBuildFailed,
                        format!("Validate hook returned HTTP status {status}"),
                    ))
                }
            }
        };
        drop(agent);
        if let Err(e) = driver.remove(&vm).await {
            tracing::warn!(error = %error_chain(&e), "cannot remove the validation clone");
        }
        if result.is_ok() {
            log.line("validate hook answered 200");
        }
        result
    }
}

/// FROM names the operator's managed base images resolve: the image's name
/// (`FROM debian-12`), its ARN, and the reference's recommended base
/// (`public.ecr.aws/lambda/microvms:*`) meaning the request's `baseImageArn`.
/// Other names are pulled from the operator's OCI registry, when one is set.
struct ManagedBases<'a> {
    assets: &'a Assets,
    region: &'a str,
    default_base: String,
    registry: Option<&'a hearth_oci::RegistryConfig>,
    cache_dir: PathBuf,
}

impl BaseResolver for ManagedBases<'_> {
    async fn resolve(&self, image: &str, log: &dyn BuildLog) -> Result<Base, BaseError> {
        let lower = image.to_ascii_lowercase();
        let managed = Arn::parse(&lower).and_then(|arn| {
            arn.image_of(self.region, crate::arn::MANAGED_ACCOUNT)
                .map(str::to_string)
        });
        let name = if let Some(name) = managed {
            name
        } else if lower.starts_with("public.ecr.aws/lambda/microvms") {
            self.default_base.clone()
        } else {
            lower.strip_suffix(":latest").unwrap_or(&lower).to_string()
        };
        // `base_image` refuses names that are not plain image names, and
        // resolves the image's `current` link to its exact content.
        let Ok(path) = self.assets.base_image(&name) else {
            if let Some(registry) = self.registry {
                return hearth_builder::oci::registry_base(registry, image, &self.cache_dir, log)
                    .await;
            }
            return Err(BaseError::NotManaged {
                image: image.to_string(),
                suggestion: if self.default_base.is_empty() {
                    "debian-12".to_string()
                } else {
                    self.default_base.clone()
                },
            });
        };
        log.line(&format!(" ---> managed base image {name}"));
        Ok(Base {
            identity: format!("{name}@{}", path.display()),
            disk: Disk {
                path,
                format: BackingFormat::Raw,
            },
            config: Default::default(),
        })
    }
}

/// A build's log file: lines are appended and flushed as they come, up to
/// [`MAX_LOG_BYTES`].
struct FileLog {
    file: Mutex<Option<std::fs::File>>,
    written: Mutex<u64>,
    /// Build-argument values, replaced by `***` in every line.
    secrets: Vec<String>,
    /// Where the count of the build's live VMs is recorded (the quota).
    live_vms: Option<(Store, String)>,
}

impl FileLog {
    fn create(path: &Path) -> FileLog {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(
                |e| tracing::warn!(path = %path.display(), error = %e, "cannot open the build log"),
            )
            .ok();
        FileLog {
            file: Mutex::new(file),
            written: Mutex::new(0),
            secrets: Vec::new(),
            live_vms: None,
        }
    }
}

impl BuildLog for FileLog {
    fn vms_live(&self, count: usize) {
        // Zero once the build is over: its row no longer counts anyway.
        if let Some((store, build_id)) = &self.live_vms {
            if let Err(err) = store.set_build_live_vms(build_id, count.max(1)) {
                tracing::warn!(build = %build_id, error = %error_chain(&err), "cannot record the build's VMs");
            }
        }
    }

    fn line(&self, text: &str) {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        tracing::debug!(target: "hearth_build", "{text}");
        let (Ok(mut file), Ok(mut written)) = (self.file.lock(), self.written.lock()) else {
            return;
        };
        let Some(f) = file.as_mut() else {
            return;
        };
        if *written >= MAX_LOG_BYTES {
            return;
        }
        let mut line = text.replace('\r', "");
        line.push('\n');
        if *written + line.len() as u64 > MAX_LOG_BYTES {
            line = "[log truncated: the build log limit was reached]\n".into();
            *written = MAX_LOG_BYTES;
        } else {
            *written += line.len() as u64;
        }
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn header(raw: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            BUILD_ARGS_HEADER,
            http::HeaderValue::from_str(raw).expect("header"),
        );
        headers
    }

    fn encoded(json: &str) -> http::HeaderMap {
        header(&base64::engine::general_purpose::STANDARD.encode(json))
    }

    #[test]
    fn build_args_header_is_checked() {
        assert_eq!(
            build_args_header(&http::HeaderMap::new()).expect("absent"),
            None
        );
        let ok = build_args_header(&encoded(r#"{"TOKEN":"s3cr3t","_X1":""}"#)).expect("valid");
        assert_eq!(ok, Some(serde_json::json!({"TOKEN": "s3cr3t", "_X1": ""})));
        let too_many = format!(
            "{{{}}}",
            (0..65)
                .map(|i| format!("\"A{i}\":\"v\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        for bad in [
            header("%%% not base64"),
            encoded("[1, 2]"),
            encoded(r#"{"1ABC":"v"}"#),
            encoded(r#"{"A-B":"v"}"#),
            encoded(r#"{"A":1}"#),
            encoded(&format!(r#"{{"A":"{}"}}"#, "x".repeat(4097))),
            encoded(&too_many),
        ] {
            let err = build_args_header(&bad).expect_err("must be refused");
            assert_eq!(err.code, hearth_api::ErrorCode::Validation);
        }
    }

    #[test]
    fn the_log_masks_build_arg_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("build.log");
        let mut log = FileLog::create(&path);
        log.secrets = vec!["s3cr3t-value".into()];
        log.line("token is s3cr3t-value, again s3cr3t-value");
        log.line("nothing secret");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "token is ***, again ***\nnothing secret\n");
    }
}
