//! Image references: `[registry/]name[:tag][@digest]`, with the grammar of the
//! distribution project's `reference` package (lowercase path components, a
//! 128-character tag, a `sha256:` digest).

use std::fmt;

/// Longest repository name the distribution API accepts.
const MAX_NAME: usize = 255;
/// Longest tag.
const MAX_TAG: usize = 128;

/// Why a reference could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("invalid repository name {0:?}")]
    InvalidName(String),
    #[error("repository name longer than {MAX_NAME} characters")]
    NameTooLong,
    #[error("invalid registry host {0:?}")]
    InvalidRegistry(String),
    #[error("invalid tag {0:?}")]
    InvalidTag(String),
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("unsupported digest algorithm {0:?} (only sha256)")]
    UnsupportedDigest(String),
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry named in the reference (`localhost:5000/app` → `localhost:5000`),
    /// if any. [`crate::pull`] refuses a reference naming a registry other than
    /// the configured one.
    pub registry: Option<String>,
    /// The repository, e.g. `library/python`.
    pub repository: String,
    /// The tag; `None` when only a digest was given (and for a bare name,
    /// which means `latest`: see [`Reference::tag_or_default`]).
    pub tag: Option<String>,
    /// `sha256:<64 hex>`, when pinned. A digest wins over a tag.
    pub digest: Option<String>,
}

impl Reference {
    /// The tag, or `latest` when neither a tag nor a digest was given.
    pub fn tag_or_default(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(tag), _) => Some(tag),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned,
    /// else the tag.
    pub fn manifest_reference(&self) -> &str {
        match &self.digest {
            Some(digest) => digest,
            None => self.tag_or_default().unwrap_or("latest"),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(registry) = &self.registry {
            write!(f, "{registry}/")?;
        }
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Parses `[registry/]name[:tag][@digest]`, e.g. `library/python:3.11` or
/// `myapp@sha256:...`. A first path component containing `.` or `:`, or equal
/// to `localhost`, is a registry host.
pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
    if s.is_empty() {
        return Err(ReferenceError::Empty);
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(parse_digest(digest)?)),
        None => (s, None),
    };
    // A tag is after the last ':' that follows the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (&rest[..at], Some(&rest[at + 1..]))
        }
        None => (rest, None),
    };
    if let Some(tag) = tag {
        if !valid_tag(tag) {
            return Err(ReferenceError::InvalidTag(tag.to_owned()));
        }
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            if !valid_registry(first) {
                return Err(ReferenceError::InvalidRegistry(first.to_owned()));
            }
            (Some(first.to_owned()), rest)
        }
        _ => (None, name),
    };
    if repository.len() > MAX_NAME {
        return Err(ReferenceError::NameTooLong);
    }
    if repository.is_empty() || !repository.split('/').all(valid_component) {
        return Err(ReferenceError::InvalidName(repository.to_owned()));
    }
    Ok(Reference {
        registry,
        repository: repository.to_owned(),
        tag: tag.map(str::to_owned),
        digest,
    })
}

/// Checks `sha256:<64 lowercase hex>`; other well-formed algorithms are
/// refused as unsupported.
pub(crate) fn parse_digest(s: &str) -> Result<String, ReferenceError> {
    let Some((algorithm, hex)) = s.split_once(':') else {
        return Err(ReferenceError::InvalidDigest(s.to_owned()));
    };
    let algorithm_ok = !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !algorithm_ok || !hex_ok {
        return Err(ReferenceError::InvalidDigest(s.to_owned()));
    }
    if algorithm != "sha256" {
        return Err(ReferenceError::UnsupportedDigest(algorithm.to_owned()));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ReferenceError::InvalidDigest(s.to_owned()));
    }
    Ok(s.to_owned())
}

/// `[\w][\w.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A host name or address with an optional port.
fn valid_registry(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        && !host.starts_with(['.', '-', ':'])
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn r(registry: Option<&str>, repo: &str, tag: Option<&str>, digest: Option<&str>) -> Reference {
        Reference {
            registry: registry.map(str::to_owned),
            repository: repo.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        }
    }

    #[test]
    fn parses_names_tags_and_digests() {
        assert_eq!(
            parse("library/python:3.11"),
            Ok(r(None, "library/python", Some("3.11"), None))
        );
        assert_eq!(parse("alpine"), Ok(r(None, "alpine", None, None)));
        assert_eq!(
            parse("alpine").map(|r| r.manifest_reference().to_owned()),
            Ok("latest".into())
        );
        let pinned = parse(&format!("myapp@{D}")).expect("pinned");
        assert_eq!(pinned, r(None, "myapp", None, Some(D)));
        assert_eq!(pinned.manifest_reference(), D);
        let both = parse(&format!("a/b:v1@{D}")).expect("both");
        assert_eq!(both.manifest_reference(), D);
        assert_eq!(both.to_string(), format!("a/b:v1@{D}"));
        assert_eq!(
            parse("localhost:5000/team/app:v2"),
            Ok(r(Some("localhost:5000"), "team/app", Some("v2"), None))
        );
        assert_eq!(
            parse("localhost/app"),
            Ok(r(Some("localhost"), "app", None, None))
        );
        assert_eq!(
            parse("registry.example.com/a.b__c-d/e---f:V_1.0-x"),
            Ok(r(
                Some("registry.example.com"),
                "a.b__c-d/e---f",
                Some("V_1.0-x"),
                None
            ))
        );
        // A port-less host without a dot is a path component.
        assert_eq!(parse("team/app"), Ok(r(None, "team/app", None, None)));
    }

    #[test]
    fn refuses_malformed_references() {
        assert_eq!(parse(""), Err(ReferenceError::Empty));
        assert!(matches!(
            parse("Upper/case"),
            Err(ReferenceError::InvalidName(_))
        ));
        assert!(matches!(parse("a//b"), Err(ReferenceError::InvalidName(_))));
        assert!(matches!(
            parse("a/../b"),
            Err(ReferenceError::InvalidName(_))
        ));
        assert!(matches!(parse("-a"), Err(ReferenceError::InvalidName(_))));
        assert!(matches!(
            parse("a___b"),
            Err(ReferenceError::InvalidName(_))
        ));
        assert!(matches!(parse("a._b"), Err(ReferenceError::InvalidName(_))));
        assert!(matches!(parse("a:"), Err(ReferenceError::InvalidTag(_))));
        assert!(matches!(parse("a:-x"), Err(ReferenceError::InvalidTag(_))));
        assert!(matches!(
            parse(&format!("a:{}", "x".repeat(129))),
            Err(ReferenceError::InvalidTag(_))
        ));
        assert!(matches!(
            parse("a@sha256:abc"),
            Err(ReferenceError::InvalidDigest(_))
        ));
        assert!(matches!(
            parse("a@sha256:"),
            Err(ReferenceError::InvalidDigest(_))
        ));
        assert!(matches!(
            parse(&format!(
                "a@{}",
                D.to_uppercase().replace("SHA256", "sha256")
            )),
            Err(ReferenceError::InvalidDigest(_))
        ));
        assert!(matches!(
            parse(&format!("a@sha512:{}", "ab".repeat(64))),
            Err(ReferenceError::UnsupportedDigest(_))
        ));
        assert_eq!(parse(&"a".repeat(256)), Err(ReferenceError::NameTooLong));
        assert!(matches!(
            parse("bad_host.com/x"),
            Err(ReferenceError::InvalidRegistry(_))
        ));
        assert!(matches!(parse("/x"), Err(ReferenceError::InvalidName(_))));
    }
}
