//! Step planning: what one Dockerfile instruction does to its stage, as a
//! pure function of the instruction (after substitution), the stage so far
//! and the parent step's cache key. No VM and no file is touched here: the
//! executor ([`crate::run`]) performs the [`Action`], or takes its layer from
//! the step cache when the [`Key`] is there.
//!
//! Every instruction extends the stage's key, metadata ones included (a later
//! step's layer was made under that metadata). A key's input is the
//! instruction's explicit encoding ([`KeyInput`]: a tag, then each field),
//! then what the step reads beyond the instruction: the command, environment,
//! user, directory and network a RUN sees, the resolved destination and the
//! digest of the files a COPY selects, the key of the stage a COPY --from
//! reads.

use std::collections::{BTreeMap, HashMap};

use crate::cache::{Key, KeyInput};
use crate::config::{resolve_path, ImageConfig};
use crate::context::Selection;
use crate::dockerfile::{CommandForm, CopySpec, InstructionKind, Stages};

/// Why an instruction cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("--from={0} names no earlier stage (images are not supported in COPY --from)")]
    NoSuchStage(String),
    #[error("the stage --from={0} names was not built")]
    StageNotBuilt(String),
    #[error("sources from URLs are not supported; fetch them with RUN (curl or wget) instead")]
    UrlSource,
    /// The caller did not pass what [`reads_context`] asked for.
    #[error("the build context was not read for this step")]
    ContextNotRead,
}

/// A stage's configuration so far (its disk is the executor's business).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageState {
    pub config: ImageConfig,
    /// ARGs declared in this stage, with their values.
    pub args: BTreeMap<String, String>,
    /// CMD was set in this stage (not inherited from the base).
    pub cmd_set: bool,
}

impl StageState {
    /// A stage starting from a base's configuration.
    pub fn new(config: ImageConfig) -> StageState {
        StageState {
            config,
            ..StageState::default()
        }
    }

    /// The variables the next instruction's `$NAME`s see: the stage's ARGs,
    /// then its ENV (which wins).
    pub fn vars(&self) -> HashMap<String, String> {
        let mut vars: HashMap<String, String> = self.args.clone().into_iter().collect();
        for (k, v) in &self.config.env {
            vars.insert(k.clone(), v.clone());
        }
        vars
    }
}

/// The build's stages before the current one, for COPY --from.
#[derive(Debug, Clone, Copy)]
pub struct EarlierStages<'a> {
    pub stages: &'a Stages,
    /// The current stage's index: only stages before it can be named.
    pub current: usize,
    /// The final key of each stage built so far.
    pub keys: &'a HashMap<usize, Key>,
}

/// What a step reads from outside its stage.
#[derive(Debug, Clone)]
pub struct StepInputs<'a> {
    /// `ARG` values given to the build.
    pub build_args: &'a HashMap<String, String>,
    /// Values of the ARGs declared before the first FROM.
    pub global_args: &'a HashMap<String, String>,
    /// Outbound network during RUN.
    pub network: bool,
    pub earlier: EarlierStages<'a>,
    /// What the instruction selects from the build context, when
    /// [`reads_context`] says it reads it (reading files is the caller's).
    pub selection: Option<Selection>,
}

/// What a step does to the stage's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Only the image's configuration changes: no layer.
    Config,
    /// WORKDIR: the directory is created.
    Mkdir(String),
    /// RUN: a process in the build VM.
    Run {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        /// `user[:group]`, looked up in the image.
        user: Option<String>,
    },
    /// COPY or ADD from the build context: the selected files are written.
    CopyContext {
        selection: Selection,
        spec: CopySpec,
        /// Resolved against WORKDIR; a trailing `/` is kept.
        dest: String,
        is_add: bool,
    },
    /// COPY --from: files travel from an earlier stage's filesystem.
    CopyFrom {
        /// The source stage's index.
        source: usize,
        spec: CopySpec,
        dest: String,
    },
}

impl Action {
    /// Whether the step makes a layer.
    pub fn changes_files(&self) -> bool {
        !matches!(self, Action::Config)
    }
}

