//! JSON control messages carried in `Hello`, `Open`, `Signal`, `Resize`, `Exit`, `Reply` and
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
    /// Write every dirty page and filesystem journal to disk (sync(2)), so the
    /// host can freeze the disk image in a consistent state. Answered by
    /// [`Reply::Synced`].
    Sync,
    /// Read the app's captured output (see [`AppLogRecord`]) from sequence
    /// number `from`: `Data` frames of newline-separated JSON records, then
    /// `Eof` when not following; a following stream waits for new records
    /// until the host closes it.
    AppLogs(AppLogsRequest),
    /// Forget the captured records numbered below `before` (the build's own
    /// output, before the image snapshot). Answered by [`Reply::AppLogDiscarded`].
    DiscardAppLog(DiscardAppLogRequest),
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
    /// Run the process on a new pseudo-terminal instead of pipes: it becomes a
    /// session leader with the terminal as its controlling tty and its
    /// stdin/stdout/stderr. Output arrives as `Data` frames flagged stdout (one
    /// `Eof` flagged stdout, then `Exit`; no stderr frames); host `Data` is typed
    /// into the terminal, host `Eof` is ignored, `Resize` frames change the
    /// window size. `stdin` is implied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtyRequest>,
}

/// Largest number of columns or rows a pseudo-terminal may have.
pub const MAX_WINDOW_DIMENSION: u16 = 1000;

/// Whether `cols` x `rows` is an acceptable window size (1 to
/// [`MAX_WINDOW_DIMENSION`] each).
pub fn window_size_is_valid(cols: u16, rows: u16) -> bool {
    (1..=MAX_WINDOW_DIMENSION).contains(&cols) && (1..=MAX_WINDOW_DIMENSION).contains(&rows)
}

/// The pseudo-terminal of an exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    /// Initial window size; each from 1 to [`MAX_WINDOW_DIMENSION`].
    pub cols: u16,
    pub rows: u16,
    /// `TERM` for the process (default `xterm-256color`), set even with
    /// `clear_env`; a `TERM` in the request's `env` still wins. Printable ASCII,
    /// at most 128 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
}

/// Payload of `Resize` frames: the new window size of a stream's pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeRequest {
    pub cols: u16,
    pub rows: u16,
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

/// Where the image's app writes its standard output and error inside the
/// guest: FIFOs the agent creates and reads forever (opened read-write, so a
/// writer that goes away never ends the capture and a writer never blocks
/// while the agent runs).
pub const APP_STDOUT_PIPE: &str = "/run/hearth/app.stdout";
pub const APP_STDERR_PIPE: &str = "/run/hearth/app.stderr";
/// Longest line the agent keeps in one record; longer lines are split.
pub const MAX_APP_LOG_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLogsRequest {
    /// First sequence number wanted; older records no longer held are skipped.
    pub from: u64,
    #[serde(default)]
    pub follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscardAppLogRequest {
    pub before: u64,
}

/// Which of the app's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppStream {
    Stdout,
    Stderr,
}

impl AppStream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One line of the app's output, numbered in the order the agent read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLogRecord {
    pub seq: u64,
    /// Guest wall-clock time the line was read, milliseconds since the epoch.
    pub timestamp_ms: u64,
    pub stream: AppStream,
    /// The line without its newline (invalid UTF-8 replaced), at most
    /// [`MAX_APP_LOG_LINE`] bytes.
    pub line: String,
}

/// Why a batch of app log records from the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppLogError {
    #[error("malformed app log record")]
    Malformed,
    #[error("app log line of {0} bytes exceeds the limit")]
    LineTooLong(usize),
    #[error("app log sequence numbers go backwards")]
    OutOfOrder,
}

/// Encodes records as one `Data` payload (newline-terminated JSON records).
pub fn encode_app_log_batch(records: &[AppLogRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        // Our own plain struct: serialising it cannot fail.
        out.extend(serde_json::to_vec(record).unwrap_or_default());
        out.push(b'\n');
    }
    out
}

