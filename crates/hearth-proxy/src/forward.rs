//! Forwarding one request to the guest over HTTP/1.1 on a [`Backend`] stream.
//!
//! Each client connection keeps at most one idle guest connection (the last one
//! whose response body ended), reused by its next request to the same microVM
//! and port; everything else gets a fresh stream.
//!
//! [`Backend`]: crate::backend::Backend

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{
    CONNECTION, EXPECT, HOST, SEC_WEBSOCKET_PROTOCOL, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::timeout;

use crate::body::{empty, error_response, head_len, Meter, Metered, ProxyBody};
use crate::limits::Permit;
use crate::shared::Shared;
use crate::websocket::{self, Offered, BASE_PROTOCOL};

/// The request id header added to the request the app sees and to the response.
pub const REQUEST_ID_HEADER: &str = "x-amzn-requestid";
use crate::backend::ConnectError;

/// What goes to the guest: the client's body, counted.
pub(crate) type UpstreamBody = Metered<Incoming>;
type Sender = SendRequest<UpstreamBody>;

/// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded in either direction.
const HOP_BY_HOP: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];
/// How long a kept guest connection may take to become ready for the next request.
const IDLE_READY_WAIT: Duration = Duration::from_millis(100);
/// Request headers that only address the proxy.
const PROXY_HEADER_PREFIX: &str = "x-aws-proxy-";

/// The idle guest connection a client connection keeps for its next request.
#[derive(Default)]
pub(crate) struct IdleSlot(Mutex<Option<Idle>>);

struct Idle {
    microvm_id: String,
    port: u16,
    sender: Sender,
}

impl IdleSlot {
    /// The idle connection if it goes to this microVM and port and becomes
    /// ready for a request soon.
    async fn take(&self, microvm_id: &str, port: u16) -> Option<Sender> {
        let idle = self.lock().take()?;
        if idle.microvm_id != microvm_id || idle.port != port || idle.sender.is_closed() {
            return None;
        }
        let mut sender = idle.sender;
        // The connection task may still be finishing the previous exchange.
        match timeout(IDLE_READY_WAIT, sender.ready()).await {
            Ok(Ok(())) => Some(sender),
            _ => None,
        }
    }

    fn put(&self, microvm_id: String, port: u16, sender: Sender) {
        *self.lock() = Some(Idle {
            microvm_id,
            port,
            sender,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Idle>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where a request goes.
pub(crate) struct Target<'a> {
    pub microvm_id: &'a str,
    pub port: u16,
    /// The client's subprotocols when the request is a WebSocket upgrade.
    pub websocket: Option<Offered>,
}

/// Sends `req` to the guest and returns the response to give the client.
/// `permit` is held until the response body ends (or, for a WebSocket, until
/// the stream closes).
pub(crate) async fn forward(
    shared: &Arc<Shared>,
    slot: &Arc<IdleSlot>,
    mut req: Request<Incoming>,
    target: Target<'_>,
    permit: Permit,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let Target {
        microvm_id,
        port,
        websocket,
    } = target;
    let meter = Meter::new(Arc::clone(&shared.backend), microvm_id);
    let client_upgrade = websocket.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    meter.add(head_len(
        &parts.headers,
        parts.method.as_str().len()
            + parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + 11,
    ));

    let host = match parts.uri.authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => parts.headers.get(HOST).cloned(),
    };
    prepare_request_headers(&mut parts.headers, websocket.as_ref(), host, request_id);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = Uri::try_from(path) else {
        return error_response(StatusCode::BAD_REQUEST, "Invalid request target");
    };
    let mut upstream = Request::new(Metered::new(body, meter.clone()));
    *upstream.method_mut() = parts.method;
    *upstream.uri_mut() = uri;
    *upstream.version_mut() = Version::HTTP_11;
    *upstream.headers_mut() = parts.headers;

    let exchange = async {
        let (mut sender, reused) = match slot.take(microvm_id, port).await {
            Some(sender) => (sender, true),
            None => (open(shared, microvm_id, port).await?, false),
        };
        match sender.try_send_request(upstream).await {
            Ok(response) => Ok((response, sender)),
            Err(mut e) => match (reused, e.take_message()) {
                // The idle connection was closed before the request went out: use a fresh one.
                (true, Some(upstream)) => {
                    let mut sender = open(shared, microvm_id, port).await?;
                    match sender.send_request(upstream).await {
                        Ok(response) => Ok((response, sender)),
                        Err(e) => Err(bad_response(microvm_id, &e)),
                    }
                }
                _ => Err(bad_response(microvm_id, e.error())),
            },
        }
    };
    let (mut response, sender) = match timeout(shared.config.response_timeout, exchange).await {
        Ok(Ok(exchanged)) => exchanged,
        Ok(Err(response)) => return response,
        Err(_) => {
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "The microVM did not answer in time",
            );
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client_upgrade), Some(offered)) = (client_upgrade, websocket) else {
            tracing::debug!(microvm = microvm_id, "guest switched protocols unasked");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "The microVM returned an invalid response",
            );
        };
        let guest_upgrade = hyper::upgrade::on(&mut response);
        meter.add(head_len(response.headers(), 32));
        let answer = switching_protocols(response.headers(), &offered);
        tokio::spawn(websocket::splice(
            client_upgrade,
            guest_upgrade,
            meter,
            permit,
        ));
        return answer;
    }

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    meter.add(head_len(&parts.headers, 17));
    let mut body = Metered::new(body, meter).with_permit(permit);
    if client_upgrade.is_none() {
        let slot = Arc::clone(slot);
        let microvm_id = microvm_id.to_owned();
        body = body.on_end(move || slot.put(microvm_id, port, sender));
    }
    Response::from_parts(parts, body.boxed_unsync())
}

