#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use super::*;
use crate::dockerfile;

fn stages() -> Stages {
    dockerfile::parse(
        "FROM debian-12 AS tools\nRUN x\nFROM debian-12 AS app\nRUN y\nFROM debian-12\n",
    )
    .unwrap()
    .stages()
    .unwrap()
}

fn selection(digest: &str) -> Selection {
    Selection {
        entries: Vec::new(),
        dest_is_dir: true,
        digest: digest.into(),
    }
}

/// Inputs for a step of stage 2 (`tools` is built, `app` is not).
struct Fixture {
    stages: Stages,
    keys: HashMap<usize, Key>,
    build_args: HashMap<String, String>,
    global_args: HashMap<String, String>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            stages: stages(),
            keys: HashMap::from([(0, Key::base("t", "tools-final"))]),
            build_args: HashMap::from([("FROM_CLI".to_string(), "cli".to_string())]),
            global_args: HashMap::from([("GLOBAL".to_string(), "global".to_string())]),
        }
    }

    fn inputs(&self, network: bool, selection: Option<Selection>) -> StepInputs<'_> {
        StepInputs {
            build_args: &self.build_args,
            global_args: &self.global_args,
            network,
            earlier: EarlierStages {
                stages: &self.stages,
                current: 2,
                keys: &self.keys,
            },
            selection,
        }
    }

    /// Plans one instruction line (parsed as a Dockerfile line), passing a
    /// selection with digest `context` when the instruction reads the context.
    fn plan_line(&self, state: &StageState, line: &str, parent: &Key) -> Planned {
        self.try_plan_line(state, line, parent, false).unwrap()
    }

    fn try_plan_line(
        &self,
        state: &StageState,
        line: &str,
        parent: &Key,
        network: bool,
    ) -> Result<Planned, PlanError> {
        let kind = instruction(line);
        let selection = reads_context(&kind).map(|_| selection("context-digest"));
        plan(state, &kind, parent, self.inputs(network, selection))
    }
}

fn instruction(line: &str) -> InstructionKind {
    let parsed = dockerfile::parse(&format!("FROM debian-12\n{line}\n")).unwrap();
    parsed.instructions[1].kind.clone()
}

