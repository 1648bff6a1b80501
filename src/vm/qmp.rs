//! QMP over the per-VM unix socket, on the `qapi` crate's command and event types.
//!
//! qapi's generated schema is pinned to one QEMU release (qapi-qmp 0.15: QEMU 9.1), and its own stream
//! (`QmpStreamTokio`) decodes every line straight into those types: a single message the schema does not
//! describe ends the stream. So this client frames lines itself, parses each into JSON
//! first, and only then tries qapi's types: a command's reply or an event that does not fit the schema
//! degrades to its raw fields (for the few the driver acts on) or to "other event", never to an error.
//! Examples: QEMU before 7.2 sends `RTC_CHANGE` without `qom-path` (mandatory in the 9.1 schema), every
//! boot; QEMU 10.x has events 9.1 does not know (`NETDEV_VHOST_USER_CONNECTED`, …).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qapi::qmp;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::Error;

/// The longest line taken from QEMU. Ours are a few hundred bytes (the greeting, `query-status`,
/// events); a peer that sends more without a newline is not QEMU as we know it, or an escaped one
/// trying to grow the daemon's memory.
pub const MAX_LINE: usize = 1 << 20;

/// Events queued unread before the peer is dropped: the driver reads them as they come, QEMU
/// rate-limits the noisy ones, so a full queue means a flood.
pub const EVENT_QUEUE: usize = 1024;

/// The events of one connection; closed when QEMU closes the socket or is dropped.
pub type QmpEvents = mpsc::Receiver<QmpEvent>;

/// Why a QMP peer was dropped: it sent more than the daemon holds for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Misbehaviour {
    #[error("QEMU sent a QMP line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("QEMU sent more than {limit} QMP events that were not read yet")]
    EventFlood { limit: usize },
}

/// The QEMU version from the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    pub package: String,
}

impl std::fmt::Display for Greeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// The events the driver acts on; everything else is `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// QEMU is about to exit (we run with `-no-reboot`, so resets end up here too). `reason` is
    /// QEMU's `ShutdownCause` name: `guest-shutdown`, `guest-reset`, `guest-panic`, `host-qmp-quit`, …
    Shutdown {
        guest: bool,
        reason: String,
    },
    Powerdown,
    Stop,
    Resume,
    Reset {
        guest: bool,
        reason: String,
    },
    GuestPanicked {
        action: String,
    },
    /// `BLOCK_WRITE_THRESHOLD`: the overlay grew past the threshold by `amount_exceeded` bytes.
    WriteThreshold {
        amount_exceeded: u64,
    },
    Other {
        name: String,
    },
}

/// One line from QEMU, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Greeting),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
    /// Not JSON or no known shape: logged and skipped.
    Unknown(String),
}

/// The name qapi serialises an enum value to (`guest-shutdown`, …).
fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Typed through qapi when the data fits its schema, else from the raw fields.
fn parse_event(name: &str, data: &Value) -> QmpEvent {
    let raw_bool = |k: &str| data.get(k).and_then(Value::as_bool).unwrap_or(false);
    let raw_str = |k: &str| {
        data.get(k)
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned()
    };
    let untyped = |e: serde_json::Error| {
        tracing::debug!(event = name, error = %e, "QMP event does not fit qapi's schema; using raw fields");
    };
    match name {
        "SHUTDOWN" => match serde_json::from_value::<qmp::SHUTDOWN>(data.clone()) {
            Ok(d) => QmpEvent::Shutdown {
                guest: d.guest,
                reason: enum_name(&d.reason),
            },
            Err(e) => {
                untyped(e);
                QmpEvent::Shutdown {
                    guest: raw_bool("guest"),
                    reason: raw_str("reason"),
                }
            }
        },
        "RESET" => match serde_json::from_value::<qmp::RESET>(data.clone()) {
            Ok(d) => QmpEvent::Reset {
                guest: d.guest,
                reason: enum_name(&d.reason),
            },
            Err(e) => {
                untyped(e);
                QmpEvent::Reset {
                    guest: raw_bool("guest"),
                    reason: raw_str("reason"),
                }
            }
        },
        "GUEST_PANICKED" => match serde_json::from_value::<qmp::GUEST_PANICKED>(data.clone()) {
            Ok(d) => QmpEvent::GuestPanicked {
                action: enum_name(&d.action),
            },
            Err(e) => {
                untyped(e);
                QmpEvent::GuestPanicked {
                    action: raw_str("action"),
                }
            }
        },
        "POWERDOWN" => QmpEvent::Powerdown,
        "STOP" => QmpEvent::Stop,
        // A node's highest written offset passed the threshold we set (the overlay's disk_max).
        "BLOCK_WRITE_THRESHOLD" => QmpEvent::WriteThreshold {
            amount_exceeded: data
                .get("amount-exceeded")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        },
        "RESUME" => QmpEvent::Resume,
        other => QmpEvent::Other {
            name: other.to_owned(),
        },
    }
}

