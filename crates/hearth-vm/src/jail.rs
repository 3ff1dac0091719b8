//! The jail every QEMU process starts in (after Firecracker's `jailer`).
//!
//! A QEMU under TCG is the whole guest-escape surface: a guest that escapes
//! into it must reach nothing of the host or of other tenants. So each QEMU
//! starts, between fork and exec, in:
//!
//! - new mount, pid, ipc and uts namespaces, and a new (empty) network
//!   namespace unless it joins one made for it ([`Network`]);
//! - a private root: a tmpfs holding bind mounts, at their usual absolute
//!   paths, of only what this VM needs (read-only: `/usr`, kernel, initramfs,
//!   its disk's backing chain, snapshot files; read-write: its directory, disk
//!   overlay and RAM file; a few `/dev` nodes), then `pivot_root`: no host
//!   `/proc`, no data directory, no other VM's files;
//! - its own uid and gid from a configured range (root server) or the
//!   server's own uid inside a user namespace (unprivileged server), with
//!   `no_new_privs`, every inherited descriptor closed, rlimits and an
//!   `oom_score_adj` that makes it die before the server; QEMU's own seccomp
//!   filter (`-sandbox`) is switched on by its command line.
//!
//! A pid namespace applies to the children of the process that makes it, so
//! the forked child forks once more: the intermediate reports the
//! grandchild's pid through a pipe and exits; the grandchild is pid 1 of the
//! new namespace and execs QEMU. That pid (as the host sees it) is QEMU's pid
//! everywhere. The server is a child subreaper ([`become_subreaper`]), so the
//! orphaned grandchild is reparented to it and reaped by [`reap`].
//!
//! Everything the child does runs between fork and exec of a multi-threaded
//! process: only raw system calls on data prepared before the fork ([`Plan`]),
//! no allocation, no locks.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The default uid range of a root server: far above ordinary users and
/// system accounts, one 16-bit block as container runtimes allocate.
pub const DEFAULT_UID_BASE: u32 = 200_000;
pub const DEFAULT_UID_COUNT: u32 = 65_536;

/// How QEMU processes are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailMode {
    /// A root server: every VM gets its own uid and gid from
    /// `uid_base + 1 .. uid_base + uid_count`; `uid_base` itself is the gid of
    /// the group that may read shared read-only assets (base images, layers,
    /// snapshot files).
    Root { uid_base: u32, uid_count: u32 },
    /// A non-root server: QEMU keeps the server's uid, mapped into a user
    /// namespace that owns its other namespaces (see THREAT-MODEL.md for what
    /// this gives up).
    Unprivileged,
    /// No jail: only for a non-root server started with `--no-jail` (development).
    Disabled,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("refusing to run QEMU unjailed as root: drop --no-jail")]
    RootUnjailed,
    #[error(
        "a jail with its own uids needs a root server; run as root or use the unprivileged jail"
    )]
    RangeNeedsRoot,
    #[error("jail uid range {0:?} is invalid: want BASE:COUNT with BASE >= 1000, COUNT >= 2 and the range below 2^32-1")]
    BadRange(String),
    #[error("no free uid left in the jail range")]
    NoFreeUid,
    #[error("{0} cannot be put into a jail: not an absolute path")]
    BadPath(PathBuf),
    #[error("jail I/O on {0}")]
    Io(PathBuf, #[source] io::Error),
    #[error("cannot learn the jailed process's pid")]
    PidPipe(#[source] io::Error),
}

/// The jail a driver puts its QEMU processes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailConfig {
    pub mode: JailMode,
}

impl JailConfig {
    /// The default for this process: its own uid range when root, the
    /// unprivileged jail otherwise.
    pub fn for_current_user() -> Self {
        let mode = if is_root() {
            JailMode::Root {
                uid_base: DEFAULT_UID_BASE,
                uid_count: DEFAULT_UID_COUNT,
            }
        } else {
            JailMode::Unprivileged
        };
        Self { mode }
    }

