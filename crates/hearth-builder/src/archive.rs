//! Safe extraction of a code-artifact zip into a directory.
//!
//! [`extract`] first checks every entry's metadata without writing anything
//! (entry count, name length, path depth, path safety, entry type, declared
//! sizes, duplicates, compression method, a `Dockerfile` at the root), then
//! writes the files, counting the bytes actually decompressed so that a
//! compression bomb stops at the limits whatever its headers claim (and at its
//! declared size, since a size that lies is itself an error).
//!
//! Refused: `..` components, absolute paths, backslashes, NUL, Windows drive
//! prefixes (`C:`), symlinks and other special entries (only regular files and
//! directories are created), encrypted entries, compression other than
//! stored/deflate, duplicate names (including a file that is also a parent
//! directory of another entry). File modes keep their permission bits
//! (`& 0o777`, no setuid/setgid/sticky; 0o644 when the zip has none);
//! directories are created 0o755.
//!
//! On error the destination may hold a partial tree; the caller removes it.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hearth_api::{BuildErrorCode, BuildFailure};
use hearth_vm::error_chain;
use zip::CompressionMethod;

/// Limits applied to one artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest decompressed size of one file, in bytes.
    pub max_file_bytes: u64,
    /// Largest decompressed size of all files together, in bytes.
    pub max_total_bytes: u64,
    /// Most entries (files and directories).
    pub max_entries: usize,
    /// Most path components in an entry name.
    pub max_depth: usize,
    /// Longest entry name, in bytes.
    pub max_name_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 1 << 30,
            max_total_bytes: 4 << 30,
            max_entries: 100_000,
            max_depth: 64,
            max_name_len: 4096,
        }
    }
}

/// What [`extract`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extracted {
    pub files: usize,
    pub dirs: usize,
    /// Total decompressed bytes written.
    pub bytes: u64,
}

/// Why an artifact could not be extracted. [`ArchiveError::code`] gives the
/// build error code.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a valid zip archive")]
    NotZip(#[source] zip::result::ZipError),
    #[error("corrupt zip entry {name:?}")]
    Corrupt {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("more than {max} entries")]
    TooManyEntries { max: usize },
    #[error("entry name longer than {max} bytes")]
    NameTooLong { max: usize },
    #[error("entry {name:?} is nested deeper than {max} directories")]
    TooDeep { name: String, max: usize },
    #[error("entry {name:?} has an unsafe path")]
    UnsafePath { name: String },
    #[error("entry {name:?} is a symbolic link")]
    Symlink { name: String },
    #[error("entry {name:?} is not a regular file or directory")]
    SpecialFile { name: String },
    #[error("entry {name:?} is encrypted")]
    Encrypted { name: String },
    #[error("entry {name:?} uses an unsupported compression method")]
    UnsupportedCompression { name: String },
    #[error("duplicate entry {name:?}")]
    Duplicate { name: String },
    #[error("duplicate entry names")]
    DuplicateNames,
    #[error("entry {name:?} is larger than {max} bytes")]
    FileTooLarge { name: String, max: u64 },
    #[error("artifact is larger than {max} bytes uncompressed")]
    TotalTooLarge { max: u64 },
    #[error("entry {name:?} is larger than its declared size")]
    SizeMismatch { name: String },
    #[error("no Dockerfile at the root of the artifact")]
    DockerfileNotFound,
    #[error("destination {path:?} is not an empty directory")]
    Destination { path: PathBuf },
    #[error("no space left to extract the artifact")]
    DiskFull(#[source] io::Error),
    #[error("cannot write {path:?}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ArchiveError {
    /// The build error code: `ARCHIVE_INVALID`, `ARCHIVE_DOCKERFILE_NOT_FOUND`,
    /// `DISK_STORAGE_FULL` or `INTERNAL_PLATFORM_ERROR`.
    pub fn code(&self) -> BuildErrorCode {
        match self {
            Self::DockerfileNotFound => BuildErrorCode::ArchiveDockerfileNotFound,
            Self::DiskFull(_) => BuildErrorCode::DiskStorageFull,
            Self::Destination { .. } | Self::Io { .. } => BuildErrorCode::InternalPlatformError,
            Self::NotZip(_)
            | Self::Corrupt { .. }
            | Self::TooManyEntries { .. }
            | Self::NameTooLong { .. }
            | Self::TooDeep { .. }
            | Self::UnsafePath { .. }
            | Self::Symlink { .. }
            | Self::SpecialFile { .. }
            | Self::Encrypted { .. }
            | Self::UnsupportedCompression { .. }
            | Self::Duplicate { .. }
            | Self::DuplicateNames
            | Self::FileTooLarge { .. }
            | Self::TotalTooLarge { .. }
            | Self::SizeMismatch { .. } => BuildErrorCode::ArchiveInvalid,
        }
    }
}

/// The build's failure: the code and the error with its causes.
impl From<&ArchiveError> for BuildFailure {
    fn from(err: &ArchiveError) -> BuildFailure {
        BuildFailure::new(err.code(), error_chain(err))
    }
}

/// Maps a write-side I/O error: ENOSPC/EDQUOT are "disk full".
fn write_error(path: &Path, source: io::Error) -> ArchiveError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ArchiveError::DiskFull(source),
        _ => ArchiveError::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
}

