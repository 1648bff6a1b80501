//! The serial log: written by the daemon from QEMU's stdout with a size cap ([`CappedLog`]), read
//! for first output, kernel panics and the tail for error messages, and pruned by count and age.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// What Linux prints when it panics. A guest booted with `panic=0` (or whose panic did not reset it)
/// spins forever afterwards, so the driver stops it as soon as this shows up.
pub const PANIC_MARKER: &str = "Kernel panic";

/// Follows a growing serial log by offset.
#[derive(Debug)]
pub struct SerialWatch {
    path: PathBuf,
    offset: u64,
    /// The last bytes of the previous read, so a marker split across reads is still found.
    carry: Vec<u8>,
}

impl SerialWatch {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            offset: 0,
            carry: Vec::new(),
        }
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Returns the bytes appended since the last call (empty if none, or if the log does not exist
    /// yet). The returned buffer starts with up to 256 bytes seen before, so callers searching for a
    /// marker do not miss one that straddles two reads.
    pub fn poll(&mut self) -> Vec<u8> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        // The capped writer cut the log back to its head: start over.
        if f.metadata().is_ok_and(|m| m.len() < self.offset) {
            self.offset = 0;
            self.carry.clear();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut new = Vec::new();
        if f.read_to_end(&mut new).is_err() || new.is_empty() {
            return Vec::new();
        }
        self.offset += new.len() as u64;
        let mut out = std::mem::take(&mut self.carry);
        out.extend_from_slice(&new);
        let keep = out.len().saturating_sub(256);
        self.carry = out[keep..].to_vec();
        out
    }
}

/// Whether `haystack` contains `needle` (byte-wise; serial output is not always UTF-8).
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    let n = needle.as_bytes();
    !n.is_empty() && haystack.windows(n.len()).any(|w| w == n)
}

/// The last `max_lines` lines of the log, with terminal escape sequences (OVMF writes many) removed.
pub fn serial_tail(path: &Path, max_lines: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let _ = f.read_to_end(&mut buf);
    }
    let text = strip_ansi(&String::from_utf8_lossy(&buf));
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// The serial log file, bounded: the first `head` bytes as written, then at most `tail` bytes of the
/// most recent output. When the file would pass `head + tail`, everything after the head but the
/// last `tail / 2` bytes is dropped, with one line saying how much: a guest that prints for hours
/// leaves its boot messages and its last words, never a file that fills the disk.
#[derive(Debug)]
pub struct CappedLog {
    file: std::fs::File,
    head: u64,
    tail: u64,
    /// Where the rolling part starts (after the head, and the marker once there was a cut).
    roll_start: u64,
    len: u64,
    dropped: u64,
}

impl CappedLog {
    /// Creates (truncates) `path` with mode 0600.
    pub fn create(path: &Path, head: u64, tail: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file,
            head,
            tail: tail.max(2),
            roll_start: head,
            len: 0,
            dropped: 0,
        })
    }

    /// Opens an existing log to continue it (a VM taken over after a daemon restart), with the
    /// same caps; created when missing.
    pub fn resume(path: &Path, head: u64, tail: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            head,
            tail: tail.max(2),
            // A cut made before the restart left its marker somewhere after the head: from here
            // on it is part of the rolling output.
            roll_start: head,
            len,
            dropped: 0,
        })
    }

    /// Bytes of output dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let n = buf.len() as u64;
        if self.len + n <= self.head + self.tail {
            self.file.seek(SeekFrom::Start(self.len))?;
            self.file.write_all(buf)?;
            self.len += n;
            return Ok(());
        }
        // The rolling part as it is, plus `buf`; keep its last tail/2 bytes.
        let mut rolling = Vec::new();
        if self.len > self.roll_start {
            self.file.seek(SeekFrom::Start(self.roll_start))?;
            (&mut self.file)
                .take(self.len - self.roll_start)
                .read_to_end(&mut rolling)?;
        } else if self.len < self.head {
            // Still filling the head: complete it from `buf` first.
            let fill = (self.head - self.len).min(n) as usize;
            self.file.seek(SeekFrom::Start(self.len))?;
            self.file.write_all(&buf[..fill])?;
            self.len += fill as u64;
            return self.write(&buf[fill..]);
        }
        rolling.extend_from_slice(buf);
        let keep = (self.tail / 2) as usize;
        let cut = rolling.len().saturating_sub(keep);
        self.dropped += cut as u64;
        let line = format!(
            "\n[fkr-qemu: serial output cut here, {} bytes dropped so far]\n",
            self.dropped
        );
        self.file.set_len(self.head)?;
        self.file.seek(SeekFrom::Start(self.head))?;
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(&rolling[cut..])?;
        self.roll_start = self.head + line.len() as u64;
        self.len = self.roll_start + (rolling.len() - cut) as u64;
        Ok(())
    }
}

/// How many bytes of serial output may wait for the disk before the pump stops reading.
const WRITE_BACKLOG: usize = 1 << 20;