    /// `BASE:COUNT` (as `hearth serve --jail-uids` takes it).
    pub fn parse_uid_range(text: &str) -> Result<JailMode, JailError> {
        let bad = || JailError::BadRange(text.to_string());
        let (base, count) = text.split_once(':').ok_or_else(bad)?;
        let base: u32 = base.trim().parse().map_err(|_| bad())?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if base < 1000 || count < 2 || base.checked_add(count).is_none_or(|end| end == u32::MAX) {
            return Err(bad());
        }
        Ok(JailMode::Root {
            uid_base: base,
            uid_count: count,
        })
    }

    /// Refuses a configuration this process cannot or must not run.
    pub fn check(&self) -> Result<(), JailError> {
        match self.mode {
            // Unprivileged as root would map root to itself: QEMU as uid 0.
            JailMode::Disabled | JailMode::Unprivileged if is_root() => {
                Err(JailError::RootUnjailed)
            }
            JailMode::Root { .. } if !is_root() => Err(JailError::RangeNeedsRoot),
            _ => Ok(()),
        }
    }

    /// The group that may read shared read-only assets (root mode only).
    pub fn shared_gid(&self) -> Option<u32> {
        match self.mode {
            JailMode::Root { uid_base, .. } => Some(uid_base),
            _ => None,
        }
    }

    /// True when `uid` may be one of this jail's QEMU processes.
    pub fn owns_uid(&self, uid: u32) -> bool {
        match self.mode {
            JailMode::Root {
                uid_base,
                uid_count,
            } => uid > uid_base && uid < uid_base + uid_count,
            JailMode::Unprivileged | JailMode::Disabled => {
                uid == rustix::process::getuid().as_raw()
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.mode != JailMode::Disabled
    }
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Which network namespace a jailed QEMU runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A new, empty one: no interface but loopback.
    Isolated,
    /// One made for this VM (its path, e.g. `/run/netns/NAME`).
    Join(PathBuf),
    /// The host's: for QEMU's user-mode NAT, whose sockets are the host's
    /// until the network layer gives such VMs a namespace of their own.
    Host,
}

/// What one QEMU process's jail holds and how it is limited.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    /// Bound read-only at the same absolute path (files or directories).
    pub read_only: Vec<PathBuf>,
    /// Bound read-write at the same absolute path.
    pub read_write: Vec<PathBuf>,
    /// Device nodes bound in (`/dev/null`, ...).
    pub devices: Vec<PathBuf>,
    /// cgroup `cgroup.procs` files the process joins before exec.
    pub cgroup_procs: Vec<PathBuf>,
    pub network: Network,
    /// Descriptors QEMU inherits besides 0, 1 and 2.
    pub keep_fds: Vec<RawFd>,
    pub limits: Limits,
}

/// Resource limits of a jailed QEMU.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub nofile: u64,
    /// Processes and threads of its uid (root mode only: in unprivileged mode
    /// the uid is the server's, whose other processes would count).
    pub nproc: u64,
    /// Largest file it may write: bounded by its disk and RAM.
    pub fsize: u64,
}

/// `/dev` nodes every QEMU gets.
pub const BASE_DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// One step of building the private root, in the child.
/// The host setting QEMU reads before `reserve=off` (see [`Plan::new`]).
const OVERCOMMIT_MEMORY: &str = "/proc/sys/vm/overcommit_memory";

#[derive(Debug)]
enum Step {
    Dir(CString),
    File(CString),
    /// A file of the skeleton with these contents (a copy, not a bind).
    Contents(CString, Vec<u8>),
    Symlink {
        target: CString,
        at: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
        device: bool,
        /// The source mount's own flags (nosuid, noatime, ...), kept on the
        /// remount: a user namespace may not clear them.
        source_flags: libc::c_ulong,
    },
}

