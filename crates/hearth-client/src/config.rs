//! Where the client connects and with which keys, by the AWS conventions:
//! flags, then the environment, then an AWS profile named explicitly
//! (`--profile`, `AWS_PROFILE`), then hearth's config file, then the
//! `default` AWS profile, then defaults. (The implicit `default` profile
//! comes after hearth's own file so that `hearth configure` is not overridden
//! by keys kept for AWS itself.)
//!
//! - endpoint: `--endpoint-url`, `HEARTH_ENDPOINT_URL`,
//!   `AWS_ENDPOINT_URL_LAMBDA_MICROVMS`, `AWS_ENDPOINT_URL`, then the
//!   profile's `services` block (`lambda_microvms = \n  endpoint_url = ...`)
//!   and its `endpoint_url`, the config file's `endpointUrl`;
//! - region: `--region`, `HEARTH_REGION`, `AWS_REGION`, `AWS_DEFAULT_REGION`,
//!   the profile's `region`, the config file's `region`;
//! - keys (a pair from one source, never half from each): the flags,
//!   `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (+`AWS_SESSION_TOKEN`), the
//!   profile in `AWS_SHARED_CREDENTIALS_FILE` (`~/.aws/credentials`) or
//!   `AWS_CONFIG_FILE` (`~/.aws/config`, `[profile NAME]` sections), the
//!   config file;
//! - CA bundle for https endpoints: `--ca-bundle`, `AWS_CA_BUNDLE`, the
//!   profile's `ca_bundle` (added to the system's roots).
//!
//! [`resolve_from`] is the whole decision as a pure function of the flags,
//! the environment and the files' text.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// Used when neither a flag, the environment nor the config file names one.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9070";
pub const DEFAULT_REGION: &str = "us-east-1";
/// The service's key in AWS config `services` blocks (its serviceId, lower
/// case with underscores, as `AWS_ENDPOINT_URL_LAMBDA_MICROVMS` upper case).
const SERVICE_KEY: &str = "lambda_microvms";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, use an AWS \
         profile (--profile, AWS_PROFILE), run `hearth configure`, or put accessKeyId \
         and secretAccessKey in {0}"
    )]
    NoCredentials(String),
    #[error(
        "incomplete credentials in {0}: give both the access key id and the secret access key"
    )]
    PartialCredentials(String),
    #[error("the AWS profile {0:?} is in neither the AWS config nor the credentials file")]
    NoProfile(String),
    #[error("cannot read the config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the config file {0} is not valid")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("cannot write the config file {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("no place for the config file: set HEARTH_CONFIG, XDG_CONFIG_HOME or HOME")]
    NoConfigPath,
    #[error("invalid endpoint URL {url:?}: {reason}")]
    Endpoint { url: String, reason: &'static str },
    #[error("invalid region {0:?}: a region looks like us-east-1")]
    Region(String),
    #[error("cannot read the CA bundle {0}")]
    CaBundle(PathBuf, #[source] std::io::Error),
    #[error("the CA bundle {0} holds no PEM certificate")]
    EmptyCaBundle(PathBuf),
}

/// Settings given explicitly (command-line flags); each wins over the
/// environment and the files.
#[derive(Default, Clone)]
pub struct ConfigFlags {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// AWS profile (`--profile`).
    pub profile: Option<String>,
    /// PEM file of extra trusted CAs for https endpoints (`--ca-bundle`).
    pub ca_bundle: Option<PathBuf>,
}

impl fmt::Debug for ConfigFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigFlags")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("profile", &self.profile)
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

/// The config file: `{"endpointUrl","region","accessKeyId","secretAccessKey"}`.
#[derive(Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigFile")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .finish()
    }
}

fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "<redacted>")
}

/// A complete, validated client configuration.
#[derive(Clone)]
pub struct ClientConfig {
    /// `http[s]://host[:port][/prefix]`, without a trailing slash.
    endpoint_url: String,
    /// `host[:port]` of the endpoint, for the `host` header.
    authority: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    /// Trusted for https besides the system's roots.
    extra_roots: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &redacted(&self.session_token))
            .field("extra_roots", &self.extra_roots.len())
            .finish()
    }
}

/// A resolved configuration and what the user should hear about it.
#[derive(Debug)]
pub struct Resolved {
    pub config: ClientConfig,
    /// E.g. a config file that others can read.
    pub warnings: Vec<String>,
}

