//! Reading the serial log QEMU writes: first output, kernel panics, the tail for error messages.

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
