//! TLS for the endpoint: a certificate from PEM files, or a self-signed one for
//! `*.<domain>` and `<domain>` made at first start and kept (key mode 0600).
//!
//! SNI needs no handling of its own: one wildcard certificate covers every
//! endpoint, and requests are routed by `Host` / `:authority` as on plain TCP.
//!
//! A wildcard directly under a single-label domain (`*.localhost`) is refused
//! by certificate verifiers (webpki, browsers), so with the default domain
//! `localhost` clients must skip verification; give TLS endpoints a domain of
//! two or more labels (`endpoints.example.test`) or bring a real certificate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::host;

/// File names [`load_or_generate`] uses inside its directory.
pub const CERT_FILE: &str = "endpoint-cert.pem";
pub const KEY_FILE: &str = "endpoint-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("cannot parse the PEM in {0}")]
    Pem(PathBuf, #[source] rustls_pki_types::pem::Error),
    #[error("the endpoint domain is not a DNS name")]
    Domain,
    #[error("cannot generate a certificate")]
    Generate(#[source] rcgen::Error),
    #[error("certificate and key are unusable")]
    Config(#[source] rustls::Error),
}

/// A TLS server configuration (ring provider, TLS 1.2 and 1.3, ALPN `h2` then
/// `http/1.1`) for this certificate chain and key.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Loads a PEM certificate chain and private key.
pub fn load_pem(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = read_pem(cert, key)?;
    server_config(chain, key)
}

/// Loads `endpoint-cert.pem` and `endpoint-key.pem` from `dir`, or when either
/// is missing makes a self-signed certificate for `*.<domain>` and `<domain>`
/// and saves both there first (the directory 0700 if created, the key 0600).
pub fn load_or_generate(dir: &Path, domain: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let cert = dir.join(CERT_FILE);
    let key = dir.join(KEY_FILE);
    if !(cert.exists() && key.exists()) {
        generate(dir, domain)?;
    }
    load_pem(&cert, &key)
}

/// Writes a new self-signed certificate and key for `domain` into `dir`.
fn generate(dir: &Path, domain: &str) -> Result<(), TlsError> {
    if !host::is_valid_domain(domain) {
        return Err(TlsError::Domain);
    }
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| TlsError::Write(dir.to_owned(), e))?;
    let mut params = rcgen::CertificateParams::new(vec![format!("*.{domain}"), domain.clone()])
        .map_err(TlsError::Generate)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("hearth endpoint *.{domain}"),
    );
    let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    // Key first: a certificate on disk always has its key beside it.
    write_private(&dir.join(KEY_FILE), key.serialize_pem().as_bytes())?;
    write_private(&dir.join(CERT_FILE), cert.pem().as_bytes())?;
    Ok(())
}

/// Writes `data` to `path` atomically, the file 0600 from its creation.
fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(|e| TlsError::Write(path.to_owned(), e))
}

fn read_pem(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_pem = fs::read(cert).map_err(|e| TlsError::Read(cert.to_owned(), e))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(cert.to_owned(), e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key_pem = fs::read(key).map_err(|e| TlsError::Read(key.to_owned(), e))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem(key.to_owned(), e))?;
    Ok((chain, key_der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generates_once_then_loads() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("tls");
        load_or_generate(&certs, "Example.test.")?;
        let key_mode = fs::metadata(certs.join(KEY_FILE))?.permissions().mode() & 0o777;
        let dir_mode = fs::metadata(&certs)?.permissions().mode() & 0o777;
        assert_eq!((key_mode, dir_mode), (0o600, 0o700));
        let first = fs::read(certs.join(CERT_FILE))?;
        load_or_generate(&certs, "example.test")?;
        assert_eq!(
            fs::read(certs.join(CERT_FILE))?,
            first,
            "an existing certificate is kept"
        );
        assert!(matches!(
            load_or_generate(&dir.path().join("x"), "*.bad"),
            Err(TlsError::Domain)
        ));
        fs::write(certs.join(CERT_FILE), "not pem")?;
        assert!(matches!(
            load_pem(&certs.join(CERT_FILE), &certs.join(KEY_FILE)),
            Err(TlsError::NoCertificate(_))
        ));
        Ok(())
    }
}