/// Classifies one line QEMU sent. Never fails: what cannot be understood is `Message::Unknown`.
pub fn parse_line(line: &str) -> Message {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => return Message::Unknown(line.to_owned()),
    };
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(g) = v.get("QMP") {
        let num = |k: &str| {
            g.pointer(&format!("/version/qemu/{k}"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        return Message::Greeting(Greeting {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
            package: g
                .pointer("/version/package")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        });
    }
    if let Some(r) = v.get("return") {
        return Message::Return {
            id,
            value: r.clone(),
        };
    }
    if let Some(e) = v.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        return Message::Error {
            id,
            class: s("class"),
            desc: s("desc"),
        };
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let data = v
            .get("data")
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        return Message::Event(parse_event(name, &data));
    }
    Message::Unknown(line.to_owned())
}

type Reply = Result<Value, Error>;
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;
type Dropped = Arc<Mutex<Option<Misbehaviour>>>;

/// A negotiated QMP connection. Events arrive on the receiver returned by [`QmpClient::connect`]; the
/// receiver closes when QEMU closes the socket (it exits).
pub struct QmpClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// `None` once the connection is gone: new commands fail at once.
    pending: Pending,
    /// Set when the peer was dropped for sending too much.
    dropped: Dropped,
    next_id: AtomicU64,
    greeting: Greeting,
}

