//! A tiny HTTP/1.0 server in a network namespace, for VMs to reach (or not).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use super::netns::NetNs;

/// Runs `f` on a thread that joined `ns` and outlives the call (a server's accept loop).
pub fn spawn_in<R: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> R + Send + 'static,
) -> JoinHandle<R> {
    let file = std::fs::File::open(format!("/run/netns/{}", ns.name())).expect("open the netns");
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the test netns");
        f()
    })
}

/// A tiny HTTP/1.0 server in a namespace: answers every request with what `body()` returns then
/// and records the source address of every client.
pub struct HttpServer {
    clients: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(
        ns: &NetNs,
        addr: SocketAddr,
        body: impl Fn() -> String + Send + 'static,
    ) -> HttpServer {
        let clients = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let clients = clients.clone();
            let stop = stop.clone();
            spawn_in(ns, move || {
                let listener = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                listener.set_nonblocking(true).unwrap();
                let _ = tx.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            clients.lock().unwrap().push(peer);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                            let mut buf = [0u8; 1024];
                            let _ = stream.read(&mut buf);
                            let body = body();
                            let _ = write!(
                                stream,
                                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        rx.recv()
            .expect("server thread")
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
        HttpServer {
            clients,
            stop,
            thread: Some(thread),
        }
    }

    /// Source addresses of the clients so far.
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.clients.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
