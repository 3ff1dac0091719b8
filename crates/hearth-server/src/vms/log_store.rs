//! A microVM's app output on the host: `DATA/logs/<microvm id>/` holds
//! segments of newline-terminated JSON events named by the first guest
//! sequence number they hold (`00000000000000000042.ndjson`), `meta.json`
//! (the log group and stream names), and once the microVM has ended a
//! `terminated` marker, from which the sweep counts the retention time.
//!
//! The guest numbers its lines; an event is appended only when its number is
//! past the last stored one, so a reconnect (resume, server restart) that
//! reads again from the stored end neither loses nor duplicates a line. The
//! number is also the read cursor the API hands out.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_proto::{AppLogRecord, AppStream};
use serde::{Deserialize, Serialize};

use crate::layout;

/// A segment is closed once it holds this many bytes.
const SEGMENT_BYTES: u64 = 1024 * 1024;
/// Most segments kept per microVM (the oldest go first).
const MAX_SEGMENTS: usize = 10;
/// How long a terminated microVM's output is kept.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
const SEGMENT_SUFFIX: &str = ".ndjson";
const META_FILE: &str = "meta.json";
const TERMINATED_FILE: &str = "terminated";

#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("cannot read or write {0}")]
    Io(PathBuf, #[source] io::Error),
    #[error("{0:?} is not a microVM id")]
    BadId(String),
}

/// One stored line, as the segments hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEvent {
    pub seq: u64,
    /// Epoch milliseconds (the guest's clock when it read the line).
    pub timestamp: u64,
    pub stream: AppStream,
    pub message: String,
}

/// What a microVM's log was recorded under (BEHAVIOUR.md "Logs").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogMeta {
    pub microvm_id: String,
    pub account_id: String,
    pub log_group: String,
    pub log_stream: String,
    /// The request's `logging` was `{"disabled": {}}`: nothing is collected.
    #[serde(default)]
    pub disabled: bool,
}

/// Which events a read wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogQuery {
    /// First sequence number (the cursor of a previous answer).
    pub from: u64,
    /// Only events at or after this epoch millisecond.
    pub since_ms: Option<u64>,
    pub max_events: usize,
    /// Most bytes of messages.
    pub max_bytes: usize,
}

/// A read's events and the cursor to continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    pub events: Vec<LogEvent>,
    pub next: u64,
}

/// The `logs` directory of a data directory.
#[derive(Debug, Clone)]
pub struct LogStore {
    root: PathBuf,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LogStoreError + '_ {
    move |err| LogStoreError::Io(path.to_path_buf(), err)
}

