//! Starting an exec'd process, with pipes or on a terminal: the command a
//! request describes, the spawn off the event loop, and the guard that kills
//! the process group when its stream goes away.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hearth_proto::{ErrorKind, ExecRequest, MAX_WINDOW_DIMENSION};

use crate::children::Spawned;
use crate::stream::{Agent, StreamControl, StreamFailure};
use crate::sys;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("invalid environment variable name {0:?}")]
    BadEnvName(String),
    #[error("executable not found: {0}")]
    NotFound(String),
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("the spawning task failed")]
    SpawnTask,
    #[error("window size {cols}x{rows} is out of range (1 to {MAX_WINDOW_DIMENSION} each)")]
    BadWindowSize { cols: u16, rows: u16 },
    #[error("invalid TERM value")]
    BadTerm,
    #[error("cannot open a pseudo-terminal")]
    Pty(#[source] io::Error),
    #[error("malformed resize request")]
    BadResize,
}

impl StreamFailure for ExecError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::EmptyArgv | Self::BadEnvName(_) | Self::BadWindowSize { .. } | Self::BadTerm => {
                ErrorKind::InvalidRequest
            }
            Self::BadResize => ErrorKind::Protocol,
            Self::Pty(_) => ErrorKind::Internal,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Spawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
                _ => ErrorKind::Internal,
            },
            Self::SpawnTask => ErrorKind::Internal,
        }
    }
}

/// `TERM` of a process on a pseudo-terminal unless the request names one.
pub const DEFAULT_PTY_TERM: &str = "xterm-256color";
/// Longest `TERM` value accepted.
const MAX_TERM_LEN: usize = 128;

/// Kills the process group when the stream is dropped (host `Close`, protocol
/// error) while the process still runs, unless the session detached it.
pub struct KillGuard {
    pid: i32,
    control: Arc<StreamControl>,
    armed: bool,
}

impl KillGuard {
    /// The process was reaped: its pid may be reused, so never signal it again.
    pub fn disarm(&mut self) {
        self.armed = false;
        self.control.pid.store(0, Ordering::Release);
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if self.armed && !self.control.detached.load(Ordering::Acquire) {
            let _ = sys::kill(-self.pid, libc::SIGKILL);
        }
    }
}

/// Finds the program to run. Names without `/` are looked up in `path_var`.
fn resolve_program(program: &str, path_var: &str, cwd: Option<&str>) -> Option<PathBuf> {
    if program.contains('/') {
        let as_given = Path::new(program);
        let check = match cwd {
            Some(cwd) if as_given.is_relative() => Path::new(cwd).join(as_given),
            _ => as_given.to_path_buf(),
        };
        return check.exists().then(|| as_given.to_path_buf());
    }
    path_var
        .split(':')
        .map(|dir| if dir.is_empty() { "." } else { dir })
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Builds the command for `request`. With `controlling_tty` the child makes the
/// terminal on its standard input its controlling terminal (the caller sets up
/// stdio); otherwise stdio are pipes (or `/dev/null` for stdin).
pub fn build_command(request: &ExecRequest, controlling_tty: bool) -> Result<Command, ExecError> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err(ExecError::EmptyArgv);
    };
    if let Some((name, _)) = request
        .env
        .iter()
        .find(|(name, _)| name.is_empty() || name.contains('='))
    {
        return Err(ExecError::BadEnvName(name.clone()));
    }
    let path_var = request
        .env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map_or(DEFAULT_PATH, |(_, value)| value.as_str());
    let resolved = resolve_program(program, path_var, request.cwd.as_deref())
        .ok_or_else(|| ExecError::NotFound(program.clone()))?;

    let mut command = Command::new(resolved);
    command.arg0(program).args(args).env_clear();
    if !request.clear_env {
        command
            .env("PATH", DEFAULT_PATH)
            .env("HOME", "/root")
            .env("TERM", "linux");
    }
    if let Some(pty) = &request.pty {
        // A terminal without TERM is hardly usable, so it is set even with
        // `clear_env`; the request's own `env` still wins.
        let term = pty.term.as_deref().unwrap_or(DEFAULT_PTY_TERM);
        if term.is_empty()
            || term.len() > MAX_TERM_LEN
            || !term.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ExecError::BadTerm);
        }
        command.env("TERM", term);
    }
    command.envs(request.env.iter().map(|(name, value)| (name, value)));
    if let Some(cwd) = &request.cwd {
        command.current_dir(cwd);
    }
    command
        .stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (uid, gid) = (request.uid, request.gid);
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid, setuid).
    unsafe {
        command.pre_exec(move || sys::child_setup(uid, gid, controlling_tty));
    }
    Ok(command)
}

/// Spawns `command` off the event loop, registered with the reaper, with its pid
/// published in `control` and a guard that kills its process group if the
/// stream goes away first.
pub async fn spawn(
    mut command: Command,
    program: String,
    agent: &Agent,
    control: &Arc<StreamControl>,
) -> Result<(Spawned, KillGuard), ExecError> {
    let children = agent.children.clone();
    let guard_control = control.clone();
    // Spawning blocks for fork+exec. The guard is made on the blocking thread so
    // that, should this stream be dropped meanwhile, dropping the unclaimed result
    // still kills the new process. The command (and any descriptors it holds for
    // the child) is dropped there too, right after the spawn.
    let spawned = tokio::task::spawn_blocking(move || {
        let spawned = children.spawn(&mut command)?;
        drop(command);
        guard_control.pid.store(spawned.pid, Ordering::Release);
        let guard = KillGuard {
            pid: spawned.pid,
            control: guard_control,
            armed: true,
        };
        Ok::<_, io::Error>((spawned, guard))
    })
    .await
    .map_err(|_| ExecError::SpawnTask)?;
    spawned.map_err(|source| ExecError::Spawn { program, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_through_path() {
        let found = resolve_program("sh", DEFAULT_PATH, None).expect("sh is installed");
        assert!(found.is_absolute());
        assert!(found.ends_with("sh"));
        assert_eq!(
            resolve_program("no-such-program-hearth", DEFAULT_PATH, None),
            None
        );
    }

    #[test]
    fn paths_with_slash_are_taken_as_given() {
        assert_eq!(
            resolve_program("/bin/sh", "", None),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(resolve_program("./missing-hearth", "", Some("/")), None);
    }

    #[test]
    fn spawn_errors_map_to_kinds() {
        let err = ExecError::Spawn {
            program: "x".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert_eq!(ExecError::NotFound("x".into()).kind(), ErrorKind::NotFound);
        assert_eq!(ExecError::EmptyArgv.kind(), ErrorKind::InvalidRequest);
    }

    #[test]
    fn bad_env_names_are_refused() {
        let request = ExecRequest {
            argv: vec!["sh".into()],
            env: vec![("A=B".into(), "c".into())],
            ..ExecRequest::default()
        };
        assert!(matches!(
            build_command(&request, false),
            Err(ExecError::BadEnvName(_))
        ));
    }
}
