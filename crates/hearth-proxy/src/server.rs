//! Accepting client connections and deciding what each request gets.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::auth::{self, Token};
use crate::backend::{Access, Backend, Denied};
use crate::body::{error_response, ProxyBody};
use crate::config::ProxyConfig;
use crate::extension::{ExtensionRequest, ExtensionRoute, RESERVED_PREFIX, SHELL_PATH};
use crate::forward::REQUEST_ID_HEADER;
use crate::forward::{self, IdleSlot, Target};
use crate::host;
use crate::limits::{Exceeded, Limiter};
use crate::shared::Shared;
use crate::websocket::{self, Offered};

/// Why [`serve`] or [`serve_tls`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy configuration: {0}")]
    Config(&'static str),
    #[error("cannot accept connections")]
    Accept(#[source] std::io::Error),
}

/// hyper refuses buffer limits below this.
const MIN_BUFFER: usize = 8192;
/// HTTP/2 streams per client connection.
const MAX_H2_STREAMS: u32 = 128;

/// Serves plain-TCP clients (HTTP/1.1, and HTTP/2 with prior knowledge) on
/// `listener` until the listener fails for good; drop the future to stop.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    config: ProxyConfig,
) -> Result<(), ProxyError> {
    run(listener, backend, config, None).await
}

/// Serves TLS clients on `listener`; HTTP/2 is chosen by ALPN, so `tls` should
/// offer `h2` and `http/1.1` (as [`crate::tls::server_config`] does).
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    backend: Arc<dyn Backend>,
    config: ProxyConfig,
) -> Result<(), ProxyError> {
    run(listener, backend, config, Some(TlsAcceptor::from(tls))).await
}

async fn run(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    mut config: ProxyConfig,
    tls: Option<TlsAcceptor>,
) -> Result<(), ProxyError> {
    if !host::is_valid_domain(&config.domain) {
        return Err(ProxyError::Config("the endpoint domain is not a DNS name"));
    }
    if config.default_port == 0 {
        return Err(ProxyError::Config("the default port is 0"));
    }
    config.domain = config.domain.trim_end_matches('.').to_ascii_lowercase();
    let mut client = http1::Builder::new();
    client.max_header_size(config.max_response_header_bytes.max(1024));
    let http = Arc::new(server_builder(&config));
    let connections = Arc::new(Semaphore::new(config.max_client_connections.max(1)));
    let shared = Arc::new(Shared {
        backend,
        limiter: Limiter::new(config.limits),
        config,
        client,
    });
    loop {
        let Ok(permit) = Arc::clone(&connections).acquire_owned().await else {
            return Ok(());
        };
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) if is_fatal(&e) => return Err(ProxyError::Accept(e)),
            Err(e) => {
                // Out of descriptors or memory, or a connection that died while
                // queued: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        tokio::spawn(connection(
            Arc::clone(&shared),
            Arc::clone(&http),
            tls.clone(),
            stream,
            permit,
        ));
    }
}

/// Accept errors that say the listener itself is unusable.
fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

fn server_builder(config: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_request_header_bytes.max(MIN_BUFFER))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_request_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

async fn connection(
    shared: Arc<Shared>,
    http: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
) {
    let Some(acceptor) = tls else {
        return serve_io(shared, &http, stream).await;
    };
    match timeout(shared.config.tls_handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_io(shared, &http, stream).await,
        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

async fn serve_io<I>(shared: Arc<Shared>, http: &auto::Builder<TokioExecutor>, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot = Arc::new(IdleSlot::default());
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        let slot = Arc::clone(&slot);
        async move { Ok::<_, Infallible>(handle(&shared, &slot, req).await) }
    });
    if let Err(e) = http
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!("client connection ended: {e}");
    }
}

/// Every response, the proxy's own included, carries the request id.
async fn handle(
    shared: &Arc<Shared>,
    slot: &Arc<IdleSlot>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let request_id = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-0000-0000-000000000000"));
    let mut response = route(shared, slot, req, &request_id).await;
    response.headers_mut().insert(REQUEST_ID_HEADER, request_id);
    response
}

