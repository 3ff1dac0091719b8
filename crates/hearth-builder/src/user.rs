//! USER and `--chown` names: `user[:group]` resolved to numbers with the
//! image's own /etc/passwd and /etc/group, read through the agent.

use hearth_vm::agent::{AgentClient, CappedBuffer};

/// Why a `user[:group]` does not resolve (Docker's wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
}

/// `user[:group]` as numbers, looked up in the guest's /etc/passwd and
/// /etc/group when they are names. Returns (uid, gid, home).
pub async fn resolve_user(
    agent: &AgentClient,
    spec: &str,
) -> Result<(u32, u32, Option<String>), UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // The image's files are the tenant's: read at most MAX_ACCOUNT_FILE bytes.
    let read = |path: &'static str| async move {
        let mut buf = CappedBuffer::new(MAX_ACCOUNT_FILE);
        match agent.read_file(path, &mut buf).await {
            Ok(_) => String::from_utf8_lossy(&buf.into_bytes()).into_owned(),
            Err(_) => String::new(),
        }
    };
    let passwd = read("/etc/passwd").await;
    let entry = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && (f[0] == user || f[2] == user)).then(|| {
            (
                f[2].parse::<u32>().ok(),
                f[3].parse::<u32>().ok(),
                f[5].to_string(),
            )
        })
    });
    let (uid, primary_gid, home) = match (user.parse::<u32>(), entry) {
        (_, Some((Some(uid), gid, home))) => (uid, gid, Some(home)),
        (Ok(uid), _) => (uid, Some(uid), None),
        _ => return Err(UserError::NoUser(user.to_string())),
    };
    let gid = match group {
        None => primary_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read("/etc/group").await;
                groups
                    .lines()
                    .find_map(|line| {
                        let f: Vec<&str> = line.split(':').collect();
                        (f.len() >= 3 && f[0] == g)
                            .then(|| f[2].parse::<u32>().ok())
                            .flatten()
                    })
                    .ok_or_else(|| UserError::NoGroup(g.to_string()))?
            }
        },
    };
    Ok((uid, gid, home))
}

/// Largest /etc/passwd or /etc/group read to resolve a user.
const MAX_ACCOUNT_FILE: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn capped_buffer_refuses_past_its_limit() {
        let mut w = CappedBuffer::new(8);
        w.write_all(b"12345678").await.expect("fits");
        assert!(w.write_all(b"9").await.is_err());
        assert_eq!(w.into_bytes(), b"12345678");
    }
}
