//! Runs a Dockerfile inside build microVMs.
//!
//! The Dockerfile is untrusted, so nothing of it runs on the host: each stage
//! gets a build VM booted from its base disk (or from the last cached layer),
//! RUN is a process in that VM, COPY and ADD write files through the agent,
//! and after every step that changes the filesystem the guest syncs and the
//! VM's disk overlay is frozen into a layer of the step cache ([`crate::cache`]).
//! A stage whose steps are all cached needs no VM at all.
//!
//! The result is the last stage's top layer (a qcow2 chain down to the base
//! disk) and its [`ImageConfig`]; the server boots the app from it and
//! snapshots it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hearth_api::{BuildErrorCode, BuildFailure};
use hearth_proto::{ExecRequest, WriteFileRequest};
use hearth_vm::agent::AgentClient;
use hearth_vm::disk::{BackingFormat, DiskError};
use hearth_vm::{
    error_chain, AgentError, BootRequest, ColdBoot, Driver, MachineShape, VmError, VmRecord,
};
use tokio::io::AsyncWrite;

pub use crate::base::{Base, BaseResolver, Disk};
pub use crate::log::BuildLog;

use crate::base::BaseError;
use crate::cache::{CacheError, Key, LayerCache};
use crate::config::{resolve_path, ImageConfig};
use crate::context::{self, ContextError};
use crate::dockerfile::{
    self, CopySpec, Dockerfile, DockerfileError, InstructionKind, Stage, Stages,
};
use crate::plan::{self, Action, EarlierStages, PlanError, StageState, StepInputs};
use crate::user::{resolve_user, UserError};

/// Virtual size of a build VM's disk on a base image: the root filesystem
/// grows to it (the reference's microVMs have an 8 GB root disk).
pub const BUILD_DISK_BYTES: u64 = 8 << 30;
/// How much of a failing step's output the error keeps.
const OUTPUT_TAIL: usize = 2000;
/// Longest Dockerfile line quoted in the log.
const QUOTE: usize = 160;