/// Decodes one `Data` payload of app log records, as the guest (untrusted)
/// sent it: every record well-formed, lines within the limit, sequence
/// numbers strictly increasing.
pub fn decode_app_log_batch(payload: &[u8]) -> Result<Vec<AppLogRecord>, AppLogError> {
    let mut records: Vec<AppLogRecord> = Vec::new();
    for line in payload.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let record: AppLogRecord =
            serde_json::from_slice(line).map_err(|_| AppLogError::Malformed)?;
        if record.line.len() > MAX_APP_LOG_LINE {
            return Err(AppLogError::LineTooLong(record.line.len()));
        }
        if records.last().is_some_and(|last| last.seq >= record.seq) {
            return Err(AppLogError::OutOfOrder);
        }
        records.push(record);
    }
    Ok(records)
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
    Synced,
    AppLogDiscarded {
        /// The sequence number the next captured line will get.
        next_seq: u64,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_without_pty_keeps_the_old_shape() {
        let old = r#"{"op":"exec","argv":["true"],"env":[],"clear_env":false,"cwd":null,"uid":null,"gid":null,"stdin":false,"timeout_ms":null}"#;
        let parsed: Request = serde_json::from_str(old).expect("old request");
        let Request::Exec(exec) = &parsed else {
            panic!("not an exec: {parsed:?}");
        };
        assert_eq!(exec.pty, None);
        assert_eq!(serde_json::to_string(&parsed).expect("json"), old);
    }

    #[test]
    fn exec_with_pty_round_trips() {
        let request = Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-i".into()],
            pty: Some(PtyRequest {
                cols: 120,
                rows: 40,
                term: Some("vt100".into()),
            }),
            ..ExecRequest::default()
        });
        let json = serde_json::to_value(&request).expect("json");
        assert_eq!(
            json["pty"],
            serde_json::json!({"cols": 120, "rows": 40, "term": "vt100"})
        );
        let back: Request = serde_json::from_value(json).expect("parse");
        assert_eq!(back, request);

        let minimal: Request =
            serde_json::from_str(r#"{"op":"exec","argv":["sh"],"pty":{"cols":80,"rows":24}}"#)
                .expect("minimal pty request");
        let Request::Exec(exec) = minimal else {
            panic!("not an exec");
        };
        assert_eq!(
            exec.pty,
            Some(PtyRequest {
                cols: 80,
                rows: 24,
                term: None
            })
        );
    }

    #[test]
    fn app_log_batches_round_trip_and_refuse_hostile_input() {
        let records = vec![
            AppLogRecord {
                seq: 4,
                timestamp_ms: 1_700_000_000_000,
                stream: AppStream::Stdout,
                line: "hello \"world\"".into(),
            },
            AppLogRecord {
                seq: 9,
                timestamp_ms: 1_700_000_000_001,
                stream: AppStream::Stderr,
                line: String::new(),
            },
        ];
        let payload = encode_app_log_batch(&records);
        assert_eq!(decode_app_log_batch(&payload), Ok(records.clone()));
        assert_eq!(decode_app_log_batch(b""), Ok(Vec::new()));
        assert_eq!(
            decode_app_log_batch(b"{\"seq\":1}\n"),
            Err(AppLogError::Malformed)
        );
        let mut backwards = records.clone();
        backwards.reverse();
        assert_eq!(
            decode_app_log_batch(&encode_app_log_batch(&backwards)),
            Err(AppLogError::OutOfOrder)
        );
        let long = AppLogRecord {
            line: "x".repeat(MAX_APP_LOG_LINE + 1),
            ..records[0].clone()
        };
        assert_eq!(
            decode_app_log_batch(&encode_app_log_batch(&[long])),
            Err(AppLogError::LineTooLong(MAX_APP_LOG_LINE + 1))
        );
        let request: Request =
            serde_json::from_str(r#"{"op":"app_logs","from":3}"#).expect("request");
        assert_eq!(
            request,
            Request::AppLogs(AppLogsRequest {
                from: 3,
                follow: false
            })
        );
    }

    #[test]
    fn resize_shape_and_bounds() {
        let resize = ResizeRequest {
            cols: 100,
            rows: 30,
        };
        assert_eq!(
            serde_json::to_string(&resize).expect("json"),
            r#"{"cols":100,"rows":30}"#
        );
        assert!(serde_json::from_str::<ResizeRequest>(r#"{"cols":-1,"rows":3}"#).is_err());
        assert!(serde_json::from_str::<ResizeRequest>(r#"{"cols":70000,"rows":3}"#).is_err());
        assert!(window_size_is_valid(1, 1));
        assert!(window_size_is_valid(
            MAX_WINDOW_DIMENSION,
            MAX_WINDOW_DIMENSION
        ));
        assert!(!window_size_is_valid(0, 24));
        assert!(!window_size_is_valid(80, 0));
        assert!(!window_size_is_valid(1001, 24));
        assert!(!window_size_is_valid(80, 1001));
    }
}