/// Opens a stream to the guest port and an HTTP/1.1 client connection on it.
async fn open(shared: &Shared, microvm_id: &str, port: u16) -> Result<Sender, Response<ProxyBody>> {
    let io = match timeout(
        shared.config.connect_timeout,
        shared.backend.connect(microvm_id, port),
    )
    .await
    {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            tracing::debug!(microvm = microvm_id, port, "connect failed: {e}");
            let message = match e {
                ConnectError::Refused => format!("Nothing listens on port {port} in the microVM"),
                ConnectError::Unreachable(_) => "The microVM is not reachable".to_owned(),
                ConnectError::ResumeFailed(_) => "The microVM could not be resumed".to_owned(),
                ConnectError::Io(_) => "The connection to the microVM failed".to_owned(),
            };
            return Err(error_response(StatusCode::BAD_GATEWAY, &message));
        }
        Err(_) => {
            tracing::debug!(microvm = microvm_id, port, "connect timed out");
            return Err(error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "The microVM did not answer in time",
            ));
        }
    };
    let (sender, connection) = shared
        .client
        .handshake::<_, UpstreamBody>(TokioIo::new(io))
        .await
        .map_err(|e| bad_response(microvm_id, &e))?;
    let microvm = microvm_id.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(microvm, "guest connection ended: {e}");
        }
    });
    Ok(sender)
}

fn bad_response(microvm_id: &str, e: &hyper::Error) -> Response<ProxyBody> {
    tracing::debug!(microvm = microvm_id, "guest exchange failed: {e}");
    error_response(
        StatusCode::BAD_GATEWAY,
        "The microVM returned an invalid response",
    )
}

/// The headers the app sees: no hop-by-hop or `x-aws-proxy-*` headers, `Host`
/// as the client addressed it, a fresh `x-amzn-requestid`, and for a WebSocket
/// only the app's subprotocols.
fn prepare_request_headers(
    headers: &mut HeaderMap,
    websocket: Option<&Offered>,
    host: Option<HeaderValue>,
    request_id: &HeaderValue,
) {
    strip_hop_by_hop(headers);
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(PROXY_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
    // The proxy already answered any `Expect: 100-continue` by reading the body.
    headers.remove(EXPECT);
    headers.remove(HOST);
    if let Some(host) = host {
        headers.insert(HOST, host);
    }
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
    if let Some(offered) = websocket {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        offered.rewrite(headers);
    }
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TRANSFER_ENCODING, TE, TRAILER, UPGRADE] {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The `101` the client gets: the guest's headers (its `Sec-WebSocket-Accept`
/// and chosen subprotocol), plus `lambda-microvms` as the subprotocol when the
/// client offered it and the app chose none.
fn switching_protocols(guest: &HeaderMap, offered: &Offered) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    *headers = guest.clone();
    strip_hop_by_hop(headers);
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if offered.base && !headers.contains_key(SEC_WEBSOCKET_PROTOCOL) {
        headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(BASE_PROTOCOL),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_lose_proxy_and_hop_headers() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-aws-proxy-auth", "secret"),
            ("x-aws-proxy-port", "9000"),
            ("x-aws-proxy-force-h2", "true"),
            ("connection", "keep-alive, x-private, host"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("expect", "100-continue"),
            ("x-amzn-requestid", "forged"),
            ("host", "a.localhost:9080"),
            ("x-app", "kept"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        let host = headers.get(HOST).cloned();
        let id = HeaderValue::from_static("id-1");
        prepare_request_headers(&mut headers, None, host, &id);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-amzn-requestid", "x-app"]);
        assert_eq!(
            headers.get(HOST),
            Some(&HeaderValue::from_static("a.localhost:9080"))
        );
        assert_eq!(headers.get(REQUEST_ID_HEADER), Some(&id));
        assert_eq!(headers.get_all(REQUEST_ID_HEADER).iter().count(), 1);
    }

    #[test]
    fn switching_protocols_names_base_protocol_only_when_needed() {
        let offered = Offered {
            base: true,
            ..Offered::default()
        };
        let mut guest = HeaderMap::new();
        guest.insert("sec-websocket-accept", HeaderValue::from_static("abc"));
        let response = switching_protocols(&guest, &offered);
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            response.headers().get(SEC_WEBSOCKET_PROTOCOL),
            Some(&HeaderValue::from_static("lambda-microvms"))
        );
        guest.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("chat"));
        let response = switching_protocols(&guest, &offered);
        assert_eq!(
            response.headers().get(SEC_WEBSOCKET_PROTOCOL),
            Some(&HeaderValue::from_static("chat"))
        );
    }
}
