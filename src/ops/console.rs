//! Streaming a VM's serial log (`fkr-qemu console`): from the start, then optionally live like
//! `tail -f` until the VM is gone. Read-only by construction: the log file is the only input,
//! nothing is ever written towards the guest.
//!
//! The guest is untrusted: its bytes could drive the operator's terminal (escape sequences that
//! retitle windows, rewrite the screen, or on some terminals answer back as input). By default
//! [`Sanitizer`] shows every control character other than newline and tab as a visible escape
//! (`\x1b`, `\u{9b}`), a carriage return only as part of CRLF, invalid UTF-8 as `\xNN`, and
//! Unicode bidi overrides as `\u{…}`. `--raw` copies the bytes unchanged (firmware menus with
//! their ANSI colours, for a trusted guest).

use std::future::Future;
use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use super::Error;

/// How often a followed log is polled for new output.
const POLL: Duration = Duration::from_millis(200);

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Everything written so far was shown (no `--follow`).
    EndOfLog,
    /// The VM ended and its last output was shown.
    VmEnded,
    /// `stop` completed (Ctrl+C).
    Stopped,
    /// The reader went away (for example `| head`).
    OutputClosed,
}

/// Copies `log` to `out`. With `follow`, keeps copying new output until `vm_alive` says the VM is
/// gone (then copies what is left) or `stop` completes. A followed log that does not exist yet is
/// waited for while the VM is alive (the VM may still be preparing).
pub async fn stream<W, A, S>(
    log: &Path,
    out: &mut W,
    follow: bool,
    raw: bool,
    vm_alive: A,
    stop: S,
) -> Result<End, Error>
where
    W: AsyncWrite + Unpin,
    A: Fn() -> bool,
    S: Future<Output = ()>,
{
    tokio::pin!(stop);
    let io_err = |e| Error::Io {
        what: "reading the serial log",
        path: log.to_owned(),
        source: e,
    };
    let mut file = loop {
        match tokio::fs::File::open(log).await {
            Ok(f) => break f,
            Err(e) if e.kind() == ErrorKind::NotFound && follow && vm_alive() => {
                tokio::select! {
                    () = &mut stop => return Ok(End::Stopped),
                    () = tokio::time::sleep(POLL) => {}
                }
            }
            Err(e) => return Err(io_err(e)),
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos: u64 = 0;
    let mut sanitizer = (!raw).then(Sanitizer::default);
    // Set once the VM is seen gone: one more pass to EOF picks up its last lines.
    let mut draining = false;
    loop {
        let n = file.read(&mut buf).await.map_err(io_err)?;
        if n > 0 {
            pos += n as u64;
            let shown = match sanitizer.as_mut() {
                Some(s) => std::borrow::Cow::Owned(s.push(&buf[..n])),
                None => std::borrow::Cow::Borrowed(&buf[..n]),
            };
            match out.write_all(&shown).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(End::OutputClosed),
                Err(e) => return Err(Error::Output(e)),
            }
            continue;
        }
        match out.flush().await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(End::OutputClosed),
            Err(e) => return Err(Error::Output(e)),
        }
        let end = if !follow {
            Some(End::EndOfLog)
        } else if draining {
            Some(End::VmEnded)
        } else {
            None
        };
        if let Some(end) = end {
            // A sequence cut off by the end of the log is shown as what it is.
            if let Some(rest) = sanitizer.as_mut().map(Sanitizer::finish) {
                match out.write_all(&rest).await.and(out.flush().await) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(End::OutputClosed),
                    Err(e) => return Err(Error::Output(e)),
                }
            }
            return Ok(end);
        }
        if !vm_alive() {
            draining = true;
            continue;
        }
        // A log that shrank was truncated or replaced: start over from its beginning.
        if let Ok(meta) = tokio::fs::metadata(log).await {
            if meta.len() < pos {
                file = tokio::fs::File::open(log).await.map_err(io_err)?;
                file.seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(io_err)?;
                pos = 0;
            }
        }
        tokio::select! {
            () = &mut stop => return Ok(End::Stopped),
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Makes guest output safe for a terminal (see the module documentation). Stateful across
/// chunks: a UTF-8 sequence or a CRLF split between two reads is judged whole.
#[derive(Debug, Default)]
pub struct Sanitizer {
    carry: Vec<u8>,
}

impl Sanitizer {
    /// The shown form of `input`; an incomplete tail waits for the next call.
    pub fn push(&mut self, input: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(input);
        let mut out = Vec::with_capacity(data.len());
        let mut rest = &data[..];
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    let held = show(text, &mut out, false);
                    self.carry.extend_from_slice(held.as_bytes());
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    let text = std::str::from_utf8(valid).expect("valid prefix");
                    match e.error_len() {
                        Some(bad) => {
                            let held = show(text, &mut out, true);
                            debug_assert!(held.is_empty());
                            for b in &after[..bad] {
                                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                            }
                            rest = &after[bad..];
                        }
                        None => {
                            // An incomplete sequence at the end: keep it (and a CR before it).
                            let held = show(text, &mut out, false);
                            self.carry.extend_from_slice(held.as_bytes());
                            self.carry.extend_from_slice(after);
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Whatever is still held (the end of the log): shown as escapes.
    pub fn finish(&mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        let mut out = Vec::new();
        let valid = std::str::from_utf8(&carry).map_or(0, str::len);
        if valid == carry.len() {
            show(std::str::from_utf8(&carry).expect("valid"), &mut out, true);
        } else {
            for b in &carry {
                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
            }
        }
        out
    }
}

/// Appends the shown form of `text` to `out`. A CR at the very end is returned instead (it may
/// start a CRLF completed by the next chunk) unless `at_end`.
fn show<'a>(text: &'a str, out: &mut Vec<u8>, at_end: bool) -> &'a str {
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c as u8),
            '\r' => match chars.peek() {
                Some((_, '\n')) => out.push(b'\r'),
                None if !at_end => return &text[i..],
                _ => out.extend_from_slice(b"\\r"),
            },
            c if c.is_control() => {
                let code = u32::from(c);
                let shown = if code < 0x80 {
                    format!("\\x{code:02x}")
                } else {
                    format!("\\u{{{code:x}}}")
                };
                out.extend_from_slice(shown.as_bytes());
            }
            // Bidi embeddings, overrides and isolates reorder what follows on the line.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.extend_from_slice(format!("\\u{{{:x}}}", u32::from(c)).as_bytes());
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    ""
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn raw_dumps_whole_log_with_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fr-00000001.serial.log");
        let content = b"\x1b[2J\x1b[01;01HBdsDxe: loading\xff\xfe\r\nlogin: \n".to_vec();
        std::fs::write(&log, &content).unwrap();
        let mut out = Vec::new();
        let end = stream(&log, &mut out, false, true, || true, std::future::pending())
            .await
            .unwrap();
        assert_eq!(end, End::EndOfLog);
        assert_eq!(out, content);
    }

    #[tokio::test]
    async fn default_shows_control_characters_as_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fr-00000005.serial.log");
        // A window-title change (OSC … BEL), a screen clear, a C1 CSI (UTF-8 U+009B), invalid
        // bytes, a lone CR that would overwrite the line, a bidi override, backspace, DEL, and
        // an ESC cut off by the end of the log.
        let content = "\x1b]0;pwned\x07\x1b[2Jok\ttab\r\n\u{9b}31m\u{202e}evil\rfake\x08\x7f é\n"
            .as_bytes()
            .iter()
            .copied()
            .chain(*b"\xff\xfe\n\xe2\x82")
            .collect::<Vec<u8>>();
        std::fs::write(&log, &content).unwrap();
        let mut out = Vec::new();
        stream(
            &log,
            &mut out,
            false,
            false,
            || true,
            std::future::pending(),
        )
        .await
        .unwrap();
        let shown = String::from_utf8(out).expect("the shown form is UTF-8");
        assert_eq!(
            shown,
            "\\x1b]0;pwned\\x07\\x1b[2Jok\ttab\r\n\\u{9b}31m\\u{202e}evil\\rfake\\x08\\x7f é\n\
             \\xff\\xfe\n\\xe2\\x82"
        );
        assert!(!shown
            .bytes()
            .any(|b| b < 0x20 && !b"\n\t\r".contains(&b) || b == 0x7f));
    }

    #[test]
    fn sanitizer_judges_sequences_split_between_reads_whole() {
        let text = "a\r\nb é\x1bc\r";
        let bytes = text.as_bytes();
        let whole = {
            let mut s = Sanitizer::default();
            let mut v = s.push(bytes);
            v.extend(s.finish());
            v
        };
        assert_eq!(
            String::from_utf8(whole.clone()).unwrap(),
            "a\r\nb é\\x1bc\\r"
        );
        // Every split point, including inside the CRLF and inside "é", gives the same result.
        for cut in 0..=bytes.len() {
            let mut s = Sanitizer::default();
            let mut v = s.push(&bytes[..cut]);
            v.extend(s.push(&bytes[cut..]));
            v.extend(s.finish());
            assert_eq!(v, whole, "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn follows_until_the_vm_ends() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fr-00000002.serial.log");
        let alive = Arc::new(AtomicBool::new(true));
        let writer = {
            let (log, alive) = (log.clone(), alive.clone());
            tokio::spawn(async move {
                // The log appears only after following began.
                tokio::time::sleep(Duration::from_millis(300)).await;
                std::fs::write(&log, "first\n").unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
                f.write_all(b"second\n").unwrap();
                f.write_all(b"last words\n").unwrap();
                alive.store(false, Ordering::SeqCst);
            })
        };
        let mut out = Vec::new();
        let end = tokio::time::timeout(
            Duration::from_secs(20),
            stream(
                &log,
                &mut out,
                true,
                false,
                || alive.load(Ordering::SeqCst),
                std::future::pending(),
            ),
        )
        .await
        .expect("follow ends when the VM ends")
        .unwrap();
        writer.await.unwrap();
        assert_eq!(end, End::VmEnded);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "first\nsecond\nlast words\n"
        );
    }

    #[tokio::test]
    async fn stop_ends_a_follow() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fr-00000003.serial.log");
        std::fs::write(&log, "x\n").unwrap();
        let mut out = Vec::new();
        let end = stream(
            &log,
            &mut out,
            true,
            false,
            || true,
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .unwrap();
        assert_eq!(end, End::Stopped);
        assert_eq!(out, b"x\n");
    }

    #[tokio::test]
    async fn missing_log_of_a_gone_vm_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fr-00000004.serial.log");
        let mut out = Vec::new();
        let r = stream(
            &log,
            &mut out,
            true,
            false,
            || false,
            std::future::pending(),
        )
        .await;
        assert!(matches!(r, Err(Error::Io { .. })));
    }
}
