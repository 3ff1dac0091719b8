//! The local terminal for `hearth shell`: raw mode with a guard that restores
//! the saved settings when dropped (normal return, error, signal handled by
//! the caller, panic unwinding), and the window size. All of the crate's
//! termios calls, and so all its `unsafe`, are here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Columns and rows of a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

/// A terminal in raw mode; dropping it puts the saved settings back.
pub struct RawMode<'fd> {
    fd: BorrowedFd<'fd>,
    saved: libc::termios,
}

impl std::fmt::Debug for RawMode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawMode").field("fd", &self.fd).finish()
    }
}

impl<'fd> RawMode<'fd> {
    /// Saves the terminal's settings and switches it to raw mode (no echo, no
    /// line editing, no signals from keys, no output processing).
    pub fn enable(fd: BorrowedFd<'fd>) -> io::Result<Self> {
        let saved = get_attr(fd)?;
        let mut raw = saved;
        // SAFETY: `raw` is a valid, initialised termios that cfmakeraw only edits.
        unsafe { libc::cfmakeraw(&mut raw) };
        set_attr(fd, &raw)?;
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        // Nothing sensible to do if this fails (the terminal went away).
        let _ = set_attr(self.fd, &self.saved);
    }
}

fn get_attr(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
    let mut attr = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: the fd is open for the borrow's lifetime; tcgetattr writes a
    // whole termios into `attr` when it returns 0, and only then is it read.
    unsafe {
        if libc::tcgetattr(fd.as_raw_fd(), attr.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(attr.assume_init())
    }
}

fn set_attr(fd: BorrowedFd<'_>, attr: &libc::termios) -> io::Result<()> {
    // SAFETY: the fd is open for the borrow's lifetime and `attr` is a valid termios.
    let rc = unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSADRAIN, attr) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The window size of the terminal on `fd`; None when it is not a terminal
/// or reports no size.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the fd is open for the borrow's lifetime; TIOCGWINSZ writes a
    // winsize into `size`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0 && size.ws_row > 0).then_some(WindowSize {
        cols: size.ws_col,
        rows: size.ws_row,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A pseudo-terminal pair: (master, slave).
    fn pty() -> (OwnedFd, std::fs::File) {
        // SAFETY: plain libc calls on a fd we own; ptsname_r gets a buffer
        // of the size it is told.
        let master = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(fd >= 0, "posix_openpt");
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            OwnedFd::from_raw_fd(fd)
        };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is writable for the length given.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        assert_eq!(rc, 0);
        // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.to_str().expect("pts path"))
            .expect("open pts");
        (master, slave)
    }

    #[test]
    fn raw_mode_is_restored_on_drop_and_on_panic() {
        let (_master, slave) = pty();
        let before = get_attr(slave.as_fd()).expect("tcgetattr");
        assert_ne!(before.c_lflag & libc::ICANON, 0, "a new pty is canonical");
        {
            let _raw = RawMode::enable(slave.as_fd()).expect("raw");
            let now = get_attr(slave.as_fd()).expect("tcgetattr");
            assert_eq!(now.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        }
        let after = get_attr(slave.as_fd()).expect("tcgetattr");
        assert_eq!(after.c_lflag, before.c_lflag);
        assert_eq!(after.c_iflag, before.c_iflag);
        assert_eq!(after.c_oflag, before.c_oflag);

        let fd = slave.as_fd();
        let unwound = std::panic::catch_unwind(|| {
            let _raw = RawMode::enable(fd).expect("raw");
            panic!("boom");
        });
        assert!(unwound.is_err());
        assert_eq!(get_attr(fd).expect("tcgetattr").c_lflag, before.c_lflag);
    }

    #[test]
    fn window_size_of_a_pty_and_of_a_pipe() {
        let (_master, slave) = pty();
        let size = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: the fd is open and `size` is a valid winsize.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0);
        assert_eq!(
            window_size(slave.as_fd()),
            Some(WindowSize {
                cols: 120,
                rows: 40
            })
        );
        let (reader, _writer) = std::io::pipe().expect("pipe");
        assert_eq!(window_size(reader.as_fd()), None);
        assert!(RawMode::enable(reader.as_fd()).is_err());
    }
}
