//! Thin, safe wrappers over the raw system calls the agent needs. Every `unsafe`
//! block of the crate lives here, next to the reason it is sound.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn c_path(path: &Path) -> io::Result<CString> {
    c_string(path.as_os_str().as_bytes())
}

/// `mkfifo(3)`; an existing FIFO at `path` is fine.
pub fn mkfifo(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    match check(unsafe { libc::mkfifo(path.as_ptr(), mode) }) {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map(drop),
    }
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = c_string(source.as_bytes())?;
    let target = c_path(target)?;
    let fstype = fstype.map(|s| c_string(s.as_bytes())).transpose()?;
    let data = data.map(|s| c_string(s.as_bytes())).transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives
    // the call; the kernel copies them.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    };
    check(ret).map(drop)
}

/// Loads a kernel module from an open `.ko` file (`finit_module(2)`).
pub fn finit_module(module: impl AsFd) -> io::Result<()> {
    let params = c"";
    // SAFETY: the descriptor is open for the duration of the call and `params` is
    // a static NUL-terminated string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            module.as_fd().as_raw_fd(),
            params.as_ptr(),
            0,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `kill(2)`; a negative `pid` names a process group, -1 every process.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// Reaps one exited child without blocking: `Some((pid, raw_status))`, or `None`
/// when no child has exited (or there are no children at all).
pub fn reap_any() -> io::Result<Option<(i32, i32)>> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            return Ok(Some((pid, status)));
        }
        if pid == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Reads a clock, in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> io::Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    check(unsafe { libc::clock_gettime(clock, &mut now) })?;
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// Sets `CLOCK_REALTIME`.
pub fn set_realtime_ns(unix_ns: u64) -> io::Result<()> {
    let time = libc::timespec {
        tv_sec: libc::time_t::try_from(unix_ns / 1_000_000_000)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        // Below one billion, so it fits.
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `time` is a valid timespec that outlives the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) }).map(drop)
}

/// Mixes `bytes` into the kernel's entropy pool, crediting 8 bits per byte
/// (`RNDADDENTROPY` on `/dev/urandom` or `/dev/random`).
pub fn add_entropy(random: &std::fs::File, bytes: &[u8]) -> io::Result<()> {
    let info = rand_pool_info(bytes)?;
    // SAFETY: `info` is a properly aligned `struct rand_pool_info` whose `buf_size`
    // matches the bytes that follow it; the kernel only reads from it.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    check(ret).map(drop)
}

/// Builds `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// in a `u32` buffer, which gives it the alignment the kernel expects.
fn rand_pool_info(bytes: &[u8]) -> io::Result<Vec<u32>> {
    let too_big = || io::Error::from(io::ErrorKind::InvalidInput);
    let size = i32::try_from(bytes.len()).map_err(|_| too_big())?;
    let bits = size.checked_mul(8).ok_or_else(too_big)?;
    let mut info = vec![0u32; 2 + bytes.len().div_ceil(4)];
    info[0] = bits as u32;
    info[1] = size as u32;
    for (word, chunk) in info[2..].iter_mut().zip(bytes.chunks(4)) {
        let mut raw = [0u8; 4];
        raw[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(raw);
    }
    Ok(info)
}

/// Asks the kernel to reseed its CRNG from the pool now (`RNDRESEEDCRNG`).
pub fn reseed_crng(random: &std::fs::File) -> io::Result<()> {
    // SAFETY: this ioctl takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) }).map(drop)
}

/// `sethostname(2)`.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Brings a network interface up (`SIOCSIFFLAGS` with `IFF_UP | IFF_RUNNING`).
pub fn interface_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked and then owned.
    let raw =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `request` is a valid ifreq with a NUL-terminated name; SIOCGIFFLAGS
    // writes the flags member.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) })?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) }).map(drop)
}

/// An `AF_INET` datagram socket for interface ioctls.
fn inet_socket() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked and then owned.
    let raw =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

fn sockaddr_in(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and
    // sockaddr is plain data, so the bytes reinterpret as a valid value.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Sets an interface's IPv4 address and netmask (`SIOCSIFADDR`, `SIOCSIFNETMASK`).
pub fn set_ipv4(name: &str, addr: std::net::Ipv4Addr, mask: std::net::Ipv4Addr) -> io::Result<()> {
    let socket = inet_socket()?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: `request` is a valid ifreq with a NUL-terminated name and an address.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFADDR, &request) })?;
    request.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    // SAFETY: as above, with the netmask member set.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFNETMASK, &request) }).map(drop)
}

/// Adds a default IPv4 route through `gateway` (`SIOCADDRT`).
pub fn add_default_route(gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let socket = inet_socket()?;
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: `route` is a valid rtentry (no device name pointer: the kernel
    // picks the interface that reaches the gateway).
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &route) }).map(drop)
}

