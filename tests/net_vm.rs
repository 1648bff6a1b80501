//! Two test guests behind the host network, inside throw-away namespaces: they get their static
//! addresses from the seed, reach the "internet" (the upstream namespace) through NAT, and reach
//! neither the host, nor each other, nor a private address that is not allow-listed.

mod common {
    pub mod http_server;
    pub mod netns;
    pub mod netns_exec;
    pub mod netns_run;
    pub mod topology;
    pub mod vm_config;
}

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::http_server::HttpServer;
use common::topology::Topology;
use fkr_qemu::net::{HostNetwork, NetConfig};
use fkr_qemu::types::{Accel, VmName};
use fkr_qemu::vm::{self, Seed, VmConfig, VmSpec};

const PORT: u16 = 8080;
const HOST_CLOSED_PORT: u16 = 8081;
const HOST_OPEN_PORT: u16 = 8082;

/// Runs in each guest with the peer's address as `$1`. Every probe prints one
/// `FKR-NET <name>=open|closed` line; the test reads them from the serial log.
const CHECK_SCRIPT: &str = r#"#!/bin/sh
say() { echo "FKR-NET $*"; }
probe() {
  if timeout 8 wget -q -O - "$2" 2>/dev/null | grep -q "$3"; then say "$1=open"; else say "$1=closed"; fi
}
say "addr=$(ip -4 -o addr show dev eth0 | tr -s ' ' | tr '\n' ' ')"
mkdir -p /www && echo peer-ok > /www/index.html && busybox httpd -p 8080 -h /www
# Wait until the test has seen both guests' servers up (it then answers "go"): the peer probe
# below must fail because of the isolation, not because the peer was not listening yet.
i=0
until timeout 3 wget -q -O - http://10.88.0.1:8082/ 2>/dev/null | grep -q go; do
  i=$((i + 1)); [ "$i" -gt 150 ] && { say "barrier=timeout"; break; }; sleep 1
done
probe upstream http://203.0.113.1:8080/ fkr-upstream-ok &
probe allowed http://10.77.0.2:8080/ fkr-allowed-ok &
probe private http://10.77.0.1:8080/ fkr-private-ok &
probe hostport http://10.88.0.1:8082/ go &
probe host http://10.88.0.1:8081/ fkr-host-ok &
probe peer "http://$1:8080/" peer-ok &
wait
say done
"#;

fn user_data(peer: Ipv4Addr) -> String {
    let script = base64::engine::general_purpose::STANDARD.encode(CHECK_SCRIPT);
    format!(
        "#cloud-config\nwrite_files:\n- path: /etc/fkr/net-check.sh\n  owner: root:root\n  \
         permissions: '0755'\n  encoding: b64\n  content: {script}\nruncmd:\n- 'sh \
         /etc/fkr/net-check.sh {peer}'\npower_state:\n  mode: poweroff\n  timeout: 30\n  \
         condition: true\n"
    )
}

/// The host's signal to the guests: a server that answers "wait" until the test sets what it
/// answers ("go", "stop") through the handle it returns.
fn signal_server(
    ns: &common::netns::NetNs,
    addr: SocketAddr,
) -> (HttpServer, std::sync::Arc<std::sync::Mutex<&'static str>>) {
    let say = std::sync::Arc::new(std::sync::Mutex::new("wait"));
    let said = say.clone();
    let server = HttpServer::start(ns, addr, move || said.lock().unwrap().to_string());
    (server, say)
}

fn guest_image() -> PathBuf {
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-guest/test-guest.qcow2");
    assert!(
        image.exists(),
        "{} is missing: build it with image-builder/test-guest.sh (.ci/setup does)",
        image.display()
    );
    image
}

