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

use hearth_proto::{ExecRequest, WriteFileRequest};
use hearth_vm::agent::AgentClient;
use hearth_vm::agent::CappedBuffer;
use hearth_vm::disk::BackingFormat;
use hearth_vm::{error_chain, BootRequest, ColdBoot, Driver, MachineShape, QemuDriver, VmRecord};
use tokio::io::AsyncWrite;

use crate::cache::{Key, LayerCache};
use crate::config::{resolve_path, ImageConfig};
use crate::context::{self, ContextError};
use crate::dockerfile::{self, CopySpec, Dockerfile, InstructionKind, Stage, Stages};

/// Virtual size of a build VM's disk on a base image: the root filesystem
/// grows to it (the reference's microVMs have an 8 GB root disk).
pub const BUILD_DISK_BYTES: u64 = 8 << 30;
/// How much of a failing step's output the error keeps.
const OUTPUT_TAIL: usize = 2000;
/// Longest Dockerfile line quoted in the log.
const QUOTE: usize = 160;

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
    /// The base for `image` as written in FROM; `Err` is a message for the
    /// build's failure reason.
    async fn resolve(&self, image: &str, log: &dyn BuildLog) -> Result<Base, String>;
}

/// Where a build's log lines go.
pub trait BuildLog: Send + Sync {
    fn line(&self, text: &str);
}

/// Why a build failed; [`BuildError::code`] is the reference's error code.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Dockerfile {0}")]
    Dockerfile(#[from] dockerfile::DockerfileError),
    #[error("step {step}/{total} (line {line}) {text}: {detail}")]
    Step {
        step: usize,
        total: usize,
        line: usize,
        text: String,
        detail: String,
        /// The tail of the step's output.
        output: String,
        disk_full: bool,
    },
    #[error("the build did not finish within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("{0}")]
    Platform(String),
}

