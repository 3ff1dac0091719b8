//! JSON control messages carried in `Hello`, `Open`, `Signal`, `Exit`, `Reply` and
//! `Error` frames. Bulk bytes never go through JSON: they travel in `Data` frames.

use serde::{Deserialize, Serialize};

/// Stream 0 handshake, sent by the host first and answered by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Free-form software identification (e.g. `hearth-agent 0.1.0`).
    #[serde(default)]
    pub software: String,
}

/// What a stream is for; the payload of an `Open` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Health check; answered by a `Reply` with [`Reply::Pong`].
    Ping,
    /// Run a process. Output comes as `Data` frames flagged stdout/stderr, each
    /// closed by an `Eof` with the same flag, then one `Exit`.
    Exec(ExecRequest),
    /// Write a file: the host sends `Data` frames then `Eof`; the agent answers
    /// [`Reply::Written`] once the file is complete and synced.
    WriteFile(WriteFileRequest),
    /// Read a file: the agent answers [`Reply::FileInfo`], then `Data` frames, then `Eof`.
    ReadFile(ReadFileRequest),
    /// Open a TCP connection to `127.0.0.1:port` inside the guest. The agent answers
    /// [`Reply::Connected`]; then `Data` flows both ways; `Eof` half-closes.
    Connect(ConnectRequest),
    /// The VM was just restored from a snapshot or resumed: set the clock and
    /// reseed the kernel RNG. Answered by [`Reply::Restored`].
    Restored(RestoredRequest),
    /// Sync disks and power the VM off. Answered by [`Reply::ShuttingDown`] first.
    Shutdown,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; a program without `/` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Environment variables, added to a minimal default environment
    /// (`PATH`, `HOME`, `TERM`) unless `clear_env` is set.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub clear_env: bool,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// When false the process gets `/dev/null` as stdin and host `Data` is refused.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process (SIGKILL) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    pub path: String,
    /// Permission bits (default 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_parents: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredRequest {
    /// Host wall-clock time, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// Fresh host entropy, hex-encoded (at least 32 bytes).
    pub entropy_hex: String,
}

/// Host asks for a signal to be delivered to an exec'd process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    pub signal: i32,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when the process exited normally.
    pub code: Option<i32>,
    /// Signal number, when the process was killed by a signal.
    pub signal: Option<i32>,
    /// True when the agent killed it because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
}

/// Payload of `Reply` frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        uptime_ms: u64,
    },
    Written {
        bytes: u64,
    },
    FileInfo {
        size: u64,
        mode: u32,
    },
    Connected,
    Restored {
        /// Guest wall-clock time before it was set, nanoseconds since the epoch.
        previous_time_ns: u64,
    },
    ShuttingDown,
}

/// Payload of `Error` frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The program, file or directory does not exist.
    NotFound,
    /// Permission denied.
    PermissionDenied,
    /// The request was malformed or not allowed in this state.
    InvalidRequest,
    /// A frame on this stream broke the protocol (oversized, unknown kind, bad JSON).
    Protocol,
    /// Nothing listens on the requested port.
    ConnectionRefused,
    /// Any other failure inside the guest.
    Internal,
}
