//! Network-namespace helpers for tests: a `host` namespace (where fkr-qemu's networking code runs)
//! and an `upstream` namespace standing in for the internet, joined by a veth pair; running code or
//! commands inside a namespace; an HTTP server that records its clients' source addresses.
//! Everything is removed on Drop. Tests must only ever send traffic to addresses set up here.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

/// A unique name per test process and call: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace (`ip netns add`), deleted on Drop after killing what runs in it.
pub struct NetNs {
    name: String,
    file: File,
}

impl NetNs {
    pub fn create(prefix: &str) -> NetNs {
        let name = unique_name(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let file = File::open(format!("/run/netns/{name}")).expect("open the netns file");
        let ns = NetNs { name, file };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread that joined this namespace (sockets, netlink, ioctls, `/dev/net/tun`
    /// and child processes started by `f` all belong to it).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET).expect("setns into the test netns");
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`NetNs::run`], but on a thread that outlives the call.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> JoinHandle<R> {
        let file = self.file.try_clone().expect("dup the netns fd");
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the test netns");
            f()
        })
    }

    /// A command that runs inside this namespace. `nsenter --net`, not `ip netns exec`: the latter
    /// also mounts a fresh sysfs, which hides the host's cgroup file systems under /sys/fs/cgroup —
    /// and `serve` puts each QEMU into a cgroup, as it does on a real host.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args…` inside the namespace; panics on failure, returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_ok(&mut cmd)
    }

    /// Like [`NetNs::exec`] but returns the raw output whatever the exit status.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .expect("run a command in the netns")
    }

    /// `ip -n <ns> args…`; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Interface names in this namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `host` and `upstream` namespaces joined by a veth pair (`up0` in host, `eth0` in upstream) on
/// 203.0.113.0/24 (TEST-NET-3, a "public" range our firewall lets through). The host's default
/// route points at upstream. Upstream also owns two private addresses to test the private-range
/// rules: [`Topology::UPSTREAM_PRIVATE`] (never allow-listed) and
/// [`Topology::UPSTREAM_ALLOWED`] (for allow-list tests).
pub struct Topology {
    pub host: NetNs,
    pub upstream: NetNs,
}

impl Topology {
    pub const HOST_VETH: &'static str = "up0";
    pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    pub const UPSTREAM_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const UPSTREAM_PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    pub const UPSTREAM_ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    pub fn new() -> Topology {
        let host = NetNs::create("fkrt-host");
        let upstream = NetNs::create("fkrt-up");
        host.ip(&[
            "link",
            "add",
            Self::HOST_VETH,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            upstream.name(),
        ]);
        host.ip(&["addr", "add", "203.0.113.2/24", "dev", Self::HOST_VETH]);
        host.ip(&["link", "set", Self::HOST_VETH, "up"]);
        host.ip(&["route", "add", "default", "via", "203.0.113.1"]);
        upstream.ip(&["addr", "add", "203.0.113.1/24", "dev", "eth0"]);
        upstream.ip(&["addr", "add", "10.77.0.1/24", "dev", "eth0"]);
        upstream.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        upstream.ip(&["link", "set", "eth0", "up"]);
        Topology { host, upstream }
    }
}

/// A tiny HTTP/1.0 server in a namespace: answers every request with `body` and records the
/// source address of every client.
pub struct HttpServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    clients: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(ns: &NetNs, addr: SocketAddr, body: &str) -> HttpServer {
        let clients = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let body = Arc::new(Mutex::new(body.to_owned()));
        let thread = {
            let body = body.clone();
            let clients = clients.clone();
            let stop = stop.clone();
            ns.spawn(move || {
                let listener = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                listener.set_nonblocking(true).unwrap();
                let _ = tx.send(Ok(listener.local_addr().unwrap()));
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            clients.lock().unwrap().push(peer);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                            let mut buf = [0u8; 1024];
                            let _ = stream.read(&mut buf);
                            let body = body.lock().unwrap().clone();
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
        let addr = rx
            .recv()
            .expect("server thread")
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
        HttpServer {
            addr,
            body,
            clients,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes what the server answers from now on.
    pub fn set_body(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_owned();
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