/// Why a build failed. `BuildFailure::from(&error)` is what the build's
/// `stateReason` says.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Not a `#[source]`: the Dockerfile's error is the message itself.
    #[error("Dockerfile {0}")]
    Dockerfile(DockerfileError),
    #[error("step {step}/{total} (line {line}) {text}")]
    Step {
        step: usize,
        total: usize,
        line: usize,
        text: String,
        #[source]
        cause: Box<StepError>,
        /// The tail of the step's output.
        output: String,
    },
    #[error("the build did not finish within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot create the scratch disk's directory")]
    ScratchDir(#[source] DiskError),
    #[error("cannot run mkfs.ext4")]
    RunMkfs(#[source] std::io::Error),
    #[error("mkfs.ext4 failed for the scratch disk")]
    ScratchMkfs,
    #[error("cannot place the scratch disk")]
    PlaceScratch(#[source] std::io::Error),
    #[error("no stage was built")]
    NoStage,
    #[error("stage without FROM")]
    NoFrom,
}

impl From<DockerfileError> for BuildError {
    fn from(err: DockerfileError) -> BuildError {
        BuildError::Dockerfile(err)
    }
}

/// Why one step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("the build VM did not start")]
    Boot(#[source] VmError),
    #[error("the build VM's agent did not answer")]
    Agent(#[source] VmError),
    #[error("the build VM did not sync")]
    Sync(#[source] AgentError),
    #[error("cannot freeze the build disk")]
    Freeze(#[source] VmError),
    #[error("the build VM is gone")]
    VmGone,
    #[error("did not finish within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("the command returned a non-zero code: {0}")]
    ExitCode(i32),
    #[error("the command was killed by signal {0}")]
    Signal(i32),
    #[error("the command failed")]
    Failed,
    #[error("cannot run {0}")]
    Exec(String, #[source] AgentError),
    #[error("--chmod={0} is not an octal mode")]
    Chmod(String),
    #[error("cannot read {0}")]
    ReadFile(String, #[source] std::io::Error),
    #[error("cannot write {0}")]
    WriteFile(String, #[source] AgentError),
    #[error("this step needs /bin/sh in the image")]
    NoShell(#[source] AgentError),
    #[error("the copy failed in the build VM")]
    CopyFailed,
    #[error("cannot read the archive")]
    ReadArchive(#[source] std::io::Error),
    #[error("cannot copy the archive")]
    CopyArchive(#[source] AgentError),
    #[error("the source stage was not built")]
    SourceStageMissing,
    #[error("globs are not supported in COPY --from")]
    GlobFrom,
    #[error("{0} not found in the source stage (or it has no tar)")]
    NotInSourceStage(String),
    #[error("cannot unpack into the image")]
    Unpack,
    #[error("cannot unpack")]
    UnpackExec(#[source] AgentError),
}

/// A failed step: its error and the tail of its output (empty when no
/// process ran).
#[derive(Debug)]
struct StepFailure {
    cause: StepError,
    output: String,
}

/// `?` on a step's errors: a failure with no output.
macro_rules! step_failure_from {
    ($($error:ty),+) => {$(
        impl From<$error> for StepFailure {
            fn from(err: $error) -> StepFailure {
                StepFailure {
                    cause: err.into(),
                    output: String::new(),
                }
            }
        }
    )+};
}

step_failure_from!(
    StepError,
    PlanError,
    BaseError,
    ContextError,
    UserError,
    CacheError
);

impl StepError {
    fn with_output(self, output: String) -> StepFailure {
        StepFailure {
            cause: self,
            output,
        }
    }
}

impl BuildError {
    /// The build error code.
    pub fn code(&self) -> BuildErrorCode {
        match self {
            BuildError::Step { cause, output, .. } => {
                let base = match cause.as_ref() {
                    StepError::Base(base) => base.code(),
                    _ => BuildErrorCode::ContainerBuildFailed,
                };
                let full = "No space left on device";
                if base == BuildErrorCode::ContainerBuildFailed
                    && (output.contains(full) || error_chain(cause).contains(full))
                {
                    BuildErrorCode::DiskStorageFull
                } else {
                    base
                }
            }
            BuildError::Dockerfile(_) | BuildError::TimedOut(_) => {
                BuildErrorCode::ContainerBuildFailed
            }
            BuildError::Cache(_)
            | BuildError::ScratchDir(_)
            | BuildError::RunMkfs(_)
            | BuildError::ScratchMkfs
            | BuildError::PlaceScratch(_)
            | BuildError::NoStage
            | BuildError::NoFrom => BuildErrorCode::InternalPlatformError,
        }
    }
}

/// The build's failure: the code, what failed with its causes, and the tail
/// of a failed step's output.
impl From<&BuildError> for BuildFailure {
    fn from(err: &BuildError) -> BuildFailure {
        let detail = match err {
            BuildError::Dockerfile(e) => format!("Dockerfile {}", error_chain(e)),
            BuildError::Step { output, .. } if !output.is_empty() => {
                format!("{}; output ends: {output}", error_chain(err))
            }
            _ => error_chain(err),
        };
        BuildFailure::new(err.code(), detail)
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The extracted build context (the Dockerfile is `Dockerfile` in it).
    pub context: PathBuf,
    pub dockerfile: String,
    pub build_args: HashMap<String, String>,
    /// Build VMs are named `<vm_prefix>-<n>` (keep it under 36 characters).
    pub vm_prefix: String,
    pub shape: MachineShape,
    /// Outbound network during RUN (INTERNET_EGRESS).
    pub network: bool,
    /// Whose step cache this build reads and writes: the account id. Layers
    /// are never shared across scopes (see `cache::Key::base`).
    pub cache_scope: String,
    /// Longest a single RUN may take.
    pub step_timeout: Duration,
    /// Longest the whole build may take (a Dockerfile of many slow steps
    /// must not hold a build slot for ever).
    pub build_timeout: Duration,
}

/// A finished build.
#[derive(Debug, Clone)]
pub struct Built {
    pub disk: Disk,
    pub config: ImageConfig,
    /// Steps that changed the filesystem: run, and taken from the cache.
    pub steps_run: usize,
    pub steps_cached: usize,
}

/// Runs builds with one VM driver and one step cache.
#[derive(Debug, Clone)]
pub struct Builder {
    driver: Arc<dyn Driver>,
    cache: LayerCache,
    scratch_dir: PathBuf,
}

/// A stage's outcome, kept for FROM <stage> and COPY --from.
#[derive(Debug, Clone)]
struct StageResult {
    disk: Disk,
    config: ImageConfig,
    key: Key,
}

impl Builder {
    pub fn new(driver: Arc<dyn Driver>, cache_dir: &Path) -> Result<Builder, BuildError> {
        let cache = LayerCache::open(cache_dir)?;
        Ok(Builder {
            driver,
            cache,
            scratch_dir: cache_dir.join("base"),
        })
    }

    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    pub fn cache(&self) -> &LayerCache {
        &self.cache
    }

    /// Builds `request`; the build VMs are gone when this returns.
    pub async fn build<R: BaseResolver>(
        &self,
        request: &BuildRequest,
        resolver: &R,
        log: &dyn BuildLog,
    ) -> Result<Built, BuildError> {
        let parsed = dockerfile::parse(&request.dockerfile)?;
        let stages = parsed.stages()?;
        let mut run = BuildRun {
            builder: self,
            request,
            log,
            dockerfile: &parsed,
            stages: &stages,
            tree: None,
            results: HashMap::new(),
            vms: Vec::new(),
            started: Vec::new(),
            stage_vms: HashMap::new(),
            steps_run: 0,
            steps_cached: 0,
        };
        let limit = request.build_timeout;
        let result = match tokio::time::timeout(limit, run.all(resolver)).await {
            Ok(result) => result,
            Err(_) => Err(BuildError::TimedOut(limit)),
        };
        // Whatever happened (the steps' future is gone on a timeout), the
        // build's VMs go.
        run.cleanup().await;
        let last = result?;
        Ok(Built {
            disk: last.disk,
            config: last.config,
            steps_run: run.steps_run,
            steps_cached: run.steps_cached,
        })
    }

    /// An empty ext4 disk for `FROM scratch` (made once).
    async fn scratch(&self) -> Result<Base, BuildError> {
        let path = self.scratch_dir.join("scratch-1g.ext4");
        if !path.exists() {
            hearth_vm::disk::create_private_dir_all(&self.scratch_dir)
                .map_err(BuildError::ScratchDir)?;
            let tmp = self
                .scratch_dir
                .join(format!(".scratch-{}.ext4", std::process::id()));
            let output = tokio::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "hearth-root"])
                .arg(&tmp)
                .arg("1024M")
                .output()
                .await
                .map_err(BuildError::RunMkfs)?;
            if !output.status.success() {
                let _ = std::fs::remove_file(&tmp);
                return Err(BuildError::ScratchMkfs);
            }
            let _ =
                std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o400));
            std::fs::rename(&tmp, &path).map_err(BuildError::PlaceScratch)?;
        }
        Ok(Base {
            disk: Disk {
                path,
                format: BackingFormat::Raw,
            },
            identity: "scratch-1g".into(),
            config: ImageConfig::default(),
        })
    }
}

struct BuildRun<'a> {
    builder: &'a Builder,
    request: &'a BuildRequest,
    log: &'a dyn BuildLog,
    dockerfile: &'a Dockerfile,
    stages: &'a Stages,
    /// The build context's files (read at the first COPY or ADD).
    tree: Option<context::Tree>,
    results: HashMap<usize, StageResult>,
    /// Every VM this build started (removed at the end); VMs are named by
    /// their place here.
    vms: Vec<BuildVm>,
    /// The name of every VM whose boot began: a boot cut short by the
    /// build's time limit leaves a VM that never reached `vms`.
    started: Vec<String>,
    /// The VM that holds a finished stage's filesystem, for COPY --from.
    stage_vms: HashMap<usize, usize>,
    steps_run: usize,
    steps_cached: usize,
}

/// A VM of the build and its agent connection.
struct BuildVm {
    vm: VmRecord,
    agent: Arc<AgentClient>,
}

/// Where the program's stdout/stderr go: the build log, line by line, and a
/// bounded tail for the error message.
#[derive(Clone)]
struct LogSink<'a> {
    log: &'a dyn BuildLog,
    partial: Arc<Mutex<Vec<u8>>>,
    tail: Arc<Mutex<Vec<u8>>>,
}

impl<'a> LogSink<'a> {
    fn new(log: &'a dyn BuildLog) -> Self {
        LogSink {
            log,
            partial: Arc::default(),
            tail: Arc::default(),
        }
    }

    fn take_tail(&self) -> String {
        self.flush_partial();
        let tail = self.tail.lock().map(|t| t.clone()).unwrap_or_default();
        String::from_utf8_lossy(&tail).trim().to_string()
    }

    fn flush_partial(&self) {
        if let Ok(mut partial) = self.partial.lock() {
            if !partial.is_empty() {
                self.log.line(&String::from_utf8_lossy(&partial));
                partial.clear();
            }
        }
    }
}

impl AsyncWrite for LogSink<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Ok(mut tail) = self.tail.lock() {
            tail.extend_from_slice(buf);
            if tail.len() > OUTPUT_TAIL {
                let cut = tail.len() - OUTPUT_TAIL;
                tail.drain(..cut);
            }
        }
        if let Ok(mut partial) = self.partial.lock() {
            partial.extend_from_slice(buf);
            while let Some(end) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=end).collect();
                self.log
                    .line(String::from_utf8_lossy(&line[..line.len() - 1]).trim_end());
            }
            // A line with no end in sight is logged in pieces.
            if partial.len() > 8192 {
                self.log.line(&String::from_utf8_lossy(&partial));
                partial.clear();
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The stages the last one needs (through FROM <stage> and COPY --from).
fn needed_stages(stages: &Stages) -> BTreeSet<usize> {
    let mut needed = BTreeSet::new();
    let mut todo = vec![stages.stages.len().saturating_sub(1)];
    while let Some(index) = todo.pop() {
        if !needed.insert(index) {
            continue;
        }
        let Some(stage) = stages.stages.get(index) else {
            continue;
        };
        let mut refs = Vec::new();
        if let InstructionKind::From { image, .. } = &stage.from.kind {
            refs.push(image.clone());
        }
        for inst in &stage.instructions {
            if let InstructionKind::Copy(CopySpec {
                from: Some(from), ..
            }) = &inst.kind
            {
                refs.push(from.clone());
            }
        }
        for r in refs {
            if let Some(dep) = stages.find(&r).filter(|d| d.index < index) {
                todo.push(dep.index);
            }
        }
    }
    needed
}

impl BuildRun<'_> {
    async fn all<R: BaseResolver>(&mut self, resolver: &R) -> Result<StageResult, BuildError> {
        let needed = needed_stages(self.stages);
        let total_steps: usize = needed
            .iter()
            .filter_map(|i| self.stages.stages.get(*i))
            .map(|s| s.instructions.len() + 1)
            .sum();
        let mut step = 0;
        let global = self
            .stages
            .global_arg_values(&self.request.build_args, self.dockerfile.escape)?;
        let mut last = None;
        for stage in &self.stages.stages {
            if !needed.contains(&stage.index) {
                continue;
            }
            let result = self
                .stage(stage, resolver, &global, &mut step, total_steps)
                .await?;
            self.results.insert(stage.index, result.clone());
            last = Some(result);
        }
        last.ok_or(BuildError::NoStage)
    }

    fn quote(&self, line: usize) -> String {
        let text = self
            .request
            .dockerfile
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("")
            .trim();
        if text.chars().count() > QUOTE {
            format!("{}...", text.chars().take(QUOTE).collect::<String>())
        } else {
            text.to_string()
        }
    }

    async fn stage<R: BaseResolver>(
        &mut self,
        stage: &Stage,
        resolver: &R,
        global: &HashMap<String, String>,
        step: &mut usize,
        total: usize,
    ) -> Result<StageResult, BuildError> {
        *step += 1;
        let from_line = stage.from.line;
        self.log
            .line(&format!("[{step}/{total}] {}", self.quote(from_line)));
        let from = stage.from.expanded(global, self.dockerfile.escape)?;
        let InstructionKind::From { image, .. } = &from.kind else {
            return Err(BuildError::NoFrom);
        };
        let fail = |cause: StepError| BuildError::Step {
            step: *step,
            total,
            line: from_line,
            text: format!("FROM {image}"),
            cause: Box::new(cause),
            output: String::new(),
        };
        let (disk, config, mut key) = if image.eq_ignore_ascii_case("scratch") {
            let base = self.builder.scratch().await?;
            let key = Key::base(&self.request.cache_scope, &base.identity);
            (base.disk, base.config, key)
        } else if let Some(dep) = self
            .stages
            .find(image)
            .filter(|d| d.index < stage.index)
            .and_then(|d| self.results.get(&d.index))
        {
            (
                dep.disk.clone(),
                dep.config.clone(),
                plan::from_stage_key(&dep.key),
            )
        } else {
            let base = resolver
                .resolve(image, self.log)
                .await
                .map_err(|e| fail(e.into()))?;
            let key = Key::base(&self.request.cache_scope, &base.identity);
            (base.disk, base.config, key)
        };
        let mut state = StageRun {
            disk,
            plan: StageState::new(config),
            vm: None,
        };
        let stage_keys: HashMap<usize, Key> = self
            .results
            .iter()
            .map(|(index, result)| (*index, result.key.clone()))
            .collect();
        for inst in &stage.instructions {
            *step += 1;
            let quoted = self.quote(inst.line);
            let expanded = inst.expanded(&state.plan.vars(), self.dockerfile.escape)?;
            let step_err = |failure: StepFailure| BuildError::Step {
                step: *step,
                total,
                line: inst.line,
                text: quoted.clone(),
                cause: Box::new(failure.cause),
                output: failure.output,
            };
            self.log.line(&format!("[{step}/{total}] {quoted}"));
            let selection = match plan::reads_context(&expanded.kind) {
                Some(spec) => Some(self.select(spec).map_err(|e| step_err(e.into()))?),
                None => None,
            };
            let inputs = StepInputs {
                build_args: &self.request.build_args,
                global_args: global,
                network: self.request.network,
                earlier: EarlierStages {
                    stages: self.stages,
                    current: stage.index,
                    keys: &stage_keys,
                },
                selection,
            };
            let planned = plan::plan(&state.plan, &expanded.kind, &key, inputs)
                .map_err(|e| step_err(e.into()))?;
            state.plan = planned.state;
            if planned.action.changes_files() {
                self.fs_step(&mut state, &planned.key, planned.action)
                    .await
                    .map_err(step_err)?;
            }
            key = planned.key;
        }
        // The stage's VM (if any) holds its final filesystem for COPY --from.
        if let Some(index) = state.vm {
            self.stage_vms.insert(stage.index, index);
        }
        Ok(StageResult {
            disk: state.disk,
            config: state.plan.config,
            key,
        })
    }

    /// What a COPY or ADD selects from the build context (read at the first one).
    fn select(&mut self, spec: &CopySpec) -> Result<context::Selection, ContextError> {
        let tree = match &self.tree {
            Some(tree) => tree,
            None => {
                let ignore = context::dockerignore(&self.request.context);
                let tree = context::Tree::read(&self.request.context, &ignore)?;
                self.tree.insert(tree)
            }
        };
        tree.select(&spec.sources, &spec.dest)
    }

    /// Runs one filesystem step: from the cache when `key` is there, else in
    /// the stage's VM (booted on demand), then freezes the disk as the layer.
    async fn fs_step(
        &mut self,
        state: &mut StageRun,
        key: &Key,
        action: Action,
    ) -> Result<(), StepFailure> {
        let index = match state.vm {
            Some(index) => index,
            None => {
                if let Some(layer) = self.builder.cache.lookup(key) {
                    self.log.line(" ---> cached");
                    self.steps_cached += 1;
                    state.disk = Disk {
                        path: layer,
                        format: BackingFormat::Qcow2,
                    };
                    return Ok(());
                }
                let index = self.boot(&state.disk, true).await?;
                state.vm = Some(index);
                index
            }
        };
        self.perform(index, action).await?;
        let layer = self.checkpoint(index).await?;
        self.builder.cache.record(key, &layer)?;
        self.steps_run += 1;
        state.disk = Disk {
            path: layer,
            format: BackingFormat::Qcow2,
        };
        Ok(())
    }

    /// Boots a build VM on `disk`; with `keep_layers`, its overlays live in
    /// the cache (the first one, holding what the boot wrote, is frozen at
    /// once and becomes part of the chain). Returns its index in `self.vms`.
    async fn boot(&mut self, disk: &Disk, keep_layers: bool) -> Result<usize, StepError> {
        let name = format!("{}-{}", self.request.vm_prefix, self.started.len() + 1);
        self.started.push(name.clone());
        self.log.line(" ---> starting a build VM");
        let overlay = keep_layers.then(|| self.builder.cache.new_file("boot"));
        let vm = self
            .builder
            .driver
            .boot_with(
                &BootRequest {
                    name,
                    image: "build".into(),
                    shape: self.request.shape,
                },
                &ColdBoot {
                    base: disk.path.clone(),
                    base_format: disk.format,
                    overlay,
                    egress: self.request.network,
                    // A build VM on a base image gets room to grow (see `grow_root`).
                    disk_size: (keep_layers && disk.format == BackingFormat::Raw)
                        .then_some(BUILD_DISK_BYTES),
                    // Build VMs are never cloned: what a step frees goes back.
                    free_page_reporting: true,
                },
            )
            .await
            .map_err(StepError::Boot)?;
        let agent = match self.builder.driver.agent(&vm).await {
            Ok(agent) => agent,
            Err(e) => {
                let _ = self.builder.driver.remove(&vm).await;
                return Err(StepError::Agent(e));
            }
        };
        self.vms.push(BuildVm {
            vm,
            agent: Arc::new(agent),
        });
        self.log.vms_live(self.vms.len());
        let index = self.vms.len() - 1;
        if keep_layers {
            if disk.format == BackingFormat::Raw {
                self.grow_root(index).await;
            }
            // Freeze what the boot wrote, so the first step's layer holds only its own writes.
            self.checkpoint(index).await?;
        }
        Ok(index)
    }

    /// Grows the root filesystem to the build disk's size (online, with the
    /// image's own resize2fs; an image without it keeps its base's size).
    async fn grow_root(&self, index: usize) {
        let Ok(agent) = self.agent(index) else {
            return;
        };
        let grown = agent
            .exec_output(ExecRequest {
                argv: vec!["resize2fs".into(), "/dev/vda".into()],
                env: vec![("PATH".into(), crate::config::DEFAULT_PATH.into())],
                timeout_ms: Some(120_000),
                ..Default::default()
            })
            .await;
        if !grown.is_ok_and(|o| o.status.code == Some(0)) {
            self.log
                .line(" ---> the root filesystem keeps its size (no resize2fs in the image)");
        }
    }

    /// Syncs the guest and freezes the VM's overlay; returns the frozen file.
    async fn checkpoint(&mut self, index: usize) -> Result<PathBuf, StepError> {
        let agent = self.agent(index)?;
        agent.sync().await.map_err(StepError::Sync)?;
        let next = self.builder.cache.new_file("layer");
        let build_vm = self.vms.get_mut(index).ok_or(StepError::VmGone)?;
        self.builder
            .driver
            .checkpoint_disk(&mut build_vm.vm, &next)
            .await
            .map_err(StepError::Freeze)
    }

    fn agent(&self, index: usize) -> Result<Arc<AgentClient>, StepError> {
        self.vms
            .get(index)
            .map(|v| v.agent.clone())
            .ok_or(StepError::VmGone)
    }

    async fn cleanup(&mut self) {
        let mut vms = Vec::new();
        for BuildVm { vm, agent } in self.vms.drain(..) {
            drop(agent);
            vms.push(vm);
        }
        self.log.vms_live(0);
        // A boot the time limit interrupted: its record is on disk, its QEMU may run.
        for name in self.started.drain(..) {
            if !vms.iter().any(|vm| vm.name == name) {
                if let Ok(vm) = self.builder.driver.load(&name) {
                    vms.push(vm);
                }
            }
        }
        for vm in vms {
            if let Err(e) = self.builder.driver.remove(&vm).await {
                tracing::warn!(vm = %vm.name, error = %error_chain(&e), "cannot remove a build VM");
            }
            // The active overlay after the last checkpoint holds nothing of value.
            if vm.disk.starts_with(self.builder.cache.dir()) {
                let _ = std::fs::remove_file(&vm.disk);
            }
        }
    }
}

/// A stage in progress.
struct StageRun {
    /// The top of the stage's disk chain so far.
    disk: Disk,
    /// What planning tracks: the configuration, ARG values, CMD set.
    plan: StageState,
    /// The stage's build VM, once one was needed.
    vm: Option<usize>,
}

/// The first bytes of an archive ADD extracts (tar, gzip, bzip2, xz).
fn is_archive(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 262];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let head = &head[..n];
    head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(b"BZh")
        || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0])
        || head.get(257..262) == Some(b"ustar")
}

fn octal_mode(text: &str) -> Result<u32, StepError> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| StepError::Chmod(text.to_string()))
}

impl BuildRun<'_> {
    async fn perform(&mut self, index: usize, action: Action) -> Result<(), StepFailure> {
        let agent = self.agent(index)?;
        match action {
            Action::Config => Ok(()),
            Action::Mkdir(path) => {
                // A scratch image has no mkdir; WORKDIR is then only metadata.
                let _ = agent
                    .exec_output(ExecRequest {
                        argv: vec!["mkdir".into(), "-p".into(), path],
                        timeout_ms: Some(60_000),
                        ..Default::default()
                    })
                    .await;
                Ok(())
            }
            Action::Run {
                argv,
                env,
                cwd,
                user,
            } => {
                let mut env = env;
                let (uid, gid) = match &user {
                    Some(spec) => {
                        let (uid, gid, home) = resolve_user(&agent, spec).await?;
                        if let Some(home) = home {
                            if !env.iter().any(|(k, _)| k == "HOME") {
                                env.push(("HOME".into(), home));
                            }
                        }
                        (Some(uid), Some(gid))
                    }
                    None => (None, None),
                };
                if !env.iter().any(|(k, _)| k == "HOME") {
                    env.push(("HOME".into(), "/root".into()));
                }
                let sink = LogSink::new(self.log);
                let mut out = sink.clone();
                let mut err = sink.clone();
                let status = agent
                    .exec(
                        ExecRequest {
                            argv: argv.clone(),
                            env,
                            clear_env: true,
                            cwd: Some(cwd),
                            uid,
                            gid,
                            timeout_ms: Some(self.request.step_timeout.as_millis() as u64),
                            ..Default::default()
                        },
                        None::<tokio::io::Empty>,
                        &mut out,
                        &mut err,
                    )
                    .await;
                let tail = sink.take_tail();
                let cause = match status {
                    Ok(status) if status.code == Some(0) => return Ok(()),
                    Ok(status) if status.timed_out => {
                        StepError::TimedOut(self.request.step_timeout)
                    }
                    Ok(status) => match (status.code, status.signal) {
                        (Some(code), _) => StepError::ExitCode(code),
                        (None, Some(signal)) => StepError::Signal(signal),
                        (None, None) => StepError::Failed,
                    },
                    Err(e) => StepError::Exec(argv.first().cloned().unwrap_or_default(), e),
                };
                Err(cause.with_output(tail))
            }
            Action::CopyContext {
                selection,
                spec,
                dest,
                is_add,
            } => {
                self.copy_context(&agent, &selection, &spec, &dest, is_add)
                    .await
            }
            Action::CopyFrom { source, spec, dest } => {
                self.copy_from_stage(&agent, source, &spec, &dest).await
            }
        }
    }

    async fn owner(&self, agent: &AgentClient, spec: &CopySpec) -> Result<(u32, u32), StepFailure> {
        match &spec.chown {
            Some(chown) => {
                let (uid, gid, _) = resolve_user(agent, chown).await?;
                Ok((uid, gid))
            }
            None => Ok((0, 0)),
        }
    }

    async fn copy_context(
        &self,
        agent: &AgentClient,
        selection: &context::Selection,
        spec: &CopySpec,
        dest: &str,
        is_add: bool,
    ) -> Result<(), StepFailure> {
        let (uid, gid) = self.owner(agent, spec).await?;
        let chmod = spec.chmod.as_deref().map(octal_mode).transpose()?;
        let base = dest.trim_end_matches('/');
        let target_of = |rel: &str| {
            if rel.is_empty() {
                if base.is_empty() {
                    "/".to_string()
                } else {
                    base.to_string()
                }
            } else {
                format!("{base}/{rel}")
            }
        };
        let mut dirs = Vec::new();
        for entry in &selection.entries {
            let target = target_of(&entry.dest);
            if entry.is_dir {
                dirs.push((target, chmod.unwrap_or(entry.mode)));
                continue;
            }
            if is_add && is_archive(&entry.source) {
                self.add_archive(agent, &entry.source, &target_of(""), uid, gid)
                    .await?;
                continue;
            }
            let file = tokio::fs::File::open(&entry.source)
                .await
                .map_err(|e| StepError::ReadFile(entry.dest.clone(), e))?;
            agent
                .write_file(
                    WriteFileRequest {
                        path: target.clone(),
                        mode: Some(chmod.unwrap_or(entry.mode)),
                        uid: Some(uid),
                        gid: Some(gid),
                        create_parents: true,
                    },
                    file,
                )
                .await
                .map_err(|e| StepError::WriteFile(target.clone(), e))?;
        }
        if !dirs.is_empty() {
            // Directories (empty ones included) with their modes and owner;
            // needs mkdir/chmod/chown in the image, as a COPY of a directory does.
            let mut script = String::from("set -e\n");
            for (dir, mode) in &dirs {
                script.push_str(&format!(
                    "mkdir -p '{0}'\nchmod {mode:o} '{0}'\n",
                    dir.replace('\'', "'\\''")
                ));
                script.push_str(&format!(
                    "chown {uid}:{gid} '{}'\n",
                    dir.replace('\'', "'\\''")
                ));
            }
            self.shell(agent, script).await?;
        }
        Ok(())
    }

    /// Runs a shell script as root; its output is the error's tail.
    async fn shell(&self, agent: &AgentClient, script: String) -> Result<(), StepFailure> {
        let output = agent
            .exec_output(ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), script],
                env: vec![("PATH".into(), crate::config::DEFAULT_PATH.into())],
                timeout_ms: Some(self.request.step_timeout.as_millis() as u64),
                ..Default::default()
            })
            .await
            .map_err(StepError::NoShell)?;
        if output.status.code == Some(0) {
            Ok(())
        } else {
            let mut text = output.stderr;
            text.extend_from_slice(&output.stdout);
            let text = String::from_utf8_lossy(&text);
            let tail: String = text
                .chars()
                .rev()
                .take(OUTPUT_TAIL)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(StepError::CopyFailed.with_output(tail.trim().to_string()))
        }
    }

    /// ADD of a local archive: copied into the guest and unpacked there with
    /// the image's own tar (the archive is as untrusted as the rest).
    async fn add_archive(
        &self,
        agent: &AgentClient,
        archive: &Path,
        dest: &str,
        uid: u32,
        gid: u32,
    ) -> Result<(), StepFailure> {
        let tmp = "/tmp/.hearth-add-archive";
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(StepError::ReadArchive)?;
        agent
            .write_file(
                WriteFileRequest {
                    path: tmp.into(),
                    mode: Some(0o600),
                    uid: Some(0),
                    gid: Some(0),
                    create_parents: true,
                },
                file,
            )
            .await
            .map_err(StepError::CopyArchive)?;
        let quoted = dest.replace('\'', "'\\''");
        let mut script =
            format!("set -e\nmkdir -p '{quoted}'\ntar -xf {tmp} -C '{quoted}'\nrm -f {tmp}\n");
        if (uid, gid) != (0, 0) {
            script.push_str(&format!("chown -R {uid}:{gid} '{quoted}'\n"));
        }
        self.shell(agent, script).await
    }

    /// COPY --from=<stage>: the files travel as a tar stream from the source
    /// stage's VM to this one (both need tar; globs are not supported here).
    async fn copy_from_stage(
        &mut self,
        agent: &AgentClient,
        source: usize,
        spec: &CopySpec,
        dest: &str,
    ) -> Result<(), StepFailure> {
        let source_agent = self.stage_agent(source).await?;
        let (uid, gid) = self.owner(agent, spec).await?;
        let single = spec.sources.len() == 1 && !dest.ends_with('/');
        for src in &spec.sources {
            if src.contains(['*', '?', '[']) {
                return Err(StepError::GlobFrom.into());
            }
            let src_path = resolve_path("/", src);
            let is_dir = source_agent
                .exec_output(ExecRequest {
                    argv: vec!["test".into(), "-d".into(), src_path.clone()],
                    env: vec![("PATH".into(), crate::config::DEFAULT_PATH.into())],
                    timeout_ms: Some(30_000),
                    ..Default::default()
                })
                .await
                .is_ok_and(|o| o.status.code == Some(0));
            // What to pack (relative to `dir`) and where to unpack it.
            let (dir, what, into, rename) = if is_dir {
                (
                    src_path.clone(),
                    ".".to_string(),
                    dest.trim_end_matches('/').to_string(),
                    None,
                )
            } else {
                let (parent, name) = src_path.rsplit_once('/').unwrap_or(("", src_path.as_str()));
                let parent = if parent.is_empty() { "/" } else { parent };
                if single {
                    // A file copied to a file path: unpack beside it, then rename.
                    let (dparent, dname) = dest.rsplit_once('/').unwrap_or(("", dest));
                    let dparent = if dparent.is_empty() { "/" } else { dparent };
                    (
                        parent.to_string(),
                        name.to_string(),
                        dparent.to_string(),
                        Some((name.to_string(), dname.to_string())),
                    )
                } else {
                    (
                        parent.to_string(),
                        name.to_string(),
                        dest.trim_end_matches('/').to_string(),
                        None,
                    )
                }
            };
            let into = if into.is_empty() {
                "/".to_string()
            } else {
                into
            };
            let (reader, mut writer) = tokio::io::duplex(256 * 1024);
            let pack = async {
                let mut sink = tokio::io::sink();
                let status = source_agent
                    .exec(
                        ExecRequest {
                            argv: vec![
                                "tar".into(),
                                "-C".into(),
                                dir.clone(),
                                "-cf".into(),
                                "-".into(),
                                what.clone(),
                            ],
                            env: vec![("PATH".into(), crate::config::DEFAULT_PATH.into())],
                            timeout_ms: Some(self.request.step_timeout.as_millis() as u64),
                            ..Default::default()
                        },
                        None::<tokio::io::Empty>,
                        &mut writer,
                        &mut sink,
                    )
                    .await;
                drop(writer);
                status
            };
            let q = |s: &str| s.replace('\'', "'\\''");
            let mut script = format!(
                "set -e\nmkdir -p '{0}'\ntar -xf - -C '{0}' --no-same-owner\n",
                q(&into)
            );
            if let Some((from_name, to_name)) = &rename {
                if from_name != to_name {
                    script.push_str(&format!(
                        "mv -f '{0}/{1}' '{0}/{2}'\n",
                        q(&into),
                        q(from_name),
                        q(to_name)
                    ));
                }
            }
            let target = match &rename {
                Some((_, to)) => format!("{into}/{to}"),
                None if is_dir => into.clone(),
                None => format!("{into}/{what}"),
            };
            if (uid, gid) != (0, 0) {
                script.push_str(&format!("chown -R {uid}:{gid} '{}'\n", q(&target)));
            }
            let sink = LogSink::new(self.log);
            let mut out = sink.clone();
            let mut err = sink.clone();
            let unpack = agent.exec(
                ExecRequest {
                    argv: vec!["/bin/sh".into(), "-c".into(), script],
                    env: vec![("PATH".into(), crate::config::DEFAULT_PATH.into())],
                    timeout_ms: Some(self.request.step_timeout.as_millis() as u64),
                    ..Default::default()
                },
                Some(reader),
                &mut out,
                &mut err,
            );
            let (packed, unpacked) = tokio::join!(pack, unpack);
            let tail = sink.take_tail();
            match packed {
                Ok(s) if s.code == Some(0) => {}
                _ => return Err(StepError::NotInSourceStage(src.clone()).with_output(tail)),
            }
            match unpacked {
                Ok(s) if s.code == Some(0) => {}
                Ok(_) => return Err(StepError::Unpack.with_output(tail)),
                Err(e) => return Err(StepError::UnpackExec(e).with_output(tail)),
            }
        }
        Ok(())
    }

    /// The agent of a VM holding `stage`'s final filesystem, booting one from
    /// its disk when the stage came from the cache.
    async fn stage_agent(&mut self, stage: usize) -> Result<Arc<AgentClient>, StepError> {
        if let Some(index) = self.stage_vms.get(&stage).copied() {
            return self.agent(index);
        }
        let disk = self
            .results
            .get(&stage)
            .map(|r| r.disk.clone())
            .ok_or(StepError::SourceStageMissing)?;
        let index = self.boot(&disk, false).await?;
        self.stage_vms.insert(stage, index);
        self.agent(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_needed_stages_are_built() {
        let text = "FROM debian-12 AS unused\nRUN x\nFROM debian-12 AS base\nRUN y\n\
                    FROM debian-12 AS tools\nRUN z\nFROM base\nCOPY --from=tools /t /t\n";
        let stages = dockerfile::parse(text)
            .expect("parse")
            .stages()
            .expect("stages");
        assert_eq!(
            needed_stages(&stages).into_iter().collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    fn step(cause: StepError, output: &str) -> BuildError {
        BuildError::Step {
            step: 2,
            total: 3,
            line: 4,
            text: "RUN make".into(),
            cause: Box::new(cause),
            output: output.into(),
        }
    }

    fn reason(err: &BuildError) -> String {
        BuildFailure::from(err).to_string()
    }

    #[test]
    fn failures_and_their_reasons() {
        assert_eq!(
            reason(&step(StepError::ExitCode(2), "cc: error")),
            "CONTAINER_BUILD_FAILED: step 2/3 (line 4) RUN make: the command returned a \
             non-zero code: 2; output ends: cc: error"
        );
        assert_eq!(
            reason(&step(StepError::Signal(9), "")),
            "CONTAINER_BUILD_FAILED: step 2/3 (line 4) RUN make: the command was killed by signal 9"
        );
        assert!(
            reason(&step(StepError::ExitCode(1), "No space left on device"))
                .starts_with("DISK_STORAGE_FULL: step 2/3")
        );
        // A cause's own source is part of the reason.
        let unreadable = StepError::ReadFile(
            "app.py".into(),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        let text = reason(&step(unreadable, ""));
        assert!(text.starts_with("DISK_STORAGE_FULL: step 2/3 (line 4) RUN make: cannot read app.py: No space left on device"), "{text}");
        assert_eq!(
            reason(&BuildError::TimedOut(Duration::from_secs(5))),
            "CONTAINER_BUILD_FAILED: the build did not finish within 5 s"
        );
        let parse = dockerfile::parse("FROM x\nFROBNICATE\n").expect_err("unknown instruction");
        assert_eq!(
            reason(&BuildError::from(parse)),
            "CONTAINER_BUILD_FAILED: Dockerfile line 2: unknown instruction \"FROBNICATE\""
        );
        assert_eq!(
            reason(&BuildError::NoStage),
            "INTERNAL_PLATFORM_ERROR: no stage was built"
        );
        // A base's failure keeps its own code.
        let base = |cause: BaseError| BuildError::Step {
            step: 1,
            total: 2,
            line: 1,
            text: "FROM x".into(),
            cause: Box::new(cause.into()),
            output: String::new(),
        };
        assert_eq!(
            reason(&base(BaseError::Mkfs("too big".into()))),
            "DISK_STORAGE_FULL: step 1/2 (line 1) FROM x: mkfs.ext4 failed: too big"
        );
        assert_eq!(
            reason(&base(BaseError::Debugfs)),
            "INTERNAL_PLATFORM_ERROR: step 1/2 (line 1) FROM x: debugfs could not set owners"
        );
        assert_eq!(
            reason(&base(BaseError::NotManaged {
                image: "nothing".into(),
                suggestion: "debian-12".into()
            })),
            "CONTAINER_BUILD_FAILED: step 1/2 (line 1) FROM x: nothing is not a managed base \
             image of this host (try FROM debian-12), and no registry is configured"
        );
        // Planning refusals read as before.
        assert_eq!(
            reason(&step(PlanError::UrlSource.into(), "")),
            "CONTAINER_BUILD_FAILED: step 2/3 (line 4) RUN make: sources from URLs are not \
             supported; fetch them with RUN (curl or wget) instead"
        );
    }
}