impl LogStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: layout::app_logs_dir(data_dir),
        }
    }

    fn dir(&self, microvm_id: &str) -> Result<PathBuf, LogStoreError> {
        let valid = !microvm_id.is_empty()
            && microvm_id.len() <= 64
            && microvm_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(LogStoreError::BadId(microvm_id.to_string()));
        }
        Ok(self.root.join(microvm_id))
    }

    /// Records what the log is filed under, once.
    pub fn write_meta(&self, meta: &LogMeta) -> Result<(), LogStoreError> {
        let dir = self.dir(&meta.microvm_id)?;
        let path = dir.join(META_FILE);
        if path.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let text = serde_json::to_vec_pretty(meta).unwrap_or_default();
        let partial = dir.join(".meta.json.tmp");
        std::fs::write(&partial, text).map_err(io_error(&partial))?;
        std::fs::rename(&partial, &path).map_err(io_error(&path))
    }

    pub fn meta(&self, microvm_id: &str) -> Option<LogMeta> {
        let path = self.dir(microvm_id).ok()?.join(META_FILE);
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// The appending side; one at a time per microVM.
    pub fn writer(&self, microvm_id: &str) -> Result<SegmentWriter, LogStoreError> {
        let dir = self.dir(microvm_id)?;
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        SegmentWriter::open(dir)
    }

    /// Events from `query.from` on, oldest first, within the query's limits.
    pub fn read(&self, microvm_id: &str, query: &LogQuery) -> Result<LogPage, LogStoreError> {
        let dir = self.dir(microvm_id)?;
        let segments = segments(&dir)?;
        // The last segment starting at or before the cursor holds it.
        let start = segments
            .iter()
            .rposition(|(first, _)| *first <= query.from)
            .unwrap_or(0);
        let mut page = LogPage {
            events: Vec::new(),
            next: query.from,
        };
        let mut bytes = 0usize;
        for (_, path) in &segments[start..] {
            let text = match std::fs::read(path) {
                Ok(text) => text,
                // Rotated away meanwhile: its events are gone.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(LogStoreError::Io(path.clone(), err)),
            };
            // Only whole lines: the writer may be mid-line.
            let whole = text
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(&text[..0], |end| &text[..end]);
            for line in whole.split(|b| *b == b'\n') {
                // Lines before the cursor are skipped without parsing them whole.
                if leading_seq(line).is_some_and(|seq| seq < page.next) {
                    continue;
                }
                let Ok(event) = serde_json::from_slice::<LogEvent>(line) else {
                    continue;
                };
                if event.seq < page.next {
                    continue;
                }
                if query.since_ms.is_some_and(|since| event.timestamp < since) {
                    page.next = event.seq.saturating_add(1);
                    continue;
                }
                if page.events.len() >= query.max_events
                    || (!page.events.is_empty() && bytes + event.message.len() > query.max_bytes)
                {
                    return Ok(page);
                }
                bytes += event.message.len();
                page.next = event.seq.saturating_add(1);
                page.events.push(event);
            }
        }
        Ok(page)
    }

    /// Starts the retention clock of an ended microVM's log (once).
    pub fn mark_terminated(&self, microvm_id: &str, now_ms: i64) -> Result<(), LogStoreError> {
        let dir = self.dir(microvm_id)?;
        let path = dir.join(TERMINATED_FILE);
        if !dir.exists() || path.exists() {
            return Ok(());
        }
        std::fs::write(&path, now_ms.to_string()).map_err(io_error(&path))
    }

    /// The microVM ids that have a log.
    pub fn ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|name| self.dir(name).is_ok())
            .collect()
    }

    /// Removes the logs whose microVM ended more than [`RETENTION`] ago; a
    /// log whose microVM `has_ended` but carries no marker yet gets one.
    pub fn sweep(&self, now_ms: i64, has_ended: impl Fn(&str) -> bool) {
        for id in self.ids() {
            let Ok(dir) = self.dir(&id) else { continue };
            let marker = dir.join(TERMINATED_FILE);
            match std::fs::read_to_string(&marker) {
                Ok(text) => {
                    let ended_at = text.trim().parse::<i64>().unwrap_or(0);
                    let retention = i64::try_from(RETENTION.as_millis()).unwrap_or(i64::MAX);
                    if now_ms.saturating_sub(ended_at) >= retention {
                        if let Err(err) = std::fs::remove_dir_all(&dir) {
                            tracing::warn!(microvm = %id, error = %err, "cannot remove an expired log");
                        }
                    }
                }
                Err(_) if has_ended(&id) => {
                    if let Err(err) = self.mark_terminated(&id, now_ms) {
                        tracing::warn!(microvm = %id, error = %err, "cannot mark a log ended");
                    }
                }
                Err(_) => {}
            }
        }
    }
}

/// The sequence number a stored line starts with (`{"seq":N,`, as
/// [`LogEvent`] serialises), if it does.
fn leading_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Segment files of `dir` by first sequence number, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogStoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(LogStoreError::Io(dir.to_path_buf(), err)),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let first = name.to_str()?.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()?;
            Some((first, entry.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}{SEGMENT_SUFFIX}")
}

/// Appends a microVM's events to its newest segment, rotating by size.
#[derive(Debug)]
pub struct SegmentWriter {
    dir: PathBuf,
    current: Option<(File, u64)>,
    next_seq: u64,
}

