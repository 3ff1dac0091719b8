//! The app's output: its standard output and error arrive through two FIFOs
//! (`hearth_proto::APP_STDOUT_PIPE`, `APP_STDERR_PIPE`) that the agent reads
//! for as long as it lives, cut into numbered lines and kept in a ring of
//! bounded size. The host reads the ring from a sequence number
//! (`Request::AppLogs`), so a reconnect (restart, resume) continues where it
//! stopped; a chatty app never blocks (the oldest lines are dropped) and
//! never fills guest memory.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use hearth_proto::{AppLogRecord, AppStream, MAX_APP_LOG_LINE};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::{log, sys};

/// Most bytes of lines the ring holds.
pub const RING_BYTES: usize = 1024 * 1024;
/// What a record costs in the ring beyond its line (its numbers, its slot).
const RECORD_OVERHEAD: usize = 48;
/// A partial line (no newline yet) is shipped after this long.
const PARTIAL_LINE_DELAY: Duration = Duration::from_secs(1);

/// The numbered lines still held, oldest first; sequence numbers are
/// consecutive from the front.
#[derive(Debug)]
struct Ring {
    records: VecDeque<AppLogRecord>,
    bytes: usize,
    next_seq: u64,
    limit: usize,
}

impl Ring {
    fn new(limit: usize) -> Self {
        Self {
            records: VecDeque::new(),
            bytes: 0,
            next_seq: 0,
            limit,
        }
    }

    fn push(&mut self, stream: AppStream, timestamp_ms: u64, line: String) {
        self.bytes += line.len() + RECORD_OVERHEAD;
        self.records.push_back(AppLogRecord {
            seq: self.next_seq,
            timestamp_ms,
            stream,
            line,
        });
        self.next_seq += 1;
        while self.bytes > self.limit {
            let Some(old) = self.records.pop_front() else {
                break;
            };
            self.bytes -= old.line.len() + RECORD_OVERHEAD;
        }
    }

    /// Encoded records from `from` on (or from the oldest held), at most
    /// `max_bytes` unless the first alone is larger; and the sequence number
    /// after the last one.
    fn batch(&self, from: u64, max_bytes: usize) -> (Vec<u8>, u64) {
        let Some(front) = self.records.front() else {
            return (Vec::new(), from);
        };
        let skip = usize::try_from(from.saturating_sub(front.seq)).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut next = from;
        for record in self.records.iter().skip(skip) {
            let encoded = hearth_proto::encode_app_log_batch(std::slice::from_ref(record));
            if !out.is_empty() && out.len() + encoded.len() > max_bytes {
                break;
            }
            out.extend(encoded);
            next = record.seq + 1;
        }
        (out, next)
    }

    fn discard_before(&mut self, before: u64) {
        while self.records.front().is_some_and(|r| r.seq < before) {
            if let Some(old) = self.records.pop_front() {
                self.bytes -= old.line.len() + RECORD_OVERHEAD;
            }
        }
    }
}

/// The ring every session reads, and a signal when it grows.
#[derive(Debug)]
pub struct AppLog {
    ring: Mutex<Ring>,
    grown: watch::Sender<u64>,
}

impl Default for AppLog {
    fn default() -> Self {
        Self::with_limit(RING_BYTES)
    }
}

impl AppLog {
    fn with_limit(limit: usize) -> Self {
        Self {
            ring: Mutex::new(Ring::new(limit)),
            grown: watch::channel(0).0,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells when lines are added (the value is the next sequence number).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.grown.subscribe()
    }

    /// Encoded records from sequence number `from`, at most `max_bytes`, and
    /// the number to continue from.
    pub(crate) fn batch(&self, from: u64, max_bytes: usize) -> (Vec<u8>, u64) {
        self.ring().batch(from, max_bytes)
    }

    /// Drops the lines before `before`; returns the next sequence number.
    pub(crate) fn discard_before(&self, before: u64) -> u64 {
        let mut ring = self.ring();
        ring.discard_before(before);
        ring.next_seq
    }

    pub fn push(&self, stream: AppStream, line: &[u8]) {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let next = {
            let mut ring = self.ring();
            for piece in line_pieces(line) {
                ring.push(stream, timestamp_ms, piece);
            }
            ring.next_seq
        };
        self.grown.send_replace(next);
    }
}

/// A line as text in pieces of at most `MAX_APP_LOG_LINE` bytes (invalid
/// UTF-8 replaced, which may make it longer, then cut at char boundaries).
fn line_pieces(line: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(line);
    let mut pieces = Vec::new();
    let mut rest: &str = &text;
    loop {
        if rest.len() <= MAX_APP_LOG_LINE {
            pieces.push(rest.to_string());
            return pieces;
        }
        let mut cut = MAX_APP_LOG_LINE;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        pieces.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
}

/// Cuts a byte stream into lines; a line reaching `MAX_APP_LOG_LINE` bytes
/// without a newline is cut there.
#[derive(Debug, Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    fn feed(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let room = MAX_APP_LOG_LINE - self.pending.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    self.pending.extend_from_slice(&window[..end]);
                    emit(&self.pending);
                    self.pending.clear();
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.pending.len() >= MAX_APP_LOG_LINE {
                        emit(&self.pending);
                        self.pending.clear();
                    }
                }
            }
        }
    }

    fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

/// Where the app's output pipes are: the fixed paths as PID 1; in test mode
/// under `HEARTH_AGENT_APP_PIPE_DIR` when set, else nowhere.
pub fn pipe_paths(is_init: bool) -> Option<(PathBuf, PathBuf)> {
    if is_init {
        return Some((
            PathBuf::from(hearth_proto::APP_STDOUT_PIPE),
            PathBuf::from(hearth_proto::APP_STDERR_PIPE),
        ));
    }
    let dir = PathBuf::from(std::env::var_os("HEARTH_AGENT_APP_PIPE_DIR")?);
    Some((dir.join("app.stdout"), dir.join("app.stderr")))
}

