//! Lifecycle hook calls: `POST /aws/lambda-microvms/runtime/v1/<hook>` on the
//! app's hooks port inside the guest, carried over the agent's TCP stream (the
//! guest needs no network interface). The guest's answer is untrusted: only the
//! status line is parsed, and at most [`MAX_RESPONSE`] bytes are read.
//!
//! A request is one HTTP/1.1 exchange with `Connection: close`; hyper would
//! need an `AsyncRead`/`AsyncWrite` adapter over the agent's framed stream for
//! no gain, so the few lines are written here.

use std::time::Duration;

use bytes::Bytes;
use hearth_proto::FrameKind;
use hearth_vm::agent::{AgentClient, AgentError};

/// The most of a hook's response read before its status line must be complete.
const MAX_RESPONSE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("nothing listens on the hooks port {0}")]
    Refused(u16),
    #[error("hook channel failed")]
    Agent(#[source] AgentError),
    #[error("hook invocation timed out after {0:?}")]
    Timeout(Duration),
    #[error("hook answered with a malformed response")]
    Malformed,
}

/// Calls hook `name` (e.g. `ready`) and returns the HTTP status.
pub async fn call(
    agent: &AgentClient,
    port: u16,
    name: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u16, HookError> {
    tokio::time::timeout(timeout, call_inner(agent, port, name, body))
        .await
        .map_err(|_| HookError::Timeout(timeout))?
}

async fn call_inner(
    agent: &AgentClient,
    port: u16,
    name: &str,
    body: Option<&[u8]>,
) -> Result<u16, HookError> {
    let mut stream = agent.connect_tcp(port).await.map_err(|err| {
        if err.remote_kind() == Some(hearth_proto::ErrorKind::ConnectionRefused) {
            HookError::Refused(port)
        } else {
            HookError::Agent(err)
        }
    })?;
    let body = body.unwrap_or_default();
    let mut request = format!(
        "POST /aws/lambda-microvms/runtime/v1/{name} HTTP/1.1\r\nHost: localhost:{port}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    let sender = stream.sender();
    sender
        .send_data(Bytes::from(bytes))
        .await
        .map_err(HookError::Agent)?;
    let mut response = Vec::new();
    loop {
        if let Some(status) = parse_status(&response)? {
            return Ok(status);
        }
        if response.len() > MAX_RESPONSE {
            return Err(HookError::Malformed);
        }
        let frame = stream.recv().await.map_err(HookError::Agent)?;
        match frame.kind {
            FrameKind::Data => response.extend_from_slice(&frame.payload),
            FrameKind::Eof => {
                return parse_status(&response)?.ok_or(HookError::Malformed);
            }
            _ => return Err(HookError::Malformed),
        }
    }
}

/// The status of a response once its status line is complete.
fn parse_status(response: &[u8]) -> Result<Option<u16>, HookError> {
    let Some(end) = response.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&response[..end]).map_err(|_| HookError::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HookError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(HookError::Malformed);
    }
    code.parse::<u16>()
        .ok()
        .filter(|c| (100..600).contains(c))
        .map(Some)
        .ok_or(HookError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 OK\r\n").ok().flatten(),
            Some(200)
        );
        assert_eq!(parse_status(b"HTTP/1.0 503\r\n").ok().flatten(), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 20").ok().flatten(), None);
        assert!(parse_status(b"SSH-2.0-x\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 999 x\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 abc x\r\n").is_err());
        assert!(parse_status(b"\xff\xfe\r\n").is_err());
    }
}
