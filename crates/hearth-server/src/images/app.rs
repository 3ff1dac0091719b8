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

use hearth_proto::{APP_STDERR_PIPE, APP_STDOUT_PIPE};

/// Most lines of the app's build-time output copied into the build's log.
const BUILD_LOG_APP_LINES: usize = 200;
/// How long a process must stay up before a hook-less build snapshots it.
const SETTLE: Duration = Duration::from_millis(1500);
/// After SETTLE, a hook-less app is snapshotted once it used at most
/// IDLE_TICKS clock ticks (1/100 s) of CPU in an IDLE_WINDOW, or at
/// SETTLE_LIMIT whatever it does (a busy app is snapshotted busy).
const IDLE_WINDOW: Duration = Duration::from_millis(1000);
const IDLE_TICKS: u64 = 2;
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

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
    let platform = |what: &str, err: &(dyn std::error::Error + 'static)| {
        tracing::warn!(error = %error_chain(err), "{what}");
        // A full data directory is the caller's to fix, not a platform fault;
        // the snapshot leaves no half-written files (a temporary directory,
        // renamed only when whole).
        let code = if is_disk_full(err) {
            BuildErrorCode::DiskStorageFull
        } else {
            BuildErrorCode::InternalPlatformError
        };
        BuildFailure::new(code, what)
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
        if disk.disk_size.is_some() {
            grow_root(&agent, progress).await;
        }
        if !app.argv.is_empty() {
            progress(&format!("starting {}", app.argv.join(" ")));
            let pid = start_app(&agent, app).await?;
            wait_ready(&agent, app, pid, progress).await?;
        }
        if !app.argv.is_empty() {
            hand_build_output_to_build(&agent, progress).await;
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

/// Grows the root filesystem to the size's disk (online, with the image's
/// own resize2fs; an image without it keeps its filesystem's size).
async fn grow_root(agent: &AgentClient, progress: &(dyn Fn(&str) + Sync)) {
    let grown = agent
        .exec_output(ExecRequest {
            argv: vec!["resize2fs".into(), "/dev/vda".into()],
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            timeout_ms: Some(120_000),
            ..Default::default()
        })
        .await;
    if grown.is_ok_and(|o| o.status.code == Some(0)) {
        progress("root filesystem grown to the size's disk");
    } else {
        progress("the root filesystem keeps its size (no resize2fs in the image)");
    }
}

/// Reads what the app printed while the image was built, copies its last
/// lines into the build's log and has the guest forget it: a microVM
/// launched from the snapshot then ships only its own output.
async fn hand_build_output_to_build(agent: &AgentClient, progress: &(dyn Fn(&str) + Sync)) {
    let (lines, next) = match app_output(agent).await {
        Ok(read) => read,
        Err(err) => {
            tracing::debug!(error = %error_chain(&err), "cannot read the app's output");
            return;
        }
    };
    let skip = lines.len().saturating_sub(BUILD_LOG_APP_LINES);
    for line in &lines[skip..] {
        progress(&format!("app {}: {}", line.stream.as_str(), line.line));
    }
    if let Err(err) = agent.discard_app_log(next).await {
        tracing::debug!(error = %error_chain(&err), "cannot discard the app's build-time output");
    }
}

/// Every line of the app's output the guest holds, and the sequence number
/// after the last.
async fn app_output(
    agent: &AgentClient,
) -> Result<(Vec<hearth_proto::AppLogRecord>, u64), hearth_vm::AgentError> {
    let mut stream = agent.app_logs(0, false).await?;
    let mut lines: Vec<hearth_proto::AppLogRecord> = Vec::new();
    while let Some(batch) = stream.next_app_logs().await? {
        lines.extend(batch);
        // The guest holds at most 1 MiB; keep the host's copy as bounded.
        let excess = lines.len().saturating_sub(4 * BUILD_LOG_APP_LINES);
        lines.drain(..excess);
    }
    let next = lines.last().map_or(0, |l| l.seq.saturating_add(1));
    Ok((lines, next))
}

/// Starts the app detached (its own session, stdout and stderr into the
/// agent's capture pipes) and returns its pid.
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
    // The agent's pipes belong to root; the app's user must open them.
    let prepare = agent
        .exec_output(ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "chown {}:{} {APP_STDOUT_PIPE} {APP_STDERR_PIPE}",
                    uid.unwrap_or(0),
                    gid.unwrap_or(0)
                ),
            ],
            timeout_ms: Some(10_000),
            ..Default::default()
        })
        .await;
    if !prepare.is_ok_and(|o| o.status.code == Some(0)) {
        tracing::debug!("cannot hand the output pipes to the app's user");
    }
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        format!("setsid \"$@\" </dev/null >{APP_STDOUT_PIPE} 2>{APP_STDERR_PIPE} & echo $!"),
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