impl BuildError {
    pub fn code(&self) -> &'static str {
        match self {
            BuildError::Step {
                disk_full: true, ..
            } => "DISK_STORAGE_FULL",
            BuildError::Dockerfile(_) | BuildError::Step { .. } | BuildError::TimedOut(_) => {
                "CONTAINER_BUILD_FAILED"
            }
            BuildError::Platform(_) => "INTERNAL_PLATFORM_ERROR",
        }
    }

    /// The build's `stateReason`: the code, what failed and the output's tail.
    pub fn reason(&self) -> String {
        match self {
            BuildError::Step { output, .. } if !output.is_empty() => {
                format!("{}: {self}; output ends: {output}", self.code())
            }
            _ => format!("{}: {self}", self.code()),
        }
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
    driver: QemuDriver,
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
    pub fn new(driver: QemuDriver, cache_dir: &Path) -> Result<Builder, BuildError> {
        let cache = LayerCache::open(cache_dir).map_err(|e| BuildError::Platform(e.to_string()))?;
        Ok(Builder {
            driver,
            cache,
            scratch_dir: cache_dir.join("base"),
        })
    }

    pub fn driver(&self) -> &QemuDriver {
        &self.driver
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
                .map_err(|e| BuildError::Platform(format!("scratch disk: {e}")))?;
            let tmp = self
                .scratch_dir
                .join(format!(".scratch-{}.ext4", std::process::id()));
            let output = tokio::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "hearth-root"])
                .arg(&tmp)
                .arg("1024M")
                .output()
                .await
                .map_err(|_| BuildError::Platform("cannot run mkfs.ext4".into()))?;
            if !output.status.success() {
                let _ = std::fs::remove_file(&tmp);
                return Err(BuildError::Platform(
                    "mkfs.ext4 failed for the scratch disk".into(),
                ));
            }
            let _ =
                std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o400));
            std::fs::rename(&tmp, &path)
                .map_err(|_| BuildError::Platform("cannot place the scratch disk".into()))?;
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
        last.ok_or_else(|| BuildError::Platform("no stage was built".into()))
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
            return Err(BuildError::Platform("stage without FROM".into()));
        };
        let fail = |detail: String| BuildError::Step {
            step: *step,
            total,
            line: from_line,
            text: format!("FROM {image}"),
            detail,
            output: String::new(),
            disk_full: false,
        };
        let (disk, config, mut key) = if image.eq_ignore_ascii_case("scratch") {
            let base = self.builder.scratch().await?;
            let key = Key::base(&base.identity);
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
                dep.key.then(&["FROM stage"]),
            )
        } else {
            let base = resolver.resolve(image, self.log).await.map_err(fail)?;
            let key = Key::base(&base.identity);
            (base.disk, base.config, key)
        };
        let mut state = StageState {
            disk,
            config,
            args: HashMap::new(),
            vm: None,
            cmd_set: false,
        };
        for inst in &stage.instructions {
            *step += 1;
            let quoted = self.quote(inst.line);
            let mut vars: HashMap<String, String> = state.args.clone();
            for (k, v) in &state.config.env {
                vars.insert(k.clone(), v.clone());
            }
            let expanded = inst.expanded(&vars, self.dockerfile.escape)?;
            let step_err = |detail: String, output: String| {
                let disk_full = output.contains("No space left on device")
                    || detail.contains("No space left on device");
                BuildError::Step {
                    step: *step,
                    total,
                    line: inst.line,
                    text: quoted.clone(),
                    detail,
                    output,
                    disk_full,
                }
            };
            let text = format!("{:?}", expanded.kind);
            self.log.line(&format!("[{step}/{total}] {quoted}"));
            // A step that changes files: its cache key and what it does.
            let change: Option<(Key, Action)> = match &expanded.kind {
                InstructionKind::Env(pairs) => {
                    for (k, v) in pairs {
                        state.config.set_env(k, v);
                    }
                    None
                }
                InstructionKind::Arg(args) => {
                    for (name, default) in args {
                        let value = self
                            .request
                            .build_args
                            .get(name)
                            .cloned()
                            .or_else(|| default.clone())
                            .or_else(|| global.get(name).cloned());
                        if let Some(value) = value {
                            state.args.insert(name.clone(), value);
                        }
                    }
                    None
                }
                InstructionKind::Label(pairs) => {
                    for (k, v) in pairs {
                        state.config.labels.insert(k.clone(), v.clone());
                    }
                    None
                }
                InstructionKind::Expose(ports) => {
                    for p in ports {
                        if !state.config.exposed.contains(p) {
                            state.config.exposed.push(p.clone());
                        }
                    }
                    None
                }
                InstructionKind::Cmd(form) => {
                    state.config.cmd = Some(form.clone());
                    state.cmd_set = true;
                    None
                }
                InstructionKind::Entrypoint(form) => {
                    state.config.entrypoint = Some(form.clone());
                    // Docker: ENTRYPOINT resets a CMD inherited from the base.
                    if !state.cmd_set {
                        state.config.cmd = None;
                    }
                    None
                }
                InstructionKind::User(user) => {
                    state.config.user = Some(user.clone());
                    None
                }
                InstructionKind::Shell(words) => {
                    state.config.shell = Some(words.clone());
                    None
                }
                InstructionKind::StopSignal(sig) => {
                    state.config.stop_signal = Some(sig.clone());
                    None
                }
                InstructionKind::From { .. } => None,
                InstructionKind::Workdir(dir) => {
                    let cwd = state.config.cwd();
                    let path = resolve_path(&cwd, dir);
                    state.config.workdir = Some(path.clone());
                    Some((key.then(&[&text]), Action::Mkdir(path)))
                }
                InstructionKind::Run(form) => {
                    let argv = state.config.argv(form);
                    let mut env = state.config.process_env();
                    // ARG values reach RUN as environment, unless ENV set them.
                    let mut args: Vec<_> = state.args.iter().collect();
                    args.sort();
                    for (k, v) in args {
                        if state.config.env_value(k).is_none() {
                            env.push((k.clone(), v.clone()));
                        }
                    }
                    // The network setting is part of what a RUN saw.
                    let env_text = format!(
                        "{env:?}|{:?}|{:?}|net={}",
                        state.config.user,
                        state.config.cwd(),
                        self.request.network
                    );
                    let action = Action::Run {
                        argv,
                        env,
                        cwd: state.config.cwd(),
                        user: state.config.user.clone(),
                    };
                    Some((key.then(&[&text, &env_text]), action))
                }
                InstructionKind::Copy(spec) | InstructionKind::Add(spec) => {
                    let is_add = matches!(expanded.kind, InstructionKind::Add(_));
                    let dest = resolve_dest(&state.config.cwd(), &spec.dest);
                    if let Some(from) = &spec.from {
                        let source = self
                            .stages
                            .find(from)
                            .filter(|s| s.index < stage.index)
                            .map(|s| s.index)
                            .ok_or_else(|| {
                                step_err(
                                    format!("--from={from} names no earlier stage (images are not supported in COPY --from)"),
                                    String::new(),
                                )
                            })?;
                        let source_key = self
                            .results
                            .get(&source)
                            .map(|r| r.key.as_str().to_string())
                            .unwrap_or_default();
                        let action = Action::CopyFrom {
                            source,
                            spec: spec.clone(),
                            dest,
                        };
                        Some((key.then(&[&text, &source_key]), action))
                    } else {
                        if spec.sources.iter().any(|s| s.contains("://")) {
                            return Err(step_err(
                            "sources from URLs are not supported; fetch them with RUN (curl or wget) instead".into(),
                            String::new(),
                        ));
                        }
                        let tree = match &self.tree {
                            Some(tree) => tree,
                            None => {
                                let ignore = context::dockerignore(&self.request.context);
                                let tree = context::Tree::read(&self.request.context, &ignore)
                                    .map_err(|e| step_err(e.to_string(), String::new()))?;
                                self.tree.insert(tree)
                            }
                        };
                        let selection = tree
                            .select(&spec.sources, &spec.dest)
                            .map_err(|e: ContextError| step_err(e.to_string(), String::new()))?;
                        let step_key = key.then(&[&text, &selection.digest, &format!("{is_add}")]);
                        let action = Action::CopyContext {
                            selection,
                            spec: spec.clone(),
                            dest,
                            is_add,
                        };
                        Some((step_key, action))
                    }
                }
            };
            key = match change {
                Some((step_key, action)) => {
                    self.fs_step(&mut state, &step_key, action)
                        .await
                        .map_err(|(d, o)| step_err(d, o))?;
                    step_key
                }
                // Metadata-only instructions change the key, not the disk.
                None => key.then(&[&text]),
            };
        }
        // The stage's VM (if any) holds its final filesystem for COPY --from.
        if let Some(index) = state.vm {
            self.stage_vms.insert(stage.index, index);
        }
        Ok(StageResult {
            disk: state.disk,
            config: state.config,
            key,
        })
    }

    /// Runs one filesystem step: from the cache when `key` is there, else in
    /// the stage's VM (booted on demand), then freezes the disk as the layer.
    async fn fs_step(
        &mut self,
        state: &mut StageState,
        key: &Key,
        action: Action,
    ) -> Result<(), (String, String)> {
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
                let index = self
                    .boot(&state.disk, true)
                    .await
                    .map_err(|e| (e, String::new()))?;
                state.vm = Some(index);
                index
            }
        };
        self.perform(index, action).await?;
        let layer = self
            .checkpoint(index)
            .await
            .map_err(|e| (e, String::new()))?;
        self.builder
            .cache
            .record(key, &layer)
            .map_err(|e| (e.to_string(), String::new()))?;
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
    async fn boot(&mut self, disk: &Disk, keep_layers: bool) -> Result<usize, String> {
        let name = format!("{}-{}", self.request.vm_prefix, self.vms.len() + 1);
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
                    user_network: self.request.network,
                    // A build VM on a base image gets room to grow (see `grow_root`).
                    disk_size: (keep_layers && disk.format == BackingFormat::Raw)
                        .then_some(BUILD_DISK_BYTES),
                },
            )
            .await
            .map_err(|e| format!("the build VM did not start: {}", error_chain(&e)))?;
        let agent = match self.builder.driver.agent(&vm).await {
            Ok(agent) => agent,
            Err(e) => {
                let _ = self.builder.driver.remove(&vm).await;
                return Err(format!(
                    "the build VM's agent did not answer: {}",
                    error_chain(&e)
                ));
            }
        };
        self.vms.push(BuildVm {
            vm,
            agent: Arc::new(agent),
        });
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
    async fn checkpoint(&mut self, index: usize) -> Result<PathBuf, String> {
        let agent = self.agent(index)?;
        agent
            .sync()
            .await
            .map_err(|e| format!("the build VM did not sync: {}", error_chain(&e)))?;
        let next = self.builder.cache.new_file("layer");
        let build_vm = self
            .vms
            .get_mut(index)
            .ok_or_else(|| "no build VM".to_string())?;
        self.builder
            .driver
            .checkpoint_disk(&mut build_vm.vm, &next)
            .await
            .map_err(|e| format!("cannot freeze the build disk: {}", error_chain(&e)))
    }

    fn agent(&self, index: usize) -> Result<Arc<AgentClient>, String> {
        self.vms
            .get(index)
            .map(|v| v.agent.clone())
            .ok_or_else(|| "the build VM is gone".to_string())
    }

    async fn cleanup(&mut self) {
        for BuildVm { vm, agent } in self.vms.drain(..) {
            drop(agent);
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
struct StageState {
    /// The top of the stage's disk chain so far.
    disk: Disk,
    config: ImageConfig,
    /// ARGs declared in this stage, with their values.
    args: HashMap<String, String>,
    /// The stage's build VM, once one was needed.
    vm: Option<usize>,
    /// CMD was set in this stage (not inherited).
    cmd_set: bool,
}

/// A step that changes the filesystem.
enum Action {
    Mkdir(String),
    Run {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        user: Option<String>,
    },
    CopyContext {
        selection: context::Selection,
        spec: CopySpec,
        dest: String,
        is_add: bool,
    },
    CopyFrom {
        source: usize,
        spec: CopySpec,
        dest: String,
    },
}

/// A COPY destination: relative to WORKDIR; a trailing `/` is kept (it
/// makes the destination a directory).
fn resolve_dest(cwd: &str, dest: &str) -> String {
    let resolved = resolve_path(cwd, dest);
    if dest.ends_with('/') && resolved != "/" {
        format!("{resolved}/")
    } else {
        resolved
    }
}

/// `user[:group]` as numbers, looked up in the guest's /etc/passwd and
/// /etc/group when they are names. Returns (uid, gid, home).
pub async fn resolve_user(
    agent: &AgentClient,
    spec: &str,
) -> Result<(u32, u32, Option<String>), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // The image's files are the tenant's: read at most MAX_ACCOUNT_FILE bytes.
    let read = |path: &'static str| async move {
        let mut buf = CappedBuffer::new(MAX_ACCOUNT_FILE);
        match agent.read_file(path, &mut buf).await {
            Ok(_) => String::from_utf8_lossy(&buf.into_bytes()).into_owned(),
            Err(_) => String::new(),
        }
    };
    let passwd = read("/etc/passwd").await;
    let entry = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && (f[0] == user || f[2] == user)).then(|| {
            (
                f[2].parse::<u32>().ok(),
                f[3].parse::<u32>().ok(),
                f[5].to_string(),
            )
        })
    });
    let (uid, primary_gid, home) = match (user.parse::<u32>(), entry) {
        (_, Some((Some(uid), gid, home))) => (uid, gid, Some(home)),
        (Ok(uid), _) => (uid, Some(uid), None),
        _ => {
            return Err(format!(
                "unable to find user {user}: no matching entries in passwd file"
            ))
        }
    };
    let gid = match group {
        None => primary_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read("/etc/group").await;
                groups
                    .lines()
                    .find_map(|line| {
                        let f: Vec<&str> = line.split(':').collect();
                        (f.len() >= 3 && f[0] == g)
                            .then(|| f[2].parse::<u32>().ok())
                            .flatten()
                    })
                    .ok_or_else(|| {
                        format!("unable to find group {g}: no matching entries in group file")
                    })?
            }
        },
    };
    Ok((uid, gid, home))
}