impl QmpClient {
    /// Connects to `socket`, retrying until QEMU has created it or `timeout` passes, then reads the
    /// greeting and negotiates capabilities (none: we use no out-of-band commands).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<(Self, QmpEvents), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Qmp(format!(
                        "cannot connect to {} within {}s: {e}",
                        socket.display(),
                        timeout.as_secs()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let greeting = loop {
            let line = tokio::time::timeout_at(deadline, read_line(&mut lines))
                .await
                .map_err(|_| Error::Qmp("no greeting from QEMU".into()))?
                .map_err(|e| match e {
                    LineError::TooLong => {
                        Error::QmpPeerDropped(Misbehaviour::LineTooLong { limit: MAX_LINE })
                    }
                    LineError::Io(e) => Error::Qmp(format!("reading the greeting: {e}")),
                })?
                .ok_or_else(|| Error::Qmp("QEMU closed the socket before its greeting".into()))?;
            match parse_line(&line) {
                Message::Greeting(g) => break g,
                other => tracing::debug!(?other, "QMP line before the greeting"),
            }
        };
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let dropped: Dropped = Arc::default();
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(read_loop(
            lines,
            pending.clone(),
            events_tx,
            dropped.clone(),
        ));
        let client = Self {
            writer: tokio::sync::Mutex::new(write),
            pending,
            dropped,
            next_id: AtomicU64::new(1),
            greeting,
        };
        client
            .execute(qmp::qmp_capabilities { enable: None })
            .await?;
        Ok((client, events_rx))
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Why the peer was dropped, if it was (its event stream then ended early): the VM must stop.
    pub fn dropped_for(&self) -> Option<Misbehaviour> {
        self.dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends `command` and returns the raw `return` value.
    pub async fn execute_raw<C: qapi::Command>(&self, command: C) -> Result<Value, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(map) => map.insert(id, tx),
            None => {
                return Err(match self.dropped_for() {
                    Some(m) => Error::QmpPeerDropped(m),
                    None => Error::Qmp(format!("{}: connection closed", C::NAME)),
                })
            }
        };
        let mut line = serde_json::to_vec(&qapi::Execute::new(command, Some(id)))
            .map_err(|e| Error::Qmp(format!("encoding {}: {e}", C::NAME)))?;
        line.push(b'\n');
        {
            let mut w = self.writer.lock().await;
            w.write_all(&line)
                .await
                .map_err(|e| Error::Qmp(format!("sending {}: {e}", C::NAME)))?;
        }
        rx.await.map_err(|_| match self.dropped_for() {
            Some(m) => Error::QmpPeerDropped(m),
            None => Error::Qmp(format!("{}: connection closed", C::NAME)),
        })?
    }

    /// Sends `command` and decodes the reply with qapi's type.
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, Error> {
        let v = self.execute_raw(command).await?;
        serde_json::from_value(v)
            .map_err(|e| Error::Qmp(format!("decoding the reply to {}: {e}", C::NAME)))
    }

    /// The run state name (`running`, `paused`, `shutdown`, …), tolerant of fields the schema lacks.
    pub async fn query_status(&self) -> Result<String, Error> {
        let v = self.execute_raw(qmp::query_status {}).await?;
        Ok(match serde_json::from_value::<qmp::StatusInfo>(v.clone()) {
            Ok(s) => enum_name(&s.status),
            Err(_) => v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
        })
    }

    /// Presses the ACPI power button (lost if the guest does not listen yet: follow with a deadline).
    pub async fn system_powerdown(&self) -> Result<(), Error> {
        self.execute_raw(qmp::system_powerdown {}).await.map(drop)
    }

    /// Asks QEMU to exit. QEMU may close the socket before its reply arrives; that counts as done.
    pub async fn quit(&self) -> Result<(), Error> {
        match self.execute_raw(qmp::quit {}).await {
            Ok(_) => Ok(()),
            Err(Error::Qmp(m)) if m.ends_with("connection closed") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

enum LineError {
    Io(std::io::Error),
    /// More than [`MAX_LINE`] bytes without a newline.
    TooLong,
}

/// The next line (without its `\n`), holding at most [`MAX_LINE`] bytes of it; `None` at the end
/// of the stream. (`AsyncBufReadExt::lines` would buffer a line of any length.)
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            // The end of the stream: a last line without its newline still counts.
            return Ok((!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned()));
        }
        let (part, used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        if line.len() + part.len() > MAX_LINE {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(part);
        r.consume(used);
        if done {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
    }
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: mpsc::Sender<QmpEvent>,
    dropped: Dropped,
) {
    let mut misbehaved = None;
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(LineError::TooLong) => {
                misbehaved = Some(Misbehaviour::LineTooLong { limit: MAX_LINE });
                break;
            }
            Err(LineError::Io(e)) => {
                tracing::debug!(error = %e, "QMP read failed");
                break;
            }
        };
        let (id, reply) = match parse_line(&line) {
            Message::Event(e) => {
                tracing::debug!(event = ?e, "QMP event");
                match events.try_send(e) {
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        misbehaved = Some(Misbehaviour::EventFlood { limit: EVENT_QUEUE });
                        break;
                    }
                    // Nobody listens for events (the accelerator probe): fine.
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
                continue;
            }
            Message::Return { id, value } => (id, Ok(value)),
            Message::Error { id, class, desc } => (id, Err(Error::Qmp(format!("{class}: {desc}")))),
            Message::Greeting(_) | Message::Unknown(_) => {
                tracing::debug!(%line, "unexpected QMP line");
                continue;
            }
        };
        let sender = id.and_then(|id| {
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .and_then(|m| m.remove(&id))
        });
        match sender {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(%line, "QMP reply nobody waits for"),
        }
    }
    if let Some(m) = misbehaved {
        tracing::warn!(error = %m, "dropping the QMP peer");
        // Hang up both ways now (the write half lives on in the client): the peer's writes fail.
        let _ = nix::sys::socket::shutdown(
            reader.get_ref().as_ref().as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
        // Recorded before the senders go, so that every waiting command fails with it.
        *dropped.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
    }
    // Dropping the senders fails every waiting command with "connection closed"; dropping the
    // reader stops taking anything more from the peer.
    pending.lock().unwrap_or_else(|e| e.into_inner()).take();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines recorded from Debian 12's QEMU 7.2 (greeting, replies, RTC_CHANGE: verbatim; the events
    /// after the RTC_CHANGE as QEMU 7.2 sends them for power-off, reset-with-`-no-reboot` and `quit`).
    const QEMU_7_2: &[&str] = &[
        r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#,
        r#"{"return": {}, "id": 1}"#,
        r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}"#,
        r#"{"timestamp": {"seconds": 1795830396, "microseconds": 263739}, "event": "RTC_CHANGE", "data": {"offset": 0, "qom-path": "/machine/unattached/device[8]"}}"#,
        r#"{"timestamp": {"seconds": 1764294003, "microseconds": 2}, "event": "NIC_RX_FILTER_CHANGED", "data": {"path": "/machine/peripheral-anon/device[2]/virtio-backend"}}"#,
        r#"{"timestamp": {"seconds": 1764294004, "microseconds": 3}, "event": "POWERDOWN"}"#,
        r#"{"timestamp": {"seconds": 1764294004, "microseconds": 4}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
        r#"{"timestamp": {"seconds": 1764294005, "microseconds": 5}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#,
        r#"{"timestamp": {"seconds": 1764294006, "microseconds": 6}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#,
    ];

    /// QEMU 6.2 (Ubuntu 22.04): RTC_CHANGE has no `qom-path` yet.
    const QEMU_6_2_RTC: &str = r#"{"timestamp": {"seconds": 1764294000, "microseconds": 1}, "event": "RTC_CHANGE", "data": {"offset": 0}}"#;

    /// Lines in QEMU 10.x's shape (Debian 13): no `singlestep`, events that 9.1's schema does not know,
    /// and a shutdown reason and run state a future QEMU might add.
    const QEMU_10: &[&str] = &[
        r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#,
        r#"{"return": {}, "id": 1}"#,
        r#"{"return": {"status": "running", "running": true}, "id": 2}"#,
        r#"{"timestamp": {"seconds": 1764294000, "microseconds": 1}, "event": "RTC_CHANGE", "data": {"offset": 0, "qom-path": "/machine/unattached/device[9]"}}"#,
        r#"{"timestamp": {"seconds": 1764294001, "microseconds": 2}, "event": "NETDEV_VHOST_USER_CONNECTED", "data": {"netdev-id": "net0", "chardev-id": "c0"}}"#,
        r#"{"timestamp": {"seconds": 1764294004, "microseconds": 4}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
        r#"{"timestamp": {"seconds": 1764294004, "microseconds": 4}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-future-cause"}}"#,
        r#"{"return": {"status": "some-new-state", "running": false}, "id": 3}"#,
    ];

    #[test]
    fn qapi_alone_chokes_on_lines_outside_its_schema_which_is_why_lines_are_parsed_first() {
        for line in [QEMU_6_2_RTC, QEMU_10[4], QEMU_10[6]] {
            assert!(
                serde_json::from_str::<qmp::QmpMessageAny>(line).is_err(),
                "{line}"
            );
        }
        assert_eq!(
            parse_line(QEMU_6_2_RTC),
            Message::Event(QmpEvent::Other {
                name: "RTC_CHANGE".into()
            })
        );
    }

    #[test]
    fn qemu_7_2_lines() {
        let m: Vec<Message> = QEMU_7_2.iter().map(|l| parse_line(l)).collect();
        let Message::Greeting(g) = &m[0] else {
            panic!("{:?}", m[0])
        };
        assert_eq!((g.major, g.minor, g.micro), (7, 2, 22));
        assert_eq!(
            m[1],
            Message::Return {
                id: Some(1),
                value: serde_json::json!({})
            }
        );
        let Message::Return { value, .. } = &m[2] else {
            panic!()
        };
        let s: qmp::StatusInfo = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(enum_name(&s.status), "running");
        assert_eq!(m[5], Message::Event(QmpEvent::Powerdown));
        assert_eq!(
            m[6],
            Message::Event(QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        assert_eq!(
            m[7],
            Message::Event(QmpEvent::Shutdown {
                guest: true,
                reason: "guest-reset".into()
            })
        );
        assert_eq!(
            m[8],
            Message::Event(QmpEvent::Shutdown {
                guest: false,
                reason: "host-qmp-quit".into()
            })
        );
    }

    #[test]
    fn qemu_10_lines() {
        let m: Vec<Message> = QEMU_10.iter().map(|l| parse_line(l)).collect();
        let Message::Greeting(g) = &m[0] else {
            panic!()
        };
        assert_eq!(g.to_string(), "10.0.2 (Debian 1:10.0.2+ds-2)");
        assert_eq!(
            m[3],
            Message::Event(QmpEvent::Other {
                name: "RTC_CHANGE".into()
            })
        );
        assert_eq!(
            m[4],
            Message::Event(QmpEvent::Other {
                name: "NETDEV_VHOST_USER_CONNECTED".into()
            })
        );
        assert_eq!(
            m[5],
            Message::Event(QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        // A ShutdownCause qapi does not know still arrives, by its raw name.
        assert_eq!(
            m[6],
            Message::Event(QmpEvent::Shutdown {
                guest: false,
                reason: "host-future-cause".into()
            })
        );
    }

    #[test]
    fn errors_and_garbage() {
        assert_eq!(
            parse_line(
                r#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}}"#
            ),
            Message::Error {
                id: Some(4),
                class: "CommandNotFound".into(),
                desc: "The command foo has not been found".into()
            }
        );
        assert!(matches!(
            parse_line("\u{1b}[2J not json"),
            Message::Unknown(_)
        ));
        assert!(matches!(
            parse_line(r#"{"something": 1}"#),
            Message::Unknown(_)
        ));
    }

    /// A fake QEMU speaking 10.x's dialect over a real socket: the client negotiates, survives unknown
    /// events and an unknown run state, and sees the connection close.
    #[tokio::test]
    async fn client_against_a_fake_qemu_10() {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(format!("{}\n", QEMU_10[0]).as_bytes())
                .await
                .unwrap();
            let mut seen = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                let v: Value = serde_json::from_str(&line).unwrap();
                let id = v["id"].as_u64().unwrap();
                let cmd = v["execute"].as_str().unwrap().to_owned();
                seen.push(cmd.clone());
                let reply = match cmd.as_str() {
                    "query-status" => format!(
                        r#"{{"return": {{"status": "some-new-state", "running": false}}, "id": {id}}}"#
                    ),
                    _ => format!(r#"{{"return": {{}}, "id": {id}}}"#),
                };
                if cmd == "system_powerdown" {
                    for l in &QEMU_10[3..7] {
                        w.write_all(format!("{l}\n").as_bytes()).await.unwrap();
                    }
                }
                w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
                if cmd == "quit" {
                    break;
                }
            }
            seen
        });
        let (client, mut events) = QmpClient::connect(&sock, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(client.greeting().major, 10);
        assert_eq!(client.query_status().await.unwrap(), "some-new-state");
        client.system_powerdown().await.unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(events.recv().await.unwrap());
        }
        assert_eq!(
            got[2],
            QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
        client.quit().await.unwrap();
        assert_eq!(
            server.await.unwrap(),
            [
                "qmp_capabilities",
                "query-status",
                "system_powerdown",
                "quit"
            ]
        );
        // The fake QEMU hung up: the event stream ends and commands fail cleanly.
        assert!(events.recv().await.is_none());
        assert!(client.query_status().await.is_err());
    }

    /// Peak resident memory of this process so far (`VmHWM`), in bytes.
    fn peak_rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib * 1024
    }

    /// A fake QMP peer that greets, negotiates, then streams `total` bytes without a newline (in
    /// `chunk`s, each one an event's start so it is not garbage right away); returns how many
    /// bytes it got to send before the client hung up.
    async fn flooding_peer(
        sock: &Path,
        chunk: Vec<u8>,
        total: u64,
    ) -> tokio::task::JoinHandle<u64> {
        let listener = tokio::net::UnixListener::bind(sock).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(format!("{}\n", QEMU_10[0]).as_bytes())
                .await
                .unwrap();
            let caps = lines.next_line().await.unwrap().unwrap();
            let id = serde_json::from_str::<Value>(&caps).unwrap()["id"].clone();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            let mut sent = 0u64;
            while sent < total {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len() as u64;
            }
            sent
        })
    }

    /// An escaped QEMU streams a gigabyte without a newline: the client holds at most one capped
    /// line of it, drops the peer with a typed error and the event stream ends.
    #[tokio::test]
    async fn a_peer_streaming_a_gigabyte_without_a_newline_is_dropped_with_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let mut chunk = br#"{"event": "RTC_CHANGE", "data": {"x": ""#.to_vec();
        chunk.resize(1 << 20, b'a');
        let peer = flooding_peer(&sock, chunk, 1 << 30).await;
        let before = peak_rss();
        let (client, mut events) = QmpClient::connect(&sock, Duration::from_secs(5))
            .await
            .unwrap();
        let end = tokio::time::timeout(Duration::from_secs(120), events.recv())
            .await
            .expect("the event stream ends");
        assert!(end.is_none());
        assert_eq!(
            client.dropped_for(),
            Some(Misbehaviour::LineTooLong { limit: MAX_LINE })
        );
        assert!(matches!(
            client.query_status().await,
            Err(Error::QmpPeerDropped(Misbehaviour::LineTooLong { .. }))
        ));
        let sent = tokio::time::timeout(Duration::from_secs(30), peer)
            .await
            .expect("the peer's writes fail once it is dropped")
            .unwrap();
        assert!(sent < 1 << 30, "the peer got to send all {sent} bytes");
        let grown = peak_rss().saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "peak memory grew by {} MiB while the peer sent {} MiB",
            grown >> 20,
            sent >> 20
        );
    }

    /// An escaped QEMU floods events the driver does not read: the queue stays bounded and the
    /// peer is dropped.
    #[tokio::test]
    async fn a_peer_flooding_events_is_dropped_once_the_queue_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let event = format!("{}\n", QEMU_10[3]).into_bytes();
        let chunk: Vec<u8> = event.repeat(4096);
        let peer = flooding_peer(&sock, chunk, 1 << 30).await;
        let (client, mut events) = QmpClient::connect(&sock, Duration::from_secs(5))
            .await
            .unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(60), peer)
            .await
            .expect("the peer's writes fail once it is dropped")
            .unwrap();
        assert!(sent < 1 << 30, "the peer got to send all {sent} bytes");
        assert_eq!(
            client.dropped_for(),
            Some(Misbehaviour::EventFlood { limit: EVENT_QUEUE })
        );
        let mut queued = 0;
        while events.recv().await.is_some() {
            queued += 1;
        }
        assert_eq!(queued, EVENT_QUEUE);
    }
}