/// One planned step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The stage after the step.
    pub state: StageState,
    pub key: Key,
    pub action: Action,
}

/// The COPY or ADD whose selection from the build context [`plan`] needs in
/// [`StepInputs::selection`]; `None` for every other instruction.
pub fn reads_context(kind: &InstructionKind) -> Option<&CopySpec> {
    match kind {
        InstructionKind::Copy(spec) | InstructionKind::Add(spec)
            if spec.from.is_none() && !has_url_source(spec) =>
        {
            Some(spec)
        }
        _ => None,
    }
}

fn has_url_source(spec: &CopySpec) -> bool {
    spec.sources.iter().any(|s| s.contains("://"))
}

/// The key of a stage that starts FROM an earlier stage whose final key is `parent`.
pub fn from_stage_key(parent: &Key) -> Key {
    parent.then(&KeyInput::new("FROM-STAGE"))
}

/// Plans `kind` (already substituted) on `state`, whose last key is `parent`.
pub fn plan(
    state: &StageState,
    kind: &InstructionKind,
    parent: &Key,
    inputs: StepInputs<'_>,
) -> Result<Planned, PlanError> {
    let mut next = state.clone();
    let config = &mut next.config;
    let instruction = encode(kind);
    let (input, action) = match kind {
        InstructionKind::Env(pairs) => {
            for (k, v) in pairs {
                config.set_env(k, v);
            }
            (instruction, Action::Config)
        }
        InstructionKind::Arg(args) => {
            for (name, default) in args {
                let value = inputs
                    .build_args
                    .get(name)
                    .cloned()
                    .or_else(|| default.clone())
                    .or_else(|| inputs.global_args.get(name).cloned());
                if let Some(value) = value {
                    next.args.insert(name.clone(), value);
                }
            }
            (instruction, Action::Config)
        }
        InstructionKind::Label(pairs) => {
            for (k, v) in pairs {
                config.labels.insert(k.clone(), v.clone());
            }
            (instruction, Action::Config)
        }
        InstructionKind::Expose(ports) => {
            for p in ports {
                if !config.exposed.contains(p) {
                    config.exposed.push(p.clone());
                }
            }
            (instruction, Action::Config)
        }
        InstructionKind::Cmd(form) => {
            config.cmd = Some(form.clone());
            next.cmd_set = true;
            (instruction, Action::Config)
        }
        InstructionKind::Entrypoint(form) => {
            config.entrypoint = Some(form.clone());
            // Docker: ENTRYPOINT resets a CMD inherited from the base.
            if !next.cmd_set {
                config.cmd = None;
            }
            (instruction, Action::Config)
        }
        InstructionKind::User(user) => {
            config.user = Some(user.clone());
            (instruction, Action::Config)
        }
        InstructionKind::Shell(words) => {
            config.shell = Some(words.clone());
            (instruction, Action::Config)
        }
        InstructionKind::StopSignal(sig) => {
            config.stop_signal = Some(sig.clone());
            (instruction, Action::Config)
        }
        // A stage's FROM is its start, never one of its steps.
        InstructionKind::From { .. } => (instruction, Action::Config),
        InstructionKind::Workdir(dir) => {
            let path = resolve_path(&config.cwd(), dir);
            config.workdir = Some(path.clone());
            (instruction.str(&path), Action::Mkdir(path))
        }
        InstructionKind::Run(form) => {
            let argv = config.argv(form);
            let mut env = config.process_env();
            // ARG values reach RUN as environment, unless ENV set them.
            for (k, v) in &next.args {
                if config.env_value(k).is_none() {
                    env.push((k.clone(), v.clone()));
                }
            }
            let cwd = config.cwd();
            let input = instruction
                .list(&argv)
                .pairs(&env)
                .opt(config.user.as_deref())
                .str(&cwd)
                .flag(inputs.network);
            let action = Action::Run {
                argv,
                env,
                cwd,
                user: config.user.clone(),
            };
            (input, action)
        }
        InstructionKind::Copy(spec) | InstructionKind::Add(spec) => {
            let is_add = matches!(kind, InstructionKind::Add(_));
            let dest = resolve_dest(&config.cwd(), &spec.dest);
            if let Some(from) = &spec.from {
                let earlier = inputs.earlier;
                let source = earlier
                    .stages
                    .find(from)
                    .filter(|s| s.index < earlier.current)
                    .map(|s| s.index)
                    .ok_or_else(|| PlanError::NoSuchStage(from.clone()))?;
                let source_key = earlier
                    .keys
                    .get(&source)
                    .ok_or_else(|| PlanError::StageNotBuilt(from.clone()))?;
                let input = instruction.str(&dest).str(source_key.as_str());
                let action = Action::CopyFrom {
                    source,
                    spec: spec.clone(),
                    dest,
                };
                (input, action)
            } else {
                if has_url_source(spec) {
                    return Err(PlanError::UrlSource);
                }
                let selection = inputs.selection.ok_or(PlanError::ContextNotRead)?;
                let input = instruction.str(&dest).str(&selection.digest);
                let action = Action::CopyContext {
                    selection,
                    spec: spec.clone(),
                    dest,
                    is_add,
                };
                (input, action)
            }
        }
    };
    Ok(Planned {
        state: next,
        key: parent.then(&input),
        action,
    })
}

