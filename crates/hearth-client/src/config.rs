//! Where the client connects and with which keys: explicit flags, then the
//! environment, then the config file, then defaults.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Used when neither a flag, the environment nor the config file names one.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9070";
pub const DEFAULT_REGION: &str = "us-east-1";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, run \
         `hearth configure`, or put accessKeyId and secretAccessKey in {0}"
    )]
    NoCredentials(String),
    #[error(
        "incomplete credentials in {0}: give both the access key id and the secret access key"
    )]
    PartialCredentials(String),
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
}

/// Settings given explicitly (command-line flags); each wins over the
/// environment and the config file.
#[derive(Default, Clone)]
pub struct ConfigFlags {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for ConfigFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigFlags")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
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
    /// `http://host[:port][/prefix]`, without a trailing slash.
    endpoint_url: String,
    /// `host[:port]` of the endpoint, for the `host` header.
    authority: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
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
        })
    }

    /// Resolves from `flags`, the process environment and the config file.
    pub fn resolve(flags: &ConfigFlags) -> Result<Resolved, ConfigError> {
        Self::resolve_with(flags, &|key| std::env::var(key).ok())
    }

    /// [`ClientConfig::resolve`] with an explicit environment (for tests and
    /// embedders). Empty variables count as unset.
    pub fn resolve_with(
        flags: &ConfigFlags,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Resolved, ConfigError> {
        let env = |key: &str| env(key).filter(|v| !v.is_empty());
        let mut warnings = Vec::new();
        let path = config_path(&env);
        let file = match &path {
            Some(path) => read_config_file(path, env("HEARTH_CONFIG").is_some(), &mut warnings)?,
            None => ConfigFile::default(),
        };
        let flag = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        let endpoint = flag(&flags.endpoint_url)
            .or_else(|| env("HEARTH_ENDPOINT_URL"))
            .or(file.endpoint_url)
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let region = flag(&flags.region)
            .or_else(|| env("HEARTH_REGION"))
            .or_else(|| env("AWS_REGION"))
            .or(file.region)
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let file_name = path.as_ref().map_or_else(
            || "the config file".to_string(),
            |p| p.display().to_string(),
        );
        // Keys come as a pair from one source, never half from each.
        let sources = [
            (
                "the flags".to_string(),
                flag(&flags.access_key_id),
                flag(&flags.secret_access_key),
            ),
            (
                "the environment".to_string(),
                env("AWS_ACCESS_KEY_ID"),
                env("AWS_SECRET_ACCESS_KEY"),
            ),
            (
                file_name.clone(),
                file.access_key_id.filter(|v| !v.is_empty()),
                file.secret_access_key.filter(|v| !v.is_empty()),
            ),
        ];
        let mut keys = None;
        for (source, id, secret) in sources {
            match (id, secret) {
                (Some(id), Some(secret)) => {
                    keys = Some((id, secret));
                    break;
                }
                (None, None) => {}
                _ => return Err(ConfigError::PartialCredentials(source)),
            }
        }
        let (id, secret) = keys.ok_or(ConfigError::NoCredentials(file_name))?;
        let config = ClientConfig::new(&endpoint, &region, &id, &secret)?;
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

/// Reads the config file. A missing default file is an empty one; a missing
/// file that `HEARTH_CONFIG` names explicitly is an error.
fn read_config_file(
    path: &Path,
    explicit: bool,
    warnings: &mut Vec<String>,
) -> Result<ConfigFile, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(ConfigFile::default())
        }
        Err(e) => return Err(ConfigError::Read(path.to_path_buf(), e)),
    };
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "{} holds a secret but is readable by others (mode {mode:03o}); run chmod 600 on it",
                path.display()
            ));
        }
    }
    serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))
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
        .map_err(|_| fail("expected http://HOST[:PORT]"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(fail(
                "https is not supported by this client; put the server behind a local TLS proxy or use http",
            ))
        }
        _ => return Err(fail("expected http://HOST[:PORT]")),
    }
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
        format!("http://{}{path}", authority.as_str()),
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
        for url in [
            "localhost:9070",
            "ftp://h",
            "https://h",
            "http://u:p@h",
            "http://h/?q",
        ] {
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
