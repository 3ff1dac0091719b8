//! The end of every image build (Dockerfile builds and `hearth image
//! import`): boot a VM from the image's disk, start the app, wait until it is
//! ready (its `ready` hook answers 200, or without hooks until its process is
//! up and settled), and snapshot memory and disk.

use std::path::Path;
use std::time::{Duration, Instant};

use hearth_api::{BuildErrorCode, BuildFailure, BuildHook};
use hearth_proto::ExecRequest;
use hearth_vm::agent::AgentClient;
use hearth_vm::{BootRequest, ColdBoot, Driver, MachineShape};

use hearth_vm::error_chain;

use crate::arn::Arn;
use crate::db::records::SnapshotSizes;
use crate::vms::hooks;

/// Where the app's output goes inside the guest.
const APP_LOG: &str = "/var/log/hearth-app.log";
/// How long a process must stay up before a hook-less build snapshots it.
const SETTLE: Duration = Duration::from_millis(1500);

/// How to start an image's app.
#[derive(Debug, Clone)]
pub struct AppSpec {
    /// The command; empty: the snapshot holds an idle system.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// `user[:group]` (names are looked up in the image), as Dockerfile USER.
    pub user: Option<String>,
    /// With a port, the `ready` hook decides when to snapshot.
    pub hooks_port: Option<u16>,
    pub ready_timeout: Duration,
}

/// The variables the reference gives every app.
pub fn aws_env(
    region: &str,
    account: &str,
    image: &str,
    version: Option<u32>,
) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "AWS_LAMBDA_MICROVM_IMAGE_NAME".to_string(),
            image.to_string(),
        ),
        (
            "AWS_LAMBDA_MICROVM_IMAGE_ARN".to_string(),
            Arn::image(region, account, image).to_string(),
        ),
        ("AWS_REGION".to_string(), region.to_string()),
    ];
    if let Some(version) = version {
        env.push((
            "AWS_LAMBDA_MICROVM_IMAGE_VERSION".to_string(),
            format!("{version}.0"),
        ));
    }
    env
}

