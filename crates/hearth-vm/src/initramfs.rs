//! Builds the guest's initramfs: the agent as `/init`, the kernel modules it must
//! load, and their load order. Written as a `newc` cpio archive by hand because the
//! format is a few lines and no crate adds anything for writing it; cached by the
//! content hash of its inputs so a rebuilt agent yields a new initramfs.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write initramfs {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("agent binary {0} is dynamically linked; build it with +crt-static")]
    AgentNotStatic(PathBuf),
    #[error("module list {0} names no modules")]
    NoModules(PathBuf),
}

/// Inputs of an initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The static `hearth-agent` binary.
    pub agent: PathBuf,
    /// Directory with the `.ko` files and an `order` file listing them.
    pub modules_dir: PathBuf,
}

/// Returns the path of the initramfs for `spec` under `cache_dir`, building it
/// when no initramfs with the same content exists yet.
pub fn ensure(spec: &InitramfsSpec, cache_dir: &Path) -> Result<PathBuf, InitramfsError> {
    let agent =
        std::fs::read(&spec.agent).map_err(|e| InitramfsError::Read(spec.agent.clone(), e))?;
    if !is_static_elf(&agent) {
        return Err(InitramfsError::AgentNotStatic(spec.agent.clone()));
    }
    let order_path = spec.modules_dir.join("order");
    let order = std::fs::read_to_string(&order_path)
        .map_err(|e| InitramfsError::Read(order_path.clone(), e))?;
    let names: Vec<&str> = order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if names.is_empty() {
        return Err(InitramfsError::NoModules(order_path));
    }
    let mut modules = Vec::new();
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"hearth-initramfs-v1\0");
    hasher.update(&agent);
    for name in &names {
        let path = spec.modules_dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| InitramfsError::Read(path, e))?;
        hasher.update(name.as_bytes());
        hasher.update(&bytes);
        modules.push((name.to_string(), bytes));
    }
    let key = hasher.finalize().to_hex();
    let out = cache_dir.join(format!("initramfs-{}.cpio", &key[..16]));
    if out.exists() {
        return Ok(out);
    }
    let mut archive = CpioWriter::default();
    for dir in [
        "dev",
        "proc",
        "sys",
        "newroot",
        "lib",
        "lib/modules",
        "etc",
        "etc/hearth",
    ] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for PID 1's stdio before anything is mounted.
    archive.char_device("dev/console", 0o600, 5, 1);
    archive.file("init", 0o755, &agent);
    for (name, bytes) in &modules {
        archive.file(&format!("lib/modules/{name}"), 0o644, bytes);
    }
    archive.file(
        "etc/hearth/modules",
        0o644,
        (names.join("\n") + "\n").as_bytes(),
    );
    let bytes = archive.finish();

    std::fs::create_dir_all(cache_dir).map_err(|e| InitramfsError::Write(out.clone(), e))?;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        InitramfsError::Write(out.clone(), e)
    })?;
    Ok(out)
}

/// True for an ELF file without a program interpreter (statically linked).
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read_u16 = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let read_u32 = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let read_u64 = |at: usize| {
        bytes.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if bytes.get(0..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (read_u64(0x20), read_u16(0x36), read_u16(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let at = phoff as usize + i * phentsize as usize;
        read_u32(at).is_some_and(|kind| kind != PT_INTERP)
    })
}

/// Minimal writer for the `newc` cpio format the kernel unpacks.
#[derive(Debug, Default)]
struct CpioWriter {
    out: Vec<u8>,
    next_inode: u32,
}

impl CpioWriter {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 0, 0, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, 0, 0, data);
    }

    fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | mode, major, minor, &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev_major: u32, rdev_minor: u32, data: &[u8]) {
        self.next_inode += 1;
        let name_size = name.len() + 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so equal inputs give equal archives
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev_major,
            rdev_minor,
            name_size as u32,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_parseable() {
        let mut w = CpioWriter::default();
        w.dir("dev");
        w.file("init", 0o755, b"abcde");
        let bytes = w.finish();
        assert_eq!(bytes.len() % 4, 0);
        // First header: magic, then the name right after the 110-byte header.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[110..113], b"dev");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init"));
        assert!(text.contains("abcde"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"not an elf"));
        assert!(!is_static_elf(b"\x7fELF"));
        // The test binary itself is dynamically linked.
        let exe = std::env::current_exe().expect("test binary path");
        let bytes = std::fs::read(exe).expect("read test binary");
        assert!(!is_static_elf(&bytes));
    }
}