/// The instruction as key fields: its tag, then every field it has.
fn encode(kind: &InstructionKind) -> KeyInput {
    let form = |input: KeyInput, form: &CommandForm| match form {
        CommandForm::Shell(text) => input.str("shell").str(text),
        CommandForm::Exec(argv) => input.str("exec").list(argv),
    };
    let copy = |input: KeyInput, spec: &CopySpec| {
        input
            .list(&spec.sources)
            .str(&spec.dest)
            .opt(spec.chown.as_deref())
            .opt(spec.chmod.as_deref())
            .opt(spec.from.as_deref())
    };
    match kind {
        InstructionKind::From {
            image,
            name,
            platform,
        } => KeyInput::new("FROM")
            .str(image)
            .opt(name.as_deref())
            .opt(platform.as_deref()),
        InstructionKind::Run(f) => form(KeyInput::new("RUN"), f),
        InstructionKind::Copy(spec) => copy(KeyInput::new("COPY"), spec),
        InstructionKind::Add(spec) => copy(KeyInput::new("ADD"), spec),
        InstructionKind::Env(pairs) => KeyInput::new("ENV").pairs(pairs),
        InstructionKind::Arg(args) => {
            // Each ARG is a name and an optional default: a list of names,
            // then one optional value per name.
            let names: Vec<&str> = args.iter().map(|(name, _)| name.as_str()).collect();
            args.iter()
                .fold(KeyInput::new("ARG").list(&names), |input, (_, default)| {
                    input.opt(default.as_deref())
                })
        }
        InstructionKind::Workdir(dir) => KeyInput::new("WORKDIR").str(dir),
        InstructionKind::User(user) => KeyInput::new("USER").str(user),
        InstructionKind::Cmd(f) => form(KeyInput::new("CMD"), f),
        InstructionKind::Entrypoint(f) => form(KeyInput::new("ENTRYPOINT"), f),
        InstructionKind::Expose(ports) => KeyInput::new("EXPOSE").list(ports),
        InstructionKind::Label(pairs) => KeyInput::new("LABEL").pairs(pairs),
        InstructionKind::Shell(words) => KeyInput::new("SHELL").list(words),
        InstructionKind::StopSignal(sig) => KeyInput::new("STOPSIGNAL").str(sig),
    }
}

/// A COPY destination: relative to WORKDIR; a trailing `/` is kept (it
/// makes the destination a directory).
pub fn resolve_dest(cwd: &str, dest: &str) -> String {
    let resolved = resolve_path(cwd, dest);
    if dest.ends_with('/') && resolved != "/" {
        format!("{resolved}/")
    } else {
        resolved
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
