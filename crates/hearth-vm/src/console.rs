//! The guest console log, capped: a guest writing to its serial port forever
//! must not fill the disk.
//!
//! QEMU appends to `console.log` in the VM directory (`-chardev file,append=on`).
//! One thread per process (started by the first driver) looks at every VM
//! directory it was told of every [`INTERVAL`]; a log over [`CAP`] has its
//! last [`KEEP`] bytes copied to `console.log.1` (replacing the previous one)
//! and is truncated to zero, where QEMU's appends start again. So a VM's
//! console takes at most about `CAP + KEEP` plus what a guest writes in one
//! interval (the serial port's rate under TCG is a few MiB/s at most), and the
//! jail's RLIMIT_FSIZE ends a QEMU whose log outruns that while no hearth
//! process is watching. Bytes written between the copy and the truncation
//! are lost: a console log is diagnostics, not data.
//!
//! Why not a pipe the server drains: QEMU's serial port would block or lose
//! output whenever the server is restarting, and every restart would need to
//! hand the pipe over; a file survives both.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// A console log larger than this is cut.
pub const CAP: u64 = 4 << 20;
/// What is kept of it (in `console.log.1`).
pub const KEEP: u64 = 256 << 10;
const INTERVAL: Duration = Duration::from_secs(1);
const LOG: &str = "console.log";
const PREVIOUS: &str = "console.log.1";

static WATCHED: OnceLock<Mutex<BTreeSet<PathBuf>>> = OnceLock::new();

/// Caps the console logs of every VM directory under `vms_dir` from now on.
pub fn watch(vms_dir: &Path) {
    let mut started = false;
    let set = WATCHED.get_or_init(|| {
        started = true;
        Mutex::new(BTreeSet::new())
    });
    if let Ok(mut set) = set.lock() {
        set.insert(vms_dir.to_path_buf());
    }
    if started {
        let _ = std::thread::Builder::new()
            .name("console-cap".into())
            .spawn(|| loop {
                std::thread::sleep(INTERVAL);
                let dirs: Vec<PathBuf> = WATCHED
                    .get()
                    .and_then(|set| set.lock().ok().map(|s| s.iter().cloned().collect()))
                    .unwrap_or_default();
                for vms in dirs {
                    for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                        let _ = cap(&entry.path());
                    }
                }
            });
    }
}

/// Cuts `dir/console.log` if it is over [`CAP`]. Files are opened without
/// following symlinks: the directory is writable by the VM's jailed QEMU.
pub fn cap(dir: &Path) -> std::io::Result<bool> {
    let path = dir.join(LOG);
    let mut log = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let meta = log.metadata()?;
    if !meta.is_file() || meta.len() <= CAP {
        return Ok(false);
    }
    log.seek(SeekFrom::Start(meta.len() - KEEP))?;
    let mut tail = Vec::with_capacity(KEEP as usize);
    Read::by_ref(&mut log).take(KEEP).read_to_end(&mut tail)?;
    let previous = dir.join(PREVIOUS);
    let mut out =
        crate::disk::create_fresh(&previous).map_err(|e| std::io::Error::other(e.to_string()))?;
    out.write_all(&tail)?;
    log.set_len(0)?;
    Ok(true)
}

/// The console as far as it is kept: the saved tail, then the current log.
pub fn read(dir: &Path) -> Vec<u8> {
    let read = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(dir.join(name))
            .and_then(|mut f| {
                let mut bytes = Vec::new();
                Read::by_ref(&mut f)
                    .take(CAP + KEEP)
                    .read_to_end(&mut bytes)?;
                Ok(bytes)
            })
            .unwrap_or_default()
    };
    let mut bytes = read(PREVIOUS);
    bytes.extend(read(LOG));
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_over_the_cap_keeps_only_its_tail_and_appends_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LOG);
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        let line = b"guest says hello forever\n";
        let mut written = 0u64;
        while written <= CAP {
            writer.write_all(line).expect("write");
            written += line.len() as u64;
        }
        writer.write_all(b"LAST LINE\n").expect("write");
        assert!(cap(dir.path()).expect("cap"));
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        let kept = std::fs::read(dir.path().join(PREVIOUS)).expect("previous");
        assert_eq!(kept.len() as u64, KEEP);
        assert!(kept.ends_with(b"LAST LINE\n"));
        // The writer (QEMU, appending) carries on at the start of the file.
        writer.write_all(b"after\n").expect("write");
        assert_eq!(std::fs::read(&path).expect("log"), b"after\n");
        assert!(read(dir.path()).ends_with(b"LAST LINE\nafter\n"));
        // Under the cap: untouched.
        assert!(!cap(dir.path()).expect("cap"));
    }

    #[test]
    fn a_symlinked_log_is_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("precious");
        std::fs::write(&target, vec![b'x'; (CAP + 10) as usize]).expect("target");
        std::os::unix::fs::symlink(&target, dir.path().join(LOG)).expect("link");
        assert!(cap(dir.path()).is_err());
        assert_eq!(
            std::fs::metadata(&target).expect("meta").len(),
            CAP + 10,
            "the link's target is left alone"
        );
    }
}
