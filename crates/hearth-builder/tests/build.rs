//! The builder on real guests: a Dockerfile runs in build VMs under QEMU, the
//! result boots, and the step cache makes rebuilds skip unchanged steps.
//! Needs `scripts/setup-host` (as `scripts/test` does).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

mod common;

use common::Lines;
use hearth_api::BuildFailure;
use hearth_builder::oci::BaseError;
use hearth_builder::run::{Base, BaseResolver, BuildError, BuildLog, BuildRequest, Builder, Disk};
use hearth_proto::ExecRequest;
use hearth_vm::disk::BackingFormat;
use hearth_vm::{Assets, Driver, MachineShape};

/// Resolves `debian-12` to the host's managed base image, as the server does.
struct HostBases(Assets);

impl BaseResolver for HostBases {
    async fn resolve(&self, image: &str, _log: &dyn BuildLog) -> Result<Base, BaseError> {
        let path = self
            .0
            .base_image(image)
            .map_err(|_| BaseError::NotManaged {
                image: image.into(),
                suggestion: "debian-12".into(),
            })?;
        Ok(Base {
            identity: format!("{image}@{}", path.display()),
            disk: Disk {
                path,
                format: BackingFormat::Raw,
            },
            config: Default::default(),
        })
    }
}

fn write(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

const DOCKERFILE: &str = r#"# a test app
ARG BASE=debian-12
FROM ${BASE} AS builder
RUN mkdir -p /out && echo compiled > /out/artifact.txt

FROM debian-12
ARG GREETING=hello
ENV APP_HOME=/srv/app MODE=test
WORKDIR $APP_HOME
COPY app/ ./
COPY --from=builder /out/artifact.txt ./artifact.txt
ADD data.tar.gz /opt/data/
RUN echo "$GREETING $MODE" > built.txt && useradd -m -u 1234 appuser
USER appuser
RUN id -u > /tmp/uid.txt
LABEL purpose=test
CMD ["python3", "main.py"]
"#;

fn context(dir: &Path) {
    write(dir, "Dockerfile", DOCKERFILE);
    write(dir, "app/main.py", "print('hi')\n");
    write(dir, "app/lib/util.py", "X = 1\n");
    write(dir, "app/secret.key", "do not copy");
    write(dir, ".dockerignore", "app/*.key\n");
    // A gzipped tar for ADD to unpack.
    let src = dir.join("tarsrc");
    write(&src, "inside/file.txt", "from the tar\n");
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(dir.join("data.tar.gz"))
        .arg("-C")
        .arg(&src)
        .arg("inside")
        .status()
        .expect("tar");
    assert!(status.success());
    std::fs::remove_dir_all(&src).expect("rm");
}

async fn sh(agent: &hearth_vm::AgentClient, script: &str) -> String {
    let out = agent
        .exec_output(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(
        out.status.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerfile_builds_boots_and_caches() {
    let (state, assets, driver) = common::driver("hbl");
    let builder = Builder::new(
        std::sync::Arc::new(driver.clone()),
        &state.path().join("cache"),
    )
    .expect("builder");
    let ctx = state.path().join("ctx");
    context(&ctx);
    let request = BuildRequest {
        context: ctx.clone(),
        dockerfile: DOCKERFILE.into(),
        build_args: HashMap::from([("GREETING".to_string(), "howdy".to_string())]),
        vm_prefix: "bt".into(),
        shape: MachineShape::default(),
        network: false,
        cache_scope: "111122223333".into(),
        step_timeout: Duration::from_secs(600),
        build_timeout: Duration::from_secs(1200),
    };
    let bases = HostBases(assets.clone());
    let log = Lines::default();
    let built = builder
        .build(&request, &bases, &log)
        .await
        .unwrap_or_else(|e| panic!("build failed: {}\n{}", BuildFailure::from(&e), log.text()));
    assert_eq!(built.steps_cached, 0, "{}", log.text());
    // builder: RUN; final: WORKDIR, COPY, COPY --from, ADD, RUN, RUN.
    assert_eq!(built.steps_run, 7, "{}", log.text());
    assert_eq!(built.config.command(), ["python3", "main.py"]);
    assert_eq!(built.config.cwd(), "/srv/app");
    assert_eq!(built.config.user.as_deref(), Some("appuser"));
    assert_eq!(built.config.env_value("MODE"), Some("test"));
    assert_eq!(
        built.config.labels.get("purpose").map(String::as_str),
        Some("test")
    );
    assert!(
        driver.list().expect("list").is_empty(),
        "build VMs left behind"
    );

    // The result boots and holds what the steps made.
    let (vm, agent) = common::boot_built(&driver, &built.disk).await;
    assert_eq!(sh(&agent, "cat /srv/app/built.txt").await, "howdy test");
    assert_eq!(sh(&agent, "cat /srv/app/main.py").await, "print('hi')");
    assert_eq!(sh(&agent, "cat /srv/app/lib/util.py").await, "X = 1");
    assert_eq!(
        sh(&agent, "test -e /srv/app/secret.key && echo yes || echo no").await,
        "no"
    );
    assert_eq!(sh(&agent, "cat /srv/app/artifact.txt").await, "compiled");
    assert_eq!(
        sh(&agent, "cat /opt/data/inside/file.txt").await,
        "from the tar"
    );
    assert_eq!(sh(&agent, "cat /tmp/uid.txt").await, "1234");
    // The root filesystem grew to the build disk's 8 GiB (from the base's 1 GiB).
    let blocks: u64 = sh(&agent, "df -k --output=size / | tail -1")
        .await
        .trim()
        .parse()
        .expect("df");
    assert!(blocks > 7 * 1024 * 1024, "{blocks} KiB");
    drop(agent);
    driver.remove(&vm).await.expect("remove");

    // Unchanged: everything from the cache, no VM booted.
    let log2 = Lines::default();
    let again = builder
        .build(&request, &bases, &log2)
        .await
        .expect("rebuild");
    assert_eq!(
        (again.steps_run, again.steps_cached),
        (0, 7),
        "{}",
        log2.text()
    );
    assert_eq!(again.disk, built.disk);
    assert!(
        !log2.text().contains("starting a build VM"),
        "{}",
        log2.text()
    );

    // A changed source file re-runs its COPY and what follows, not what precedes.
    write(&ctx, "app/main.py", "print('changed')\n");
    let log3 = Lines::default();
    let changed = builder
        .build(&request, &bases, &log3)
        .await
        .expect("build after a change");
    assert_eq!(
        (changed.steps_run, changed.steps_cached),
        (5, 2),
        "{}",
        log3.text()
    );

    // A failing RUN names its line and shows its output.
    let failing = BuildRequest {
        dockerfile: "FROM debian-12\nRUN echo preparing\nRUN echo 'boom happened' >&2; exit 3\n"
            .into(),
        ..request.clone()
    };
    let log4 = Lines::default();
    let err = builder
        .build(&failing, &bases, &log4)
        .await
        .expect_err("must fail");
    let reason = BuildFailure::from(&err).to_string();
    assert!(matches!(err, BuildError::Step { line: 3, .. }), "{reason}");
    assert!(reason.starts_with("CONTAINER_BUILD_FAILED"), "{reason}");
    assert!(reason.contains("non-zero code: 3"), "{reason}");
    assert!(reason.contains("boom happened"), "{reason}");
    assert!(
        driver.list().expect("list").is_empty(),
        "build VMs left behind"
    );

    // A build past its time limit fails, and its VM goes with it.
    let slow = BuildRequest {
        dockerfile: "FROM debian-12\nRUN sleep 600\n".into(),
        build_timeout: Duration::from_secs(8),
        ..request.clone()
    };
    let started = std::time::Instant::now();
    let err = builder
        .build(&slow, &bases, &Lines::default())
        .await
        .expect_err("must time out");
    assert!(started.elapsed() < Duration::from_secs(60));
    let reason = BuildFailure::from(&err).to_string();
    assert!(
        reason.starts_with("CONTAINER_BUILD_FAILED: the build did not finish within 8 s"),
        "{reason}"
    );
    assert!(
        driver.list().expect("list").is_empty(),
        "build VMs left behind"
    );
}
