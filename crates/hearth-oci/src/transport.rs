//! A small HTTP/1.1 client on hyper: one connection per request (a pull makes
//! a handful), HTTPS through rustls with the webpki roots, timeouts on connect,
//! on the response head and between body chunks.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, HOST, USER_AGENT};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the next chunk of a body.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot set up TLS")]
    TlsConfig(#[source] rustls::Error),
    #[error("invalid URL {0:?}")]
    InvalidUrl(String),
    #[error("plain HTTP to {0} is not allowed (insecure_http is off)")]
    InsecureRefused(String),
    #[error("cannot connect to {host}")]
    Connect {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out talking to {0}")]
    Timeout(String),
    #[error("TLS handshake with {host} failed")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {host} failed")]
    Protocol {
        host: String,
        #[source]
        source: hyper::Error,
    },
    #[error("response body from {0} is larger than {1} bytes")]
    BodyTooLarge(String, u64),
}

/// What a request needs to know about TLS.
#[derive(Clone)]
pub(crate) struct HttpClient {
    tls: tokio_rustls::TlsConnector,
    allow_http: bool,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// `allow_http`: whether `http://` URLs may be used at all.
    pub(crate) fn new(allow_http: bool) -> Result<Self, HttpError> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(HttpError::TlsConfig)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpClient {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            allow_http,
        })
    }

    /// Sends one request and returns the response head; the body streams from
    /// the returned [`Incoming`].
    pub(crate) async fn send(
        &self,
        method: Method,
        url: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, HttpError> {
        let invalid = || HttpError::InvalidUrl(url.to_string());
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid()),
        };
        let authority = url.authority().ok_or_else(invalid)?;
        if !https && !self.allow_http {
            return Err(HttpError::InsecureRefused(authority.to_string()));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = url.path_and_query().map_or("/", |p| p.as_str());

        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(body))
            .map_err(|_| invalid())?;
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| invalid())?;
        request.headers_mut().insert(HOST, host_header);
        request
            .headers_mut()
            .insert(USER_AGENT, HeaderValue::from_static("hearth-oci/0.1"));
        for (name, value) in headers {
            request.headers_mut().insert(name, value.clone());
        }

        let name = authority.to_string();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| HttpError::Timeout(name.clone()))?
            .map_err(|source| HttpError::Connect {
                host: name.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        if https {
            let server_name =
                rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|_| invalid())?;
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(server_name, tcp))
                .await
                .map_err(|_| HttpError::Timeout(name.clone()))?
                .map_err(|source| HttpError::Tls {
                    host: name.clone(),
                    source,
                })?;
            exchange(tls, request, name).await
        } else {
            exchange(tcp, request, name).await
        }
    }
}

async fn exchange<S>(
    io: S,
    request: Request<Full<Bytes>>,
    name: String,
) -> Result<Response<Incoming>, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = |source| HttpError::Protocol {
        host: name.clone(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(protocol)?;
    // The connection is driven until the response body has been read (or
    // dropped); its own errors surface through the body.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| HttpError::Timeout(name.clone()))?
        .map_err(protocol)
}

/// The next chunk of `body`, or `None` at its end.
pub(crate) async fn next_chunk(
    body: &mut Incoming,
    host: &str,
) -> Result<Option<Bytes>, HttpError> {
    loop {
        let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame())
            .await
            .map_err(|_| HttpError::Timeout(host.to_owned()))?;
        match frame {
            None => return Ok(None),
            Some(Err(source)) => {
                return Err(HttpError::Protocol {
                    host: host.to_owned(),
                    source,
                })
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads a whole body of at most `limit` bytes.
pub(crate) async fn read_body(
    response: Response<Incoming>,
    host: &str,
    limit: u64,
) -> Result<Bytes, HttpError> {
    let mut body = response.into_body();
    let mut out = BytesMut::new();
    while let Some(chunk) = next_chunk(&mut body, host).await? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(HttpError::BodyTooLarge(host.to_owned(), limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// Whether `status` is a redirect that carries a `Location`.
pub(crate) fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Resolves a `Location` header against the URL it answered.
pub(crate) fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().ok();
    }
    let scheme = base.scheme_str()?;
    let authority = base.authority()?;
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}").parse().ok();
    }
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}").parse().ok();
    }
    let dir = base.path().rsplit_once('/').map_or("", |(dir, _)| dir);
    format!("{scheme}://{authority}{dir}/{location}")
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_locations() {
        let base: Uri = "http://127.0.0.1:5000/v2/a/blobs/sha256:x"
            .parse()
            .expect("uri");
        let r = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(r("/v2/b").as_deref(), Some("http://127.0.0.1:5000/v2/b"));
        assert_eq!(
            r("https://cdn.example/x?y=1").as_deref(),
            Some("https://cdn.example/x?y=1")
        );
        assert_eq!(
            r("//cdn.example/x").as_deref(),
            Some("http://cdn.example/x")
        );
        assert_eq!(
            r("other").as_deref(),
            Some("http://127.0.0.1:5000/v2/a/blobs/other")
        );
    }

    #[tokio::test]
    async fn refuses_plain_http_unless_allowed() {
        let client = HttpClient::new(false).expect("client");
        let url: Uri = "http://127.0.0.1:1/v2/".parse().expect("uri");
        let err = client
            .send(Method::GET, &url, &HeaderMap::new(), Bytes::new())
            .await
            .expect_err("refused");
        assert!(matches!(err, HttpError::InsecureRefused(_)), "{err:?}");
    }
}
