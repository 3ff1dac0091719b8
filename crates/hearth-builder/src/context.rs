//! The build context on the host: which files a COPY or ADD selects, and a
//! digest of them for the step cache.
//!
//! The context is the extracted code artifact ([`crate::archive::extract`]
//! refuses symlinks and special files, so it holds only regular files and
//! directories). Sources are relative to its root; `..` that would leave it is
//! refused. Globs follow Docker: `*`, `?` and `[...]` within a path component.
//! Paths excluded by `.dockerignore` are treated as absent.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::archive::{clean, glob_path, ignored};

/// Most entries one COPY may select (the artifact limits bound it anyway).
pub const MAX_SELECTED: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{0:?} is outside the build context")]
    Outside(String),
    #[error("{0:?} is not in the build context (or .dockerignore excludes it)")]
    NotFound(String),
    #[error("{0:?} selects more than {MAX_SELECTED} entries")]
    TooMany(String),
    #[error("cannot read {0} in the build context")]
    Io(PathBuf, #[source] std::io::Error),
}

/// One file or directory to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where it is on the host.
    pub source: PathBuf,
    /// Where it goes, relative to the destination directory (`""`: the
    /// destination itself, for a single file copied to a file path).
    pub dest: String,
    pub is_dir: bool,
    /// Permission bits.
    pub mode: u32,
    pub size: u64,
}

/// What a COPY/ADD selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub entries: Vec<Entry>,
    /// Whether the destination is a directory (several sources, a glob, a
    /// directory source, or a destination ending in `/`).
    pub dest_is_dir: bool,
    /// BLAKE3 over every entry's destination, type, mode and content.
    pub digest: String,
}

