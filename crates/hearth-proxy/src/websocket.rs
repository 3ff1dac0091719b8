//! WebSocket upgrades: the `lambda-microvms*` subprotocols, and splicing the two
//! upgraded streams once the guest has answered `101`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{CONNECTION, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::Meter;
use crate::limits::Permit;

/// Marks a client as speaking the proxy's subprotocol convention; echoed back
/// when the app picks no subprotocol, since browsers fail a handshake that
/// offered subprotocols and got none.
pub(crate) const BASE_PROTOCOL: &str = "lambda-microvms";
const AUTH_PREFIX: &str = "lambda-microvms.authentication.";
const PORT_PREFIX: &str = "lambda-microvms.port.";

/// What a client offered in `Sec-WebSocket-Protocol`, split into the proxy's
/// subprotocols and the app's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Offered {
    /// From `lambda-microvms.authentication.<token>`.
    pub token: Option<String>,
    /// The text after `lambda-microvms.port.` (validated later).
    pub port: Option<String>,
    /// Whether the bare `lambda-microvms` was offered.
    pub base: bool,
    /// Everything else, in order: these reach the app.
    pub app: Vec<String>,
}

impl Offered {
    pub(crate) fn parse(headers: &HeaderMap) -> Offered {
        let mut offered = Offered::default();
        let values = headers
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok());
        for item in values
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if item == BASE_PROTOCOL {
                offered.base = true;
            } else if let Some(token) = item.strip_prefix(AUTH_PREFIX) {
                offered.token.get_or_insert_with(|| token.to_owned());
            } else if let Some(port) = item.strip_prefix(PORT_PREFIX) {
                offered.port.get_or_insert_with(|| port.to_owned());
            } else if item.starts_with(BASE_PROTOCOL) {
                // Another `lambda-microvms...` name: ours, so it never reaches the app.
            } else {
                offered.app.push(item.to_owned());
            }
        }
        offered
    }

    /// Replaces the request's `Sec-WebSocket-Protocol` with the app's subprotocols only.
    pub(crate) fn rewrite(&self, headers: &mut HeaderMap) {
        headers.remove(SEC_WEBSOCKET_PROTOCOL);
        if self.app.is_empty() {
            return;
        }
        if let Ok(value) = HeaderValue::from_str(&self.app.join(", ")) {
            headers.insert(SEC_WEBSOCKET_PROTOCOL, value);
        }
    }
}

/// An HTTP/1.1 `GET` asking for `Upgrade: websocket` (WebSocket over HTTP/2,
/// RFC 8441, is not supported: such requests are forwarded as plain requests).
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && has_token(req.headers(), CONNECTION, "upgrade")
        && has_token(req.headers(), UPGRADE, "websocket")
}

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Waits for both sides to finish upgrading, then copies bytes both ways until
/// either side closes, counting them. `permit` holds the microVM's connection
/// slot for the stream's lifetime.
pub(crate) async fn splice(client: OnUpgrade, guest: OnUpgrade, meter: Meter, permit: Permit) {
    let (client, guest) = tokio::join!(client, guest);
    let (client, guest) = match (client, guest) {
        (Ok(client), Ok(guest)) => (client, guest),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(microvm = %meter.microvm_id(), "websocket upgrade failed: {e}");
            return;
        }
    };
    let mut client = Counted::new(TokioIo::new(client), meter.clone());
    let mut guest = Counted::new(TokioIo::new(guest), meter);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut guest).await {
        tracing::debug!("websocket stream ended: {e}");
    }
    drop(permit);
}

/// A stream that reports every byte read from it to a [`Meter`].
struct Counted<T> {
    inner: T,
    meter: Meter,
}

impl<T> Counted<T> {
    fn new(inner: T, meter: Meter) -> Self {
        Counted { inner, meter }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.meter.add(read as u64);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered(values: &[&'static str]) -> Offered {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(value));
        }
        Offered::parse(&headers)
    }

    #[test]
    fn splits_subprotocols() {
        let o = offered(&[
            "lambda-microvms, lambda-microvms.authentication.hm1.abc.def",
            "lambda-microvms.port.9000 , chat.v2",
            "lambda-microvms.other, ,graphql-ws",
        ]);
        assert!(o.base);
        assert_eq!(o.token.as_deref(), Some("hm1.abc.def"));
        assert_eq!(o.port.as_deref(), Some("9000"));
        assert_eq!(o.app, vec!["chat.v2".to_owned(), "graphql-ws".to_owned()]);

        let mut headers = HeaderMap::new();
        headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("x"));
        o.rewrite(&mut headers);
        assert_eq!(headers.get_all(SEC_WEBSOCKET_PROTOCOL).iter().count(), 1);
        assert_eq!(
            headers.get(SEC_WEBSOCKET_PROTOCOL),
            Some(&HeaderValue::from_static("chat.v2, graphql-ws"))
        );

        let only_ours = offered(&["lambda-microvms", "lambda-microvms.authentication.t"]);
        only_ours.rewrite(&mut headers);
        assert!(headers.get(SEC_WEBSOCKET_PROTOCOL).is_none());
    }

    #[test]
    fn first_token_and_port_win() {
        let o = offered(&["lambda-microvms.authentication.a, lambda-microvms.authentication.b"]);
        assert_eq!(o.token.as_deref(), Some("a"));
        assert!(!o.base);
    }
}