/// One entry that passed the metadata checks.
#[derive(Debug)]
struct Planned {
    index: usize,
    name: String,
    rel: String,
    kind: Kind,
    mode: u32,
    declared: u64,
}

/// Checks an entry name and returns it normalised (`a/b/c`, no `.` or empty
/// components), or `None` if it is unsafe.
fn normalise(name: &str) -> Option<String> {
    if name.starts_with('/') || name.contains('\\') || name.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for (i, part) in name.split('/').enumerate() {
        match part {
            "" | "." => {}
            ".." => return None,
            p => {
                // Windows drive prefix such as `C:`.
                if i == 0 && p.len() >= 2 && p.as_bytes()[1] == b':' {
                    return None;
                }
                parts.push(p);
            }
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

/// The entry count the end-of-central-directory record declares, if it can
/// be found. The zip reader keys entries by name, so a count larger than
/// what it returns means duplicate names.
fn declared_entries<R: Read + Seek>(reader: &mut R) -> io::Result<Option<u64>> {
    const EOCD: &[u8] = b"PK\x05\x06";
    let len = reader.seek(SeekFrom::End(0))?;
    let tail_len = len.min(22 + 65_535);
    let tail_start = len - tail_len;
    reader.seek(SeekFrom::Start(tail_start))?;
    let mut tail = vec![0u8; usize::try_from(tail_len).unwrap_or(0)];
    reader.read_exact(&mut tail)?;
    let Some(pos) = (0..tail.len().saturating_sub(21)).rev().find(|&p| {
        let comment = usize::from(u16::from_le_bytes([tail[p + 20], tail[p + 21]]));
        &tail[p..p + 4] == EOCD && p + 22 + comment == tail.len()
    }) else {
        return Ok(None);
    };
    let count = u16::from_le_bytes([tail[pos + 10], tail[pos + 11]]);
    if count != 0xFFFF {
        return Ok(Some(u64::from(count)));
    }
    // Zip64: the locator sits just before the EOCD record.
    let Some(loc) = pos.checked_sub(20) else {
        return Ok(None);
    };
    if &tail[loc..loc + 4] != b"PK\x06\x07" {
        return Ok(None);
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&tail[loc + 8..loc + 16]);
    let record = u64::from_le_bytes(off);
    if record.checked_add(56).is_none_or(|end| end > len) {
        return Ok(None);
    }
    reader.seek(SeekFrom::Start(record))?;
    let mut buf = [0u8; 56];
    reader.read_exact(&mut buf)?;
    if &buf[..4] != b"PK\x06\x06" {
        return Ok(None);
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&buf[32..40]);
    Ok(Some(u64::from_le_bytes(n)))
}

/// Extracts the zip read from `reader` into `dest`, which must be an existing
/// empty directory.
pub fn extract<R: Read + Seek>(
    mut reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<Extracted, ArchiveError> {
    let empty = fs::read_dir(dest)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if !empty {
        return Err(ArchiveError::Destination {
            path: dest.to_path_buf(),
        });
    }

    let declared = declared_entries(&mut reader).map_err(|e| ArchiveError::NotZip(e.into()))?;
    if declared.is_some_and(|n| n > limits.max_entries as u64) {
        return Err(ArchiveError::TooManyEntries {
            max: limits.max_entries,
        });
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| ArchiveError::NotZip(e.into()))?;
    let mut zip = zip::ZipArchive::new(reader).map_err(ArchiveError::NotZip)?;
    if zip.len() > limits.max_entries {
        return Err(ArchiveError::TooManyEntries {
            max: limits.max_entries,
        });
    }
    if declared.is_some_and(|n| n != zip.len() as u64) {
        return Err(ArchiveError::DuplicateNames);
    }

    let plan = check_entries(&mut zip, limits)?;

    let mut done = Extracted::default();
    for entry in &plan {
        let path = dest.join(&entry.rel);
        match entry.kind {
            Kind::Dir => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&path)
                    .map_err(|e| write_error(&path, e))?;
                done.dirs += 1;
            }
            Kind::File => {
                if let Some(parent) = path.parent() {
                    DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)
                        .map_err(|e| write_error(parent, e))?;
                }
                let file = zip
                    .by_index(entry.index)
                    .map_err(|e| ArchiveError::Corrupt {
                        name: entry.name.clone(),
                        source: e.into(),
                    })?;
                let remaining = limits.max_total_bytes.saturating_sub(done.bytes);
                let written = write_file(file, &path, entry, limits.max_file_bytes, remaining)
                    .inspect_err(|_| {
                        let _ = fs::remove_file(&path);
                    })
                    .map_err(|e| match e {
                        CopyError::TotalLimit => ArchiveError::TotalTooLarge {
                            max: limits.max_total_bytes,
                        },
                        CopyError::FileLimit => ArchiveError::FileTooLarge {
                            name: entry.name.clone(),
                            max: limits.max_file_bytes,
                        },
                        CopyError::Declared => ArchiveError::SizeMismatch {
                            name: entry.name.clone(),
                        },
                        CopyError::Read(source) => ArchiveError::Corrupt {
                            name: entry.name.clone(),
                            source,
                        },
                        CopyError::Write(source) => write_error(&path, source),
                    })?;
                done.bytes += written;
                done.files += 1;
            }
        }
    }
    Ok(done)
}

/// The metadata pass: nothing is written.
fn check_entries<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    limits: &Limits,
) -> Result<Vec<Planned>, ArchiveError> {
    let mut seen: HashMap<String, Kind> = HashMap::new();
    let mut plan = Vec::with_capacity(zip.len());
    let mut declared_total: u64 = 0;
    let mut dockerfile = false;
    for index in 0..zip.len() {
        let file = zip.by_index_raw(index).map_err(ArchiveError::NotZip)?;
        let name = file.name().to_string();
        if name.len() > limits.max_name_len {
            return Err(ArchiveError::NameTooLong {
                max: limits.max_name_len,
            });
        }
        let rel =
            normalise(&name).ok_or_else(|| ArchiveError::UnsafePath { name: name.clone() })?;
        if rel.split('/').count() > limits.max_depth {
            return Err(ArchiveError::TooDeep {
                name,
                max: limits.max_depth,
            });
        }
        let mode = file.unix_mode();
        let kind = match mode.map(|m| m & S_IFMT) {
            Some(S_IFLNK) => return Err(ArchiveError::Symlink { name }),
            Some(S_IFDIR) => Kind::Dir,
            Some(0) | None if name.ends_with('/') => Kind::Dir,
            Some(S_IFREG) | Some(0) | None => Kind::File,
            Some(_) => return Err(ArchiveError::SpecialFile { name }),
        };
        if kind == Kind::File && name.ends_with('/') {
            return Err(ArchiveError::UnsafePath { name });
        }
        if file.encrypted() {
            return Err(ArchiveError::Encrypted { name });
        }
        if kind == Kind::File
            && !matches!(
                file.compression(),
                CompressionMethod::Stored | CompressionMethod::Deflated
            )
        {
            return Err(ArchiveError::UnsupportedCompression { name });
        }
        let declared = if kind == Kind::File { file.size() } else { 0 };
        if declared > limits.max_file_bytes {
            return Err(ArchiveError::FileTooLarge {
                name,
                max: limits.max_file_bytes,
            });
        }
        declared_total = declared_total.saturating_add(declared);
        if declared_total > limits.max_total_bytes {
            return Err(ArchiveError::TotalTooLarge {
                max: limits.max_total_bytes,
            });
        }

        // Every parent must be (or become) a directory, never a file.
        let mut end = 0;
        while let Some(slash) = rel[end..].find('/') {
            let parent = &rel[..end + slash];
            match seen.get(parent) {
                Some(Kind::File) => return Err(ArchiveError::Duplicate { name }),
                Some(Kind::Dir) => {}
                None => {
                    seen.insert(parent.to_string(), Kind::Dir);
                }
            }
            end += slash + 1;
        }
        match (seen.get(&rel), kind) {
            (None, _) => {
                seen.insert(rel.clone(), kind);
            }
            (Some(Kind::Dir), Kind::Dir) => {}
            (Some(_), _) => return Err(ArchiveError::Duplicate { name }),
        }

        if kind == Kind::File && rel == "Dockerfile" {
            dockerfile = true;
        }
        let perm = mode.map_or(0o644, |m| m & 0o777);
        plan.push(Planned {
            index,
            name,
            rel,
            kind,
            mode: perm,
            declared,
        });
    }
    if !dockerfile {
        return Err(ArchiveError::DockerfileNotFound);
    }
    Ok(plan)
}

