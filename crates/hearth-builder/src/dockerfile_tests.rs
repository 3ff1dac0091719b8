#![allow(clippy::unwrap_used)]

use super::*;

fn kinds(text: &str) -> Vec<InstructionKind> {
    parse(text)
        .unwrap()
        .instructions
        .into_iter()
        .map(|i| i.kind)
        .collect()
}

fn err(text: &str) -> DockerfileError {
    parse(text).unwrap_err()
}

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn basic_file_with_line_numbers() {
    let df = parse(
        "# comment\n\nFROM python:3.12 AS build\nRUN pip install x\n\nWORKDIR /app\nCMD [\"python\", \"app.py\"]\n",
    )
    .unwrap();
    let lines: Vec<usize> = df.instructions.iter().map(|i| i.line).collect();
    assert_eq!(lines, vec![3, 4, 6, 7]);
    assert_eq!(
        df.instructions[0].kind,
        InstructionKind::From {
            image: "python:3.12".into(),
            name: Some("build".into()),
            platform: None
        }
    );
    assert_eq!(
        df.instructions[1].kind,
        InstructionKind::Run(CommandForm::Shell("pip install x".into()))
    );
    assert_eq!(
        df.instructions[3].kind,
        InstructionKind::Cmd(CommandForm::Exec(s(&["python", "app.py"])))
    );
    assert_eq!(df.escape, '\\');
}

#[test]
fn keywords_are_case_insensitive() {
    let k = kinds("from alpine as Base\nrun echo hi\nWorkDir /x\n");
    assert_eq!(
        k[0],
        InstructionKind::From {
            image: "alpine".into(),
            name: Some("base".into()),
            platform: None
        }
    );
    assert_eq!(k[2], InstructionKind::Workdir("/x".into()));
}

#[test]
fn byte_order_mark_is_skipped() {
    let df = parse("\u{feff}# escape=`\nFROM a\n").unwrap();
    assert_eq!(df.escape, '`');
    assert_eq!(df.instructions.len(), 1);
}

#[test]
fn crlf_line_endings() {
    let k = kinds("FROM a\r\nRUN echo \\\r\n  hi\r\n");
    assert_eq!(
        k[1],
        InstructionKind::Run(CommandForm::Shell("echo   hi".into()))
    );
}

#[test]
fn continuations_skip_comments_and_blank_lines() {
    let df = parse("FROM a\nRUN apt-get update && \\\n# a comment\n\n    apt-get install -y x \\  \n  && echo done\nUSER app\n").unwrap();
    assert_eq!(
        df.instructions[1].kind,
        InstructionKind::Run(CommandForm::Shell(
            "apt-get update &&     apt-get install -y x   && echo done".into()
        ))
    );
    assert_eq!(df.instructions[1].line, 2);
    assert_eq!(df.instructions[2].line, 7);
}

#[test]
fn continuation_at_end_of_file() {
    let k = kinds("FROM a\nRUN echo hi \\");
    assert_eq!(
        k[1],
        InstructionKind::Run(CommandForm::Shell("echo hi".into()))
    );
}

#[test]
fn escape_directive_backtick() {
    let df = parse("# escape=`\nFROM mcr/windows\nRUN dir c:\\ `\n  && echo x\nWORKDIR c:\\app\n")
        .unwrap();
    assert_eq!(df.escape, '`');
    assert_eq!(
        df.instructions[1].kind,
        InstructionKind::Run(CommandForm::Shell("dir c:\\   && echo x".into()))
    );
    // Backslash is literal under the backtick escape.
    let w = df.instructions[2]
        .expanded(&HashMap::new(), df.escape)
        .unwrap();
    assert_eq!(w.kind, InstructionKind::Workdir("c:\\app".into()));
}

#[test]
fn directives_only_at_top() {
    // After a comment the "directive" is an ordinary comment.
    let df = parse("# hello\n# escape=`\nFROM a\n").unwrap();
    assert_eq!(df.escape, '\\');
    let df = parse("# syntax=docker/dockerfile:1\n# escape=`\nFROM a\n").unwrap();
    assert_eq!(df.escape, '`');
    assert!(matches!(
        err("# escape=x\nFROM a\n"),
        DockerfileError::Syntax { line: 1, .. }
    ));
    assert!(matches!(
        err("# escape=`\n# escape=\\\nFROM a\n"),
        DockerfileError::Syntax { line: 2, .. }
    ));
}