/// A [`CappedLog`] written on a blocking thread, so the pump that reads QEMU's serial socket never
/// waits for the disk. A pump that stops reading stalls the guest's UART (QEMU holds the byte until
/// the socket takes it), and a guest that powers off then loses what its UART still held; a blocking
/// write would also hold one of the runtime's few workers.
pub struct LogWriter {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    /// Bytes that may still be queued (the queue itself is unbounded).
    room: std::sync::Arc<tokio::sync::Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl LogWriter {
    pub fn spawn(mut log: CappedLog) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let room = std::sync::Arc::new(tokio::sync::Semaphore::new(WRITE_BACKLOG));
        let freed = room.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut failed = false;
            while let Some(mut buf) = rx.blocking_recv() {
                // What queued up meanwhile goes in one write (a capped log rewrites its tail).
                while let Ok(more) = rx.try_recv() {
                    buf.extend_from_slice(&more);
                }
                if let Err(e) = log.write(&buf) {
                    if !failed {
                        tracing::warn!(error = %e, "cannot write the serial log");
                        failed = true;
                    }
                }
                freed.add_permits(buf.len());
            }
        });
        Self {
            tx: Some(tx),
            room,
            task,
        }
    }

    /// Queues `chunk`. Waits only while a MiB is queued already (a disk stalled for long).
    pub async fn write(&self, chunk: &[u8]) {
        let n = chunk.len().min(WRITE_BACKLOG) as u32;
        if let Ok(permits) = self.room.acquire_many(n).await {
            // Given back by the writer once written.
            permits.forget();
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(chunk.to_vec());
        }
    }

    /// Returns once everything queued is written.
    pub async fn finish(mut self) {
        drop(self.tx.take());
        let _ = (&mut self.task).await;
    }
}

/// Removes old serial logs (`fr-<8 hex>.serial.log`) from `dir`: all but the newest `keep`, and
/// those older than `max_age`. Returns how many were removed. Other files are never touched.
pub fn prune_logs(dir: &Path, keep: usize, max_age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".serial.log"))
                .is_some_and(|n| crate::types::VmName::parse(n).is_ok())
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort_by_key(|l| std::cmp::Reverse(l.0));
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for (i, (mtime, path)) in logs.iter().enumerate() {
        let old = now.duration_since(*mtime).unwrap_or_default() > max_age;
        if (i >= keep || old) && std::fs::remove_file(path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Removes CSI (`ESC [ … letter`) and two-byte escape sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // `ESC [ params letter`; any other escape drops just the following character.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() || c == '~' {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn capped_log_keeps_the_head_and_the_latest_output_within_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fr-0123abcd.serial.log");
        let mut log = CappedLog::create(&p, 100, 200).unwrap();
        log.write(&[b'h'; 60]).unwrap();
        log.write(&[b'i'; 60]).unwrap(); // head full at 100, 20 bytes rolling
        let mut last = Vec::new();
        for i in 0..500u32 {
            let line = format!("line {i}\n");
            log.write(line.as_bytes()).unwrap();
            last = line.into_bytes();
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len <= 100 + 200 + 80, "{len} bytes after line {i}");
        }
        let text = std::fs::read(&p).unwrap();
        assert_eq!(&text[..60], &[b'h'; 60][..]);
        assert_eq!(&text[60..100], &[b'i'; 40][..]);
        assert!(text.ends_with(&last));
        assert!(contains(&text, "bytes dropped so far"));
        assert!(log.dropped() > 0);
        // One huge write at once.
        log.write(&vec![b'z'; 10_000]).unwrap();
        let text = std::fs::read(&p).unwrap();
        assert!(text.len() <= 100 + 200 + 80);
        assert!(text.ends_with(&[b'z'; 100]));
    }

    #[test]
    fn a_resumed_log_continues_the_file_and_keeps_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fr-00000001.serial.log");
        let mut log = CappedLog::create(&p, 100, 200).unwrap();
        log.write(&[b'h'; 80]).unwrap();
        drop(log);
        let mut log = CappedLog::resume(&p, 100, 200).unwrap();
        log.write(b"after the restart\n").unwrap();
        let text = std::fs::read(&p).unwrap();
        assert_eq!(&text[..80], &[b'h'; 80][..], "the earlier output stays");
        assert!(text.ends_with(b"after the restart\n"));
        for _ in 0..50 {
            log.write(b"more output\n").unwrap();
        }
        let text = std::fs::read(&p).unwrap();
        assert!(text.len() <= 100 + 200 + 80, "{} bytes", text.len());
        assert_eq!(&text[..80], &[b'h'; 80][..], "the head survives the cut");
    }

    #[test]
    fn prune_keeps_the_newest_logs_and_touches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for i in 0..5u8 {
            let p = d.join(format!("fr-0000000{i}.serial.log"));
            std::fs::write(&p, "x").unwrap();
            let t = std::time::SystemTime::now()
                - std::time::Duration::from_secs(600 - u64::from(i) * 100);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        std::fs::write(d.join("notes.serial.log"), "mine").unwrap();
        assert_eq!(prune_logs(d, 3, std::time::Duration::from_secs(3600)), 2);
        assert!(d.join("fr-00000004.serial.log").exists());
        assert!(!d.join("fr-00000000.serial.log").exists());
        assert!(d.join("notes.serial.log").exists());
        // Age: the two oldest left are over 250 s old.
        assert_eq!(prune_logs(d, 10, std::time::Duration::from_secs(250)), 2);
    }

    #[test]
    fn watch_finds_a_marker_split_across_reads_and_tail_strips_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        let mut w = SerialWatch::new(&p);
        assert!(w.poll().is_empty(), "missing file reads as nothing");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"\x1b[2J\x1b[01;01HBdsDxe: starting\r\n[ 1.0] Kernel pa")
            .unwrap();
        assert!(!contains(&w.poll(), PANIC_MARKER));
        f.write_all(b"nic - not syncing\n").unwrap();
        assert!(contains(&w.poll(), PANIC_MARKER));
        assert!(w.poll().is_empty());
        assert_eq!(
            serial_tail(&p, 2),
            "BdsDxe: starting\n[ 1.0] Kernel panic - not syncing"
        );
    }
}