/// Largest /etc/passwd or /etc/group read to resolve a user.
const MAX_ACCOUNT_FILE: usize = 4 << 20;

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

fn octal_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("--chmod={text} is not an octal mode"))
}

impl BuildRun<'_> {
    async fn perform(&mut self, index: usize, action: Action) -> Result<(), (String, String)> {
        let agent = self.agent(index).map_err(|e| (e, String::new()))?;
        match action {
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
                        let (uid, gid, home) = resolve_user(&agent, spec)
                            .await
                            .map_err(|e| (e, String::new()))?;
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
                match status {
                    Ok(status) if status.code == Some(0) => Ok(()),
                    Ok(status) if status.timed_out => Err((
                        format!(
                            "did not finish within {} s",
                            self.request.step_timeout.as_secs()
                        ),
                        tail,
                    )),
                    Ok(status) => Err((
                        match (status.code, status.signal) {
                            (Some(code), _) => {
                                format!("the command returned a non-zero code: {code}")
                            }
                            (None, Some(signal)) => {
                                format!("the command was killed by signal {signal}")
                            }
                            (None, None) => "the command failed".into(),
                        },
                        tail,
                    )),
                    Err(e) => Err((
                        format!(
                            "cannot run {}: {}",
                            argv.first().map(String::as_str).unwrap_or(""),
                            error_chain(&e)
                        ),
                        tail,
                    )),
                }
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

    async fn owner(
        &self,
        agent: &AgentClient,
        spec: &CopySpec,
    ) -> Result<(u32, u32), (String, String)> {
        match &spec.chown {
            Some(chown) => {
                let (uid, gid, _) = resolve_user(agent, chown)
                    .await
                    .map_err(|e| (e, String::new()))?;
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
    ) -> Result<(), (String, String)> {
        let (uid, gid) = self.owner(agent, spec).await?;
        let chmod = spec
            .chmod
            .as_deref()
            .map(octal_mode)
            .transpose()
            .map_err(|e| (e, String::new()))?;
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
                .map_err(|e| (format!("cannot read {}: {e}", entry.dest), String::new()))?;
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
                .map_err(|e| {
                    (
                        format!("cannot write {target}: {}", error_chain(&e)),
                        String::new(),
                    )
                })?;
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
    async fn shell(&self, agent: &AgentClient, script: String) -> Result<(), (String, String)> {
        let output = agent
            .exec_output(ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), script],
                env: vec![("PATH".into(), crate::config::DEFAULT_PATH.into())],
                timeout_ms: Some(self.request.step_timeout.as_millis() as u64),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                (
                    format!("this step needs /bin/sh in the image: {}", error_chain(&e)),
                    String::new(),
                )
            })?;
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
            Err((
                "the copy failed in the build VM".into(),
                tail.trim().to_string(),
            ))
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
    ) -> Result<(), (String, String)> {
        let tmp = "/tmp/.hearth-add-archive";
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| (format!("cannot read the archive: {e}"), String::new()))?;
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
            .map_err(|e| {
                (
                    format!("cannot copy the archive: {}", error_chain(&e)),
                    String::new(),
                )
            })?;
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
    ) -> Result<(), (String, String)> {
        let source_agent = self
            .stage_agent(source)
            .await
            .map_err(|e| (e, String::new()))?;
        let (uid, gid) = self.owner(agent, spec).await?;
        let single = spec.sources.len() == 1 && !dest.ends_with('/');
        for src in &spec.sources {
            if src.contains(['*', '?', '[']) {
                return Err((
                    "globs are not supported in COPY --from".into(),
                    String::new(),
                ));
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
                _ => {
                    return Err((
                        format!("{src} not found in the source stage (or it has no tar)"),
                        tail,
                    ))
                }
            }
            match unpacked {
                Ok(s) if s.code == Some(0) => {}
                Ok(_) => return Err(("cannot unpack into the image".into(), tail)),
                Err(e) => return Err((format!("cannot unpack: {}", error_chain(&e)), tail)),
            }
        }
        Ok(())
    }

    /// The agent of a VM holding `stage`'s final filesystem, booting one from
    /// its disk when the stage came from the cache.
    async fn stage_agent(&mut self, stage: usize) -> Result<Arc<AgentClient>, String> {
        if let Some(index) = self.stage_vms.get(&stage).copied() {
            return self.agent(index);
        }
        let disk = self
            .results
            .get(&stage)
            .map(|r| r.disk.clone())
            .ok_or_else(|| "the source stage was not built".to_string())?;
        let index = self.boot(&disk, false).await?;
        self.stage_vms.insert(stage, index);
        self.agent(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn capped_buffer_refuses_past_its_limit() {
        let mut w = CappedBuffer::new(8);
        w.write_all(b"12345678").await.expect("fits");
        assert!(w.write_all(b"9").await.is_err());
        assert_eq!(w.into_bytes(), b"12345678");
    }

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

    #[test]
    fn destinations_resolve_against_workdir() {
        assert_eq!(resolve_dest("/srv", "./"), "/srv/");
        assert_eq!(resolve_dest("/srv", "app.py"), "/srv/app.py");
        assert_eq!(resolve_dest("/srv", "/etc/"), "/etc/");
        assert_eq!(resolve_dest("/", "/"), "/");
    }

    #[test]
    fn error_codes() {
        let step = |output: &str| BuildError::Step {
            step: 2,
            total: 3,
            line: 4,
            text: "RUN make".into(),
            detail: "the command returned a non-zero code: 2".into(),
            output: output.into(),
            disk_full: output.contains("No space"),
        };
        assert_eq!(
            step("cc: error").reason(),
            "CONTAINER_BUILD_FAILED: step 2/3 (line 4) RUN make: the command returned a \
             non-zero code: 2; output ends: cc: error"
        );
        assert!(step("No space left on device")
            .reason()
            .starts_with("DISK_STORAGE_FULL"));
        assert_eq!(
            BuildError::TimedOut(Duration::from_secs(5)).reason(),
            "CONTAINER_BUILD_FAILED: the build did not finish within 5 s"
        );
    }
}
