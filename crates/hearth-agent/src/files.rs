//! `WriteFile` and `ReadFile` streams. Files are streamed in chunks, never held
//! whole in memory; writes go to a temporary file renamed over the target.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hearth_proto::{ErrorKind, Frame, FrameKind, ReadFileRequest, Reply, WriteFileRequest};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::stream::{FrameSink, StreamFailure};

/// Bytes per `Data` frame when reading a file.
const READ_CHUNK: usize = 128 * 1024;
const DEFAULT_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("invalid path {0:?}")]
    BadPath(String),
    #[error("{path} is a directory")]
    IsDirectory { path: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("the host abandoned the transfer")]
    Abandoned,
}

impl StreamFailure for FilesError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::BadPath(_) | Self::IsDirectory { .. } => ErrorKind::InvalidRequest,
            Self::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                _ => ErrorKind::Internal,
            },
            Self::Abandoned => ErrorKind::Internal,
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FilesError {
    let path = path.display().to_string();
    move |source| FilesError::Io {
        action,
        path,
        source,
    }
}

/// Removes the temporary file unless the transfer completed.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A unique temporary name next to `target` (same filesystem, so rename is atomic).
fn temp_path_for(target: &Path) -> Option<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name()?.to_string_lossy();
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp_name = format!(".{name}.hearth-{}-{unique}", std::process::id());
    Some(target.with_file_name(temp_name))
}

/// Runs a `WriteFile` stream: `Data` frames until `Eof`, then sync, permissions,
/// owner, rename, and `Reply::Written`.
pub async fn write_file(
    stream: u32,
    request: WriteFileRequest,
    mut inbox: mpsc::Receiver<Frame>,
    sink: &FrameSink,
) -> Result<(), FilesError> {
    let target = PathBuf::from(&request.path);
    let temp_path = match temp_path_for(&target) {
        Some(path) if !request.path.is_empty() => path,
        _ => return Err(FilesError::BadPath(request.path)),
    };
    if request.create_parents {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_error("create directory", parent))?;
        }
    }
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp_path)
        .await
        .map_err(io_error("create", &target))?;
    let mut temp = TempFile {
        path: temp_path,
        keep: false,
    };
    let mut file = file;
    let mut bytes: u64 = 0;
    loop {
        let Some(frame) = inbox.recv().await else {
            return Err(FilesError::Abandoned);
        };
        match frame.kind {
            FrameKind::Data => {
                file.write_all(&frame.payload)
                    .await
                    .map_err(io_error("write", &target))?;
                bytes += frame.payload.len() as u64;
            }
            FrameKind::Eof => break,
            _ => {}
        }
    }
    drop(inbox);
    file.flush().await.map_err(io_error("write", &target))?;
    let file = file.into_std().await;
    let mode = request.mode.unwrap_or(DEFAULT_MODE) & 0o7777;
    let (uid, gid) = (request.uid, request.gid);
    let temp_path = temp.path.clone();
    let finish_target = target.clone();
    tokio::task::spawn_blocking(move || {
        finish_write(&file, &temp_path, &finish_target, mode, uid, gid)
    })
    .await
    .map_err(|_| FilesError::Io {
        action: "finish",
        path: target.display().to_string(),
        source: io::Error::other("task failed"),
    })??;
    temp.keep = true;
    let _ = sink.reply(stream, &Reply::Written { bytes }).await;
    Ok(())
}

fn finish_write(
    file: &std::fs::File,
    temp_path: &Path,
    target: &Path,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), FilesError> {
    file.sync_all().map_err(io_error("sync", target))?;
    // Owner first: chown clears set-id bits that chmod then sets.
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(file, uid, gid).map_err(io_error("chown", target))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_error("chmod", target))?;
    std::fs::rename(temp_path, target).map_err(io_error("rename onto", target))?;
    // Make the rename itself durable.
    if let Some(dir) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Runs a `ReadFile` stream: `Reply::FileInfo`, `Data` frames, `Eof`.
pub async fn read_file(
    stream: u32,
    request: ReadFileRequest,
    sink: &FrameSink,
) -> Result<(), FilesError> {
    let path = PathBuf::from(&request.path);
    if request.path.is_empty() {
        return Err(FilesError::BadPath(request.path));
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(io_error("open", &path))?;
    let meta = file.metadata().await.map_err(io_error("stat", &path))?;
    if meta.is_dir() {
        return Err(FilesError::IsDirectory { path: request.path });
    }
    let info = Reply::FileInfo {
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
    };
    if sink.reply(stream, &info).await.is_err() {
        return Ok(());
    }
    sink.send_from(stream, &mut file, READ_CHUNK)
        .await
        .map_err(io_error("read", &path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_sit_next_to_the_target() {
        let temp = temp_path_for(Path::new("/etc/app/config.toml")).expect("has a name");
        assert_eq!(temp.parent(), Some(Path::new("/etc/app")));
        let name = temp
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with(".config.toml.hearth-"));
        assert_eq!(temp_path_for(Path::new("/")), None);
    }

    #[test]
    fn error_kinds() {
        let missing = FilesError::Io {
            action: "open",
            path: "x".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        assert_eq!(
            FilesError::IsDirectory { path: "/".into() }.kind(),
            ErrorKind::InvalidRequest
        );
    }
}