/// Everything the child needs, prepared before the fork.
#[derive(Debug)]
pub(crate) struct Plan {
    mode: JailMode,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    root: CString,
    old_root: CString,
    old_root_inside: CString,
    steps: Vec<Step>,
    cgroup_procs: Vec<CString>,
    netns: Option<CString>,
    unshare_net: bool,
    keep_fds: Vec<RawFd>,
    limits: Limits,
    oom_score_adj: CString,
    setgroups_file: CString,
    uid_map_file: CString,
    gid_map_file: CString,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    slash: CString,
    tmpfs: CString,
    tmpfs_options: CString,
    pid_pipe: RawFd,
}

/// The read end of the pipe the intermediate writes QEMU's pid into.
#[derive(Debug)]
pub(crate) struct PidPipe {
    read: OwnedFd,
    write: Option<OwnedFd>,
}

impl PidPipe {
    /// After the spawn: the pid the intermediate process reported.
    pub(crate) fn read_pid(mut self) -> Result<u32, JailError> {
        // Our copy of the write end must be closed, or a failed child leaves
        // the read blocking forever instead of seeing end-of-file.
        self.write = None;
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: reads into a live local buffer within its bounds.
            let n = unsafe {
                libc::read(
                    self.read.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    buf.len() - got,
                )
            };
            match n {
                n if n > 0 => got += n as usize,
                0 => {
                    return Err(JailError::PidPipe(io::Error::from(
                        io::ErrorKind::UnexpectedEof,
                    )))
                }
                _ => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(JailError::PidPipe(err));
                    }
                }
            }
        }
        Ok(u32::from_ne_bytes(buf))
    }
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(path.to_path_buf()))
}

