//! The distribution API's client side: GETs against `/v2/<name>/...` with the
//! registry's authentication (anonymous first; on a 401, a Bearer token from the
//! challenge's realm, with basic credentials when configured, or Basic auth),
//! redirects followed (credentials only ever go to the registry itself).

use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use http::{Method, Response, StatusCode, Uri};
use hyper::body::Incoming;

use crate::transport::{is_redirect, read_body, resolve_location, HttpClient, HttpError};

const MAX_REDIRECTS: usize = 5;
/// Cap on error and token bodies.
const SMALL_BODY: u64 = 64 * 1024;

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry request failed")]
    Http(#[from] HttpError),
    #[error("invalid registry host {0:?}")]
    InvalidHost(String),
    #[error("{0} not found in the registry")]
    NotFound(String),
    #[error("registry answered {status} for {what}{}", code_suffix(.code))]
    Status {
        what: String,
        status: u16,
        code: Option<String>,
    },
    #[error("registry refused access to {0}")]
    Unauthorized(String),
    #[error("registry asks for credentials and none are configured")]
    CredentialsRequired,
    #[error("unsupported authentication challenge {0:?}")]
    Challenge(String),
    #[error("token service answered {0}")]
    TokenStatus(u16),
    #[error("token service gave no token")]
    TokenMissing,
    #[error("too many redirects for {0}")]
    TooManyRedirects(String),
    #[error("redirect without a usable Location for {0}")]
    BadRedirect(String),
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
}

/// Basic credentials.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl Credentials {
    fn basic(&self) -> Option<HeaderValue> {
        let raw = format!("{}:{}", self.username, self.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

/// One repository on one registry.
pub(crate) struct Registry {
    http: HttpClient,
    base: Uri,
    repository: String,
    credentials: Option<Credentials>,
    auth: Mutex<Option<HeaderValue>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub(crate) fn new(
        host: &str,
        insecure_http: bool,
        repository: &str,
        credentials: Option<Credentials>,
    ) -> Result<Self, RegistryError> {
        let scheme = if insecure_http { "http" } else { "https" };
        let base: Uri = format!("{scheme}://{host}/")
            .parse()
            .map_err(|_| RegistryError::InvalidHost(host.to_owned()))?;
        if base.authority().map(|a| a.as_str()) != Some(host) {
            return Err(RegistryError::InvalidHost(host.to_owned()));
        }
        Ok(Registry {
            http: HttpClient::new(insecure_http)?,
            base,
            repository: repository.to_owned(),
            credentials,
            auth: Mutex::new(None),
        })
    }

    pub(crate) fn host(&self) -> &str {
        self.base.authority().map_or("", |a| a.as_str())
    }

    pub(crate) fn repository(&self) -> &str {
        &self.repository
    }

    fn current_auth(&self) -> Option<HeaderValue> {
        self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_auth(&self, value: HeaderValue) {
        *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    }

    /// `GET /v2/<repository>/<path>`; `what` names the object in errors.
    /// Returns a 2xx response whose body is still to be read.
    pub(crate) async fn get(
        &self,
        path: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut url: Uri = format!("{}v2/{}/{}", self.base, self.repository, path)
            .parse()
            .map_err(|_| HttpError::InvalidUrl(path.to_owned()))?;
        let mut authenticated = false;
        let mut redirects = 0;
        loop {
            let to_registry =
                url.scheme() == self.base.scheme() && url.authority() == self.base.authority();
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                if let Ok(value) = HeaderValue::from_str(accept) {
                    headers.insert(ACCEPT, value);
                }
            }
            if to_registry {
                if let Some(auth) = self.current_auth() {
                    headers.insert(AUTHORIZATION, auth);
                }
            }
            let response = self
                .http
                .send(Method::GET, &url, &headers, Bytes::new())
                .await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && to_registry && !authenticated {
                authenticated = true;
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                drop(response);
                self.authenticate(&challenge).await?;
                continue;
            }
            if is_redirect(status) {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(RegistryError::TooManyRedirects(what.to_owned()));
                }
                let location = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| resolve_location(&url, l))
                    .ok_or_else(|| RegistryError::BadRedirect(what.to_owned()))?;
                url = location;
                continue;
            }
            if status.is_success() {
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(RegistryError::Unauthorized(what.to_owned()));
            }
            let host = url.authority().map_or("", |a| a.as_str()).to_owned();
            let code = read_body(response, &host, SMALL_BODY)
                .await
                .ok()
                .and_then(|body| error_code(&body));
            if status == StatusCode::NOT_FOUND {
                return Err(RegistryError::NotFound(what.to_owned()));
            }
            return Err(RegistryError::Status {
                what: what.to_owned(),
                status: status.as_u16(),
                code,
            });
        }
    }

    /// Answers a `WWW-Authenticate` challenge by storing the header later
    /// requests to the registry carry.
    async fn authenticate(&self, challenge: &str) -> Result<(), RegistryError> {
        let Some((scheme, params)) = parse_challenge(challenge) else {
            return Err(RegistryError::Challenge(challenge.to_owned()));
        };
        let param = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_str())
        };
        if scheme.eq_ignore_ascii_case("basic") {
            let value = self
                .credentials
                .as_ref()
                .and_then(Credentials::basic)
                .ok_or(RegistryError::CredentialsRequired)?;
            self.set_auth(value);
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(RegistryError::Challenge(challenge.to_owned()));
        }
        let realm = param("realm").ok_or_else(|| RegistryError::Challenge(challenge.to_owned()))?;
        let default_scope = format!("repository:{}:pull", self.repository);
        // The serializer is not Send: finish it before the next await.
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if let Some(service) = param("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", param("scope").unwrap_or(&default_scope));
            query.finish()
        };
        let separator = if realm.contains('?') { '&' } else { '?' };
        let url: Uri = format!("{realm}{separator}{query}")
            .parse()
            .map_err(|_| RegistryError::Challenge(challenge.to_owned()))?;
        let mut headers = HeaderMap::new();
        if let Some(basic) = self.credentials.as_ref().and_then(Credentials::basic) {
            headers.insert(AUTHORIZATION, basic);
        }
        let response = self
            .http
            .send(Method::GET, &url, &headers, Bytes::new())
            .await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized(format!(
                "token for {}",
                self.repository
            )));
        }
        if !status.is_success() {
            return Err(RegistryError::TokenStatus(status.as_u16()));
        }
        let host = url.authority().map_or("", |a| a.as_str()).to_owned();
        let body = read_body(response, &host, SMALL_BODY).await?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token =
            serde_json::from_slice(&body).map_err(|_| RegistryError::TokenMissing)?;
        let token = token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty())
            .ok_or(RegistryError::TokenMissing)?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| RegistryError::TokenMissing)?;
        value.set_sensitive(true);
        self.set_auth(value);
        Ok(())
    }
}

