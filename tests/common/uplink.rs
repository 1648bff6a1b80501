//! The fake guests' way to Forgejo. A real guest reaches Forgejo through its tap; the fake
//! "guest" (`tests/fakes/guest_runner.rs`) is QEMU's process itself, which the sandbox puts in a
//! network namespace with only loopback. Its way out instead: a unix socket beside the fake's
//! argv0 (filesystem sockets do not depend on the network namespace) whose every connection the
//! test process forwards to the emulator, from inside the upstream namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::netns::NetNs;

/// Where `guest_runner.rs` looks for it, beside its argv0.
const UPLINK_SOCKET: &str = "uplink.sock";

/// Forwards the fake guests' connections until dropped.
pub struct Uplink {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Uplink {
    /// The uplink for `qemu` when it is a fake whose guest runs its job (`runner*`), to the
    /// emulator at `emu_url` (`http://<addr>`) in `upstream`.
    pub fn for_fake_qemu(qemu: &Path, upstream: &NetNs, emu_url: &str) -> Option<Uplink> {
        let behaviour = qemu.parent()?.file_name()?.to_string_lossy();
        if !behaviour.starts_with("runner") {
            return None;
        }
        let target: SocketAddr = emu_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the emulator's url is http://<addr>");
        Some(Uplink::start(
            qemu.with_file_name(UPLINK_SOCKET),
            upstream,
            target,
        ))
    }

    fn start(path: PathBuf, upstream: &NetNs, target: SocketAddr) -> Uplink {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // QEMU runs under a VM uid.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let ns = std::fs::File::open(format!("/run/netns/{}", upstream.name())).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            // This thread only (and the threads it starts): upstream's network namespace.
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((guest, _)) => {
                        std::thread::spawn(move || forward(guest, target));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        Uplink { path, stop }
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copies both ways between the fake guest's connection and a new one to `target`.
fn forward(guest: std::os::unix::net::UnixStream, target: std::net::SocketAddr) {
    let _ = guest.set_nonblocking(false);
    let Ok(up) = std::net::TcpStream::connect(target) else {
        return;
    };
    let (Ok(mut guest_r), Ok(mut up_w)) = (guest.try_clone(), up.try_clone()) else {
        return;
    };
    let there = std::thread::spawn(move || {
        let _ = std::io::copy(&mut guest_r, &mut up_w);
        let _ = up_w.shutdown(std::net::Shutdown::Write);
    });
    let (mut up_r, mut guest_w) = (up, guest);
    let _ = std::io::copy(&mut up_r, &mut guest_w);
    let _ = guest_w.shutdown(std::net::Shutdown::Write);
    let _ = there.join();
}