/// `path` with `.` removed and `..` applied, without touching the disk.
fn normalize(path: &Path) -> Result<PathBuf, JailError> {
    if !path.is_absolute() {
        return Err(JailError::BadPath(path.to_path_buf()));
    }
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// Where `path` goes under the new root.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl Plan {
    /// Prepares `spec` for a child: the mount steps, the files it writes, the
    /// pid pipe. `root` is an empty directory the tmpfs is mounted on (in the
    /// child's own mount namespace only).
    pub(crate) fn new(
        config: &JailConfig,
        spec: &JailSpec,
        root: &Path,
    ) -> Result<(Self, PidPipe), JailError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut leaves: Vec<Step> = Vec::new();
        let add_parents = |dirs: &mut Vec<PathBuf>, path: &Path| {
            let mut parent = path.parent();
            while let Some(p) = parent {
                if p == Path::new("/") {
                    break;
                }
                dirs.push(p.to_path_buf());
                parent = p.parent();
            }
        };
        // Merged-/usr hosts: /bin, /lib, /lib64, /sbin are symlinks into /usr.
        for top in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
            let top = Path::new(top);
            match std::fs::symlink_metadata(top) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target =
                        std::fs::read_link(top).map_err(|e| JailError::Io(top.into(), e))?;
                    leaves.push(Step::Symlink {
                        target: cstring(&target)?,
                        at: cstring(&under(root, top))?,
                    });
                }
                Ok(meta) if meta.is_dir() => {
                    leaves.push(Step::Dir(cstring(&under(root, top))?));
                    leaves.push(Step::Bind {
                        src: cstring(top)?,
                        dst: cstring(&under(root, top))?,
                        read_only: true,
                        device: false,
                        source_flags: mount_flags(top),
                    });
                }
                _ => {}
            }
        }
        let mut binds = Vec::new();
        let usr = PathBuf::from("/usr");
        let lists = [
            (std::slice::from_ref(&usr), true, false),
            (spec.read_only.as_slice(), true, false),
            (spec.read_write.as_slice(), false, false),
            (spec.devices.as_slice(), false, true),
        ];
        for (paths, read_only, device) in lists {
            for path in paths {
                let at = normalize(path)?;
                let meta = std::fs::metadata(&at).map_err(|e| JailError::Io(at.clone(), e))?;
                add_parents(&mut dirs, &at);
                binds.push((at, meta.is_dir(), read_only, device));
            }
        }
        // Parents first (shortest paths first), each once.
        dirs.sort_by_key(|d| d.components().count());
        dirs.dedup();
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|d| seen.insert(d.clone()));
        let mut steps = Vec::new();
        for dir in &dirs {
            steps.push(Step::Dir(cstring(&under(root, dir))?));
        }
        steps.extend(leaves);
        // No /proc in the jail, but QEMU reads the host's overcommit mode
        // before mapping guest RAM without a swap reservation (a clone's
        // `reserve=off`): a copy of that one value, not the host's /proc.
        if let Ok(mode) = std::fs::read(OVERCOMMIT_MEMORY) {
            for dir in ["/proc", "/proc/sys", "/proc/sys/vm"] {
                steps.push(Step::Dir(cstring(&under(root, Path::new(dir)))?));
            }
            steps.push(Step::Contents(
                cstring(&under(root, Path::new(OVERCOMMIT_MEMORY)))?,
                mode,
            ));
        }
        let mut bound = std::collections::HashSet::new();
        for (at, is_dir, read_only, device) in binds {
            if !bound.insert(at.clone()) {
                continue;
            }
            let dst = cstring(&under(root, &at))?;
            if is_dir {
                if !dirs.contains(&at) {
                    steps.push(Step::Dir(dst.clone()));
                }
            } else {
                steps.push(Step::File(dst.clone()));
            }
            steps.push(Step::Bind {
                src: cstring(&at)?,
                dst,
                read_only,
                device,
                source_flags: mount_flags(&at),
            });
        }

        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills the two-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(JailError::PidPipe(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 just returned these two descriptors; nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let pid_pipe = write.as_raw_fd();

        // Unprivileged: the spec's ids are the server's own.
        let (server_uid, server_gid) = (spec.uid, spec.gid);
        let plan = Plan {
            mode: config.mode,
            uid: spec.uid,
            gid: spec.gid,
            groups: config.shared_gid().into_iter().collect(),
            root: cstring(root)?,
            old_root: cstring(&root.join(".old"))?,
            old_root_inside: CString::from(c"/.old"),
            steps,
            cgroup_procs: spec
                .cgroup_procs
                .iter()
                .map(|p| cstring(p))
                .collect::<Result<_, _>>()?,
            netns: match &spec.network {
                Network::Join(path) => Some(cstring(path)?),
                _ => None,
            },
            unshare_net: spec.network == Network::Isolated,
            keep_fds: spec.keep_fds.clone(),
            limits: spec.limits,
            oom_score_adj: CString::from(c"/proc/self/oom_score_adj"),
            setgroups_file: CString::from(c"/proc/self/setgroups"),
            uid_map_file: CString::from(c"/proc/self/uid_map"),
            gid_map_file: CString::from(c"/proc/self/gid_map"),
            // The server's own ids, mapped to themselves: QEMU's uid is not 0
            // inside, so exec drops the capabilities the namespace gave.
            uid_map: format!("{server_uid} {server_uid} 1\n").into_bytes(),
            gid_map: format!("{server_gid} {server_gid} 1\n").into_bytes(),
            slash: CString::from(c"/"),
            tmpfs: CString::from(c"tmpfs"),
            tmpfs_options: CString::from(c"mode=0755,size=1m"),
            pid_pipe,
        };
        Ok((
            plan,
            PidPipe {
                read,
                write: Some(write),
            },
        ))
    }

    /// Runs in the forked child, before exec. Async-signal-safe: raw system
    /// calls on prepared data only.
    pub(crate) fn enter(&self) -> io::Result<()> {
        // Die first when the host runs out of memory; raising needs no privilege.
        write_file(&self.oom_score_adj, b"1000")?;
        for procs in &self.cgroup_procs {
            write_file(procs, b"0")?;
        }
        if self.mode == JailMode::Unprivileged {
            check(unsafe_unshare(libc::CLONE_NEWUSER))?;
            write_file(&self.setgroups_file, b"deny")?;
            write_file(&self.uid_map_file, &self.uid_map)?;
            write_file(&self.gid_map_file, &self.gid_map)?;
        }
        if let Some(netns) = &self.netns {
            let fd = open(netns, libc::O_RDONLY | libc::O_CLOEXEC)?;
            // SAFETY: setns on a descriptor just opened; no memory is involved.
            let joined = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
            close(fd);
            check(joined)?;
        }
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.unshare_net {
            flags |= libc::CLONE_NEWNET;
        }
        check(unsafe_unshare(flags))?;
        // The pid namespace holds only children: fork once more. A raw fork:
        // no atfork handlers run in this already-forked child.
        // SAFETY: fork(2) as a system call; the child only makes system calls.
        let pid = unsafe { libc::syscall(libc::SYS_fork) };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid > 0 {
            let bytes = (pid as u32).to_ne_bytes();
            // SAFETY: writes a local buffer; then leaves without running any
            // of the parent's exit handlers.
            unsafe {
                let _ = libc::write(self.pid_pipe, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0);
            }
        }
        self.build_root()?;
        self.drop_privileges()
    }

    fn build_root(&self) -> io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: mount(2) on NUL-terminated strings prepared before the fork.
        unsafe {
            check(libc::mount(
                null,
                self.slash.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                self.tmpfs.as_ptr(),
                self.root.as_ptr(),
                self.tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                self.tmpfs_options.as_ptr().cast(),
            ))?;
        }
        for step in &self.steps {
            match step {
                Step::Dir(path) => mkdir(path)?,
                Step::File(path) => {
                    let fd = open(
                        path,
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    )?;
                    close(fd);
                }
                Step::Contents(path, bytes) => {
                    // SAFETY: open(2) on a NUL-terminated string; readable by
                    // QEMU's uid, as the host's own file is.
                    let fd = unsafe {
                        libc::open(
                            path.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                            0o444,
                        )
                    };
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: writes a buffer prepared before the fork, within its bounds.
                    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
                    close(fd);
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // SAFETY: symlink(2) on prepared strings.
                Step::Symlink { target, at } => unsafe {
                    check(libc::symlink(target.as_ptr(), at.as_ptr()))?;
                },
                Step::Bind {
                    src,
                    dst,
                    read_only,
                    device,
                    source_flags,
                } => {
                    // SAFETY: mount(2) on prepared strings.
                    unsafe {
                        check(libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        let mut flags =
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | source_flags;
                        if *read_only {
                            flags |= libc::MS_RDONLY;
                        }
                        if !*device {
                            flags |= libc::MS_NODEV;
                        }
                        if *read_only && !*device && !is_usr(src) {
                            flags |= libc::MS_NOEXEC;
                        }
                        check(libc::mount(
                            null,
                            dst.as_ptr(),
                            null,
                            flags,
                            std::ptr::null(),
                        ))?;
                    }
                }
            }
        }
        mkdir(&self.old_root)?;
        // SAFETY: pivot_root(2), chdir(2), umount2(2), rmdir(2), mount(2) on
        // prepared strings.
        unsafe {
            check(libc::syscall(
                libc::SYS_pivot_root,
                self.root.as_ptr(),
                self.old_root.as_ptr(),
            ) as libc::c_int)?;
            check(libc::chdir(self.slash.as_ptr()))?;
            check(libc::umount2(
                self.old_root_inside.as_ptr(),
                libc::MNT_DETACH,
            ))?;
            check(libc::rmdir(self.old_root_inside.as_ptr()))?;
            // The skeleton itself is read-only: QEMU writes only where bound.
            check(libc::mount(
                null,
                self.slash.as_ptr(),
                null,
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                self.tmpfs_options.as_ptr().cast(),
            ))?;
        }
        Ok(())
    }

    fn drop_privileges(&self) -> io::Result<()> {
        let limit = |resource, value: u64| {
            let rlim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit(2) with a local struct.
            check(unsafe { libc::setrlimit(resource, &rlim) })
        };
        limit(libc::RLIMIT_NOFILE, self.limits.nofile)?;
        limit(libc::RLIMIT_FSIZE, self.limits.fsize)?;
        limit(libc::RLIMIT_CORE, 0)?;
        if let JailMode::Root { .. } = self.mode {
            limit(libc::RLIMIT_NPROC, self.limits.nproc)?;
            // SAFETY: setgroups/setresgid/setresuid with prepared values.
            unsafe {
                check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
                check(libc::setresgid(self.gid, self.gid, self.gid))?;
                check(libc::setresuid(self.uid, self.uid, self.uid))?;
            }
        }
        // SAFETY: prctl(2) with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        // Every descriptor but 0, 1, 2 and the kept ones closes at exec. Not
        // closed now: std's pipe that reports a failed exec must stay open.
        // SAFETY: close_range(2) and fcntl(2) with integer arguments.
        unsafe {
            check(libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) as libc::c_int)?;
            for fd in &self.keep_fds {
                check(libc::fcntl(*fd, libc::F_SETFD, 0))?;
            }
        }
        Ok(())
    }
}