impl SegmentWriter {
    /// Opens the newest segment, dropping a torn last line (a crash
    /// mid-write), and learns the next sequence number from its last event.
    fn open(dir: PathBuf) -> Result<Self, LogStoreError> {
        let mut writer = Self {
            dir,
            current: None,
            next_seq: 0,
        };
        let Some((first, path)) = segments(&writer.dir)?.pop() else {
            return Ok(writer);
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io_error(&path))?;
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            file.set_len(whole as u64).map_err(io_error(&path))?;
            file.seek(SeekFrom::End(0)).map_err(io_error(&path))?;
        }
        writer.next_seq = text[..whole]
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice::<LogEvent>(line).ok())
            .map(|event| event.seq.saturating_add(1))
            .max()
            .unwrap_or(first);
        writer.current = Some((file, whole as u64));
        Ok(writer)
    }

    /// The guest sequence number to read from next.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends the records not stored yet; returns how many.
    pub fn append(&mut self, records: &[AppLogRecord]) -> Result<usize, LogStoreError> {
        let mut text = Vec::new();
        let mut first = None;
        let mut count = 0;
        let stored_end = self.next_seq;
        for record in records.iter().filter(|r| r.seq >= stored_end) {
            let event = LogEvent {
                seq: record.seq,
                timestamp: record.timestamp_ms,
                stream: record.stream,
                message: record.line.clone(),
            };
            text.extend(serde_json::to_vec(&event).unwrap_or_default());
            text.push(b'\n');
            first.get_or_insert(record.seq);
            count += 1;
            self.next_seq = record.seq.saturating_add(1);
        }
        let Some(first) = first else {
            return Ok(0);
        };
        let full = self
            .current
            .as_ref()
            .is_none_or(|(_, size)| *size >= SEGMENT_BYTES);
        if full {
            self.rotate(first)?;
        }
        let path = self.dir.clone();
        let Some((file, size)) = self.current.as_mut() else {
            return Ok(0);
        };
        file.write_all(&text).map_err(io_error(&path))?;
        *size += text.len() as u64;
        Ok(count)
    }

    fn rotate(&mut self, first: u64) -> Result<(), LogStoreError> {
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        self.current = Some((file, 0));
        let segments = segments(&self.dir)?;
        let excess = segments.len().saturating_sub(MAX_SEGMENTS);
        for (_, old) in &segments[..excess] {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }
}