#[derive(Debug)]
enum CopyError {
    FileLimit,
    TotalLimit,
    Declared,
    Read(io::Error),
    Write(io::Error),
}

fn write_file(
    reader: impl Read,
    path: &Path,
    entry: &Planned,
    max_file: u64,
    max_remaining: u64,
) -> Result<u64, CopyError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(CopyError::Write)?;
    let written = copy_limited(reader, &mut out, max_file, max_remaining, entry.declared)?;
    out.set_permissions(fs::Permissions::from_mode(entry.mode))
        .map_err(CopyError::Write)?;
    Ok(written)
}

/// Copies, failing as soon as more than `max_file`, `max_remaining` or
/// `declared` bytes have come out of the decompressor.
fn copy_limited(
    mut reader: impl Read,
    out: &mut impl Write,
    max_file: u64,
    max_remaining: u64,
    declared: u64,
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        total += n as u64;
        if total > max_file {
            return Err(CopyError::FileLimit);
        }
        if total > max_remaining {
            return Err(CopyError::TotalLimit);
        }
        if total > declared {
            return Err(CopyError::Declared);
        }
        out.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

/// Whether `path` (relative, `/`-separated) is excluded by `.dockerignore`
/// `patterns` (one pattern per element, as written; blank lines and `#`
/// comments are skipped). Docker semantics: the last matching pattern wins,
/// `!` re-includes, a leading `/` is ignored, `*` and `?` do not cross `/`,
/// `**` matches any number of directories, and a pattern that matches a
/// directory also excludes everything below it.
pub fn ignored(path: &str, patterns: &[String]) -> bool {
    let path = clean(path);
    let mut result = false;
    for raw in patterns {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negate, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p.trim()),
            None => (false, line),
        };
        let pattern = clean(pattern);
        if pattern.is_empty() {
            continue;
        }
        // A trailing `**` makes a pattern that matches a directory also
        // match everything below it.
        let mut pat: Vec<&str> = pattern.split('/').collect();
        pat.push("**");
        let comps: Vec<&str> = path.split('/').collect();
        let matched = match_components(&pat, &comps);
        if matched {
            result = !negate;
        }
    }
    result
}