/// The CPU time (user + system, in clock ticks) the app's process has used,
/// or None when it is gone.
async fn app_cpu_ticks(agent: &AgentClient, pid: u32) -> Option<u64> {
    let out = agent
        .exec_output(ExecRequest {
            argv: vec!["/bin/cat".into(), format!("/proc/{pid}/stat")],
            timeout_ms: Some(10_000),
            ..Default::default()
        })
        .await
        .ok()
        .filter(|o| o.status.code == Some(0))?;
    stat_cpu_ticks(&String::from_utf8_lossy(&out.stdout))
}

/// utime + stime (fields 14 and 15 of `/proc/PID/stat`), read after the
/// parenthesised command name, which may hold spaces.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The end of what the app printed (both streams, in order).
async fn app_log(agent: &AgentClient) -> String {
    match app_output(agent).await {
        Ok((lines, _)) => {
            let mut text = Vec::new();
            for line in lines.iter().rev().take(100).rev() {
                text.extend_from_slice(line.line.as_bytes());
                text.push(b'\n');
            }
            tail(&text)
        }
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
        // Up for SETTLE, then idle: an app still importing or warming up
        // (Python takes seconds under TCG) keeps using CPU; one that has
        // finished waits in poll/accept. Snapshotting earlier would launch
        // every microVM with an app that is not listening yet.
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut before = app_cpu_ticks(agent, pid).await;
        loop {
            let Some(ticks) = before else {
                return Err(exited(app_log(agent).await));
            };
            tokio::time::sleep(IDLE_WINDOW).await;
            let after = app_cpu_ticks(agent, pid).await;
            if after.is_some_and(|now| now.saturating_sub(ticks) <= IDLE_TICKS)
                || (after.is_some() && Instant::now() >= deadline)
            {
                return Ok(());
            }
            before = after;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_come_from_fields_14_and_15() {
        let stat =
            "87 (python3 a) b) S 1 87 87 0 -1 4194560 2979 0 0 0 143 21 0 0 20 0 1 0 520 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(164));
        assert_eq!(stat_cpu_ticks("garbage"), None);
        assert_eq!(stat_cpu_ticks("1 (x) S 1"), None);
    }
}

/// Whether `err` (or an error it wraps) is ENOSPC or EDQUOT, from the OS or
/// reported by QEMU (whose messages carry the OS's text).
pub(crate) fn is_disk_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) {
                return true;
            }
        }
        let text = err.to_string();
        if text.contains("No space left on device") || text.contains("Disk quota exceeded") {
            return true;
        }
        next = err.source();
    }
    false
}

#[cfg(test)]
mod disk_full_tests {
    use super::is_disk_full;

    #[derive(Debug, thiserror::Error)]
    #[error("snapshot failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn enospc_is_found_through_the_chain_and_nothing_else_is() {
        let full = Outer(std::io::Error::from_raw_os_error(28));
        assert!(is_disk_full(&full));
        let quota = Outer(std::io::Error::from_raw_os_error(122));
        assert!(is_disk_full(&quota));
        let denied = Outer(std::io::Error::from_raw_os_error(13));
        assert!(!is_disk_full(&denied));
        let qemu = std::io::Error::other("migration failed: No space left on device");
        assert!(is_disk_full(&qemu));
    }
}