/// Creates both FIFOs and reads them into `log` for ever.
pub async fn capture(log: Arc<AppLog>, stdout: PathBuf, stderr: PathBuf) {
    let out = tokio::spawn(capture_one(log.clone(), stdout, AppStream::Stdout));
    let err = tokio::spawn(capture_one(log, stderr, AppStream::Stderr));
    let _ = tokio::join!(out, err);
}

async fn capture_one(log: Arc<AppLog>, path: PathBuf, stream: AppStream) {
    loop {
        if let Err(err) = read_pipe(&log, &path, stream).await {
            log!("app {} capture: {err}", stream.as_str());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn read_pipe(log: &AppLog, path: &Path, stream: AppStream) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    sys::mkfifo(path, 0o600)?;
    // Read-write: the FIFO always has a writer (us), so the read side never
    // sees end-of-file between app writers, and opening it to write never blocks.
    let mut pipe = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)?;
    let mut splitter = LineSplitter::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let read = if splitter.pending.is_empty() {
            pipe.read_buf(&mut buf).await?
        } else {
            match tokio::time::timeout(PARTIAL_LINE_DELAY, pipe.read_buf(&mut buf)).await {
                Ok(read) => read?,
                Err(_) => {
                    splitter.flush(|line| log.push(stream, line));
                    continue;
                }
            }
        };
        if read == 0 {
            return Ok(());
        }
        splitter.feed(&buf, |line| log.push(stream, line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(ring: &Ring, from: u64) -> Vec<(u64, String)> {
        let (payload, _) = ring.batch(from, usize::MAX);
        hearth_proto::decode_app_log_batch(&payload)
            .expect("decodes")
            .into_iter()
            .map(|r| (r.seq, r.line))
            .collect()
    }

    #[test]
    fn ring_keeps_the_newest_lines_within_its_limit() {
        let mut ring = Ring::new(10 * (RECORD_OVERHEAD + 10));
        for i in 0..25u64 {
            ring.push(AppStream::Stdout, i, format!("line {i:05}"));
        }
        assert!(ring.bytes <= ring.limit);
        let held = lines(&ring, 0);
        assert_eq!(held.len(), 10);
        assert_eq!(held[0], (15, "line 00015".to_string()));
        assert_eq!(held[9], (24, "line 00024".to_string()));
        // From the middle, and past the end.
        assert_eq!(lines(&ring, 20).len(), 5);
        assert!(lines(&ring, 25).is_empty());
        assert_eq!(ring.batch(99, usize::MAX), (Vec::new(), 99));
    }

    #[test]
    fn batches_are_bounded_and_continue_where_they_stopped() {
        let mut ring = Ring::new(RING_BYTES);
        for i in 0..100u64 {
            ring.push(AppStream::Stderr, i, "x".repeat(1000));
        }
        let (first, next) = ring.batch(0, 10_000);
        assert!(first.len() <= 10_000);
        let first = hearth_proto::decode_app_log_batch(&first).expect("decodes");
        assert_eq!(next, first.len() as u64);
        let (second, _) = ring.batch(next, 10_000);
        let second = hearth_proto::decode_app_log_batch(&second).expect("decodes");
        assert_eq!(second[0].seq, next);
        // A record larger than the batch size still goes, alone.
        let (one, next) = ring.batch(0, 10);
        assert_eq!(
            hearth_proto::decode_app_log_batch(&one).expect("one").len(),
            1
        );
        assert_eq!(next, 1);
    }

    #[test]
    fn discard_drops_only_older_lines() {
        let mut ring = Ring::new(RING_BYTES);
        for i in 0..5u64 {
            ring.push(AppStream::Stdout, i, format!("{i}"));
        }
        ring.discard_before(3);
        assert_eq!(
            lines(&ring, 0),
            vec![(3, "3".to_string()), (4, "4".to_string())]
        );
        assert_eq!(ring.bytes, 2 * (RECORD_OVERHEAD + 1));
        ring.push(AppStream::Stdout, 5, "5".into());
        assert_eq!(lines(&ring, 0).last(), Some(&(5, "5".to_string())));
    }

    #[test]
    fn splitter_cuts_lines_and_long_lines() {
        let mut splitter = LineSplitter::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        splitter.feed(b"one\ntw", |l| got.push(l.to_vec()));
        splitter.feed(b"o\n\nthree", |l| got.push(l.to_vec()));
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec(), Vec::new()]);
        splitter.flush(|l| got.push(l.to_vec()));
        assert_eq!(got.last().map(Vec::as_slice), Some(&b"three"[..]));

        let mut got: Vec<usize> = Vec::new();
        let long = vec![b'a'; MAX_APP_LOG_LINE * 2 + 5];
        splitter.feed(&long, |l| got.push(l.len()));
        splitter.feed(b"\n", |l| got.push(l.len()));
        assert_eq!(got, vec![MAX_APP_LOG_LINE, MAX_APP_LOG_LINE, 5]);
    }

    #[test]
    fn invalid_utf8_never_makes_a_piece_too_long() {
        let bytes = vec![0xFFu8; MAX_APP_LOG_LINE];
        let pieces = line_pieces(&bytes);
        assert!(pieces.len() >= 3);
        assert!(pieces.iter().all(|p| p.len() <= MAX_APP_LOG_LINE));
        assert_eq!(line_pieces(b"plain"), vec!["plain".to_string()]);
    }
}