/// Registers an open file with tokio's reactor.
pub fn register_async(file: std::fs::File) -> io::Result<tokio::io::unix::AsyncFd<std::fs::File>> {
    // SAFETY: a `File` owns its descriptor, which stays open and unchanged until the
    // `File` (held inside the `AsyncFd`) is dropped; `as_raw_fd` always returns it.
    let registered = unsafe { tokio::io::unix::AsyncFd::register(file) };
    registered.map_err(io::Error::from)
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() }
}

/// Powers the machine off. Only returns on failure.
pub fn power_off() -> io::Error {
    // SAFETY: plain reboot(2) call; on success it does not return.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    io::Error::last_os_error()
}

/// Polls one descriptor without waiting and returns its `revents`.
pub fn poll_now(fd: &impl AsFd, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut entry = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; zero timeout.
    check(unsafe { libc::poll(&mut entry, 1, 0) })?;
    Ok(entry.revents)
}

/// Whether descriptor `fd` is open.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on any integer is harmless; EBADF means "not open".
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Makes `target` a copy of `source` (`dup2(2)`), for repairing missing stdio.
pub fn dup_onto(source: &impl AsFd, target: RawFd) -> io::Result<()> {
    // SAFETY: only called for targets 0..=2 that are not open, so no descriptor
    // owned elsewhere is replaced.
    check(unsafe { libc::dup2(source.as_fd().as_raw_fd(), target) }).map(drop)
}

/// Runs in the forked child before exec: new session (and process group), the
/// terminal on standard input as controlling terminal when `controlling_tty` is
/// set, then the requested credentials. Only async-signal-safe calls.
pub fn child_setup(uid: Option<u32>, gid: Option<u32>, controlling_tty: bool) -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() })?;
    if controlling_tty {
        // SAFETY: TIOCSCTTY takes an integer argument (0: never steal a terminal
        // that is another session's). Descriptor 0 is the child's own standard
        // input, already set up by std before the pre-exec hooks run.
        check(unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) })?;
    }
    if uid.is_some() || gid.is_some() {
        // Without an explicit group, use the user's id as its group (Debian's
        // user-private-group convention) rather than keeping root's.
        let group = gid.or(uid).unwrap_or(0);
        let groups = [group];
        // SAFETY: the pointer and length describe `groups`.
        check(unsafe { libc::setgroups(1, groups.as_ptr()) })?;
        // SAFETY: plain integer argument.
        check(unsafe { libc::setgid(group) })?;
    }
    if let Some(uid) = uid {
        // SAFETY: plain integer argument.
        check(unsafe { libc::setuid(uid) })?;
    }
    Ok(())
}

/// Opens a new pseudo-terminal: `(master, slave)`. The master is non-blocking;
/// both are close-on-exec and neither becomes the agent's controlling terminal.
pub fn open_pty() -> io::Result<(File, File)> {
    let master = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which outlives the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags as a plain integer and returns a new
    // descriptor (or -1).
    let peer = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    let slave = match check(peer) {
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(fd) => unsafe { File::from_raw_fd(fd) },
        // Kernels before 4.13: open the slave by its number.
        Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {
            let mut number: libc::c_uint = 0;
            // SAFETY: TIOCGPTN writes one unsigned int through the pointer.
            check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) })?;
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(format!("/dev/pts/{number}"))?
        }
        Err(err) => return Err(err),
    };
    Ok((master, slave))
}

/// Sets a terminal's window size (`TIOCSWINSZ`); on a pseudo-terminal master the
/// kernel then sends `SIGWINCH` to the foreground process group.
pub fn set_window_size(terminal: &impl AsFd, cols: u16, rows: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which outlives
    // the call.
    check(unsafe { libc::ioctl(terminal.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) }).map(drop)
}

/// Decodes a raw wait status into `(exit code, terminating signal)`.
pub fn decode_wait_status(status: i32) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_layout() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]).expect("small buffer");
        assert_eq!(info.len(), 4);
        assert_eq!(info[0], 40);
        assert_eq!(info[1], 5);
        assert_eq!(info[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], u32::from_ne_bytes([5, 0, 0, 0]));
    }

    #[test]
    fn wait_status_decoding() {
        // Exit code 3: status 0x0300; killed by SIGKILL: status 9.
        assert_eq!(decode_wait_status(0x0300), (Some(3), None));
        assert_eq!(decode_wait_status(9), (None, Some(9)));
    }

    #[test]
    fn pty_pair_and_window_size() {
        let (master, slave) = open_pty().expect("pty");
        set_window_size(&master, 132, 43).expect("resize");
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer.
        let ret = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(ret, 0);
        assert_eq!((size.ws_col, size.ws_row), (132, 43));
        // SAFETY: F_GETFL takes no argument.
        let flags = unsafe { libc::fcntl(master.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "master is non-blocking");
        // SAFETY: F_GETFD takes no argument.
        let fd_flags = unsafe { libc::fcntl(slave.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "slave is close-on-exec");
    }

    #[test]
    fn clocks_read() {
        assert!(clock_ns(libc::CLOCK_REALTIME).expect("realtime") > 0);
        assert!(clock_ns(libc::CLOCK_BOOTTIME).is_ok());
    }
}
