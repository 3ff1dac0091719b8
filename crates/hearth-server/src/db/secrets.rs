//! Secret access keys at rest.
//!
//! SigV4 verification needs each secret in clear (the server recomputes the
//! signature), so secrets cannot be hashed. They are sealed instead: the server
//! keeps a 256-bit master key in `master.key` (mode 0600) beside the database,
//! and stores each secret as `v1:` + base64(nonce ‖ ChaCha20-Poly1305(secret)),
//! with the access key id as associated data so a sealed secret cannot be moved
//! to another key's row. A copy of the database file alone reveals nothing;
//! the database and the key file together do, so back them up apart.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

use crate::layout;

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read or create the master key {0}")]
    KeyFile(PathBuf, #[source] std::io::Error),
    #[error("master key {0} is not 32 bytes")]
    BadKey(PathBuf),
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("sealed secret does not open with this master key")]
    Unseal,
}

/// Seals and opens secrets with the server's master key.
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// Loads `DIR/master.key`, creating it (0600) on first use.
    pub fn open_or_create(dir: &Path) -> Result<Self, SecretsError> {
        let path = layout::master_key(dir);
        let io = |e| SecretsError::KeyFile(path.clone(), e);
        let key = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = vec![0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path);
                match created {
                    Ok(mut file) => {
                        file.write_all(&key).map_err(io)?;
                        file.sync_all().map_err(io)?;
                        // Make the new file's name durable before anything is
                        // sealed with the key: after a power cut, a database row
                        // sealed under a key whose file vanished is lost for good.
                        std::fs::File::open(dir)
                            .and_then(|d| d.sync_all())
                            .map_err(io)?;
                        key
                    }
                    // Another process created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        std::fs::read(&path).map_err(io)?
                    }
                    Err(e) => return Err(io(e)),
                }
            }
            Err(e) => return Err(io(e)),
        };
        if key.len() != 32 {
            return Err(SecretsError::BadKey(path));
        }
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        })
    }

    pub fn seal(&self, key_id: &str, secret: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        // Encryption with a fresh nonce and in-memory buffers cannot fail.
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: key_id.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    pub fn open(&self, key_id: &str, sealed: &str) -> Result<String, SecretsError> {
        let body = sealed.strip_prefix(PREFIX).ok_or(SecretsError::Malformed)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| SecretsError::Malformed)?;
        if bytes.len() <= NONCE_LEN {
            return Err(SecretsError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Unseal)?;
        String::from_utf8(plain).map_err(|_| SecretsError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sb = SecretBox::open_or_create(dir.path()).expect("key");
        let sealed = sb.seal("AKIA1", "s3cret");
        assert!(!sealed.contains("s3cret"));
        assert_eq!(sb.open("AKIA1", &sealed).expect("open"), "s3cret");
        // Bound to its key id.
        assert!(sb.open("AKIA2", &sealed).is_err());
        // The same key file opens it again; another key does not.
        let again = SecretBox::open_or_create(dir.path()).expect("key");
        assert_eq!(again.open("AKIA1", &sealed).expect("open"), "s3cret");
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = SecretBox::open_or_create(other_dir.path()).expect("key");
        assert!(other.open("AKIA1", &sealed).is_err());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(layout::master_key(dir.path()))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sb = SecretBox::open_or_create(dir.path()).expect("key");
        for bad in [
            "",
            "v1:",
            "v1:!!!",
            "v2:AAAA",
            "v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(sb.open("k", bad).is_err(), "{bad}");
        }
    }
}