/// Host → reserved paths → port → token → authorize → limits → forward.
async fn route(
    shared: &Arc<Shared>,
    slot: &Arc<IdleSlot>,
    req: Request<Incoming>,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let host = match request_host(&req) {
        Ok(host) => host,
        Err((status, message)) => return error_response(status, message),
    };
    let Some(microvm_id) = host::microvm_id(&host, &shared.config.domain) else {
        return error_response(StatusCode::NOT_FOUND, "No microVM endpoint at this host");
    };
    if req.method() == Method::CONNECT {
        return error_response(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
    }
    let is_websocket = websocket::is_upgrade(&req);
    let offered = if is_websocket {
        Offered::parse(req.headers())
    } else {
        Offered::default()
    };
    let token = auth::token(req.headers(), &offered);
    let path = req.uri().path();
    if path.starts_with(RESERVED_PREFIX) || path == RESERVED_PREFIX.trim_end_matches('/') {
        let token = match token {
            Token::Present(token) => Some(token),
            Token::Missing | Token::Invalid => None,
        };
        return extension(shared, ExtensionRoute::Reserved, microvm_id, token, req).await;
    }
    let Ok(port) = auth::port(req.headers(), &offered, shared.config.default_port) else {
        return error_response(StatusCode::BAD_REQUEST, "Invalid X-aws-proxy-port header");
    };
    let token = match token {
        Token::Present(token) => token,
        // Refused here, so tokenless traffic never reaches the backend (nor wakes a VM).
        Token::Missing => {
            return error_response(StatusCode::FORBIDDEN, "Missing authentication token")
        }
        Token::Invalid => {
            return error_response(StatusCode::FORBIDDEN, "Invalid authentication token")
        }
    };
    if is_websocket
        && path == SHELL_PATH
        && shared.config.extension.is_some()
        && shared
            .backend
            .authorize(&microvm_id, &token, Access::Shell)
            .await
            .is_ok()
    {
        return extension(shared, ExtensionRoute::Shell, microvm_id, Some(token), req).await;
    }
    match shared
        .backend
        .authorize(&microvm_id, &token, Access::Port(port))
        .await
    {
        Ok(()) => {}
        Err(Denied::Forbidden(message)) => return error_response(StatusCode::FORBIDDEN, &message),
        Err(Denied::NotFound) => return error_response(StatusCode::NOT_FOUND, "MicroVM not found"),
    }
    let permit = match shared.limiter.acquire(&microvm_id) {
        Ok(permit) => permit,
        Err(Exceeded::Connections) => {
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many connections to the microVM",
            );
        }
        Err(Exceeded::Rate) => {
            return error_response(StatusCode::TOO_MANY_REQUESTS, "Rate exceeded")
        }
    };
    let target = Target {
        microvm_id: &microvm_id,
        port,
        websocket: is_websocket.then_some(offered),
    };
    forward::forward(shared, slot, req, target, permit, request_id).await
}

/// The host a request addresses: the URI's authority (HTTP/2 `:authority`, or
/// an HTTP/1.1 absolute-form target), else the one `Host` header.
fn request_host<B>(req: &Request<B>) -> Result<String, (StatusCode, &'static str)> {
    if let Some(authority) = req.uri().authority() {
        return Ok(authority.as_str().to_owned());
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => host
            .to_str()
            .map(str::to_owned)
            .map_err(|_| (StatusCode::BAD_REQUEST, "Invalid Host header")),
        (None, _) => Err((StatusCode::NOT_FOUND, "No microVM endpoint at this host")),
        (Some(_), Some(_)) => Err((StatusCode::BAD_REQUEST, "More than one Host header")),
    }
}

async fn extension(
    shared: &Shared,
    route: ExtensionRoute,
    microvm_id: String,
    token: Option<String>,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    match &shared.config.extension {
        Some(handler) => {
            handler
                .handle(ExtensionRequest {
                    microvm_id,
                    route,
                    token,
                    request,
                })
                .await
        }
        None => error_response(StatusCode::NOT_FOUND, "Not found"),
    }
}