/// Whether a COPY source `pattern` (`*`, `?`, `[...]` within components,
/// `**` across them) matches the context path `path`, both `/`-separated.
pub(crate) fn glob_path(pattern: &str, path: &str) -> bool {
    let pattern = clean(pattern);
    let path = clean(path);
    let pat: Vec<&str> = pattern.split('/').collect();
    let comps: Vec<&str> = path.split('/').collect();
    match_components(&pat, &comps)
}

/// Strips leading `/` and `./`, collapses `//` and `.` components.
pub(crate) fn clean(p: &str) -> String {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether the component patterns match the path components; `**` matches
/// zero or more components. Dynamic programming, so hostile patterns with
/// many `**` stay polynomial.
fn match_components(pat: &[&str], path: &[&str]) -> bool {
    let n = path.len();
    // next[j]: pat[i + 1..] matches path[j..].
    let mut next = vec![false; n + 1];
    next[n] = true;
    for p in pat.iter().rev() {
        let mut cur = vec![false; n + 1];
        for j in (0..=n).rev() {
            cur[j] = if *p == "**" {
                next[j] || (j < n && cur[j + 1])
            } else {
                j < n && next[j + 1] && glob(p.as_bytes(), path[j].as_bytes())
            };
        }
        next = cur;
    }
    next[0]
}

/// `*`, `?`, `[...]` and `\` escapes within one path component.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star = Some((p, i));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, next)) = class(&pat[p..], s[i]) {
                        if ok {
                            p += next;
                            i += 1;
                            continue;
                        }
                    } else if s[i] == b'[' {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() && pat[p + 1] == s[i] => {
                    p += 2;
                    i += 1;
                    continue;
                }
                b'\\' if p + 1 < pat.len() => {}
                c if c == s[i] => {
                    p += 1;
                    i += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp + 1;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against a `[...]` class at the start of `pat`; returns whether
/// it matched and the class's length, or `None` if the class is unterminated.
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut j = 1;
    let negate = matches!(pat.get(j), Some(b'^') | Some(b'!'));
    if negate {
        j += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *pat.get(j)?;
        if lo == b']' && !first {
            return Some((matched != negate, j + 1));
        }
        first = false;
        if pat.get(j + 1) == Some(&b'-') && pat.get(j + 2).is_some_and(|&h| h != b']') {
            let hi = *pat.get(j + 2)?;
            matched |= lo <= c && c <= hi;
            j += 3;
        } else {
            matched |= lo == c;
            j += 1;
        }
    }
}

#[cfg(test)]
#[path = "archive_tests.rs"]
mod tests;
