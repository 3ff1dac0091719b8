//! Endpoint tokens (CreateMicrovmAuthToken, CreateMicrovmShellAuthToken):
//! signed, scoped to one microVM (and for proxy tokens a set of ports), and
//! expiring. The endpoint proxy checks them when a connection opens.
//!
//! Format: `hm1.<base64url(JSON claims)>.<base64url(HMAC-SHA256)>`, the MAC
//! over `hm1.` + the encoded claims, keyed by a server-held key named in the
//! claims (`kid`). Keys live in `token-keys` (0600) in the data directory,
//! newest first; [`TokenKeys::rotate`] adds a key that signs from then on while
//! the older ones still verify tokens already handed out (at most 60 minutes).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::layout;

const PREFIX: &str = "hm1.";
/// Keys kept after a rotation (the newest signs).
const KEEP_KEYS: usize = 3;
/// A token is a few hundred bytes; anything much longer is not one of ours.
const MAX_TOKEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read or write the token keys in {0}")]
    KeyFile(PathBuf, #[source] std::io::Error),
    #[error("token key file {0} is malformed")]
    BadKeyFile(PathBuf),
    #[error("token is malformed")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
}

/// What a token lets its holder reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TokenKind {
    /// HTTP/WebSocket traffic to the listed ports.
    Proxy,
    /// The `/shell` WebSocket.
    Shell,
}

/// Ports a proxy token covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PortRule {
    Port(u16),
    Range(u16, u16),
    All,
}

impl PortRule {
    pub fn covers(self, port: u16) -> bool {
        match self {
            PortRule::Port(p) => p == port,
            PortRule::Range(start, end) => (start..=end).contains(&port),
            PortRule::All => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    pub kid: String,
    pub kind: TokenKind,
    pub account: String,
    pub microvm: String,
    #[serde(default)]
    pub ports: Vec<PortRule>,
    /// Unix seconds.
    pub issued_at: u64,
    pub expires_at: u64,
}

impl Claims {
    /// Whether the token lets its holder reach `port`. A port is covered only
    /// when a rule names it; the caller decides separately whether the hooks
    /// port needs an explicit `Port` rule.
    pub fn allows_port(&self, port: u16) -> bool {
        self.kind == TokenKind::Proxy && self.ports.iter().any(|rule| rule.covers(port))
    }

    /// Whether a rule names `port` itself (not through a range or all ports).
    pub fn names_port(&self, port: u16) -> bool {
        self.ports.contains(&PortRule::Port(port))
    }
}

/// The server's token keys, newest first.
#[derive(Clone)]
pub struct TokenKeys {
    keys: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("TokenKeys").field("key_ids", &ids).finish()
    }
}

impl TokenKeys {
    /// Reads the keys in `dir`, making a first one when there are none.
    pub fn open_or_create(dir: &Path) -> Result<Self, TokenError> {
        let path = layout::token_keys(dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).ok_or(TokenError::BadKeyFile(path)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let keys = Self {
                    keys: vec![new_key()],
                };
                keys.write(dir)?;
                Ok(keys)
            }
            Err(err) => Err(TokenError::KeyFile(path, err)),
        }
    }

    /// Adds a new signing key and drops the oldest beyond a few.
    pub fn rotate(dir: &Path) -> Result<Self, TokenError> {
        let mut keys = Self::open_or_create(dir)?;
        keys.keys.insert(0, new_key());
        keys.keys.truncate(KEEP_KEYS);
        keys.write(dir)?;
        Ok(keys)
    }