/// The flags of the mount `path` is on, as `mount(2)` takes them (the
/// `ST_*` values of statvfs are the `MS_*` ones).
fn mount_flags(path: &Path) -> libc::c_ulong {
    const KEPT: libc::c_ulong = libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC
        | libc::MS_NOATIME
        | libc::MS_NODIRATIME
        | libc::MS_RELATIME;
    let Ok(path) = cstring(path) else { return 0 };
    // SAFETY: statvfs(3) fills a zeroed local struct.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return 0;
        }
        stat.f_flag & KEPT
    }
}

fn is_usr(path: &CString) -> bool {
    path.as_bytes() == b"/usr"
        || path.as_bytes().starts_with(b"/usr/")
        || path.as_bytes().starts_with(b"/lib")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unsafe_unshare(flags: libc::c_int) -> libc::c_int {
    // SAFETY: unshare(2) with flags only.
    unsafe { libc::unshare(flags) }
}

fn open(path: &CString, flags: libc::c_int) -> io::Result<RawFd> {
    // SAFETY: open(2) on a NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o600) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

fn close(fd: RawFd) {
    // SAFETY: closes a descriptor this code opened.
    unsafe {
        libc::close(fd);
    }
}

fn mkdir(path: &CString) -> io::Result<()> {
    // SAFETY: mkdir(2) on a NUL-terminated string.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(err)
    }
}

fn write_file(path: &CString, bytes: &[u8]) -> io::Result<()> {
    let fd = open(path, libc::O_WRONLY | libc::O_CLOEXEC)?;
    // SAFETY: writes a borrowed buffer within its bounds.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    close(fd);
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes this process the reaper of its orphaned descendants, so jailed QEMUs
/// (grandchildren) come back to it when their intermediate parent exits.
pub fn become_subreaper() {
    // SAFETY: prctl(2) with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Reaps `pid` when it exits, if it is this process's child (a jailed QEMU
/// reparented here); only that pid, so tokio's own children are never taken.
pub(crate) fn reap(pid: u32) {
    let Some(raw) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) else {
        return;
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        // SAFETY: the AsyncFd owns the pidfd, so the descriptor stays open
        // for as long as it is registered.
        let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register(pidfd) }) else {
            return;
        };
        // Readable once the process has exited.
        let _ = fd.readable().await;
        let mut status = 0;
        // SAFETY: waitpid(2) for one pid, with a local status word.
        unsafe {
            libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG);
        }
    });
}