/// `YYYY/MM/DD` of an epoch millisecond (UTC).
pub fn utc_date(epoch_ms: i64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = epoch_ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}/{month:02}/{day:02}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(seq: u64, line: &str) -> AppLogRecord {
        AppLogRecord {
            seq,
            timestamp_ms: 1_000 + seq,
            stream: if seq.is_multiple_of(2) {
                AppStream::Stdout
            } else {
                AppStream::Stderr
            },
            line: line.to_string(),
        }
    }

    fn all(store: &LogStore, id: &str, from: u64) -> Vec<u64> {
        let query = LogQuery {
            from,
            since_ms: None,
            max_events: usize::MAX,
            max_bytes: usize::MAX,
        };
        let page = store.read(id, &query).unwrap();
        page.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn appends_skip_what_is_stored_and_survive_a_reopen() {
        let data = tempfile::tempdir().unwrap();
        let store = LogStore::new(data.path());
        let id = "microvm-abc";
        let mut writer = store.writer(id).unwrap();
        assert_eq!(writer.next_seq(), 0);
        assert_eq!(writer.append(&[record(3, "a"), record(4, "b")]).unwrap(), 2);
        // A reconnect reads again from an earlier point: nothing doubles.
        assert_eq!(writer.append(&[record(4, "b"), record(5, "c")]).unwrap(), 1);
        drop(writer);
        let mut writer = store.writer(id).unwrap();
        assert_eq!(writer.next_seq(), 6);
        writer.append(&[record(6, "d")]).unwrap();
        assert_eq!(all(&store, id, 0), vec![3, 4, 5, 6]);
        assert_eq!(all(&store, id, 5), vec![5, 6]);
        let page = store
            .read(
                id,
                &LogQuery {
                    from: 0,
                    since_ms: Some(1_005),
                    max_events: 10,
                    max_bytes: 10,
                },
            )
            .unwrap();
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.events[0].message, "c");
        assert_eq!(page.events[0].stream, AppStream::Stderr);
        assert_eq!(page.next, 7);
    }

    #[test]
    fn a_torn_last_line_is_dropped_on_reopen() {
        let data = tempfile::tempdir().unwrap();
        let store = LogStore::new(data.path());
        let id = "microvm-torn";
        store
            .writer(id)
            .unwrap()
            .append(&[record(0, "a"), record(1, "b")])
            .unwrap();
        let segment = data.path().join("logs").join(id).join(segment_name(0));
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(b"{\"seq\":2,\"timest").unwrap();
        // Readers skip the partial line ...
        assert_eq!(all(&store, id, 0), vec![0, 1]);
        // ... and the writer cuts it off and continues after the last whole one.
        let mut writer = store.writer(id).unwrap();
        assert_eq!(writer.next_seq(), 2);
        writer.append(&[record(2, "c")]).unwrap();
        assert_eq!(all(&store, id, 0), vec![0, 1, 2]);
    }

    #[test]
    fn segments_rotate_and_the_oldest_go() {
        let data = tempfile::tempdir().unwrap();
        let store = LogStore::new(data.path());
        let id = "microvm-big";
        let mut writer = store.writer(id).unwrap();
        let line = "x".repeat(16 * 1024);
        let per_segment = SEGMENT_BYTES / line.len() as u64 + 1;
        let total = per_segment * (MAX_SEGMENTS as u64 + 3);
        for seq in 0..total {
            writer.append(&[record(seq, &line)]).unwrap();
        }
        let dir = data.path().join("logs").join(id);
        let kept = segments(&dir).unwrap();
        assert_eq!(kept.len(), MAX_SEGMENTS);
        let bytes: u64 = kept
            .iter()
            .map(|(_, p)| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(bytes <= (MAX_SEGMENTS as u64 + 1) * SEGMENT_BYTES);
        let seqs = all(&store, id, 0);
        assert_eq!(seqs.last(), Some(&(total - 1)));
        assert!(seqs[0] > 0);
        // Pages are bounded and continue where they stopped.
        let page = store
            .read(
                id,
                &LogQuery {
                    from: 0,
                    since_ms: None,
                    max_events: 5,
                    max_bytes: usize::MAX,
                },
            )
            .unwrap();
        assert_eq!(page.events.len(), 5);
        assert_eq!(page.next, seqs[4] + 1);
        let page = store
            .read(
                id,
                &LogQuery {
                    from: page.next,
                    since_ms: None,
                    max_events: 1000,
                    max_bytes: 3 * line.len(),
                },
            )
            .unwrap();
        assert_eq!(page.events.len(), 3);
        assert_eq!(page.events[0].seq, seqs[5]);
    }

    #[test]
    fn sweep_marks_ended_logs_and_removes_expired_ones() {
        let data = tempfile::tempdir().unwrap();
        let store = LogStore::new(data.path());
        for id in ["microvm-live", "microvm-ended"] {
            store.writer(id).unwrap().append(&[record(0, "a")]).unwrap();
        }
        let day = RETENTION.as_millis() as i64;
        store.sweep(1_000, |id| id == "microvm-ended");
        assert_eq!(store.ids().len(), 2);
        store.sweep(1_000 + day - 1, |id| id == "microvm-ended");
        assert_eq!(store.ids().len(), 2);
        store.sweep(1_000 + day, |id| id == "microvm-ended");
        assert_eq!(store.ids(), vec!["microvm-live".to_string()]);
        assert!(store.writer("../x").is_err());
    }

    #[test]
    fn meta_is_written_once() {
        let data = tempfile::tempdir().unwrap();
        let store = LogStore::new(data.path());
        let meta = LogMeta {
            microvm_id: "microvm-m".into(),
            account_id: "111122223333".into(),
            log_group: "/aws/lambda-microvms/web".into(),
            log_stream: "2026/12/06[1]microvm-m".into(),
            disabled: false,
        };
        store.write_meta(&meta).unwrap();
        store
            .write_meta(&LogMeta {
                log_group: "other".into(),
                ..meta.clone()
            })
            .unwrap();
        assert_eq!(store.meta("microvm-m"), Some(meta));
    }

    #[test]
    fn stored_lines_lead_with_their_number() {
        let event = LogEvent {
            seq: 1234,
            timestamp: 5,
            stream: AppStream::Stdout,
            message: "m".into(),
        };
        let line = serde_json::to_vec(&event).unwrap();
        assert_eq!(leading_seq(&line), Some(1234));
        assert_eq!(leading_seq(b"{\"timestamp\":1}"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970/01/01");
        assert_eq!(utc_date(951_782_400_000), "2000/02/29");
        assert_eq!(utc_date(1_796_515_200_000), "2026/12/06");
    }
}
