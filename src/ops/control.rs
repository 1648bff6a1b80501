//! The daemon's control socket, `<runtime_dir>/control.sock`, and its client.
//!
//! Protocol: one JSON object per line each way, any number of requests per connection.
//!
//! | request | answer |
//! |---|---|
//! | `{"cmd":"status"}` | `{"ok":true,"status":<DaemonStatus>}` |
//! | `{"cmd":"list"}` | `{"ok":true,"vms":[<VmInfo>, …]}` |
//! | anything else | `{"ok":false,"error":"…"}` |
//!
//! Access: the socket is mode 0600 in a directory only its owner may write to, and the server
//! also checks the peer's uid (root or the daemon's own user), so only root can ask. The socket
//! only reads status; nothing can be changed through it.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

use super::status::{DaemonStatus, StatusSource, VmInfo};
use super::Error;

/// The socket's file name under the runtime dir.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line the server accepts (requests are tiny; this bounds memory per client).
const MAX_REQUEST_LINE: usize = 4096;

/// Most bytes one connection may send (many tiny requests fit; a flood does not).
const MAX_CLIENT_BYTES: u64 = 1 << 20;

/// How long the client waits for connecting and for each answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket of the daemon using `runtime_dir`.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(SOCKET_NAME)
}

/// A request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    List,
}

/// An answer line. Exactly one of `status`, `vms` and `error` is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<VmInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            status: None,
            vms: None,
            error: Some(message.into()),
        }
    }
}

fn answer(source: &dyn StatusSource, line: &str) -> Response {
    match serde_json::from_str::<Request>(line) {
        Ok(Request::Status) => Response {
            ok: true,
            status: Some(source.status()),
            vms: None,
            error: None,
        },
        Ok(Request::List) => Response {
            ok: true,
            status: None,
            vms: Some(source.status().vms),
            error: None,
        },
        Err(e) => Response::error(format!(
            "bad request ({e}); expected {{\"cmd\":\"status\"}} or {{\"cmd\":\"list\"}}"
        )),
    }
}

