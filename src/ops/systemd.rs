//! systemd service notifications (`Type=notify`). Each call is a no-op when the daemon was not
//! started by systemd (no `$NOTIFY_SOCKET`), so `serve` can call them unconditionally.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    // `false`: keep $NOTIFY_SOCKET, later notifications (STATUS, STOPPING) need it too.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// The startup sweep is done and discovery begins: systemd considers the unit started.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown began (draining in-flight VMs).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A one-line status shown by `systemctl status` (for example `2 running, 1 queued`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Asks systemd for more time to start or stop (for example while a long startup sweep runs, or
/// while draining VMs beyond `TimeoutStopSec`).
pub fn extend_timeout(by: std::time::Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    // One test only: it sets a process-wide environment variable.
    #[test]
    fn sends_ready_status_and_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        let mut buf = [0u8; 512];

        ready("ready: 0 running");
        let n = sock.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(msg.contains("READY=1"), "{msg}");
        assert!(msg.contains("STATUS=ready: 0 running"), "{msg}");

        stopping("draining 1 VM");
        let n = sock.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(msg.contains("STOPPING=1"), "{msg}");

        std::env::remove_var("NOTIFY_SOCKET");
        status("nobody hears this");
    }
}