    fn parse(text: &str) -> Option<Self> {
        let keys: Option<Vec<_>> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let (id, hex_key) = line.split_once(' ')?;
                let bytes: [u8; 32] = hex::decode(hex_key.trim()).ok()?.try_into().ok()?;
                Some((id.to_string(), bytes))
            })
            .collect();
        keys.filter(|k| !k.is_empty()).map(|keys| Self { keys })
    }

    fn write(&self, dir: &Path) -> Result<(), TokenError> {
        let path = layout::token_keys(dir);
        let tmp = path.with_extension("tmp");
        let text: String = self
            .keys
            .iter()
            .map(|(id, key)| format!("{id} {}\n", hex::encode(key)))
            .collect();
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory is synced: a power
            // cut before that could bring back no key file (or an older one)
            // while tokens signed with the new key are out.
            std::fs::File::open(dir)?.sync_all()
        })();
        written.map_err(|e| TokenError::KeyFile(path, e))
    }

    /// Signs `claims` with the newest key (its id goes into the claims).
    pub fn mint(&self, mut claims: Claims) -> String {
        let (kid, key) = &self.keys[0];
        claims.kid = kid.clone();
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let body = format!("{PREFIX}{}", b64().encode(json));
        let mac = mac(key, body.as_bytes());
        format!("{body}.{}", b64().encode(mac))
    }

    /// Checks a token's signature and expiry at `now` (unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN || !token.starts_with(PREFIX) {
            return Err(TokenError::Malformed);
        }
        let (body, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let signature = b64().decode(signature).map_err(|_| TokenError::Malformed)?;
        let encoded = body.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let claims_bytes = b64().decode(encoded).map_err(|_| TokenError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&claims_bytes).map_err(|_| TokenError::Malformed)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(id, _)| *id == claims.kid)
            .ok_or(TokenError::BadSignature)?;
        let mut check = Hmac::<Sha256>::new_from_slice(key).map_err(|_| TokenError::Malformed)?;
        check.update(body.as_bytes());
        // Constant-time comparison.
        check
            .verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        if now >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn mac(key: &[u8; 32], data: &[u8]) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC accepts keys of any length; this cannot happen.
        Err(_) => Vec::new(),
    }
}

fn new_key() -> (String, [u8; 32]) {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let mut id = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut id);
    (format!("k{}", hex::encode(id)), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires_at: u64) -> Claims {
        Claims {
            kid: String::new(),
            kind: TokenKind::Proxy,
            account: "123456789012".into(),
            microvm: "microvm-1".into(),
            ports: vec![PortRule::Port(8080), PortRule::Range(3000, 3009)],
            issued_at: 100,
            expires_at,
        }
    }

    #[test]
    fn mint_verify_tamper_expire_rotate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = TokenKeys::open_or_create(dir.path()).expect("keys");
        let token = keys.mint(claims(1000));
        let got = keys.verify(&token, 999).expect("valid");
        assert_eq!(got.microvm, "microvm-1");
        assert!(got.allows_port(8080) && got.allows_port(3005));
        assert!(!got.allows_port(9000) && !got.names_port(3005));
        assert!(matches!(
            keys.verify(&token, 1000),
            Err(TokenError::Expired)
        ));

        // Any altered byte of the claims or signature fails.
        let mut altered = token.clone().into_bytes();
        let middle = altered.len() / 2;
        altered[middle] = if altered[middle] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).expect("utf8");
        assert!(keys.verify(&altered, 999).is_err());
        // Claims re-encoded with another microVM but the old signature fail.
        let (_, sig) = token.rsplit_once('.').expect("sig");
        let mut other = claims(1000);
        other.kid = got.kid.clone();
        other.microvm = "microvm-2".into();
        let forged = format!(
            "{PREFIX}{}.{sig}",
            b64().encode(serde_json::to_vec(&other).expect("json"))
        );
        assert!(matches!(
            keys.verify(&forged, 999),
            Err(TokenError::BadSignature)
        ));
        for junk in ["", "hm1.", "hm1..", "x.y.z", &"a".repeat(5000)] {
            assert!(keys.verify(junk, 0).is_err(), "{junk}");
        }

        // After a rotation old tokens still verify, new ones use the new key,
        // and another server's keys verify nothing.
        let rotated = TokenKeys::rotate(dir.path()).expect("rotate");
        assert!(rotated.verify(&token, 999).is_ok());
        let fresh = rotated.mint(claims(1000));
        assert_ne!(rotated.verify(&fresh, 0).expect("fresh").kid, got.kid);
        let reopened = TokenKeys::open_or_create(dir.path()).expect("reopen");
        assert!(reopened.verify(&fresh, 0).is_ok());
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let stranger = TokenKeys::open_or_create(elsewhere.path()).expect("keys");
        assert!(stranger.verify(&fresh, 0).is_err());
        let mode = std::fs::metadata(layout::token_keys(dir.path()))
            .expect("meta")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
