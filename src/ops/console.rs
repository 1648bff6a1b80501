//! Streaming a VM's serial log (`fkr-qemu console`): from the start, then optionally live like
//! `tail -f` until the VM is gone. Read-only by construction: the log file is the only input,
//! nothing is ever written towards the guest.
//!
//! Bytes are copied unchanged (firmware output contains ANSI escapes and is not always UTF-8; the
//! operator's terminal renders it as a serial console would).

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
    // Set once the VM is seen gone: one more pass to EOF picks up its last lines.
    let mut draining = false;
    loop {
        let n = file.read(&mut buf).await.map_err(io_err)?;
        if n > 0 {
            pos += n as u64;
            match out.write_all(&buf[..n]).await {
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
        if !follow {
            return Ok(End::EndOfLog);
        }
        if draining {
            return Ok(End::VmEnded);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn dumps_whole_log_with_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fr-00000001.serial.log");
        let content = b"\x1b[2J\x1b[01;01HBdsDxe: loading\xff\xfe\r\nlogin: \n".to_vec();
        std::fs::write(&log, &content).unwrap();
        let mut out = Vec::new();
        let end = stream(&log, &mut out, false, || true, std::future::pending())
            .await
            .unwrap();
        assert_eq!(end, End::EndOfLog);
        assert_eq!(out, content);
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
        let r = stream(&log, &mut out, true, || false, std::future::pending()).await;
        assert!(matches!(r, Err(Error::Io { .. })));
    }
}