#[test]
fn from_platform_and_flags() {
    let k = kinds("FROM --platform=linux/amd64 debian:12\n");
    assert_eq!(
        k[0],
        InstructionKind::From {
            image: "debian:12".into(),
            name: None,
            platform: Some("linux/amd64".into())
        }
    );
    assert!(matches!(
        err("FROM --foo=bar a"),
        DockerfileError::Unsupported { line: 1, .. }
    ));
    assert!(matches!(err("FROM"), DockerfileError::Syntax { .. }));
    assert!(matches!(err("FROM a b"), DockerfileError::Syntax { .. }));
    assert!(matches!(
        err("FROM a AS 9x"),
        DockerfileError::Syntax { .. }
    ));
}

#[test]
fn run_flags_unsupported() {
    let e = err("FROM a\nRUN --mount=type=cache,target=/root/.cache pip install x");
    assert_eq!(e.line(), 2);
    let msg = e.to_string();
    assert!(msg.starts_with("line 2:"), "{msg}");
    assert!(msg.contains("--mount"), "{msg}");
    assert!(msg.contains("not supported"), "{msg}");
}

#[test]
fn heredoc_rejected() {
    for text in [
        "FROM a\nRUN <<EOF\necho hi\nEOF",
        "FROM a\nRUN cat <<-'END' > x",
        "FROM a\nCOPY <<EOF /x",
    ] {
        let e = err(text);
        assert!(
            matches!(e, DockerfileError::Unsupported { line: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("heredoc"));
    }
    // Inside an exec-form argument it is just text.
    let k = kinds("FROM a\nRUN [\"sh\", \"-c\", \"cat <<EOF\"]");
    assert_eq!(k.len(), 2);
    // Arithmetic shift is not a heredoc.
    let k = kinds("FROM a\nRUN echo $((1<<2))");
    assert_eq!(k.len(), 2);
}

#[test]
fn exec_form_and_shell_lookalikes() {
    let k = kinds("FROM a\nRUN [\"/bin/sh\", \"-c\", \"echo \\\"hi\\\"\"]\nRUN [ -f /x ] && echo y\nENTRYPOINT [\"tini\", \"--\"]\nENTRYPOINT exec app\nCMD []\n");
    assert_eq!(
        k[1],
        InstructionKind::Run(CommandForm::Exec(s(&["/bin/sh", "-c", "echo \"hi\""])))
    );
    assert_eq!(
        k[2],
        InstructionKind::Run(CommandForm::Shell("[ -f /x ] && echo y".into()))
    );
    assert_eq!(
        k[3],
        InstructionKind::Entrypoint(CommandForm::Exec(s(&["tini", "--"])))
    );
    assert_eq!(
        k[4],
        InstructionKind::Entrypoint(CommandForm::Shell("exec app".into()))
    );
    assert_eq!(k[5], InstructionKind::Cmd(CommandForm::Exec(vec![])));
}

#[test]
fn exec_form_json_errors() {
    for text in [
        "FROM a\nCMD [\"a\", b]",
        "FROM a\nCMD [\"a\",]",
        "FROM a\nENTRYPOINT [\"a\"",
        "FROM a\nRUN [\"a\", 1]",
        "FROM a\nCOPY [\"a\" \"b\"]",
        "FROM a\nSHELL [\"sh\", -c]",
    ] {
        let e = err(text);
        assert_eq!(e, DockerfileError::InvalidJson { line: 2 }, "{text}");
        assert!(e.to_string().starts_with("line 2:"));
    }
    assert!(matches!(
        err("FROM a\nSHELL /bin/bash -c"),
        DockerfileError::Syntax { line: 2, .. }
    ));
    assert!(matches!(
        err("FROM a\nSHELL []"),
        DockerfileError::Syntax { line: 2, .. }
    ));
    let k = kinds("FROM a\nSHELL [\"/bin/bash\", \"-eo\", \"pipefail\", \"-c\"]");
    assert_eq!(
        k[1],
        InstructionKind::Shell(s(&["/bin/bash", "-eo", "pipefail", "-c"]))
    );
}

#[test]
fn copy_and_add() {
    let k = kinds("FROM a\nCOPY --chown=app:app --chmod=755 --from=build /src/a /src/b /dst/\nADD --chown=1000 x.tar.gz /opt/\nCOPY [\"with space\", \"/d st\"]\n");
    assert_eq!(
        k[1],
        InstructionKind::Copy(CopySpec {
            sources: s(&["/src/a", "/src/b"]),
            dest: "/dst/".into(),
            chown: Some("app:app".into()),
            chmod: Some("755".into()),
            from: Some("build".into()),
        })
    );
    assert_eq!(
        k[2],
        InstructionKind::Add(CopySpec {
            sources: s(&["x.tar.gz"]),
            dest: "/opt/".into(),
            chown: Some("1000".into()),
            ..CopySpec::default()
        })
    );
    assert_eq!(
        k[3],
        InstructionKind::Copy(CopySpec {
            sources: s(&["with space"]),
            dest: "/d st".into(),
            ..CopySpec::default()
        })
    );
    assert!(matches!(
        err("FROM a\nADD --from=x a b"),
        DockerfileError::Unsupported { line: 2, .. }
    ));
    assert!(matches!(
        err("FROM a\nCOPY --link a b"),
        DockerfileError::Unsupported { line: 2, .. }
    ));
    assert!(matches!(
        err("FROM a\nCOPY onlyone"),
        DockerfileError::Syntax { line: 2, .. }
    ));
    assert!(matches!(
        err("FROM a\nCOPY --chown= a b"),
        DockerfileError::Syntax { line: 2, .. }
    ));
}

#[test]
fn env_forms() {
    let k = kinds("FROM a\nENV PATH /usr/local/bin:$PATH\nENV A=1 B=\"v 2\" C='x y' D=a\\ b\n");
    assert_eq!(
        k[1],
        InstructionKind::Env(vec![("PATH".into(), "/usr/local/bin:$PATH".into())])
    );
    assert_eq!(
        k[2],
        InstructionKind::Env(vec![
            ("A".into(), "1".into()),
            ("B".into(), "\"v 2\"".into()),
            ("C".into(), "'x y'".into()),
            ("D".into(), "a\\ b".into()),
        ])
    );
}

#[test]
fn env_errors() {
    assert!(matches!(
        err("FROM a\nENV E"),
        DockerfileError::Syntax { line: 2, .. }
    ));
    assert!(matches!(
        err("FROM a\nENV A=1 B"),
        DockerfileError::Syntax { line: 2, .. }
    ));
    assert!(matches!(
        err("FROM a\nENV =x"),
        DockerfileError::Syntax { line: 2, .. }
    ));
    assert!(matches!(
        err("FROM a\nENV"),
        DockerfileError::Syntax { line: 2, .. }
    ));
}

#[test]
fn env_expanded_removes_quotes() {
    let df = parse("FROM a\nENV A=1 B=\"v 2 $X\" C='x $X' D=a\\ b E=${X:-none}\n").unwrap();
    let e = df.instructions[1]
        .expanded(&vars(&[("X", "ex")]), df.escape)
        .unwrap();
    assert_eq!(
        e.kind,
        InstructionKind::Env(vec![
            ("A".into(), "1".into()),
            ("B".into(), "v 2 ex".into()),
            ("C".into(), "x $X".into()),
            ("D".into(), "a b".into()),
            ("E".into(), "ex".into()),
        ])
    );
}

#[test]
fn arg_label_expose_stopsignal_user() {
    let k = kinds("ARG V=1.0 OTHER\nFROM a\nLABEL org.x=\"hello world\" b=c\nEXPOSE 80 53/udp 8000-8010/tcp\nSTOPSIGNAL SIGTERM\nUSER app:app\nMAINTAINER someone\n");
    assert_eq!(
        k[0],
        InstructionKind::Arg(vec![
            ("V".into(), Some("1.0".into())),
            ("OTHER".into(), None)
        ])
    );
    assert_eq!(
        k[2],
        InstructionKind::Label(vec![
            ("org.x".into(), "\"hello world\"".into()),
            ("b".into(), "c".into())
        ])
    );
    assert_eq!(
        k[3],
        InstructionKind::Expose(s(&["80", "53/udp", "8000-8010/tcp"]))
    );
    assert_eq!(k[4], InstructionKind::StopSignal("SIGTERM".into()));
    assert_eq!(k[5], InstructionKind::User("app:app".into()));
    assert_eq!(k.len(), 6, "MAINTAINER is ignored");
}

#[test]
fn ports() {
    assert_eq!(
        Port::parse("53/UDP"),
        Some(Port {
            start: 53,
            end: 53,
            protocol: Protocol::Udp
        })
    );
    assert_eq!(
        Port::parse("1-2"),
        Some(Port {
            start: 1,
            end: 2,
            protocol: Protocol::Tcp
        })
    );
    for bad in ["", "x", "80/sctp", "70000", "+1", "2-1", "1-", "80/"] {
        assert_eq!(Port::parse(bad), None, "{bad}");
    }
    assert!(matches!(
        err("FROM a\nEXPOSE 80/foo"),
        DockerfileError::Syntax { line: 2, .. }
    ));
    let df = parse("FROM a\nEXPOSE $P").unwrap();
    let e = df.instructions[1]
        .expanded(&vars(&[("P", "8080/tcp")]), '\\')
        .unwrap();
    assert_eq!(e.kind, InstructionKind::Expose(s(&["8080/tcp"])));
    assert!(df.instructions[1]
        .expanded(&vars(&[("P", "nope")]), '\\')
        .is_err());
}

#[test]
fn unknown_instruction() {
    let e = err("FROM a\n\nFROBNICATE x y\n");
    assert_eq!(
        e,
        DockerfileError::UnknownInstruction {
            line: 3,
            word: "FROBNICATE".into()
        }
    );
    assert_eq!(e.to_string(), "line 3: unknown instruction \"FROBNICATE\"");
}

#[test]
fn unsupported_instructions() {
    for (text, word) in [
        ("FROM a\nONBUILD RUN x", "ONBUILD"),
        ("FROM a\nhealthcheck CMD x", "HEALTHCHECK"),
        ("FROM a\nVOLUME /data", "VOLUME"),
    ] {
        let e = err(text);
        assert_eq!(e.to_string(), format!("line 2: {word} is not supported"));
    }
}

#[test]
fn huge_input_rejected() {
    let text = format!("FROM a\n{}", "# x\n".repeat(MAX_DOCKERFILE_BYTES / 4 + 1));
    assert!(matches!(err(&text), DockerfileError::TooLarge { .. }));
    assert!(err(&text).to_string().starts_with("line 1:"));
}

#[test]
fn too_many_instructions() {
    let text = format!("FROM a\n{}", "USER x\n".repeat(MAX_INSTRUCTIONS));
    let e = err(&text);
    assert_eq!(
        e,
        DockerfileError::TooManyInstructions {
            line: MAX_INSTRUCTIONS + 1,
            max: MAX_INSTRUCTIONS
        }
    );
    let ok = format!("FROM a\n{}", "USER x\n".repeat(MAX_INSTRUCTIONS - 1));
    assert_eq!(parse(&ok).unwrap().instructions.len(), MAX_INSTRUCTIONS);
}

#[test]
fn expand_variables() {
    let v = vars(&[("A", "aa"), ("EMPTY", ""), ("B_1", "b")]);
    let cases = [
        ("$A", "aa"),
        ("${A}", "aa"),
        ("x${A}y", "xaay"),
        ("$A/$B_1", "aa/b"),
        ("$UNSET", ""),
        ("${UNSET:-def}", "def"),
        ("${EMPTY:-def}", "def"),
        ("${EMPTY-def}", ""),
        ("${UNSET-def}", "def"),
        ("${A:-def}", "aa"),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET:+alt}", ""),
        ("${UNSET:-${A}-x}", "aa-x"),
        ("${UNSET:-\"q }\"}", "q }"),
        ("\\$A", "$A"),
        ("'$A'", "$A"),
        ("\"$A\"", "aa"),
        ("\"\\$A\"", "$A"),
        ("\"a\\b\"", "a\\b"),
        ("\"a\\\"b\"", "a\"b"),
        ("a\\ b", "a b"),
        ("$", "$"),
        ("a$", "a$"),
        ("$-x", "$-x"),
        ("trailing\\", "trailing\\"),
        ("${A:?must}", "aa"),
    ];
    for (input, want) in cases {
        assert_eq!(expand(input, &v).unwrap(), want, "{input}");
    }
}

#[test]
fn expand_errors() {
    let v = vars(&[]);
    assert_eq!(
        expand("'abc", &v),
        Err(ExpandError::UnterminatedSingleQuote)
    );
    assert_eq!(
        expand("\"abc", &v),
        Err(ExpandError::UnterminatedDoubleQuote)
    );
    assert_eq!(expand("${A", &v), Err(ExpandError::UnterminatedBrace));
    assert_eq!(expand("${A:-x", &v), Err(ExpandError::UnterminatedBrace));
    assert_eq!(expand("${", &v), Err(ExpandError::UnterminatedBrace));
    assert_eq!(expand("${}", &v), Err(ExpandError::BadSubstitution));
    assert_eq!(expand("${A/x/y}", &v), Err(ExpandError::BadSubstitution));
    assert_eq!(expand("${A:x}", &v), Err(ExpandError::BadSubstitution));
    assert!(matches!(
        expand("${A:?need A}", &v),
        Err(ExpandError::Required { .. })
    ));
    let df = parse("FROM a\nWORKDIR '/x").unwrap();
    let e = df.instructions[1].expanded(&v, '\\').unwrap_err();
    assert!(e.to_string().starts_with("line 2:"), "{e}");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let v = vars(&[]);
    let ok = format!(
        "{}x{}",
        "${A:-".repeat(MAX_NESTING),
        "}".repeat(MAX_NESTING)
    );
    assert_eq!(expand(&ok, &v).unwrap(), "x");
    let deep = format!("{}x{}", "${A:-".repeat(100_000), "}".repeat(100_000));
    assert_eq!(expand(&deep, &v), Err(ExpandError::TooDeep));
    let df = parse(&format!("FROM a\nWORKDIR {deep}")).unwrap();
    assert!(matches!(
        df.instructions[1].expanded(&v, '\\'),
        Err(DockerfileError::Expand { line: 2, .. })
    ));
}

#[test]
fn hostile_large_inputs_are_fast() {
    let start = std::time::Instant::now();
    let half = MAX_DOCKERFILE_BYTES / 2 - 16;
    for body in [
        "\\\n".repeat(half / 2),
        format!("FROM a\nRUN {}", "<".repeat(half)),
        format!("FROM a\nENV {}", "\"".repeat(half)),
        format!("FROM a\nCOPY {} b", "--x".repeat(half / 3)),
        format!("FROM a\nLABEL {}", "a=b ".repeat(half / 4)),
        format!("FROM a\nEXPOSE {}", "80 ".repeat(half / 3)),
    ] {
        if let Ok(df) = parse(&body) {
            for i in &df.instructions {
                let _ = i.expanded(&vars(&[]), df.escape);
            }
        }
    }
    assert!(start.elapsed().as_secs() < 20);
}

#[test]
fn expanded_only_where_docker_expands() {
    let df = parse("ARG BASE=alpine\nFROM ${BASE}:3 AS b\nRUN echo $HOME\nCMD echo $X\nCOPY --chown=$U ${SRC} /dst/$D\nWORKDIR /app/$D\nUSER $U\nLABEL k=$D\nSTOPSIGNAL $SIG\nARG Z=$D\n").unwrap();
    let v = vars(&[
        ("BASE", "debian"),
        ("HOME", "/h"),
        ("X", "x"),
        ("U", "app"),
        ("SRC", "src"),
        ("D", "d"),
        ("SIG", "SIGINT"),
    ]);
    let e: Vec<InstructionKind> = df
        .instructions
        .iter()
        .map(|i| i.expanded(&v, df.escape).unwrap().kind)
        .collect();
    assert_eq!(
        e[1],
        InstructionKind::From {
            image: "debian:3".into(),
            name: Some("b".into()),
            platform: None
        }
    );
    assert_eq!(
        e[2],
        InstructionKind::Run(CommandForm::Shell("echo $HOME".into()))
    );
    assert_eq!(
        e[3],
        InstructionKind::Cmd(CommandForm::Shell("echo $X".into()))
    );
    assert_eq!(
        e[4],
        InstructionKind::Copy(CopySpec {
            sources: s(&["src"]),
            dest: "/dst/d".into(),
            chown: Some("app".into()),
            ..CopySpec::default()
        })
    );
    assert_eq!(e[5], InstructionKind::Workdir("/app/d".into()));
    assert_eq!(e[6], InstructionKind::User("app".into()));
    assert_eq!(e[7], InstructionKind::Label(vec![("k".into(), "d".into())]));
    assert_eq!(e[8], InstructionKind::StopSignal("SIGINT".into()));
    assert_eq!(
        e[9],
        InstructionKind::Arg(vec![("Z".into(), Some("d".into()))])
    );
}

#[test]
fn stages() {
    let df = parse("ARG V=1\nARG BASE\nFROM golang AS Build\nRUN go build\nFROM alpine\nCOPY --from=build /x /x\nFROM build AS final\nUSER app\n").unwrap();
    let st = df.stages().unwrap();
    assert_eq!(st.global_args.len(), 2);
    assert_eq!(st.stages.len(), 3);
    assert_eq!(st.stages[0].name.as_deref(), Some("build"));
    assert_eq!(st.stages[0].instructions.len(), 1);
    assert_eq!(st.stages[1].name, None);
    assert_eq!(st.stages[1].from.line, 5);
    assert_eq!(st.stages[2].index, 2);
    assert_eq!(st.find("BUILD").map(|s| s.index), Some(0));
    assert_eq!(st.find("1").map(|s| s.index), Some(1));
    assert!(st.find("nope").is_none());
}

#[test]
fn global_args_expand_from_lines() {
    let df = parse(
        "ARG REG=docker.io\nARG IMAGE=${REG}/library/python\nARG TAG\nFROM ${IMAGE}:${TAG:-3.12}\n",
    )
    .unwrap();
    let st = df.stages().unwrap();
    let v = st.global_arg_values(&HashMap::new(), df.escape).unwrap();
    let from = st.stages[0].from.expanded(&v, df.escape).unwrap();
    assert_eq!(
        from.kind,
        InstructionKind::From {
            image: "docker.io/library/python:3.12".into(),
            name: None,
            platform: None
        }
    );
    let v = st
        .global_arg_values(&vars(&[("REG", "r.example"), ("TAG", "3.13")]), df.escape)
        .unwrap();
    let from = st.stages[0].from.expanded(&v, df.escape).unwrap();
    assert_eq!(
        from.kind,
        InstructionKind::From {
            image: "r.example/library/python:3.13".into(),
            name: None,
            platform: None
        }
    );
    let bad = parse("ARG A=${\nFROM x").unwrap();
    let e = bad
        .stages()
        .unwrap()
        .global_arg_values(&HashMap::new(), '\\')
        .unwrap_err();
    assert_eq!(e.line(), 1);
}

#[test]
fn stage_errors() {
    let e = parse("RUN x\nFROM a").unwrap().stages().unwrap_err();
    assert_eq!(e.line(), 1);
    let e = parse("ARG x\n").unwrap().stages().unwrap_err();
    assert!(e.to_string().contains("no FROM"));
    let e = parse("FROM a AS x\nFROM b AS X\n")
        .unwrap()
        .stages()
        .unwrap_err();
    assert_eq!(e.line(), 2);
    let e = parse("").unwrap().stages().unwrap_err();
    assert_eq!(e.line(), 1);
}

#[test]
fn long_unknown_word_is_truncated() {
    let word = "é".repeat(100);
    match err(&word) {
        DockerfileError::UnknownInstruction { word, .. } => assert!(word.len() <= 64),
        other => panic!("{other}"),
    }
}

/// xorshift64*: small deterministic PRNG for the no-panic test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn random_input_never_panics() {
    const TOKENS: &[&str] = &[
        "FROM ",
        "RUN ",
        "COPY ",
        "ADD ",
        "ENV ",
        "ARG ",
        "LABEL ",
        "EXPOSE ",
        "SHELL ",
        "CMD ",
        "ENTRYPOINT ",
        "WORKDIR ",
        "USER ",
        "STOPSIGNAL ",
        "AS ",
        "--from=",
        "--chown=",
        "--",
        "\\\n",
        "`\n",
        "\n",
        "\r\n",
        "# escape=`\n",
        "#",
        " ",
        "\t",
        "$",
        "${",
        "}",
        ":-",
        ":+",
        ":?",
        "\"",
        "'",
        "\\",
        "[",
        "]",
        ",",
        "=",
        "<<EOF",
        "/",
        "é",
        "\u{0}",
        "80/udp",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let v = vars(&[("A", "a"), ("B", "")]);
    for round in 0..4000 {
        let len = (rng.next() % 200) as usize;
        let text = if round % 2 == 0 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            (0..len / 4)
                .map(|_| TOKENS[(rng.next() % TOKENS.len() as u64) as usize])
                .collect()
        };
        let _ = expand(&text, &v);
        if let Ok(df) = parse(&text) {
            let _ = df.stages();
            for i in &df.instructions {
                let _ = i.expanded(&v, df.escape);
            }
        }
    }
}
