//! A small typed client for the QEMU Machine Protocol (QMP) over a Unix socket.
//!
//! QMP is line-delimited JSON: a greeting, then `qmp_capabilities`, then commands
//! answered by `{"return": ...}` or `{"error": ...}`, interleaved with asynchronous
//! `{"event": ...}` messages, which this client skips. Only the commands hearth uses
//! are typed here; each has a method so callers never build JSON by hand.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP line accepted; QEMU's answers to our commands are far smaller.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket")]
    Connect(#[source] std::io::Error),
    #[error("QMP connection failed")]
    Io(#[source] std::io::Error),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("QMP sent malformed JSON")]
    Malformed(#[source] serde_json::Error),
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("migration {0}")]
    MigrationFailed(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// VM run state as reported by `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub status: String,
    pub running: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct MigrationInfo {
    #[serde(default)]
    status: Option<String>,
    #[serde(rename = "error-desc", default)]
    error_desc: Option<String>,
}

/// A connected QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await.map_err(QmpError::Connect)?;
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(read),
            writer,
            line: Vec::with_capacity(4096),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Closed);
        }
        qmp.execute::<Value>("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Connects, retrying while the socket does not accept yet (QEMU starting).
    pub async fn connect_with_retry(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(path).await {
                Ok(qmp) => return Ok(qmp),
                Err(QmpError::Connect(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if n > MAX_LINE {
            return Err(QmpError::LineTooLong);
        }
        serde_json::from_slice(&self.line).map_err(QmpError::Malformed)
    }

    /// Runs one command and decodes its `return` value.
    pub async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&request).map_err(QmpError::Malformed)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(QmpError::Io)?;
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(value) = message.get("return") {
                return serde_json::from_value(value.clone()).map_err(QmpError::Malformed);
            }
            if let Some(error) = message.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
        }
    }

    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute::<Value>("stop", None).await.map(drop)
    }

    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute::<Value>("cont", None).await.map(drop)
    }

    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute::<Value>("quit", None).await {
            // QEMU may close the socket before or after answering.
            Ok(_) | Err(QmpError::Closed) | Err(QmpError::Io(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    pub async fn query_status(&mut self) -> Result<Status, QmpError> {
        self.execute("query-status", None).await
    }

    /// Sets the `x-ignore-shared` migration capability: when on, RAM blocks backed
    /// by a shared named file are left out of the migration stream.
    pub async fn set_ignore_shared(&mut self, on: bool) -> Result<(), QmpError> {
        self.set_capability("x-ignore-shared", on).await
    }

    /// Turns `mapped-ram` on or off: a `file:` stream with each RAM page at a
    /// fixed offset and zero pages left out, loaded by reading only the
    /// pages present (QEMU 9.0+).
    pub async fn set_mapped_ram(&mut self, on: bool) -> Result<(), QmpError> {
        self.set_capability("mapped-ram", on).await
    }

    /// Turns migration capability `name` on or off.
    async fn set_capability(&mut self, name: &str, on: bool) -> Result<(), QmpError> {
        self.execute::<Value>(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": name, "state": on}]})),
        )
        .await
        .map(drop)
    }

    /// Lifts the migration bandwidth cap (QEMU's default is 128 MiB/s, meant for
    /// live migration over a network; a stopped VM written to a local file
    /// should go as fast as the disk takes it).
    pub async fn set_unlimited_bandwidth(&mut self) -> Result<(), QmpError> {
        self.execute::<Value>(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": i64::MAX / 2 })),
        )
        .await
        .map(drop)
    }

    /// Starts an outgoing migration to `uri` and waits for it to complete.
    pub async fn migrate_and_wait(&mut self, uri: &str, timeout: Duration) -> Result<(), QmpError> {
        self.set_unlimited_bandwidth().await?;
        self.execute::<Value>("migrate", Some(json!({ "uri": uri })))
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            let info: MigrationInfo = self.execute("query-migrate", None).await?;
            match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(QmpError::MigrationFailed(
                        info.error_desc.unwrap_or_else(|| "failed".into()),
                    ))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(QmpError::Timeout("outgoing migration"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Loads an incoming migration from `uri` (QEMU started with `-incoming defer`)
    /// and waits until the VM state is loaded (status leaves `inmigrate`).
    pub async fn migrate_incoming_and_wait(
        &mut self,
        uri: &str,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        self.execute::<Value>("migrate-incoming", Some(json!({ "uri": uri })))
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.query_status().await?;
            if status.status != "inmigrate" {
                let info: MigrationInfo = self.execute("query-migrate", None).await?;
                return match info.status.as_deref() {
                    Some("failed") => Err(QmpError::MigrationFailed(
                        info.error_desc.unwrap_or_else(|| "failed".into()),
                    )),
                    _ => Ok(()),
                };
            }
            if Instant::now() > deadline {
                return Err(QmpError::Timeout("incoming migration"));
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
    }
}
