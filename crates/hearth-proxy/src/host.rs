//! Endpoint host names: `<microvm-id>.<domain>[:port]`.
//!
//! The host comes from the client, so everything here assumes hostile input:
//! no allocation proportional to anything but a bounded prefix, no panics.

/// Longest host (with a port) worth looking at; DNS names are at most 253 bytes.
const MAX_HOST: usize = 253 + 1 + 6;
/// A DNS label is at most 63 bytes.
const MAX_LABEL: usize = 63;

/// The microVM id that `host` names under `domain`, lowercased, or `None` when
/// `host` is not `<label>.<domain>` with an optional `:port` and an optional
/// trailing dot (the bare domain, other domains, deeper names, IP literals,
/// user info and malformed ports are all `None`). `domain` is compared without
/// regard to ASCII case or a trailing dot.
pub fn microvm_id(host: &str, domain: &str) -> Option<String> {
    // Hosts are ASCII (IDNs arrive as punycode); this also keeps the byte
    // offsets below on character boundaries.
    if host.len() > MAX_HOST || !host.is_ascii() || !domain.is_ascii() {
        return None;
    }
    let name = strip_port(host)?;
    let name = name.strip_suffix('.').unwrap_or(name);
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() || name.len() <= domain.len() + 1 {
        return None;
    }
    let (label, rest) = name.split_at(name.len() - domain.len() - 1);
    let rest = rest.strip_prefix('.')?;
    if !rest.eq_ignore_ascii_case(domain) || !is_label(label) {
        return None;
    }
    Some(label.to_ascii_lowercase())
}

/// Whether `domain` is usable as the endpoint domain: dot-separated DNS labels.
pub fn is_valid_domain(domain: &str) -> bool {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty() && domain.len() <= 253 && domain.split('.').all(is_label)
}

/// `host` without its `:port`, if the port (when present) is a decimal u16.
fn strip_port(host: &str) -> Option<&str> {
    match host.rsplit_once(':') {
        None => Some(host),
        Some((name, port)) => {
            let digits =
                !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
            (digits && port.parse::<u16>().is_ok()).then_some(name)
        }
    }
}

/// A DNS label: 1-63 of `[A-Za-z0-9-]`, not starting or ending with `-`.
fn is_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LABEL
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "microvm-0f5c7a52-9d1e-4c1a-8a53-3b7d2f1e6c90";

    #[test]
    fn accepts_endpoint_hosts() {
        let plain = format!("{ID}.localhost");
        assert_eq!(microvm_id(&plain, "localhost").as_deref(), Some(ID));
        assert_eq!(
            microvm_id(&format!("{plain}:9080"), "localhost").as_deref(),
            Some(ID)
        );
        assert_eq!(
            microvm_id(&format!("{plain}."), "localhost").as_deref(),
            Some(ID)
        );
        assert_eq!(
            microvm_id(&format!("{plain}.:443"), "localhost").as_deref(),
            Some(ID)
        );
        assert_eq!(
            microvm_id(&format!("{}.LocalHost", ID.to_uppercase()), "localhost").as_deref(),
            Some(ID)
        );
        assert_eq!(microvm_id(&plain, "LOCALHOST.").as_deref(), Some(ID));
        let deep = format!("{ID}.endpoints.example.com:1");
        assert_eq!(
            microvm_id(&deep, "endpoints.example.com").as_deref(),
            Some(ID)
        );
        assert_eq!(
            microvm_id("a.localhost:65535", "localhost").as_deref(),
            Some("a")
        );
    }

    #[test]
    fn rejects_hostile_hosts() {
        let long_label = "a".repeat(64);
        let huge = "a.".repeat(10_000) + "localhost";
        let too_long_port = format!("{ID}.localhost:000080");
        let cases: Vec<String> = vec![
            String::new(),
            ":".into(),
            ":80".into(),
            ".".into(),
            "localhost".into(),
            "localhost:80".into(),
            ".localhost".into(),
            "..localhost".into(),
            "a..localhost".into(),
            "x.y.localhost".into(),
            format!("{ID}.localhost:"),
            format!("{ID}.localhost:99999"),
            format!("{ID}.localhost:65536"),
            format!("{ID}.localhost:-1"),
            format!("{ID}.localhost:+80"),
            format!("{ID}.localhost: 80"),
            format!("{ID}.localhost:80:80"),
            format!("{ID}.localhost:8a"),
            too_long_port,
            format!("{ID}.localhostx"),
            format!("{ID}localhost"),
            format!("{ID}.localhost.evil.com"),
            format!("{ID}.evil.com"),
            format!("evil.com.{ID}.localhost"),
            format!("user@{ID}.localhost"),
            format!("{ID}@evil.localhost"),
            format!("{ID} .localhost"),
            format!("{ID}\0.localhost"),
            format!("{ID}/.localhost"),
            format!("{ID}%2e.localhost"),
            "-a.localhost".into(),
            "a-.localhost".into(),
            "a_b.localhost".into(),
            "*.localhost".into(),
            "é.localhost".into(),
            "ａ.localhost".into(),
            "aélocalhost".into(),
            "éélocalhost".into(),
            "a.localhosté".into(),
            format!("{long_label}.localhost"),
            huge,
            "[::1]".into(),
            "[::1]:80".into(),
            "127.0.0.1".into(),
            "127.0.0.1:80".into(),
            "[fe80::1].localhost".into(),
            "a.localhost..".into(),
        ];
        for host in &cases {
            assert_eq!(microvm_id(host, "localhost"), None, "{host:?}");
        }
        assert_eq!(microvm_id("a.localhost", ""), None);
        assert_eq!(microvm_id("a.", "."), None);
    }

    #[test]
    fn validates_domains() {
        assert!(is_valid_domain("localhost"));
        assert!(is_valid_domain("lambda-microvm.us-east-1.example.com."));
        assert!(!is_valid_domain(""));
        assert!(!is_valid_domain("."));
        assert!(!is_valid_domain("a..b"));
        assert!(!is_valid_domain("*.example.com"));
        assert!(!is_valid_domain("example.com:80"));
    }
}