/// Where the files of the resolution are (for reading and for messages).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigPaths {
    /// hearth's config file; `explicit` when `HEARTH_CONFIG` names it (then it must exist).
    pub hearth: Option<PathBuf>,
    pub hearth_explicit: bool,
    pub aws_config: Option<PathBuf>,
    pub aws_credentials: Option<PathBuf>,
}

impl ConfigPaths {
    /// The paths the environment points at.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Self {
        let env = |key: &str| env(key).filter(|v| !v.is_empty());
        let home = env("HOME").map(PathBuf::from);
        let aws = |var: &str, name: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
        };
        Self {
            hearth: config_path(&env),
            hearth_explicit: env("HEARTH_CONFIG").is_some(),
            aws_config: aws("AWS_CONFIG_FILE", "config"),
            aws_credentials: aws("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        }
    }
}

/// The text of the files (None: the file does not exist).
#[derive(Debug, Clone, Default)]
pub struct ConfigTexts {
    pub hearth: Option<String>,
    pub aws_config: Option<String>,
    pub aws_credentials: Option<String>,
}

/// What the resolution decided, before the endpoint and the CA bundle are
/// checked and read.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    pub endpoint_url: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub ca_bundle: Option<PathBuf>,
    /// Where the keys came from, e.g. "the environment" or "profile dev".
    pub credentials_source: String,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &redacted(&self.session_token))
            .field("ca_bundle", &self.ca_bundle)
            .field("credentials_source", &self.credentials_source)
            .finish()
    }
}

/// The sections of an AWS INI file: section name → key → value. A key with
/// an empty value followed by indented `sub = value` lines (a `services`
/// block's service) becomes `key.sub` entries.
type Ini = BTreeMap<String, BTreeMap<String, String>>;

fn parse_ini(text: &str) -> Ini {
    let mut sections = Ini::new();
    let mut current: Option<String> = None;
    let mut parent: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
            parent = None;
            continue;
        }
        let (Some(section), Some((key, value))) = (&current, line.split_once('=')) else {
            continue;
        };
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        let indented = raw.starts_with([' ', '\t']);
        let entries = sections.entry(section.clone()).or_default();
        match (&parent, indented) {
            (Some(parent), true) => {
                entries.insert(format!("{parent}.{key}"), value);
            }
            _ if value.is_empty() => parent = Some(key),
            _ => {
                parent = None;
                entries.insert(key, value);
            }
        }
    }
    sections
}

/// One profile's settings, from the credentials file (`[NAME]`) and the
/// config file (`[profile NAME]`, or `[default]`), the former winning.
#[derive(Debug, Default)]
struct Profile {
    keys: BTreeMap<String, String>,
    /// The `services` block it names, flattened (`lambda_microvms.endpoint_url`).
    services: BTreeMap<String, String>,
}

impl Profile {
    fn load(name: &str, config: &Ini, credentials: &Ini) -> Option<Self> {
        let config_section = if name == "default" {
            config
                .get("default")
                .or_else(|| config.get("profile default"))
        } else {
            config.get(&format!("profile {name}"))
        };
        let credentials_section = credentials.get(name);
        if config_section.is_none() && credentials_section.is_none() {
            return None;
        }
        let mut keys = config_section.cloned().unwrap_or_default();
        keys.extend(credentials_section.cloned().unwrap_or_default());
        let services = keys
            .get("services")
            .and_then(|block| config.get(&format!("services {block}")))
            .cloned()
            .unwrap_or_default();
        Some(Self { keys, services })
    }

    fn get(&self, key: &str) -> Option<String> {
        self.keys.get(key).filter(|v| !v.is_empty()).cloned()
    }

    fn endpoint_url(&self) -> Option<String> {
        self.services
            .get(&format!("{SERVICE_KEY}.endpoint_url"))
            .filter(|v| !v.is_empty())
            .cloned()
            .or_else(|| self.get("endpoint_url"))
    }
}