/// A per-VM uid (and gid of the same number), claimed by creating
/// `<dir>/<uid>` exclusively, the file naming the VM directory that holds it.
/// A claim whose VM directory is gone is stale and may be taken again.
#[derive(Debug, Clone)]
pub(crate) struct UidClaims {
    dir: PathBuf,
}

impl UidClaims {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub(crate) fn claim(&self, config: &JailConfig, vm_dir: &Path) -> Result<u32, JailError> {
        let JailMode::Root {
            uid_base,
            uid_count,
        } = config.mode
        else {
            return Ok(rustix::process::getuid().as_raw());
        };
        crate::disk::create_private_dir_all(&self.dir)
            .map_err(|e| JailError::Io(self.dir.clone(), io::Error::other(e)))?;
        let span = uid_count - 1;
        let start: u32 = rand::random::<u32>() % span;
        for i in 0..span.min(4096) {
            let uid = uid_base + 1 + (start + i) % span;
            let path = self.dir.join(uid.to_string());
            for _ in 0..2 {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut file) => {
                        use std::io::Write;
                        file.write_all(vm_dir.as_os_str().as_bytes())
                            .and_then(|()| file.sync_all())
                            .map_err(|e| JailError::Io(path.clone(), e))?;
                        return Ok(uid);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let holder = std::fs::read(&path).unwrap_or_default();
                        let holder = Path::new(OsStr::from_bytes(&holder));
                        if holder.as_os_str().is_empty() || holder.exists() {
                            break;
                        }
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => return Err(JailError::Io(path, e)),
                }
            }
        }
        Err(JailError::NoFreeUid)
    }

    /// Gives up `uid` if `vm_dir` holds it.
    pub(crate) fn release(&self, uid: u32, vm_dir: &Path) {
        let path = self.dir.join(uid.to_string());
        if std::fs::read(&path).is_ok_and(|holder| holder == vm_dir.as_os_str().as_bytes()) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Makes a shared read-only file readable by jailed QEMUs: owned by root,
/// group the shared group, no write bit; files already readable by everyone
/// (`/usr`, a world-readable kernel) are left alone. The mount namespace, not
/// the file mode, is what keeps one VM from another's files.
pub(crate) fn share_read_only(path: &Path, shared_gid: u32) -> Result<(), JailError> {
    let io = |e| JailError::Io(path.to_path_buf(), e);
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o004 != 0 && meta.uid() == 0 {
        return Ok(());
    }
    if meta.uid() != 0 || meta.gid() != shared_gid {
        std::os::unix::fs::chown(path, Some(0), Some(shared_gid)).map_err(io)?;
    }
    let wanted = if meta.is_dir() { 0o750 } else { 0o440 };
    if mode != wanted {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)).map_err(io)?;
    }
    Ok(())
}