/// One HTTP/1.0 GET from the calling thread's namespace; the body, if any answer came.
fn http_get(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// The same GET without blocking the runtime that drives the VMs.
async fn http_get_async(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

fn markers(serial: &str) -> BTreeMap<String, String> {
    serial
        .lines()
        .filter_map(|l| l.split_once("FKR-NET ").map(|(_, m)| m.trim()))
        .filter_map(|m| m.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .chain(
            serial
                .contains("FKR-NET done")
                .then(|| ("done".to_owned(), "yes".to_owned())),
        )
        .collect()
}

#[test]
fn vm_guests_reach_upstream_through_nat_but_not_host_peers_or_private_ranges() {
    let image = guest_image();
    let topo = Topology::new();
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    let upstream = HttpServer::start(&topo.upstream, at(Topology::UPSTREAM_ADDR, PORT), || {
        "fkr-upstream-ok".to_owned()
    });
    let private = HttpServer::start(&topo.upstream, at(Topology::UPSTREAM_PRIVATE, PORT), || {
        "fkr-private-ok".to_owned()
    });
    let allowed = HttpServer::start(&topo.upstream, at(Topology::UPSTREAM_ALLOWED, PORT), || {
        "fkr-allowed-ok".to_owned()
    });
    let cfg = NetConfig {
        dns_servers: Some(vec![Topology::UPSTREAM_ADDR]),
        allow: vec![format!("{}:{PORT}", Topology::UPSTREAM_ALLOWED)
            .parse()
            .unwrap()],
        host_ports: vec![HOST_OPEN_PORT],
        ..NetConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let vm_cfg = VmConfig {
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 256,
        runtime_root: dir.path().join("run"),
        log_dir: dir.path().join("logs"),
        keep_serial_log: true,
        powerdown_grace_secs: 5,
        quit_grace_secs: 5,
        ..VmConfig::default()
    };

    let (serials, leases) = topo.host.run(|| {
        // With br_netfilter loaded, bridged frames also pass our IP rules (the forward drop of
        // bridge→bridge would stop VM↔VM by itself). Turn that off in this namespace, as on a host
        // without br_netfilter, so the peer probe proves the bridge port isolation.
        let br_nf = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
        if br_nf.exists() {
            std::fs::write(br_nf, "0").expect("disable bridge-nf-call-iptables in the test netns");
        }
        let hn = HostNetwork::setup(&cfg, &[]).expect("host network");
        // From the host itself the private server answers: a guest that cannot reach it is
        // stopped by the firewall, not by the topology.
        assert_eq!(
            http_get(at(Topology::UPSTREAM_PRIVATE, PORT)).as_deref(),
            Some("fkr-private-ok")
        );
        let gw = hn.gateway();
        let host_closed = HttpServer::start(&topo.host, at(gw, HOST_CLOSED_PORT), || {
            "fkr-host-ok".to_owned()
        });
        let (_go, say) = signal_server(&topo.host, at(gw, HOST_OPEN_PORT));

        let names = [VmName::generate(), VmName::generate()];
        let leases = [
            hn.allocate_address().expect("address"),
            hn.allocate_address().expect("address"),
        ];
        let taps = [0, 1].map(|i| hn.create_tap(&names[i], &leases[i]).expect("tap"));
        let addrs = leases.each_ref().map(|l| l.address());

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let serials = rt.block_on(async {
            let mut handles = Vec::new();
            for i in 0..2 {
                let seed = Seed {
                    instance_id: names[i].as_str().to_owned(),
                    hostname: names[i].as_str().to_owned(),
                    user_data: user_data(addrs[1 - i]),
                    network_config: Some(hn.network_config(&leases[i], taps[i].mac())),
                };
                let mut spec =
                    VmSpec::new(names[i].clone(), &image, seed, Duration::from_secs(300));
                spec.net = Some(vm::NetDevice {
                    tap: taps[i].fd_for_qemu().expect("tap fd"),
                    mac: taps[i].mac(),
                });
                handles.push(vm::launch(&vm_cfg, spec).await.expect("launch"));
            }
            // Barrier: both guests serve on their address (seen from the host), then "go".
            let deadline = Instant::now()
                + Duration::from_secs(
                    std::env::var("FKR_NET_BARRIER_SECS")
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(240),
                );
            for addr in addrs {
                loop {
                    let body = http_get_async(at(addr, PORT)).await;
                    if body.as_deref().is_some_and(|b| b.contains("peer-ok")) {
                        break;
                    }
                    let ended = handles
                        .iter()
                        .any(|h| matches!(h.state(), vm::VmState::Stopped | vm::VmState::Failed));
                    if ended || Instant::now() > deadline {
                        let logs: Vec<String> = handles
                            .iter()
                            .map(|h| std::fs::read_to_string(h.serial_log()).unwrap_or_default())
                            .collect();
                        panic!(
                            "guest {addr} never served; serial logs:\n{}",
                            logs.join("\n----\n")
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            *say.lock().unwrap() = "go";
            let mut serials = Vec::new();
            for handle in handles {
                let log = handle.serial_log().to_owned();
                let exit = handle.wait().await.expect("wait");
                assert_eq!(exit.outcome, vm::Outcome::GuestPoweredOff, "{exit:?}");
                serials.push(std::fs::read_to_string(&log).expect("serial log"));
            }
            serials
        });
        assert!(
            host_closed.clients().is_empty(),
            "the host's closed port saw {:?}",
            host_closed.clients()
        );
        drop(taps);
        hn.teardown().expect("teardown");
        (serials, addrs)
    });

    for (serial, addr) in serials.iter().zip(leases) {
        let m = markers(serial);
        let want = |k: &str, v: &str| {
            assert_eq!(
                m.get(k).map(String::as_str),
                Some(v),
                "{k} in {m:?}\n{serial}"
            );
        };
        assert!(
            m.get("addr")
                .is_some_and(|a| a.contains(&format!("inet {addr}/24"))),
            "guest address {addr}: {m:?}"
        );
        want("upstream", "open");
        want("allowed", "open");
        want("hostport", "open");
        want("private", "closed");
        want("host", "closed");
        want("peer", "closed");
        want("done", "yes");
    }
    let host_side = Topology::HOST_ADDR;
    for (name, server, count) in [("upstream", &upstream, 2), ("allowed", &allowed, 2)] {
        let clients = server.clients();
        assert_eq!(clients.len(), count, "{name}: {clients:?}");
        assert!(
            clients.iter().all(|c| c.ip() == host_side),
            "{name} must see the host's veth address (NAT): {clients:?}"
        );
    }
    // Only the host's own check reached the private server.
    assert_eq!(private.clients().len(), 1, "{:?}", private.clients());
}

/// The hostile guest: `$1` is the victim's address. Prints `FKR-NET` markers like CHECK_SCRIPT.
const ATTACK_SCRIPT: &str = r#"#!/bin/sh
say() { echo "FKR-NET $*"; }
V=$1
E=$(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n 1)
MAC=$(cat /sys/class/net/eth0/address)
say "attacker=$E mac=$MAC"
i=0
until timeout 3 wget -q -O - http://10.88.0.1:8082/ 2>/dev/null | grep -q go; do
  i=$((i + 1)); [ "$i" -gt 150 ] && { say "barrier=timeout"; break; }; sleep 1
done
# Control: two honest pings to the probe address reach it (the host counts them upstream).
ping -c 2 -W 2 203.0.113.9 >/dev/null 2>&1; say "control=$?"
# Source addresses that are not ours, without adding them to eth0.
sysctl -w net.ipv4.ip_nonlocal_bind=1 >/dev/null
# Gratuitous ARP (request and reply form) for the victim, the gateway and every other address.
arping -U -c 2 -I eth0 "$V" >/dev/null 2>&1 &
arping -A -c 2 -I eth0 "$V" >/dev/null 2>&1 &
arping -U -c 2 -I eth0 10.88.0.1 >/dev/null 2>&1 &
arping -A -c 2 -I eth0 10.88.0.1 >/dev/null 2>&1 &
for n in 2 3 4 5 6 7 8 9 10 11 12 13 14; do
  [ "10.88.0.$n" = "$E" ] || arping -U -c 1 -I eth0 "10.88.0.$n" >/dev/null 2>&1 &
done
# IPv4 with forged source addresses: the victim's, a free one of the subnet, an outside one.
for src in "$V" 10.88.0.13 192.0.2.77; do
  ping -c 3 -W 1 -I "$src" 203.0.113.9 >/dev/null 2>&1 &
done
wait
say "arp=sent"
# Forged source MAC with our own address.
ip link set eth0 address 02:66:00:00:00:01
ping -c 3 -W 1 203.0.113.9 >/dev/null 2>&1
# A flood of random source MACs.
n=0
while [ "$n" -lt 60 ]; do
  ip link set eth0 address "02:42$(hexdump -n 4 -e '4/1 ":%02x"' /dev/urandom)"
  arping -c 1 -w 1 -I eth0 10.88.0.1 >/dev/null 2>&1 &
  usleep 100000
  n=$((n + 1))
done
wait
ip link set eth0 address "$MAC"
say "flood=sent"
# Many connections, each held open.
n=0
while [ "$n" -lt 20 ]; do
  (sleep 60 | nc 203.0.113.1 9000 >/dev/null 2>&1) &
  n=$((n + 1))
done
sleep 5
say "held"
sleep 20
say done
"#;

/// The victim: fetches from upstream once a second until the host says "stop".
const VICTIM_SCRIPT: &str = r#"#!/bin/sh
say() { echo "FKR-NET $*"; }
ok=0; bad=0; i=0
until timeout 3 wget -q -O - http://10.88.0.1:8082/ 2>/dev/null | grep -q go; do
  i=$((i + 1)); [ "$i" -gt 150 ] && { say "barrier=timeout"; break; }; sleep 1
done
while :; do
  if timeout 8 wget -q -O - http://203.0.113.1:8080/ 2>/dev/null | grep -q fkr-upstream-ok; then
    ok=$((ok + 1))
  else
    bad=$((bad + 1))
  fi
  [ $((ok + bad)) -gt 200 ] && break
  timeout 3 wget -q -O - http://10.88.0.1:8082/ 2>/dev/null | grep -q stop && break
  sleep 1
done
say "ok=$ok"
say "bad=$bad"
say "gateway=$(ip neigh show 10.88.0.1 | sed -n 's/.*lladdr \([0-9a-f:]*\).*/\1/p')"
say done
"#;

fn script_user_data(script: &str, arg: Ipv4Addr) -> String {
    let script = base64::engine::general_purpose::STANDARD.encode(script);
    format!(
        "#cloud-config\nwrite_files:\n- path: /etc/fkr/script.sh\n  owner: root:root\n  \
         permissions: '0755'\n  encoding: b64\n  content: {script}\nruncmd:\n- 'sh \
         /etc/fkr/script.sh {arg}'\npower_state:\n  mode: poweroff\n  timeout: 30\n  \
         condition: true\n"
    )
}

/// Accepts TCP connections and keeps them open; counts them.
struct Holder {
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Holder {
    fn start(ns: &common::netns::NetNs, addr: SocketAddr) -> Holder {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            common::http_server::spawn_in(ns, move || {
                let listener = std::net::TcpListener::bind(addr).expect("bind the holder");
                listener.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            held.push(stream);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        rx.recv().expect("holder up");
        Holder {
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `cond` until it holds; panics with both serial logs when a guest ended or time ran out.
async fn wait_for(handles: &[vm::VmHandle], what: &str, cond: &dyn Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !cond() {
        let ended = handles
            .iter()
            .any(|h| matches!(h.state(), vm::VmState::Stopped | vm::VmState::Failed));
        if ended || Instant::now() > deadline {
            let logs: Vec<String> = handles
                .iter()
                .map(|h| std::fs::read_to_string(h.serial_log()).unwrap_or_default())
                .collect();
            panic!(
                "waiting for {what}; serial logs:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sum of the `counter packets N` of `nft list …` output.
fn counted(listing: &str) -> u64 {
    listing
        .split("counter packets ")
        .skip(1)
        .map(|rest| rest.split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn vm_hostile_guest_cannot_spoof_flood_or_starve_its_neighbour() {
    const MAX_CONNS: u32 = 6;
    const PROBE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
    let image = guest_image();
    let topo = Topology::new();
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    let upstream = HttpServer::start(&topo.upstream, at(Topology::UPSTREAM_ADDR, PORT), || {
        "fkr-upstream-ok".to_owned()
    });
    let holder = Holder::start(&topo.upstream, at(Topology::UPSTREAM_ADDR, 9000));
    // The probe address counts every echo request that reaches it: only the attacker's two
    // honest control pings may.
    topo.upstream
        .ip(&["addr", "add", "203.0.113.9/24", "dev", "eth0"]);
    topo.upstream.exec("nft", &["add table ip probe"]);
    topo.upstream.exec(
        "nft",
        &["add chain ip probe input { type filter hook input priority 0; }"],
    );
    topo.upstream.exec(
        "nft",
        &["add rule ip probe input ip daddr 203.0.113.9 icmp type echo-request counter"],
    );
    let cfg = NetConfig {
        dns_servers: Some(vec![Topology::UPSTREAM_ADDR]),
        subnet: "10.88.0.1/28".parse().unwrap(),
        host_ports: vec![HOST_OPEN_PORT],
        max_conns_per_vm: MAX_CONNS,
        ..NetConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let vm_cfg = common::vm_config::config(dir.path());

    let host = &topo.host;
    let (victim_serial, attacker_serial) = host.run(|| {
        let br_nf = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
        if br_nf.exists() {
            std::fs::write(br_nf, "0").expect("disable bridge-nf-call-iptables in the test netns");
        }
        let hn = HostNetwork::setup(&cfg, &[]).expect("host network");
        let (go, say) = signal_server(host, at(hn.gateway(), HOST_OPEN_PORT));
        let names = [VmName::generate(), VmName::generate()];
        let leases = [
            hn.allocate_address().expect("address"),
            hn.allocate_address().expect("address"),
        ];
        let taps = [0, 1].map(|i| hn.create_tap(&names[i], &leases[i]).expect("tap"));
        let (victim, attacker) = (leases[0].address(), leases[1].address());
        let scripts = [
            script_user_data(VICTIM_SCRIPT, attacker),
            script_user_data(ATTACK_SCRIPT, victim),
        ];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let serials = rt.block_on(async {
            let mut handles = Vec::new();
            for i in 0..2 {
                let seed = Seed {
                    instance_id: names[i].as_str().to_owned(),
                    hostname: names[i].as_str().to_owned(),
                    user_data: scripts[i].clone(),
                    network_config: Some(hn.network_config(&leases[i], taps[i].mac())),
                };
                let mut spec =
                    VmSpec::new(names[i].clone(), &image, seed, Duration::from_secs(400));
                spec.net = Some(vm::NetDevice {
                    tap: taps[i].fd_for_qemu().expect("tap fd"),
                    mac: taps[i].mac(),
                });
                handles.push(vm::launch(&vm_cfg, spec).await.expect("launch"));
            }
            let serial =
                |i: usize| std::fs::read_to_string(handles[i].serial_log()).unwrap_or_default();
            // Both guests wait for "go" (they poll the host port once they are up).
            wait_for(&handles, "the barrier", &|| {
                let clients = go.clients();
                [victim, attacker]
                    .iter()
                    .all(|a| clients.iter().any(|c| c.ip() == *a))
            })
            .await;
            *say.lock().unwrap() = "go";
            // The victim keeps working while the attacker holds its connections.
            wait_for(&handles, "the held connections", &|| {
                serial(1).contains("FKR-NET held")
            })
            .await;
            let before = upstream.clients().len();
            wait_for(&handles, "victim requests during the hold", &|| {
                upstream.clients().len() >= before + 3
            })
            .await;
            let held_now = holder.accepted();
            *say.lock().unwrap() = "stop";
            let mut serials = Vec::new();
            for handle in handles {
                let log = handle.serial_log().to_owned();
                let exit = handle.wait().await.expect("wait");
                assert_eq!(exit.outcome, vm::Outcome::GuestPoweredOff, "{exit:?}");
                serials.push(std::fs::read_to_string(&log).expect("serial log"));
            }
            (serials, held_now)
        });
        let (serials, held_now) = serials;

        // The host side after the attacks, while both taps still exist.
        let fdb = host.exec("bridge", &["fdb", "show", "br", "fkr0"]);
        let learned: Vec<&str> = fdb
            .lines()
            .filter(|l| !l.contains("permanent") && !l.contains("static"))
            .collect();
        assert!(learned.is_empty(), "the bridge learned MACs:\n{fdb}");
        let neigh = host.ip(&["-4", "neigh", "show", "dev", "fkr0"]);
        let want = [(victim, taps[0].mac()), (attacker, taps[1].mac())];
        for (addr, mac) in want {
            assert!(
                neigh.contains(&format!("{addr} lladdr {mac} PERMANENT")),
                "{addr} must stay pinned to {mac}:\n{neigh}"
            );
        }
        assert_eq!(
            neigh.lines().count(),
            2,
            "entries the guests made up:\n{neigh}"
        );
        let drops = counted(&host.exec("nft", &["list", "table", "bridge", "fkr_qemu"]));
        assert!(
            drops >= 60,
            "the attacks did not reach the bridge ({drops} drops)"
        );
        let next = hn.allocate_address().expect("a new VM gets an address");
        assert!(![victim, attacker, hn.gateway()].contains(&next.address()));
        let accepted = holder.accepted();
        assert!(
            (1..=MAX_CONNS as usize).contains(&accepted) && held_now <= MAX_CONNS as usize,
            "the attacker opened {accepted} connections (limit {MAX_CONNS})"
        );
        eprintln!(
            "MEASURE hostile guest: {drops} frames dropped, {accepted} of 20 connections held"
        );
        drop((taps, leases, next));
        hn.teardown().expect("teardown");
        (serials[0].clone(), serials[1].clone())
    });

    let probe = topo
        .upstream
        .exec("nft", &["list", "chain", "ip", "probe", "input"]);
    assert_eq!(
        counted(&probe),
        2,
        "forged packets reached {PROBE}:\n{probe}"
    );
    let a = markers(&attacker_serial);
    for (k, v) in [
        ("control", "0"),
        ("arp", "sent"),
        ("flood", "sent"),
        ("done", "yes"),
    ] {
        assert_eq!(
            a.get(k).map(String::as_str),
            Some(v),
            "attacker {k}: {a:?}\n{attacker_serial}"
        );
    }
    let m = markers(&victim_serial);
    assert_eq!(
        m.get("bad").map(String::as_str),
        Some("0"),
        "victim: {m:?}\n{victim_serial}"
    );
    let ok: u32 = m.get("ok").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(ok >= 3, "victim: {m:?}");
    // The attacker's gratuitous ARP for the gateway never reached the victim.
    assert_eq!(
        m.get("gateway"),
        Some(&cfg.bridge_mac().to_string()),
        "victim's gateway entry: {m:?}"
    );
    assert!(
        upstream
            .clients()
            .iter()
            .all(|c| c.ip() == Topology::HOST_ADDR),
        "{:?}",
        upstream.clients()
    );
}