/// The whole resolution (see the module doc), as a pure function of the
/// flags, the environment and the files' text.
pub fn resolve_from(
    flags: &ConfigFlags,
    env: &dyn Fn(&str) -> Option<String>,
    paths: &ConfigPaths,
    texts: &ConfigTexts,
) -> Result<Settings, ConfigError> {
    let env = |key: &str| env(key).filter(|v| !v.is_empty());
    let flag = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    let hearth_name = paths.hearth.as_ref().map_or_else(
        || "the config file".to_string(),
        |p| p.display().to_string(),
    );
    let file: ConfigFile = match &texts.hearth {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| ConfigError::Parse(paths.hearth.clone().unwrap_or_default(), e))?,
        None => ConfigFile::default(),
    };
    let config_ini = parse_ini(texts.aws_config.as_deref().unwrap_or_default());
    let credentials_ini = parse_ini(texts.aws_credentials.as_deref().unwrap_or_default());
    // A profile named explicitly must exist and comes before hearth's file;
    // the implicit `default` profile comes after it.
    let (explicit, implicit) = match flag(&flags.profile).or_else(|| env("AWS_PROFILE")) {
        Some(name) => {
            let profile = Profile::load(&name, &config_ini, &credentials_ini)
                .ok_or_else(|| ConfigError::NoProfile(name.clone()))?;
            (Some((name, profile)), None)
        }
        None => (
            None,
            Profile::load("default", &config_ini, &credentials_ini)
                .map(|p| ("default".to_string(), p)),
        ),
    };
    let from_explicit =
        |f: &dyn Fn(&Profile) -> Option<String>| explicit.as_ref().and_then(|(_, p)| f(p));
    let from_implicit =
        |f: &dyn Fn(&Profile) -> Option<String>| implicit.as_ref().and_then(|(_, p)| f(p));

    let endpoint_url = flag(&flags.endpoint_url)
        .or_else(|| env("HEARTH_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT_URL_LAMBDA_MICROVMS"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| from_explicit(&Profile::endpoint_url))
        .or_else(|| file.endpoint_url.clone().filter(|v| !v.is_empty()))
        .or_else(|| from_implicit(&Profile::endpoint_url))
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let region = flag(&flags.region)
        .or_else(|| env("HEARTH_REGION"))
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| from_explicit(&|p| p.get("region")))
        .or_else(|| file.region.clone().filter(|v| !v.is_empty()))
        .or_else(|| from_implicit(&|p| p.get("region")))
        .unwrap_or_else(|| DEFAULT_REGION.to_string());
    let ca_bundle = flags
        .ca_bundle
        .clone()
        .or_else(|| env("AWS_CA_BUNDLE").map(PathBuf::from))
        .or_else(|| from_explicit(&|p| p.get("ca_bundle")).map(PathBuf::from))
        .or_else(|| from_implicit(&|p| p.get("ca_bundle")).map(PathBuf::from));

    let profile_keys = |named: &Option<(String, Profile)>| {
        named.as_ref().map(|(name, p)| {
            (
                format!("the AWS profile {name:?}"),
                p.get("aws_access_key_id"),
                p.get("aws_secret_access_key"),
                p.get("aws_session_token"),
            )
        })
    };
    let sources = [
        Some((
            "the flags".to_string(),
            flag(&flags.access_key_id),
            flag(&flags.secret_access_key),
            None,
        )),
        Some((
            "the environment".to_string(),
            env("AWS_ACCESS_KEY_ID"),
            env("AWS_SECRET_ACCESS_KEY"),
            env("AWS_SESSION_TOKEN"),
        )),
        profile_keys(&explicit),
        Some((
            hearth_name.clone(),
            file.access_key_id.clone().filter(|v| !v.is_empty()),
            file.secret_access_key.clone().filter(|v| !v.is_empty()),
            None,
        )),
        profile_keys(&implicit),
    ];
    for (source, id, secret, token) in sources.into_iter().flatten() {
        match (id, secret) {
            (Some(access_key_id), Some(secret_access_key)) => {
                return Ok(Settings {
                    endpoint_url,
                    region,
                    access_key_id,
                    secret_access_key,
                    session_token: token,
                    ca_bundle,
                    credentials_source: source,
                })
            }
            (None, None) => {}
            _ => return Err(ConfigError::PartialCredentials(source)),
        }
    }
    Err(ConfigError::NoCredentials(hearth_name))
}

/// Reads a file's text; None when it does not exist and need not.
fn read_optional(path: Option<&Path>, required: bool) -> Result<Option<String>, ConfigError> {
    let Some(path) = path else { return Ok(None) };
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(ConfigError::Read(path.to_path_buf(), e)),
    }
}

/// The certificates of a PEM bundle.
fn read_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let text = std::fs::read(path).map_err(|e| ConfigError::CaBundle(path.to_path_buf(), e))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(ConfigError::EmptyCaBundle(path.to_path_buf()));
    }
    Ok(certs)
}