/// The listening control socket. Owns the socket file: dropping it removes the file.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    source: Arc<dyn StatusSource>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Binds `<runtime_dir>/control.sock` (mode 0600). Fails when another daemon answers on it;
    /// a stale socket file from a crashed daemon is replaced.
    pub async fn bind(runtime_dir: &Path, source: impl StatusSource) -> Result<Self, Error> {
        check_private_dir(runtime_dir)?;
        let path = socket_path(runtime_dir);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(&path).await.is_ok() {
                    return Err(Error::ControlSocketInUse(path));
                }
                remove_file(&path)?;
            }
            Ok(_) => {
                return Err(Error::Io {
                    what: "refusing to replace a non-socket file at the control socket path",
                    path,
                    source: io::Error::from(io::ErrorKind::AlreadyExists),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Io {
                    what: "checking the control socket",
                    path,
                    source: e,
                })
            }
        }
        // Bind under a temporary name, restrict it, then rename into place: nobody can connect
        // to the real path while it still has the umask's permissions.
        let tmp = runtime_dir.join(format!(".{SOCKET_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(|e| Error::Io {
            what: "binding the control socket",
            path: tmp.clone(),
            source: e,
        })?;
        let restrict = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = restrict {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Io {
                what: "installing the control socket",
                path,
                source: e,
            });
        }
        tracing::info!("control socket at {}", path.display());
        Ok(ControlServer {
            listener,
            path,
            source: Arc::new(source),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers clients until `shutdown` completes; then drops open connections and removes the
    /// socket file.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut clients = JoinSet::new();
        let own_uid = nix::unistd::geteuid().as_raw();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        match stream.peer_cred() {
                            Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {}
                            Ok(cred) => {
                                tracing::warn!("control socket: refused a client with uid {}", cred.uid());
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!("control socket: cannot read a client's credentials: {e}");
                                continue;
                            }
                        }
                        let source = Arc::clone(&self.source);
                        clients.spawn(serve_client(stream, source));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("control socket: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                Some(_) = clients.join_next(), if !clients.is_empty() => {}
            }
        }
        clients.shutdown().await;
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

async fn serve_client(stream: UnixStream, source: Arc<dyn StatusSource>) {
    let (read, mut write) = stream.into_split();
    // Bounds what one client may send in total, so a client that never sends a newline cannot
    // grow the line buffer without bound.
    let mut lines = BufReader::new(read.take(MAX_CLIENT_BYTES)).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("control socket client: {e}");
                return;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = if line.len() > MAX_REQUEST_LINE {
            Response::error("request line too long")
        } else {
            answer(source.as_ref(), &line)
        };
        let mut out = serde_json::to_vec(&response).expect("serializing a control answer");
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Checks that `dir` is a directory owned by us that nobody else can write to (otherwise another
/// user could replace the socket).
fn check_private_dir(dir: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::Io {
        what: "reading the runtime dir",
        path: dir.to_owned(),
        source: e,
    })?;
    let own_uid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != own_uid || meta.mode() & 0o022 != 0 {
        return Err(Error::UnsafeRuntimeDir(dir.to_owned()));
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), Error> {
    std::fs::remove_file(path).map_err(|e| Error::Io {
        what: "removing a stale control socket",
        path: path.to_owned(),
        source: e,
    })
}

/// A connection to a running daemon's control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects to `<runtime_dir>/control.sock`. [`Error::DaemonNotRunning`] means no daemon
    /// listens there (no socket, or a stale one).
    pub async fn connect(runtime_dir: &Path) -> Result<Self, Error> {
        let path = socket_path(runtime_dir);
        let stream = match tokio::time::timeout(CLIENT_TIMEOUT, UnixStream::connect(&path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(Error::DaemonNotRunning(path));
            }
            Ok(Err(e)) => {
                return Err(Error::ControlSocket {
                    path,
                    message: e.to_string(),
                })
            }
            Err(_) => {
                return Err(Error::ControlSocket {
                    path,
                    message: "timed out connecting".into(),
                })
            }
        };
        let (read, write) = stream.into_split();
        Ok(Client {
            path,
            lines: BufReader::new(read).lines(),
            write,
        })
    }

    /// Sends one request and reads its answer. An `ok:false` answer becomes an error.
    pub async fn request(&mut self, request: Request) -> Result<Response, Error> {
        let fail = |message: String| Error::ControlSocket {
            path: self.path.clone(),
            message,
        };
        let mut line = serde_json::to_vec(&request).expect("serializing a control request");
        line.push(b'\n');
        let exchange = async {
            self.write.write_all(&line).await?;
            self.lines.next_line().await
        };
        let answer = match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
            Ok(Ok(Some(answer))) => answer,
            Ok(Ok(None)) => return Err(fail("the daemon closed the connection".into())),
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => return Err(fail("timed out waiting for an answer".into())),
        };
        let response: Response =
            serde_json::from_str(&answer).map_err(|e| fail(format!("unreadable answer: {e}")))?;
        if !response.ok {
            let message = response.error.unwrap_or_else(|| "request failed".into());
            return Err(fail(format!("the daemon answered: {message}")));
        }
        Ok(response)
    }

    pub async fn status(&mut self) -> Result<DaemonStatus, Error> {
        let response = self.request(Request::Status).await?;
        response.status.ok_or_else(|| Error::ControlSocket {
            path: self.path.clone(),
            message: "answer without a status".into(),
        })
    }

    pub async fn list(&mut self) -> Result<Vec<VmInfo>, Error> {
        let response = self.request(Request::List).await?;
        response.vms.ok_or_else(|| Error::ControlSocket {
            path: self.path.clone(),
            message: "answer without a VM list".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::status::StatusBoard;
    use crate::types::JobState;

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[tokio::test]
    async fn status_and_list_round_trip() {
        let dir = private_dir();
        let board = StatusBoard::new(None);
        board.set_ready(true);
        board.set_queued(2);
        board.vm_added(VmInfo {
            name: "fr-0123abcd".into(),
            job_id: 42,
            owner: "o".into(),
            repo: "r".into(),
            state: JobState::Booting.into(),
            address: Some("10.88.0.5".into()),
            started_at: time::OffsetDateTime::now_utc(),
            accel: Some(crate::types::Accel::Tcg),
            pid: Some(1234),
            serial_log: None,
            limits: None,
        });
        let server = ControlServer::bind(dir.path(), board.clone())
            .await
            .unwrap();
        let sock = server.path().to_owned();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stop_rx.await;
        }));

        let mut client = Client::connect(dir.path()).await.unwrap();
        let status = client.status().await.unwrap();
        assert!(status.ready);
        assert_eq!(status.queued, 2);
        assert_eq!(status.running, 1);
        board.vm_state("fr-0123abcd", JobState::Running);
        let vms = client.list().await.unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].state, JobState::Running.into());

        // A second daemon must not steal a live socket.
        let second = ControlServer::bind(dir.path(), board.clone()).await;
        assert!(matches!(second, Err(Error::ControlSocketInUse(_))));

        // Bad requests get an error answer, and the connection stays usable.
        let stream = UnixStream::connect(&sock).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"cmd\":\"reboot\"}\n{\"cmd\":\"list\"}\n")
            .await
            .unwrap();
        let bad: Response =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(!bad.ok && bad.error.is_some());
        let good: Response =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(good.ok && good.vms.is_some());

        stop_tx.send(()).unwrap();
        task.await.unwrap();
        assert!(!sock.exists(), "the socket file is removed at shutdown");
        assert!(matches!(
            Client::connect(dir.path()).await,
            Err(Error::DaemonNotRunning(_))
        ));
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = private_dir();
        // A socket file nobody listens on, as a crashed daemon leaves it.
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap());
        assert!(matches!(
            Client::connect(dir.path()).await,
            Err(Error::DaemonNotRunning(_))
        ));
        let server = ControlServer::bind(dir.path(), StatusBoard::new(None))
            .await
            .unwrap();
        assert!(server.path().exists());
    }

    #[tokio::test]
    async fn refuses_a_dir_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let r = ControlServer::bind(dir.path(), StatusBoard::new(None)).await;
        assert!(matches!(r, Err(Error::UnsafeRuntimeDir(_))));
    }
}