/// The `.dockerignore` patterns at the context's root (none when absent).
pub fn dockerignore(context: &Path) -> Vec<String> {
    fs::read_to_string(context.join(".dockerignore"))
        .map(|text| text.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// A source as a clean context-relative path; `""` is the root.
fn normalize(source: &str) -> Result<String, ContextError> {
    let mut parts: Vec<&str> = Vec::new();
    for part in source.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(ContextError::Outside(source.to_string()));
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Every context path (relative), directories before their contents, sorted.
fn walk(context: &Path, ignore: &[String]) -> Result<Vec<(String, bool)>, ContextError> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            context.to_path_buf()
        } else {
            context.join(&rel)
        };
        let entries = fs::read_dir(&dir).map_err(|e| ContextError::Io(dir.clone(), e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ContextError::Io(dir.clone(), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry
                .file_type()
                .map_err(|e| ContextError::Io(entry.path(), e))?
                .is_dir();
            names.push((name, is_dir));
        }
        names.sort();
        for (name, is_dir) in names.into_iter().rev() {
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if ignored(&path, ignore) {
                continue;
            }
            if out.len() >= MAX_SELECTED {
                return Err(ContextError::TooMany(rel));
            }
            if is_dir {
                stack.push(path.clone());
            }
            out.push((path, is_dir));
        }
    }
    out.sort();
    Ok(out)
}

/// Selects the files `sources` name in `context` for a copy to `dest`
/// (reads the tree; a build with several COPY steps reads it once with
/// [`Tree::read`]).
pub fn select(
    context: &Path,
    sources: &[String],
    dest: &str,
    ignore: &[String],
) -> Result<Selection, ContextError> {
    Tree::read(context, ignore)?.select(sources, dest)
}

/// A build context's paths, minus what `.dockerignore` excludes. The context
/// does not change during a build, so one read serves every COPY.
#[derive(Debug, Clone)]
pub struct Tree {
    root: PathBuf,
    /// Relative paths and whether each is a directory, sorted.
    paths: Vec<(String, bool)>,
}

impl Tree {
    pub fn read(context: &Path, ignore: &[String]) -> Result<Tree, ContextError> {
        Ok(Tree {
            root: context.to_path_buf(),
            paths: walk(context, ignore)?,
        })
    }

    /// Selects the files `sources` name for a copy to `dest` (their content
    /// is read for the digest).
    pub fn select(&self, sources: &[String], dest: &str) -> Result<Selection, ContextError> {
        let (context, all) = (self.root.as_path(), &self.paths);
        let mut matched: Vec<(String, bool)> = Vec::new();
        let mut any_glob = false;
        for source in sources {
            let cleaned = normalize(source)?;
            if cleaned.is_empty() {
                matched.push((String::new(), true));
                continue;
            }
            if has_glob(&cleaned) {
                any_glob = true;
                let before = matched.len();
                matched.extend(
                    all.iter()
                        .filter(|(path, _)| glob_path(&cleaned, path))
                        .cloned(),
                );
                if matched.len() == before {
                    return Err(ContextError::NotFound(source.clone()));
                }
            } else {
                match all.iter().find(|(path, _)| *path == cleaned) {
                    Some(found) => matched.push(found.clone()),
                    None => return Err(ContextError::NotFound(source.clone())),
                }
            }
        }
        let dest_is_dir = dest.ends_with('/')
            || sources.len() > 1
            || any_glob
            || matched.iter().any(|(_, is_dir)| *is_dir);
        let mut entries = Vec::new();
        for (path, is_dir) in &matched {
            if *is_dir {
                // A directory source copies its contents, not itself.
                let prefix = if path.is_empty() {
                    String::new()
                } else {
                    format!("{path}/")
                };
                for (sub, sub_is_dir) in all.iter().filter(|(p, _)| p.starts_with(&prefix)) {
                    entries.push(entry(context, sub, &sub[prefix.len()..], *sub_is_dir)?);
                }
            } else {
                let name = if dest_is_dir {
                    path.rsplit('/').next().unwrap_or(path.as_str())
                } else {
                    ""
                };
                entries.push(entry(context, path, name, false)?);
            }
            if entries.len() > MAX_SELECTED {
                return Err(ContextError::TooMany(path.clone()));
            }
        }
        entries.sort_by(|a, b| a.dest.cmp(&b.dest));
        entries.dedup_by(|a, b| a.dest == b.dest);
        let digest = digest(&entries)?;
        Ok(Selection {
            entries,
            dest_is_dir,
            digest,
        })
    }
}

/// Bytes in a directory tree (not following symlinks); unreadable parts count 0.
pub fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.path().symlink_metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn entry(context: &Path, rel: &str, dest: &str, is_dir: bool) -> Result<Entry, ContextError> {
    let source = context.join(rel);
    let meta = fs::symlink_metadata(&source).map_err(|e| ContextError::Io(source.clone(), e))?;
    Ok(Entry {
        source,
        dest: clean(dest),
        is_dir,
        mode: meta.permissions().mode() & 0o7777,
        size: if is_dir { 0 } else { meta.len() },
    })
}

fn digest(entries: &[Entry]) -> Result<String, ContextError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    for e in entries {
        hasher.update(e.dest.as_bytes());
        hasher.update(&[0, u8::from(e.is_dir)]);
        hasher.update(&e.mode.to_le_bytes());
        if !e.is_dir {
            let mut file =
                fs::File::open(&e.source).map_err(|err| ContextError::Io(e.source.clone(), err))?;
            hasher.update(&e.size.to_le_bytes());
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(|err| ContextError::Io(e.source.clone(), err))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("app/static")).expect("mkdir");
        fs::write(root.join("Dockerfile"), "FROM scratch\n").expect("write");
        fs::write(root.join("app/main.py"), "print(1)\n").expect("write");
        fs::write(root.join("app/util.py"), "x = 2\n").expect("write");
        fs::write(root.join("app/static/index.html"), "<p>hi</p>").expect("write");
        fs::write(root.join("secret.env"), "TOKEN=1").expect("write");
        fs::write(root.join("notes.txt"), "n").expect("write");
        dir
    }

    fn dests(s: &Selection) -> Vec<&str> {
        s.entries.iter().map(|e| e.dest.as_str()).collect()
    }

    #[test]
    fn single_file_to_file_and_to_directory() {
        let ctx = context();
        let s = select(ctx.path(), &["app/main.py".into()], "/srv/run.py", &[]).expect("select");
        assert!(!s.dest_is_dir);
        assert_eq!(dests(&s), [""]);
        let s = select(ctx.path(), &["app/main.py".into()], "/srv/", &[]).expect("select");
        assert!(s.dest_is_dir);
        assert_eq!(dests(&s), ["main.py"]);
    }

    #[test]
    fn directory_copies_its_contents() {
        let ctx = context();
        let s = select(ctx.path(), &["app".into()], "/srv", &[]).expect("select");
        assert!(s.dest_is_dir);
        assert_eq!(
            dests(&s),
            ["main.py", "static", "static/index.html", "util.py"]
        );
        let root = select(ctx.path(), &[".".into()], "/srv", &[]).expect("select");
        assert!(dests(&root).contains(&"app/static/index.html"));
    }

    #[test]
    fn globs_and_dockerignore() {
        let ctx = context();
        let s = select(ctx.path(), &["app/*.py".into()], "/srv", &[]).expect("select");
        assert_eq!(dests(&s), ["main.py", "util.py"]);
        let ignore = vec!["*.env".to_string(), "app/static".to_string()];
        let s = select(ctx.path(), &[".".into()], "/srv", &ignore).expect("select");
        assert!(!dests(&s).contains(&"secret.env"));
        assert!(!dests(&s).iter().any(|d| d.starts_with("app/static")));
        assert!(matches!(
            select(ctx.path(), &["secret.env".into()], "/srv", &ignore),
            Err(ContextError::NotFound(_))
        ));
        assert!(matches!(
            select(ctx.path(), &["*.none".into()], "/srv", &[]),
            Err(ContextError::NotFound(_))
        ));
    }

    #[test]
    fn sources_cannot_leave_the_context() {
        let ctx = context();
        for bad in ["../etc/passwd", "app/../../x", "/../x"] {
            assert!(
                matches!(
                    select(ctx.path(), &[bad.into()], "/srv", &[]),
                    Err(ContextError::Outside(_))
                ),
                "{bad}"
            );
        }
        // Absolute sources are relative to the context, as in Docker.
        let s = select(ctx.path(), &["/app/main.py".into()], "/x", &[]).expect("select");
        assert_eq!(s.entries.len(), 1);
    }

    #[test]
    fn digest_follows_content_and_mode() {
        let ctx = context();
        let a = select(ctx.path(), &["app".into()], "/srv", &[]).expect("select");
        let again = select(ctx.path(), &["app".into()], "/srv", &[]).expect("select");
        assert_eq!(a.digest, again.digest);
        fs::write(ctx.path().join("app/util.py"), "x = 3\n").expect("write");
        let changed = select(ctx.path(), &["app".into()], "/srv", &[]).expect("select");
        assert_ne!(a.digest, changed.digest);
        let mut perms = fs::metadata(ctx.path().join("app/main.py"))
            .expect("meta")
            .permissions();
        perms.set_mode(0o755);
        fs::set_permissions(ctx.path().join("app/main.py"), perms).expect("chmod");
        let chmod = select(ctx.path(), &["app".into()], "/srv", &[]).expect("select");
        assert_ne!(changed.digest, chmod.digest);
    }
}