impl ClientConfig {
    pub fn new(
        endpoint_url: &str,
        region: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<Self, ConfigError> {
        let (endpoint_url, authority) = parse_endpoint(endpoint_url)?;
        if !valid_region(region) {
            return Err(ConfigError::Region(region.to_string()));
        }
        Ok(Self {
            endpoint_url,
            authority,
            region: region.to_string(),
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret_access_key.to_string(),
            session_token: None,
            extra_roots: Vec::new(),
        })
    }

    /// Signs with temporary credentials' session token too.
    pub fn with_session_token(mut self, token: Option<String>) -> Self {
        self.session_token = token;
        self
    }

    /// Trusts the CAs in this PEM file for https, besides the system's.
    pub fn with_ca_bundle(mut self, path: &Path) -> Result<Self, ConfigError> {
        self.extra_roots = read_ca_bundle(path)?;
        Ok(self)
    }

    /// Resolves from `flags`, the process environment and the files.
    pub fn resolve(flags: &ConfigFlags) -> Result<Resolved, ConfigError> {
        Self::resolve_with(flags, &|key| std::env::var(key).ok())
    }

    /// [`ClientConfig::resolve`] with an explicit environment (for tests and
    /// embedders). Empty variables count as unset.
    pub fn resolve_with(
        flags: &ConfigFlags,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Resolved, ConfigError> {
        let paths = ConfigPaths::from_env(env);
        let mut warnings = Vec::new();
        let texts = ConfigTexts {
            hearth: read_optional(paths.hearth.as_deref(), paths.hearth_explicit)?,
            aws_config: read_optional(paths.aws_config.as_deref(), false)?,
            aws_credentials: read_optional(paths.aws_credentials.as_deref(), false)?,
        };
        for (path, text) in [
            (&paths.hearth, &texts.hearth),
            (&paths.aws_credentials, &texts.aws_credentials),
        ] {
            if let (Some(path), Some(_)) = (path, text) {
                warn_if_readable(path, &mut warnings);
            }
        }
        let settings = resolve_from(flags, env, &paths, &texts)?;
        let mut config = ClientConfig::new(
            &settings.endpoint_url,
            &settings.region,
            &settings.access_key_id,
            &settings.secret_access_key,
        )?
        .with_session_token(settings.session_token);
        if let Some(bundle) = &settings.ca_bundle {
            config = config.with_ca_bundle(bundle)?;
        }
        Ok(Resolved { config, warnings })
    }

    pub fn endpoint_url(&self) -> &str {
        &self.endpoint_url
    }

    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub(crate) fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    pub(crate) fn session_token(&self) -> Option<&str> {
        self.session_token.as_deref()
    }

    /// The CAs trusted besides the system's.
    pub fn extra_roots(&self) -> &[CertificateDer<'static>] {
        &self.extra_roots
    }
}

/// `$HEARTH_CONFIG`, else `$XDG_CONFIG_HOME/hearth/config.json`, else
/// `$HOME/.config/hearth/config.json`.
pub fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let env = |key: &str| env(key).filter(|v| !v.is_empty());
    if let Some(path) = env("HEARTH_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let base = env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("hearth").join("config.json"))
}

/// A file that holds secrets and that others can read earns a warning.
fn warn_if_readable(path: &Path, warnings: &mut Vec<String>) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "{} holds a secret but is readable by others (mode {mode:03o}); run chmod 600 on it",
                path.display()
            ));
        }
    }
}

/// Writes the config file atomically, mode 0600, creating its directory with
/// mode 0700 if needed.
pub fn write_config_file(path: &Path, file: &ConfigFile) -> Result<(), ConfigError> {
    let err = |e| ConfigError::Write(path.to_path_buf(), e);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let mut text = serde_json::to_string_pretty(file).map_err(|e| err(e.into()))?;
    text.push('\n');
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::ErrorKind::InvalidInput.into()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// Checks an endpoint URL; returns it without a trailing slash, and its authority.
fn parse_endpoint(url: &str) -> Result<(String, String), ConfigError> {
    let fail = |reason| ConfigError::Endpoint {
        url: url.to_string(),
        reason,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|_| fail("expected http[s]://HOST[:PORT]"))?;
    let scheme = match uri.scheme_str() {
        Some(scheme @ ("http" | "https")) => scheme,
        _ => return Err(fail("expected http[s]://HOST[:PORT]")),
    };
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| fail("no host"))?;
    if authority.as_str().contains('@') {
        return Err(fail("credentials do not belong in the URL"));
    }
    if uri.query().is_some() {
        return Err(fail("a query string is not allowed"));
    }
    let path = uri.path().trim_end_matches('/');
    Ok((
        format!("{scheme}://{}{path}", authority.as_str()),
        authority.as_str().to_string(),
    ))
}

fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let xdg = dir.path().to_str().expect("utf-8");
        write(
            &dir.path().join("hearth/config.json"),
            r#"{"endpointUrl":"http://file:1","region":"eu-west-1","accessKeyId":"FILEKEY","secretAccessKey":"filesecret"}"#,
            0o600,
        );
        let from_file = ClientConfig::resolve_with(
            &ConfigFlags::default(),
            &env_of(&[("XDG_CONFIG_HOME", xdg)]),
        )
        .expect("resolves");
        assert!(from_file.warnings.is_empty());
        let c = from_file.config;
        assert_eq!(c.endpoint_url(), "http://file:1");
        assert_eq!(c.region(), "eu-west-1");
        assert_eq!(c.access_key_id(), "FILEKEY");
        assert_eq!(c.secret_access_key(), "filesecret");

        let env = env_of(&[
            ("XDG_CONFIG_HOME", xdg),
            ("HEARTH_ENDPOINT_URL", "http://env:2/"),
            ("AWS_REGION", "us-west-2"),
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "envsecret"),
        ]);
        let c = ClientConfig::resolve_with(&ConfigFlags::default(), &env)
            .expect("resolves")
            .config;
        assert_eq!(c.endpoint_url(), "http://env:2");
        assert_eq!(c.authority(), "env:2");
        assert_eq!(c.region(), "us-west-2");
        assert_eq!(c.access_key_id(), "ENVKEY");

        let flags = ConfigFlags {
            endpoint_url: Some("http://flag:3".into()),
            region: Some("ap-south-1".into()),
            access_key_id: Some("FLAGKEY".into()),
            secret_access_key: Some("flagsecret".into()),
            ..Default::default()
        };
        let c = ClientConfig::resolve_with(&flags, &env)
            .expect("resolves")
            .config;
        assert_eq!(c.endpoint_url(), "http://flag:3");
        assert_eq!(c.region(), "ap-south-1");
        assert_eq!(c.access_key_id(), "FLAGKEY");

        // HEARTH_REGION wins over AWS_REGION.
        let env = env_of(&[
            ("XDG_CONFIG_HOME", xdg),
            ("HEARTH_REGION", "eu-north-1"),
            ("AWS_REGION", "us-west-2"),
        ]);
        let c = ClientConfig::resolve_with(&ConfigFlags::default(), &env)
            .expect("resolves")
            .config;
        assert_eq!(c.region(), "eu-north-1");
        assert_eq!(c.endpoint_url(), "http://file:1");
    }

    #[test]
    fn defaults_and_hearth_config_and_home() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("elsewhere.json");
        write(
            &other,
            r#"{"accessKeyId":"K","secretAccessKey":"S"}"#,
            0o600,
        );
        let env = env_of(&[("HEARTH_CONFIG", other.to_str().expect("utf-8"))]);
        let c = ClientConfig::resolve_with(&ConfigFlags::default(), &env)
            .expect("resolves")
            .config;
        assert_eq!(c.endpoint_url(), DEFAULT_ENDPOINT);
        assert_eq!(c.region(), DEFAULT_REGION);
        assert_eq!(c.access_key_id(), "K");

        let home = dir.path().to_str().expect("utf-8");
        assert_eq!(
            config_path(&env_of(&[("HOME", home)])),
            Some(dir.path().join(".config/hearth/config.json"))
        );
        assert_eq!(config_path(&env_of(&[])), None);

        // A missing file that HEARTH_CONFIG names is an error, not silence.
        let env = env_of(&[("HEARTH_CONFIG", "/nonexistent/hearth.json")]);
        let err = ClientConfig::resolve_with(&ConfigFlags::default(), &env).expect_err("fails");
        assert!(matches!(err, ConfigError::Read(..)), "{err:?}");
    }

    #[test]
    fn missing_and_partial_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = env_of(&[("XDG_CONFIG_HOME", dir.path().to_str().expect("utf-8"))]);
        let err = ClientConfig::resolve_with(&ConfigFlags::default(), &env).expect_err("fails");
        let text = err.to_string();
        assert!(text.contains("AWS_ACCESS_KEY_ID"), "{text}");
        assert!(text.contains("hearth configure"), "{text}");
        assert!(text.contains("hearth/config.json"), "{text}");

        let env = env_of(&[("AWS_ACCESS_KEY_ID", "K"), ("AWS_SECRET_ACCESS_KEY", "")]);
        let err = ClientConfig::resolve_with(&ConfigFlags::default(), &env).expect_err("fails");
        assert_eq!(
            err.to_string(),
            "incomplete credentials in the environment: give both the access key id and the secret access key"
        );
    }

    #[test]
    fn readable_file_warns_and_bad_file_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.json");
        write(&path, r#"{"accessKeyId":"K","secretAccessKey":"S"}"#, 0o644);
        let env = env_of(&[("HEARTH_CONFIG", path.to_str().expect("utf-8"))]);
        let r = ClientConfig::resolve_with(&ConfigFlags::default(), &env).expect("resolves");
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("mode 644"), "{:?}", r.warnings);

        write(&path, r#"{"accessKey":"K"}"#, 0o600);
        let err = ClientConfig::resolve_with(&ConfigFlags::default(), &env).expect_err("fails");
        assert!(matches!(err, ConfigError::Parse(..)), "{err:?}");
    }

    #[test]
    fn endpoint_and_region_validation() {
        let new = |url: &str, region: &str| ClientConfig::new(url, region, "K", "S");
        assert!(new("http://localhost:9070", "us-east-1").is_ok());
        let c = new("http://h/prefix/", "us-east-1").expect("ok");
        assert_eq!(c.endpoint_url(), "http://h/prefix");
        let c = new("https://api.example:8443/", "us-east-1").expect("https");
        assert_eq!(c.endpoint_url(), "https://api.example:8443");
        assert_eq!(c.authority(), "api.example:8443");
        for url in ["localhost:9070", "ftp://h", "http://u:p@h", "http://h/?q"] {
            assert!(
                matches!(new(url, "us-east-1"), Err(ConfigError::Endpoint { .. })),
                "{url}"
            );
        }
        assert!(matches!(
            new("http://h", "US East"),
            Err(ConfigError::Region(_))
        ));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = ClientConfig::new("http://h", "us-east-1", "KEY", "s3cr3t").expect("ok");
        let flags = ConfigFlags {
            secret_access_key: Some("s3cr3t".into()),
            ..Default::default()
        };
        let file = ConfigFile {
            secret_access_key: Some("s3cr3t".into()),
            ..Default::default()
        };
        for text in [format!("{c:?}"), format!("{flags:?}"), format!("{file:?}")] {
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }

    /// The pure resolution over an environment map and file texts.
    fn resolve_texts(
        flags: &ConfigFlags,
        pairs: &[(&str, &str)],
        texts: &ConfigTexts,
    ) -> Result<Settings, ConfigError> {
        let paths = ConfigPaths {
            hearth: Some(PathBuf::from("/h/config.json")),
            ..Default::default()
        };
        resolve_from(flags, &env_of(pairs), &paths, texts)
    }

    const AWS_CONFIG: &str = "
# a comment
[default]
region = eu-central-1
endpoint_url = http://default-profile:1

[profile dev]
region = ap-northeast-1
services = local
ca_bundle = /etc/dev-ca.pem
aws_access_key_id = DEVCONFIGKEY
aws_secret_access_key = devconfigsecret

[services local]
lambda_microvms =
  endpoint_url = http://dev-service:7
s3 =
  endpoint_url = http://not-ours:9

[profile plain]
endpoint_url = http://plain:8
";

    const AWS_CREDENTIALS: &str = "
[default]
aws_access_key_id = DEFAULTKEY
aws_secret_access_key = defaultsecret

[dev]
aws_access_key_id = DEVKEY
aws_secret_access_key = devsecret
aws_session_token = devtoken
";

    fn all_texts() -> ConfigTexts {
        ConfigTexts {
            hearth: Some(
                r#"{"endpointUrl":"http://hearth-file:2","accessKeyId":"FILEKEY","secretAccessKey":"filesecret"}"#
                    .into(),
            ),
            aws_config: Some(AWS_CONFIG.into()),
            aws_credentials: Some(AWS_CREDENTIALS.into()),
        }
    }

    #[test]
    fn endpoint_order_flag_hearth_service_global_profile_file() {
        let texts = all_texts();
        let none = ConfigFlags::default();
        let endpoint = |flags: &ConfigFlags, pairs: &[(&str, &str)]| {
            resolve_texts(flags, pairs, &texts)
                .expect("resolves")
                .endpoint_url
        };
        let full = [
            ("HEARTH_ENDPOINT_URL", "http://hearth-env:1"),
            ("AWS_ENDPOINT_URL_LAMBDA_MICROVMS", "http://service-env:1"),
            ("AWS_ENDPOINT_URL", "http://global-env:1"),
            ("AWS_PROFILE", "dev"),
        ];
        let flags = ConfigFlags {
            endpoint_url: Some("http://flag:1".into()),
            ..Default::default()
        };
        assert_eq!(endpoint(&flags, &full), "http://flag:1");
        assert_eq!(endpoint(&none, &full), "http://hearth-env:1");
        assert_eq!(endpoint(&none, &full[1..]), "http://service-env:1");
        assert_eq!(endpoint(&none, &full[2..]), "http://global-env:1");
        // An explicit profile: its services block (ours, not s3's) beats the file.
        assert_eq!(endpoint(&none, &full[3..]), "http://dev-service:7");
        let plain = ConfigFlags {
            profile: Some("plain".into()),
            ..Default::default()
        };
        assert_eq!(endpoint(&plain, &[]), "http://plain:8");
        // Without one, hearth's file beats the implicit default profile...
        assert_eq!(endpoint(&none, &[]), "http://hearth-file:2");
        // ...which still beats the built-in default.
        let no_file = ConfigTexts {
            hearth: None,
            ..all_texts()
        };
        let s = resolve_texts(&none, &[], &no_file).expect("resolves");
        assert_eq!(s.endpoint_url, "http://default-profile:1");
        assert_eq!(s.region, "eu-central-1");
        assert_eq!(s.access_key_id, "DEFAULTKEY");
        assert_eq!(s.credentials_source, "the AWS profile \"default\"");
        let nothing = ConfigTexts {
            hearth: Some(r#"{"accessKeyId":"K","secretAccessKey":"S"}"#.into()),
            ..Default::default()
        };
        let s = resolve_texts(&none, &[], &nothing).expect("resolves");
        assert_eq!(s.endpoint_url, DEFAULT_ENDPOINT);
        assert_eq!(s.region, DEFAULT_REGION);
    }

    #[test]
    fn credentials_order_flags_env_profile_file_default() {
        let texts = all_texts();
        let keys = |flags: &ConfigFlags, pairs: &[(&str, &str)]| {
            let s = resolve_texts(flags, pairs, &texts).expect("resolves");
            (s.access_key_id, s.session_token)
        };
        let env = [
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "envsecret"),
            ("AWS_SESSION_TOKEN", "envtoken"),
            ("AWS_PROFILE", "dev"),
        ];
        let flags = ConfigFlags {
            access_key_id: Some("FLAGKEY".into()),
            secret_access_key: Some("flagsecret".into()),
            ..Default::default()
        };
        assert_eq!(keys(&flags, &env), ("FLAGKEY".into(), None));
        let none = ConfigFlags::default();
        assert_eq!(
            keys(&none, &env),
            ("ENVKEY".into(), Some("envtoken".into()))
        );
        // The credentials file's [dev] beats the config file's [profile dev].
        assert_eq!(
            keys(&none, &env[3..]),
            ("DEVKEY".into(), Some("devtoken".into()))
        );
        let dev_flag = ConfigFlags {
            profile: Some("dev".into()),
            ..Default::default()
        };
        let no_credentials_file = ConfigTexts {
            aws_credentials: None,
            ..all_texts()
        };
        let s = resolve_texts(&dev_flag, &[], &no_credentials_file).expect("resolves");
        assert_eq!(s.access_key_id, "DEVCONFIGKEY");
        assert_eq!(s.ca_bundle, Some(PathBuf::from("/etc/dev-ca.pem")));
        // hearth's file beats the implicit default profile.
        assert_eq!(keys(&none, &[]), ("FILEKEY".into(), None));
        // A profile that exists nowhere is an error, not a silent fallback.
        let err = resolve_texts(&none, &[("AWS_PROFILE", "nope")], &texts).expect_err("fails");
        assert!(
            matches!(err, ConfigError::NoProfile(ref n) if n == "nope"),
            "{err:?}"
        );
        // Half a pair in a profile is reported with the profile's name.
        let half = ConfigTexts {
            aws_credentials: Some("[x]\naws_access_key_id = K\n".into()),
            ..Default::default()
        };
        let err = resolve_texts(&none, &[("AWS_PROFILE", "x")], &half).expect_err("fails");
        assert!(err.to_string().contains("profile \"x\""), "{err}");
    }

    #[test]
    fn region_and_ca_bundle_order() {
        let texts = all_texts();
        let none = ConfigFlags::default();
        let region = |flags: &ConfigFlags, pairs: &[(&str, &str)]| {
            resolve_texts(flags, pairs, &texts)
                .expect("resolves")
                .region
        };
        let env = [
            ("HEARTH_REGION", "eu-north-1"),
            ("AWS_REGION", "us-west-2"),
            ("AWS_DEFAULT_REGION", "us-west-1"),
            ("AWS_PROFILE", "dev"),
        ];
        let flags = ConfigFlags {
            region: Some("sa-east-1".into()),
            ..Default::default()
        };
        assert_eq!(region(&flags, &env), "sa-east-1");
        assert_eq!(region(&none, &env), "eu-north-1");
        assert_eq!(region(&none, &env[1..]), "us-west-2");
        assert_eq!(region(&none, &env[2..]), "us-west-1");
        assert_eq!(region(&none, &env[3..]), "ap-northeast-1");
        // hearth's file has no region: the implicit default profile's.
        assert_eq!(region(&none, &[]), "eu-central-1");

        let ca = |flags: &ConfigFlags, pairs: &[(&str, &str)]| {
            resolve_texts(flags, pairs, &texts)
                .expect("resolves")
                .ca_bundle
        };
        let with_flag = ConfigFlags {
            ca_bundle: Some("/flag.pem".into()),
            ..Default::default()
        };
        let env = [("AWS_CA_BUNDLE", "/env.pem"), ("AWS_PROFILE", "dev")];
        assert_eq!(ca(&with_flag, &env), Some("/flag.pem".into()));
        assert_eq!(ca(&none, &env), Some("/env.pem".into()));
        assert_eq!(ca(&none, &env[1..]), Some("/etc/dev-ca.pem".into()));
        assert_eq!(ca(&none, &[]), None);
    }

    #[test]
    fn aws_file_locations_from_the_environment() {
        let paths = ConfigPaths::from_env(&env_of(&[("HOME", "/home/u")]));
        assert_eq!(paths.aws_config, Some(PathBuf::from("/home/u/.aws/config")));
        assert_eq!(
            paths.aws_credentials,
            Some(PathBuf::from("/home/u/.aws/credentials"))
        );
        let paths = ConfigPaths::from_env(&env_of(&[
            ("HOME", "/home/u"),
            ("AWS_CONFIG_FILE", "/c"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/k"),
        ]));
        assert_eq!(paths.aws_config, Some(PathBuf::from("/c")));
        assert_eq!(paths.aws_credentials, Some(PathBuf::from("/k")));
    }

    #[test]
    fn files_on_disk_and_a_ca_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let credentials = dir.path().join("creds");
        write(
            &credentials,
            "[ci]\naws_access_key_id = CIKEY\naws_secret_access_key = cisecret\n",
            0o600,
        );
        let bundle = dir.path().join("ca.pem");
        // Any DER bytes in a CERTIFICATE block count as a root to add.
        write(
            &bundle,
            "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n",
            0o644,
        );
        let env = env_of(&[
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                credentials.to_str().expect("utf-8"),
            ),
            ("AWS_PROFILE", "ci"),
            ("AWS_CA_BUNDLE", bundle.to_str().expect("utf-8")),
            ("AWS_ENDPOINT_URL", "https://api.example:8443"),
        ]);
        let c = ClientConfig::resolve_with(&ConfigFlags::default(), &env)
            .expect("resolves")
            .config;
        assert_eq!(c.access_key_id(), "CIKEY");
        assert_eq!(c.endpoint_url(), "https://api.example:8443");
        assert_eq!(c.extra_roots().len(), 1);
        write(&bundle, "not pem\n", 0o644);
        let err = ClientConfig::resolve_with(&ConfigFlags::default(), &env).expect_err("fails");
        assert!(matches!(err, ConfigError::EmptyCaBundle(_)), "{err:?}");
    }

    #[test]
    fn ini_blocks_and_comments() {
        let ini = parse_ini("[a]\nk = v = w\n; c\n[services  s]\nx =\n  y = 1\nz = 2\n");
        assert_eq!(ini["a"]["k"], "v = w");
        assert_eq!(ini["services s"]["x.y"], "1");
        assert_eq!(ini["services s"]["z"], "2");
        assert!(!ini["services s"].contains_key("x"));
    }

    #[test]
    fn write_is_private_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("new/hearth/config.json");
        let file = ConfigFile {
            endpoint_url: Some("http://h:1".into()),
            region: None,
            access_key_id: Some("K".into()),
            secret_access_key: Some("S".into()),
        };
        write_config_file(&path, &file).expect("writes");
        write_config_file(&path, &file).expect("overwrites");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        let back: ConfigFile =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(back, file);
        // Nothing else left in the directory (no temporary files).
        let entries = std::fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .count();
        assert_eq!(entries, 1);
    }
}