/// The first error code of a distribution API error body
/// (`{"errors":[{"code":"MANIFEST_UNKNOWN",...}]}`).
fn error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        code: String,
    }
    let errors: Errors = serde_json::from_slice(body).ok()?;
    errors.errors.into_iter().next().map(|e| e.code)
}

/// Parses `Scheme key="value", key=value, ...` (the first challenge only).
pub(crate) fn parse_challenge(header: &str) -> Option<(String, Vec<(String, String)>)> {
    let header = header.trim();
    let (scheme, mut rest) = match header.split_once(char::is_whitespace) {
        Some((scheme, rest)) => (scheme, rest),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if rest.is_empty() {
            break;
        }
        let (key, after) = rest.split_once('=')?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            // The start of a second challenge: stop at the first.
            break;
        }
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.push((key.to_owned(), value));
        rest = remaining;
    }
    Some((scheme.to_owned(), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull""#,
        )
        .expect("challenge");
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            params,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:library/python:pull".into()),
            ]
        );
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#).expect("basic");
        assert_eq!(scheme, "Basic");
        assert_eq!(params, vec![("realm".into(), "Registry Realm".into())]);
        let (_, params) =
            parse_challenge(r#"Bearer realm=http://h/t, scope="a\"b", error="invalid_token""#)
                .expect("unquoted");
        assert_eq!(params[0], ("realm".into(), "http://h/t".into()));
        assert_eq!(params[1], ("scope".into(), "a\"b".into()));
        assert_eq!(parse_challenge("Bearer"), Some(("Bearer".into(), vec![])));
        assert_eq!(parse_challenge(""), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
    }

    #[test]
    fn reads_error_codes() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        assert_eq!(error_code(body).as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(error_code(b"not json"), None);
    }

    #[test]
    fn refuses_bad_hosts() {
        assert!(Registry::new("127.0.0.1:5000", true, "a", None).is_ok());
        assert!(matches!(
            Registry::new("a/b", true, "a", None),
            Err(RegistryError::InvalidHost(_))
        ));
        assert!(matches!(
            Registry::new("", true, "a", None),
            Err(RegistryError::InvalidHost(_))
        ));
    }
}
