//! The host end of the warm pool's job agent: one line protocol over a virtio-serial port.
//!
//! A warm VM is booted with the port `org.fkr-qemu.agent.0` (`VmSpec::agent`); QEMU's end is a
//! socket the daemon bound in the VM's 0700 runtime dir (`agent.sock`) and passed as a
//! descriptor, so only root reaches it on the host, and in the guest the port is a root-only
//! character device. Each VM has its own port: a guest cannot read another job's payload.
//!
//! ```text
//! guest → host   READY <guest ms>               the guest can take a job (booted, network up)
//! host  → guest  FILE <path> <octal mode> <b64>  0..n files, written root-only before the command
//!                RUN <b64 of a sh script>        the job's command (the runner)
//!                END
//! guest → host   STARTED <guest ms>             the command's process was started
//! ```
//! The guest powers off when the command exits. Readiness and the acknowledgement are the guest's
//! words, not a network probe. The two stamps are milliseconds on one guest clock of the agent's
//! choosing (both agents use the monotonic `/proc/uptime`: read without a fork, and never
//! stepped by an RTC or NTP); the host only compares them: [`Ready::clock_offset_ms`] (host
//! receipt minus the READY stamp, so it includes the channel's one-way delay of well under a
//! millisecond) puts the guest's STARTED on the host's clock.
//!
//! A guest's lines are untrusted: at most [`MAX_LINE`] bytes, anything unknown is an error.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::secret::Secret;

/// The virtio-serial port's name (`/dev/virtio-ports/<name>` under udev).
pub const PORT_NAME: &str = "org.fkr-qemu.agent.0";
/// The longest line a guest may send (READY/STARTED and a timestamp need ~30).
pub const MAX_LINE: u64 = 256;

/// What can go wrong on the channel.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest closed the agent channel")]
    Closed,
    #[error("the guest sent an unexpected line (expected {expected})")]
    Unexpected { expected: &'static str },
    #[error("the guest did not answer {expected} within {}ms", .after.as_millis())]
    Timeout {
        expected: &'static str,
        after: Duration,
    },
    #[error("a payload value cannot go on the channel: {what}")]
    BadPayload { what: &'static str },
}

/// One file the guest writes before it starts the command.
pub struct PayloadFile {
    /// An absolute guest path without blanks.
    pub path: String,
    /// Octal permission bits, e.g. `0600`.
    pub mode: u32,
    pub content: Secret,
}

/// What a job hands its warm VM: files (runner token, registry auth) and the command.
pub struct Payload {
    pub files: Vec<PayloadFile>,
    pub command: Secret,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the content: it holds the runner and registry tokens.
        f.debug_struct("Payload")
            .field(
                "files",
                &self.files.iter().map(|p| &p.path).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Payload {
    /// The lines the host sends (secret: they carry the payload's content).
    fn encode(&self) -> Result<Secret, AgentError> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut out = String::new();
        for f in &self.files {
            if !f.path.starts_with('/')
                || f.path.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(AgentError::BadPayload {
                    what: "a file path",
                });
            }
            if f.mode > 0o7777 {
                return Err(AgentError::BadPayload {
                    what: "a file mode",
                });
            }
            out.push_str(&format!(
                "FILE {} {:04o} {}\n",
                f.path,
                f.mode,
                b64(f.content.expose())
            ));
        }
        out.push_str(&format!("RUN {}\nEND\n", b64(self.command.expose())));
        Ok(Secret::new(out))
    }
}

/// The guest said READY.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// The guest's clock at READY.
    pub guest_ms: i64,
    /// Host clock minus guest clock (ms), measured at READY.
    pub clock_offset_ms: i64,
}