/// Hands a file or directory QEMU writes to its uid and gid (mode kept).
pub(crate) fn give(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| JailError::Io(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_parse_and_bad_ones_are_refused() {
        assert_eq!(
            JailConfig::parse_uid_range("300000:1000").expect("valid"),
            JailMode::Root {
                uid_base: 300_000,
                uid_count: 1000
            }
        );
        for bad in ["", "1", "0:10", "5000:1", "x:10", "4294967000:1000"] {
            assert!(JailConfig::parse_uid_range(bad).is_err(), "{bad}");
        }
        let config = JailConfig {
            mode: JailMode::Root {
                uid_base: 1000,
                uid_count: 10,
            },
        };
        assert!(!config.owns_uid(1000), "the base is the shared group");
        assert!(config.owns_uid(1001) && config.owns_uid(1009));
        assert!(!config.owns_uid(1010) && !config.owns_uid(0));
        // Root never runs QEMU unjailed, nor as itself in a user namespace.
        if is_root() {
            for mode in [JailMode::Disabled, JailMode::Unprivileged] {
                assert!(matches!(
                    JailConfig { mode }.check(),
                    Err(JailError::RootUnjailed)
                ));
            }
            assert!(config.check().is_ok());
        } else {
            assert!(matches!(config.check(), Err(JailError::RangeNeedsRoot)));
        }
    }

    /// The unprivileged jail, tried as `nobody` (the test drops to it in
    /// the child, as a non-root server would be): a user namespace that maps
    /// only that uid, the other namespaces, the private root, no_new_privs.
    #[test]
    fn the_unprivileged_jail_confines_a_process() {
        use std::os::unix::process::CommandExt;
        if !is_root() {
            eprintln!("skipped: needs root to become nobody");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").expect("secret");
        const NOBODY: u32 = 65534;
        let spec = JailSpec {
            uid: NOBODY,
            gid: NOBODY,
            read_only: Vec::new(),
            read_write: Vec::new(),
            devices: BASE_DEVICES.iter().map(PathBuf::from).collect(),
            cgroup_procs: Vec::new(),
            network: Network::Isolated,
            keep_fds: Vec::new(),
            limits: Limits {
                nofile: 64,
                nproc: 0,
                fsize: 1 << 20,
            },
        };
        let config = JailConfig {
            mode: JailMode::Unprivileged,
        };
        let (plan, pipe) = Plan::new(&config, &spec, &root).expect("plan");
        let mut command = std::process::Command::new("/usr/bin/sleep");
        command.arg("30").uid(NOBODY).gid(NOBODY);
        // SAFETY: prctl(2), then `Plan::enter`: only system calls on prepared data.
        unsafe {
            // std's setuid made the child non-dumpable, which makes its
            // /proc/self files root's; a server that is nobody never changed ids.
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
                Ok(())
            });
            command.pre_exec(move || plan.enter());
        }
        let mut child = command.spawn().expect("spawn");
        drop(command);
        let pid = pipe.read_pid().expect("pid");
        let _ = child.wait();
        let proc = PathBuf::from(format!("/proc/{pid}"));
        // Wait for the exec (the command line turns into sleep's).
        for _ in 0..500 {
            if std::fs::read(proc.join("cmdline")).is_ok_and(|c| c.starts_with(b"/usr/bin/sleep")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let status = std::fs::read_to_string(proc.join("status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let checks = || {
            assert_eq!(
                field("Uid:").split_whitespace().collect::<Vec<_>>(),
                ["65534"; 4]
            );
            assert_eq!(field("NoNewPrivs:"), "1");
            assert_eq!(field("CapEff:"), "0000000000000000");
            for kind in ["user", "mnt", "pid", "net", "ipc", "uts"] {
                assert_ne!(
                    std::fs::read_link(proc.join("ns").join(kind)).expect("ns"),
                    std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("ns"),
                    "{kind}"
                );
            }
            let mounts = std::fs::read_to_string(proc.join("mountinfo")).expect("mountinfo");
            assert!(
                !mounts.contains(&dir.path().display().to_string()),
                "{mounts}"
            );
            let limits = std::fs::read_to_string(proc.join("limits")).expect("limits");
            assert!(
                limits
                    .lines()
                    .any(|l| l.starts_with("Max open files") && l.contains(" 64 ")),
                "{limits}"
            );
        };
        let result = std::panic::catch_unwind(checks);
        // SAFETY: kill(2) of the pid this test started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn paths_normalize_without_the_disk() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c")).expect("absolute"),
            PathBuf::from("/a/c")
        );
        assert!(normalize(Path::new("rel/x")).is_err());
    }

    #[test]
    fn uid_claims_are_exclusive_and_stale_ones_return() {
        let root = tempfile::tempdir().expect("tempdir");
        let claims = UidClaims::new(root.path().join("uids"));
        let config = JailConfig {
            mode: JailMode::Root {
                uid_base: 5000,
                uid_count: 3,
            },
        };
        let vm_a = root.path().join("a");
        let vm_b = root.path().join("b");
        std::fs::create_dir(&vm_a).expect("a");
        std::fs::create_dir(&vm_b).expect("b");
        let a = claims.claim(&config, &vm_a).expect("first");
        let b = claims.claim(&config, &vm_b).expect("second");
        assert_ne!(a, b);
        assert!([5001, 5002].contains(&a) && [5001, 5002].contains(&b));
        assert!(matches!(
            claims.claim(&config, &vm_a),
            Err(JailError::NoFreeUid)
        ));
        // b's directory goes away: its uid is free again.
        std::fs::remove_dir(&vm_b).expect("rm b");
        let vm_c = root.path().join("c");
        std::fs::create_dir(&vm_c).expect("c");
        assert_eq!(claims.claim(&config, &vm_c).expect("stale taken"), b);
        claims.release(a, &vm_a);
        assert_eq!(claims.claim(&config, &vm_c).expect("released"), a);
    }
}