fn parent() -> Key {
    Key::base("t", "debian-12@test")
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// A fixed stage's keys, pinned (the instructions are built here, not
/// parsed, so that only the planning and the key encoding are pinned). If
/// this test fails, step keys changed: every cached layer would be misread
/// or orphaned, so bump `CACHE_FORMAT` (cache.rs) and then pin the new keys.
#[test]
fn golden_keys() {
    let fixture = Fixture::new();
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    let steps = [
        InstructionKind::Arg(vec![("VERSION".into(), Some("1.2".into()))]),
        InstructionKind::Env(vec![pair("APP_HOME", "/srv/app"), pair("MODE", "prod")]),
        InstructionKind::Workdir("/srv/app".into()),
        InstructionKind::Run(CommandForm::Shell("apt-get install -y python3".into())),
        InstructionKind::Copy(CopySpec {
            sources: strings(&["app/"]),
            dest: "./".into(),
            chown: Some("1000:1000".into()),
            ..CopySpec::default()
        }),
        InstructionKind::Copy(CopySpec {
            sources: strings(&["/out/bin"]),
            dest: "/usr/local/bin/".into(),
            from: Some("tools".into()),
            ..CopySpec::default()
        }),
        InstructionKind::User("1000".into()),
        InstructionKind::Expose(strings(&["8080"])),
        InstructionKind::Label(vec![pair("purpose", "golden")]),
        InstructionKind::Cmd(CommandForm::Exec(strings(&["python3", "main.py"]))),
    ];
    let mut state = StageState::default();
    let mut key = parent();
    let mut keys = Vec::new();
    for kind in &steps {
        let selection = reads_context(kind).map(|_| selection("context-digest"));
        let planned = plan(&state, kind, &key, fixture.inputs(false, selection)).unwrap();
        state = planned.state;
        key = planned.key;
        keys.push(key.as_str().to_string());
    }
    assert_eq!(
        parent().as_str(),
        "5b0795da87e9b2bcbda61b66efb7b88427583806"
    );
    assert_eq!(
        keys,
        [
            "14f977744b5c1fcd2dc170e31461f66503b16228",
            "953690378c7985f267b28beb2d1d83edbda2cf7a",
            "afc229bac9109993f3dbd8c851e6f0c2322c29c4",
            "88d450750902f68f575353261408098a08d56dc5",
            "458dacd723d0fe5e372ebc5a10f6cdf4453aba36",
            "399d71740f450d5c9f74ae8ca6ecbd90f6799295",
            "afdf3b1bc7fbd62beaaecab94c890a57d0c03807",
            "065cbba8dd12793d032e7ebd5ef5bfa7f009cbdd",
            "c2c117db2a9c4b0317637e44f26abea0c2df9e0a",
            "f04b4638d137ea0cdd05678ae4108a4624879f7d",
        ]
    );
}

#[test]
fn distinct_instructions_have_distinct_keys() {
    let fixture = Fixture::new();
    let state = StageState::default();
    let lines = [
        "RUN a b",
        "RUN [\"a\", \"b\"]",
        "RUN a  b",
        "CMD a b",
        "ENTRYPOINT a b",
        "CMD [\"a\", \"b\"]",
        "COPY src /dst/",
        "ADD src /dst/",
        "COPY src /dst",
        "COPY --chown=1 src /dst/",
        "COPY --chmod=755 src /dst/",
        "COPY src other /dst/",
        "COPY --from=tools /src /dst/",
        "COPY --from=0 /src /dst/",
        "ENV A=1",
        "ENV A=1 B=2",
        "LABEL A=1",
        "ARG A",
        "ARG A=",
        "ARG A=1",
        "ARG A B",
        "WORKDIR /a",
        "WORKDIR /b",
        "USER a",
        "USER b",
        "EXPOSE 80",
        "EXPOSE 80 81",
        "SHELL [\"/bin/sh\", \"-c\"]",
        "STOPSIGNAL SIGTERM",
    ];
    let mut seen = HashSet::new();
    for line in lines {
        let key = fixture.plan_line(&state, line, &parent()).key;
        assert!(seen.insert(key.clone()), "{line} shares its key {key:?}");
    }
    // The same instruction on another parent is another step.
    let other = Key::base("t", "debian-12@other");
    assert_ne!(
        fixture.plan_line(&state, "RUN a b", &other).key,
        fixture.plan_line(&state, "RUN a b", &parent()).key
    );
}

#[test]
fn what_a_run_sees_is_in_its_key() {
    let fixture = Fixture::new();
    let base = StageState::default();
    let key = |state: &StageState, network: bool| {
        fixture
            .try_plan_line(state, "RUN make", &parent(), network)
            .unwrap()
            .key
    };
    let plain = key(&base, false);
    assert_eq!(plain, key(&base, false));
    assert_ne!(plain, key(&base, true), "network");

    let mut env = base.clone();
    env.config.set_env("MODE", "debug");
    assert_ne!(plain, key(&env, false), "env");

    let mut user = base.clone();
    user.config.user = Some("app".into());
    assert_ne!(plain, key(&user, false), "user");

    let mut workdir = base.clone();
    workdir.config.workdir = Some("/srv".into());
    assert_ne!(plain, key(&workdir, false), "workdir");

    let mut shell = base.clone();
    shell.config.shell = Some(vec!["/bin/bash".into(), "-c".into()]);
    assert_ne!(plain, key(&shell, false), "shell");

    let mut arg = base.clone();
    arg.args.insert("TOKEN".into(), "a".into());
    let mut other_arg = base.clone();
    other_arg.args.insert("TOKEN".into(), "b".into());
    assert_ne!(plain, key(&arg, false), "arg");
    assert_ne!(key(&arg, false), key(&other_arg, false), "arg value");

    // What a COPY selects and where it lands.
    let copy = |state: &StageState, digest: &str| {
        let kind = instruction("COPY app ./");
        plan(
            state,
            &kind,
            &parent(),
            fixture.inputs(false, Some(selection(digest))),
        )
        .unwrap()
        .key
    };
    assert_ne!(copy(&base, "one"), copy(&base, "two"), "content");
    assert_ne!(copy(&base, "one"), copy(&workdir, "one"), "destination");
    // COPY --from follows the source stage's key.
    let mut changed = Fixture::new();
    changed.keys.insert(0, Key::base("t", "tools-changed"));
    let from = "COPY --from=tools /out /out";
    assert_ne!(
        fixture.plan_line(&base, from, &parent()).key,
        changed.plan_line(&base, from, &parent()).key
    );
}

#[test]
fn actions_per_instruction() {
    let fixture = Fixture::new();
    let mut state = StageState::default();
    state.config.set_env("PATH", "/bin");
    state.config.workdir = Some("/srv".into());
    state.args.insert("FROM_CLI".into(), "cli".into());

    let run = fixture.plan_line(&state, "RUN make all", &parent());
    assert_eq!(
        run.action,
        Action::Run {
            argv: vec!["/bin/sh".into(), "-c".into(), "make all".into()],
            env: vec![
                ("PATH".into(), "/bin".into()),
                ("FROM_CLI".into(), "cli".into())
            ],
            cwd: "/srv".into(),
            user: None,
        }
    );
    assert_eq!(run.state, state, "RUN changes files, not the configuration");

    let copy = fixture.plan_line(&state, "COPY --chown=app a b ./sub/", &parent());
    match &copy.action {
        Action::CopyContext {
            selection,
            spec,
            dest,
            is_add,
        } => {
            assert_eq!(selection.digest, "context-digest");
            assert_eq!(spec.chown.as_deref(), Some("app"));
            assert_eq!(dest, "/srv/sub/");
            assert!(!is_add);
        }
        other => panic!("COPY planned as {other:?}"),
    }
    let add = fixture.plan_line(&state, "ADD data.tar.gz /opt/", &parent());
    assert!(matches!(
        add.action,
        Action::CopyContext { is_add: true, .. }
    ));

    let from = fixture.plan_line(&state, "COPY --from=tools /out/app app", &parent());
    assert!(matches!(
        &from.action,
        Action::CopyFrom { source: 0, dest, .. } if dest == "/srv/app"
    ));

    let workdir = fixture.plan_line(&state, "WORKDIR ../opt/x", &parent());
    assert_eq!(workdir.action, Action::Mkdir("/opt/x".into()));
    assert_eq!(workdir.state.config.workdir.as_deref(), Some("/opt/x"));

    // Metadata: no layer, only the configuration (and the key) change.
    let env = fixture.plan_line(&state, "ENV MODE=prod", &parent());
    assert_eq!(env.action, Action::Config);
    assert!(!env.action.changes_files());
    assert_eq!(env.state.config.env_value("MODE"), Some("prod"));
    assert_ne!(env.key, parent());
    for line in [
        "LABEL a=b",
        "EXPOSE 80",
        "CMD run",
        "ENTRYPOINT run",
        "USER app",
        "SHELL [\"/bin/bash\", \"-c\"]",
        "STOPSIGNAL SIGINT",
        "ARG X=1",
    ] {
        let planned = fixture.plan_line(&state, line, &parent());
        assert_eq!(planned.action, Action::Config, "{line}");
        assert_ne!(planned.state, state, "{line} changes the configuration");
    }
    for action in [run.action, copy.action, from.action, workdir.action] {
        assert!(action.changes_files(), "{action:?}");
    }
}

#[test]
fn configuration_rules() {
    let fixture = Fixture::new();
    // ARG: the build's value, else the default, else the global one.
    let state = StageState::default();
    let args = fixture.plan_line(
        &state,
        "ARG FROM_CLI=default DEFAULTED=d GLOBAL UNSET",
        &parent(),
    );
    assert_eq!(
        args.state.args,
        BTreeMap::from([
            ("FROM_CLI".to_string(), "cli".to_string()),
            ("DEFAULTED".to_string(), "d".to_string()),
            ("GLOBAL".to_string(), "global".to_string()),
        ])
    );
    // An ARG that ENV also sets reaches RUN with the ENV value only.
    let mut state = args.state.clone();
    state.config.set_env("DEFAULTED", "from-env");
    let Action::Run { env, .. } = fixture.plan_line(&state, "RUN x", &parent()).action else {
        panic!("not a run");
    };
    assert_eq!(
        env.iter()
            .filter(|(k, _)| k == "DEFAULTED")
            .collect::<Vec<_>>(),
        [&("DEFAULTED".to_string(), "from-env".to_string())]
    );
    // ENTRYPOINT drops an inherited CMD, not one set in the stage.
    let mut inherited = StageState::default();
    inherited.config.cmd = Some(CommandForm::Shell("base".into()));
    let entry = fixture.plan_line(&inherited, "ENTRYPOINT [\"app\"]", &parent());
    assert_eq!(entry.state.config.cmd, None);
    let with_cmd = fixture.plan_line(&inherited, "CMD own", &parent()).state;
    let entry = fixture.plan_line(&with_cmd, "ENTRYPOINT [\"app\"]", &parent());
    assert_eq!(
        entry.state.config.cmd,
        Some(CommandForm::Shell("own".into()))
    );
    // The variables of the next instruction: ENV wins over ARG.
    assert_eq!(
        state.vars().get("DEFAULTED").map(String::as_str),
        Some("from-env")
    );
}

#[test]
fn refused_steps() {
    let fixture = Fixture::new();
    let state = StageState::default();
    let err = |line: &str| {
        fixture
            .try_plan_line(&state, line, &parent(), false)
            .unwrap_err()
    };
    assert_eq!(
        err("COPY --from=nothing /a /b"),
        PlanError::NoSuchStage("nothing".into())
    );
    // A stage named after the current one (or the current one itself) is not earlier.
    assert_eq!(
        err("COPY --from=2 /a /b"),
        PlanError::NoSuchStage("2".into())
    );
    assert_eq!(
        err("COPY --from=app /a /b"),
        PlanError::StageNotBuilt("app".into())
    );
    assert_eq!(err("ADD https://example.com/x /x"), PlanError::UrlSource);
    let copy = instruction("COPY a /a");
    assert_eq!(
        plan(&state, &copy, &parent(), fixture.inputs(false, None)),
        Err(PlanError::ContextNotRead)
    );
}

#[test]
fn only_context_copies_read_the_context() {
    assert!(reads_context(&instruction("COPY a /a")).is_some());
    assert!(reads_context(&instruction("ADD a.tar /a/")).is_some());
    assert!(reads_context(&instruction("COPY --from=tools /a /a")).is_none());
    assert!(reads_context(&instruction("ADD https://example.com/a /a")).is_none());
    assert!(reads_context(&instruction("RUN cp a b")).is_none());
}

#[test]
fn from_a_stage_is_its_own_step() {
    let tools = Key::base("t", "tools");
    assert_eq!(from_stage_key(&tools), from_stage_key(&tools));
    assert_ne!(from_stage_key(&tools), tools);
    assert_ne!(
        from_stage_key(&tools),
        from_stage_key(&Key::base("t", "other"))
    );
}

#[test]
fn destinations_resolve_against_workdir() {
    assert_eq!(resolve_dest("/srv", "./"), "/srv/");
    assert_eq!(resolve_dest("/srv", "app.py"), "/srv/app.py");
    assert_eq!(resolve_dest("/srv", "/etc/"), "/etc/");
    assert_eq!(resolve_dest("/", "/"), "/");
}