/// Boots `disk`, starts `app`, waits until it is ready and writes the
/// snapshot to `snapshot_dir`. Returns `snapshotBuild`. The VM is removed
/// either way.
#[allow(clippy::too_many_arguments)]
pub async fn snapshot_ready_app(
    driver: &dyn Driver,
    vm_name: &str,
    shape: MachineShape,
    disk: &ColdBoot,
    app: &AppSpec,
    snapshot_dir: &Path,
    code_size: u64,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<SnapshotSizes, BuildFailure> {
    // The cause goes to the log, not to the tenant.
    let platform = |what: &str, err: &dyn std::error::Error| {
        tracing::warn!(error = %error_chain(err), "{what}");
        BuildFailure::new(BuildErrorCode::InternalPlatformError, what)
    };
    progress("booting the snapshot VM");
    let vm = driver
        .boot_with(
            &BootRequest {
                name: vm_name.to_string(),
                image: "build".into(),
                shape,
            },
            disk,
        )
        .await
        .map_err(|e| platform("the VM did not boot", &e))?;
    let result = async {
        let agent = driver
            .agent(&vm)
            .await
            .map_err(|e| platform("the VM's agent did not answer", &e))?;
        if !app.argv.is_empty() {
            progress(&format!("starting {}", app.argv.join(" ")));
            let pid = start_app(&agent, app).await?;
            wait_ready(&agent, app, pid, progress).await?;
        }
        drop(agent);
        progress("snapshotting memory and disk");
        let snapshot = driver
            .snapshot(&vm, snapshot_dir)
            .await
            .map_err(|e| platform("the snapshot failed", &e))?;
        // Bytes stored: the memory file is sparse (pages the guest never
        // touched are holes), so its length would only repeat the VM's size.
        let stored = |path: std::path::PathBuf| {
            std::fs::metadata(path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0)
        };
        Ok(SnapshotSizes {
            memory_snapshot_size_in_bytes: stored(snapshot.memory()),
            disk_snapshot_size_in_bytes: stored(snapshot.disk()),
            code_install_size_in_bytes: code_size,
        })
    }
    .await;
    if let Err(err) = driver.remove(&vm).await {
        tracing::warn!(error = %error_chain(&err), "cannot remove the snapshot VM");
    }
    result
}

/// Starts the app detached (its own session, output to [`APP_LOG`]) and
/// returns its pid.
async fn start_app(agent: &AgentClient, app: &AppSpec) -> Result<u32, BuildFailure> {
    let failed = |detail: String| BuildFailure::new(BuildErrorCode::ContainerBuildFailed, detail);
    let (uid, gid) = match &app.user {
        Some(user) => {
            let (uid, gid, _) = hearth_builder::user::resolve_user(agent, user)
                .await
                .map_err(|e| failed(format!("USER {user}: {e}")))?;
            (Some(uid), Some(gid))
        }
        None => (None, None),
    };
    // The log file is made by root before the shell drops to the app's user.
    let prepare = agent
        .exec_output(ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "touch {APP_LOG} && chown {}:{} {APP_LOG}",
                    uid.unwrap_or(0),
                    gid.unwrap_or(0)
                ),
            ],
            timeout_ms: Some(10_000),
            ..Default::default()
        })
        .await;
    if !prepare.is_ok_and(|o| o.status.code == Some(0)) {
        tracing::debug!("cannot prepare the app log");
    }
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        format!("setsid \"$@\" </dev/null >>{APP_LOG} 2>&1 & echo $!"),
        "sh".to_string(),
    ];
    argv.extend(app.argv.iter().cloned());
    let output = agent
        .exec_output(ExecRequest {
            argv,
            env: app.env.clone(),
            clear_env: true,
            cwd: Some(app.cwd.clone()),
            uid,
            gid,
            timeout_ms: Some(30_000),
            ..Default::default()
        })
        .await
        .map_err(|e| {
            failed(format!(
                "cannot start the command (is /bin/sh in the root filesystem?): {}",
                error_chain(&e)
            ))
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim().parse().map_err(|_| {
        failed(format!(
            "cannot start the command: {}",
            tail(&output.stderr)
        ))
    })
}

async fn app_alive(agent: &AgentClient, pid: u32) -> bool {
    agent
        .exec_output(ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), format!("kill -0 {pid}")],
            timeout_ms: Some(10_000),
            ..Default::default()
        })
        .await
        .is_ok_and(|o| o.status.code == Some(0))
}

async fn app_log(agent: &AgentClient) -> String {
    match agent
        .exec_output(ExecRequest {
            argv: vec!["tail".into(), "-c".into(), "2000".into(), APP_LOG.into()],
            timeout_ms: Some(10_000),
            ..Default::default()
        })
        .await
    {
        Ok(output) => tail(&output.stdout),
        Err(_) => String::new(),
    }
}

pub(crate) fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(1000)
        .map(|(i, _)| i)
        .unwrap_or(0);
    text[start..].to_string()
}

/// Waits until the app is ready: its `ready` hook answers 200 (503 and a
/// closed port mean "not yet"), or without hooks, until it has stayed up.
async fn wait_ready(
    agent: &AgentClient,
    app: &AppSpec,
    pid: u32,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(), BuildFailure> {
    let exited = |log: String| {
        BuildFailure::new(
            BuildErrorCode::ContainerBuildFailed,
            format!("the command exited before it was ready; its output ends: {log}"),
        )
    };
    let Some(port) = app.hooks_port else {
        progress("waiting for the app to settle");
        tokio::time::sleep(SETTLE).await;
        if !app_alive(agent, pid).await {
            return Err(exited(app_log(agent).await));
        }
        return Ok(());
    };
    progress(&format!("waiting for the ready hook on port {port}"));
    let deadline = Instant::now() + app.ready_timeout;
    let mut last_check = Instant::now();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BuildFailure::hook_timed_out(
                BuildHook::Ready,
                app.ready_timeout,
            ));
        }
        let answer = hooks::call(
            agent,
            port,
            "ready",
            None,
            left.min(Duration::from_secs(10)),
        )
        .await;
        // 503 is "not yet"; so are a closed port and a slow answer while starting.
        if let Ok(200) = answer {
            return Ok(());
        }
        if last_check.elapsed() > Duration::from_secs(1) {
            last_check = Instant::now();
            if !app_alive(agent, pid).await {
                return Err(exited(app_log(agent).await));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