/// Milliseconds since the epoch on the host's clock.
pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A connection to one VM's agent port.
#[derive(Debug)]
pub struct AgentConn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl AgentConn {
    /// Connects to `<vm dir>/agent.sock`. QEMU's chardev is the server: the connection is
    /// queued by the kernel even before QEMU accepts it.
    pub async fn connect(socket: &Path) -> Result<Self, AgentError> {
        let (r, w) = UnixStream::connect(socket).await?.into_split();
        Ok(Self {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Over an already connected stream (tests).
    pub fn from_stream(s: UnixStream) -> Self {
        let (r, w) = s.into_split();
        Self {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// The next line (without its newline), at most [`MAX_LINE`] bytes.
    async fn line(&mut self, expected: &'static str) -> Result<String, AgentError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(AgentError::Closed);
        }
        if buf.pop() != Some(b'\n') {
            return Err(AgentError::Unexpected { expected });
        }
        String::from_utf8(buf).map_err(|_| AgentError::Unexpected { expected })
    }

    /// `<word> <guest ms>` → the timestamp.
    async fn stamped(&mut self, word: &'static str) -> Result<i64, AgentError> {
        let line = self.line(word).await?;
        line.strip_prefix(word)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|ms| ms.trim_end_matches('\r').parse().ok())
            .ok_or(AgentError::Unexpected { expected: word })
    }

    /// Waits for READY (no deadline here: the caller bounds it).
    pub async fn ready(&mut self) -> Result<Ready, AgentError> {
        let guest_ms = self.stamped("READY").await?;
        Ok(Ready {
            guest_ms,
            clock_offset_ms: unix_ms_now().saturating_sub(guest_ms),
        })
    }

    /// Sends the payload and waits up to `timeout` for STARTED; returns the guest's stamp.
    pub async fn deliver(
        &mut self,
        payload: &Payload,
        timeout: Duration,
    ) -> Result<i64, AgentError> {
        let lines = payload.encode()?;
        let exchange = async {
            self.writer.write_all(lines.expose().as_bytes()).await?;
            self.writer.flush().await?;
            self.stamped("STARTED").await
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AgentError::Timeout {
                expected: "STARTED",
                after: timeout,
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Payload {
        Payload {
            files: vec![PayloadFile {
                path: "/etc/fkr/runner-token".into(),
                mode: 0o600,
                content: Secret::new("tok-123".to_owned()),
            }],
            command: Secret::new("forgejo-runner one-job --wait".to_owned()),
        }
    }

    #[tokio::test]
    async fn ready_payload_started() {
        let (host, guest) = UnixStream::pair().unwrap();
        let mut conn = AgentConn::from_stream(host);
        let guest = tokio::spawn(async move {
            let (r, mut w) = guest.into_split();
            w.write_all(b"READY 1000\n").await.unwrap();
            let mut lines = BufReader::new(r).lines();
            let mut got = Vec::new();
            while let Some(l) = lines.next_line().await.unwrap() {
                let end = l == "END";
                got.push(l);
                if end {
                    break;
                }
            }
            w.write_all(b"STARTED 1234\n").await.unwrap();
            got
        });
        let ready = conn.ready().await.unwrap();
        assert_eq!(ready.guest_ms, 1000);
        assert!(ready.clock_offset_ms > 0);
        let started = conn
            .deliver(&payload(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(started, 1234);
        let got = guest.await.unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            got,
            vec![
                format!("FILE /etc/fkr/runner-token 0600 {}", b64("tok-123")),
                format!("RUN {}", b64("forgejo-runner one-job --wait")),
                "END".to_owned()
            ]
        );
    }

    #[tokio::test]
    async fn silence_is_a_timeout_and_junk_is_refused() {
        let (host, _guest) = UnixStream::pair().unwrap();
        let mut conn = AgentConn::from_stream(host);
        let e = conn
            .deliver(&payload(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");

        let (host, guest) = UnixStream::pair().unwrap();
        let mut conn = AgentConn::from_stream(host);
        let (_r, mut w) = guest.into_split();
        w.write_all(&[b'x'; 300]).await.unwrap();
        assert!(matches!(
            conn.ready().await.unwrap_err(),
            AgentError::Unexpected { .. }
        ));

        let (host, guest) = UnixStream::pair().unwrap();
        let mut conn = AgentConn::from_stream(host);
        drop(guest);
        assert!(matches!(
            conn.ready().await.unwrap_err(),
            AgentError::Closed
        ));
    }

    #[test]
    fn debug_and_bad_paths_never_show_content() {
        let p = payload();
        assert!(!format!("{p:?}").contains("tok-123"));
        let mut bad = payload();
        bad.files[0].path = "/etc/a b".into();
        assert!(matches!(
            bad.encode().unwrap_err(),
            AgentError::BadPayload { .. }
        ));
    }
}
