//! Host networking inside throw-away network namespaces (root): bridge, taps, nftables table,
//! sweep. The VM-level reachability tests are in `net_vm.rs`.

mod common;

use std::net::Ipv4Addr;

use common::netns::{NetNs, Topology};
use fkr_qemu::net::{self, HostNetwork, NetConfig, Tap};

fn config() -> NetConfig {
    NetConfig {
        dns_servers: Some(vec![Topology::UPSTREAM_ADDR]),
        ..NetConfig::default()
    }
}

fn vm_tap_links(ns: &NetNs) -> Vec<String> {
    ns.links()
        .into_iter()
        .filter(|l| l.starts_with("fr-"))
        .collect()
}

#[test]
fn tap_is_created_attached_isolated_and_removed() {
    let topo = Topology::new();
    let host = &topo.host;
    let cfg = config();
    host.run(|| {
        let hn = HostNetwork::setup(&cfg).expect("setup");
        assert_eq!(
            hn.uplink(),
            Topology::HOST_VETH,
            "uplink from the default route"
        );
        assert_eq!(hn.gateway(), Ipv4Addr::new(10, 88, 0, 1));

        let bridge = host.ip(&["-d", "link", "show", "fkr0"]);
        assert!(bridge.contains("bridge"), "{bridge}");
        assert!(
            bridge.contains(&format!("link/ether {}", cfg.bridge_mac())),
            "{bridge}"
        );
        assert!(bridge.contains(",UP"), "{bridge}");
        let addrs = host.ip(&["-4", "addr", "show", "fkr0"]);
        assert!(addrs.contains("inet 10.88.0.1/24"), "{addrs}");
        assert_eq!(
            host.exec("cat", &["/proc/sys/net/ipv4/ip_forward"]).trim(),
            "1"
        );

        let tap = hn.create_tap("fr-0123abcd").expect("tap");
        assert_eq!(tap.mac(), net::mac_for("fr-0123abcd"));
        let link = host.ip(&["-d", "link", "show", "fr-0123abcd"]);
        assert!(link.contains("master fkr0"), "{link}");
        assert!(link.contains("tun type tap"), "{link}");
        assert!(link.contains("pi off vnet_hdr on persist off"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        let port = host.exec("bridge", &["-d", "link", "show", "dev", "fr-0123abcd"]);
        assert!(port.contains("isolated on"), "{port}");

        // The fd QEMU gets keeps a tap alive on its own: Drop must still remove the interface.
        let tap2 = Tap::create("fr-0123abce", hn.bridge()).expect("second tap");
        let qemu_fd = tap2.fd_for_qemu().expect("dup");
        assert_eq!(vm_tap_links(host).len(), 2);
        drop(tap2);
        drop(tap);
        assert!(vm_tap_links(host).is_empty(), "{:?}", host.links());
        drop(qemu_fd);

        // Bad names never become interfaces.
        assert!(matches!(
            hn.create_tap("vm-1"),
            Err(net::Error::InvalidTapName(_))
        ));
        hn.teardown().expect("teardown");
    });
    assert!(vm_tap_links(host).is_empty());
}

#[test]
fn nft_table_exists_while_set_up_and_is_gone_after_teardown_and_sweep() {
    let topo = Topology::new();
    let host = &topo.host;
    let cfg = NetConfig {
        host_ports: vec![8080],
        allow: vec!["10.77.0.2:8080".parse().unwrap()],
        ..config()
    };
    host.run(|| {
        assert!(!net::nft::table_exists().unwrap());
        let hn = HostNetwork::setup(&cfg).expect("setup");
        assert!(net::nft::table_exists().unwrap());
        let rules = host.exec("nft", &["list", "table", "inet", "fkr_qemu"]);
        for needle in [
            "oifname \"up0\" accept",
            "ip daddr 10.77.0.2 tcp dport 8080 accept",
            "masquerade",
        ] {
            assert!(rules.contains(needle), "{needle:?} not in\n{rules}");
        }
        // A second setup (a restart over a crash's leftovers) replaces the table in one go.
        let again = HostNetwork::setup(&cfg).expect("setup again");
        let count = host
            .exec("nft", &["list", "tables"])
            .matches("fkr_qemu")
            .count();
        assert_eq!(count, 1);
        drop(again);
        hn.teardown().expect("teardown");
        assert!(!net::nft::table_exists().unwrap(), "gone after teardown");

        // A crash (no teardown) leaves the table; the sweep removes it.
        let crashed = HostNetwork::setup(&cfg).expect("setup");
        drop(crashed);
        assert!(
            net::nft::table_exists().unwrap(),
            "a dropped guard fails closed"
        );
        let report = net::sweep(&cfg).expect("sweep");
        assert!(report.table_removed);
        assert!(!net::nft::table_exists().unwrap(), "gone after sweep");
        let report = net::sweep(&cfg).expect("second sweep");
        assert!(!report.table_removed);
    });
}

#[test]
fn addresses_alive_on_the_bridge_are_never_handed_out() {
    let topo = Topology::new();
    let host = &topo.host;
    host.run(|| {
        let hn = HostNetwork::setup(&config()).expect("setup");
        // A VM from before a restart still answers on .2 behind its tap; someone added .3 to the
        // bridge.
        let _old_vm = hn.create_tap("fr-0000aaaa").expect("tap");
        host.ip(&[
            "neigh",
            "add",
            "10.88.0.2",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "fkr0",
            "nud",
            "reachable",
        ]);
        host.ip(&["addr", "add", "10.88.0.3/24", "dev", "fkr0"]);
        let lease = hn.allocate_address().expect("address");
        assert_eq!(lease.address(), Ipv4Addr::new(10, 88, 0, 4));
        let mac = net::mac_for("fr-0000beef");
        let nc = hn.network_config(&lease, mac);
        assert!(nc.contains(&format!("macaddress: '{mac}'")), "{nc}");
        assert!(nc.contains("- 10.88.0.4/24\n"), "{nc}");
        assert!(nc.contains("via: 10.88.0.1\n"), "{nc}");
        assert!(nc.ends_with("addresses:\n      - 203.0.113.1\n"), "{nc}");
        // A re-adopted lease is never handed out again.
        let kept = hn
            .pool()
            .reserve(Ipv4Addr::new(10, 88, 0, 5))
            .expect("reserve");
        assert_eq!(
            hn.allocate_address().unwrap().address(),
            Ipv4Addr::new(10, 88, 0, 6)
        );
        drop((lease, kept));
        hn.teardown().expect("teardown");
    });
}

#[test]
fn sweep_removes_only_vm_taps() {
    let ns = NetNs::create("fkrt-sweep");
    ns.ip(&["tuntap", "add", "dev", "fr-deadbeef", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "dev", "fr-feedf00d", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "dev", "keep-tap0", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "dev", "fr-tun0", "mode", "tun"]);
    ns.ip(&[
        "link", "add", "fr-veth0", "type", "veth", "peer", "name", "fr-veth1",
    ]);
    ns.ip(&["link", "add", "fr-br0", "type", "bridge"]);
    ns.ip(&["tuntap", "add", "dev", "fr-Upper0", "mode", "tap"]);
    let cfg = config();
    let report = ns.run(|| net::sweep(&cfg).expect("sweep"));
    let mut removed = report.taps_removed.clone();
    removed.sort();
    assert_eq!(removed, vec!["fr-deadbeef", "fr-feedf00d"]);
    assert!(!report.table_removed);
    let mut left = ns.links();
    left.sort();
    assert_eq!(
        left,
        vec![
            "fr-Upper0",
            "fr-br0",
            "fr-tun0",
            "fr-veth0",
            "fr-veth1",
            "keep-tap0",
            "lo"
        ]
    );
}

#[test]
fn setup_explains_what_is_missing() {
    let ns = NetNs::create("fkrt-bare");
    ns.run(|| {
        let err = HostNetwork::setup(&config()).unwrap_err();
        assert!(matches!(err, net::Error::NoUplink), "{err}");
        assert!(err.to_string().contains("net.uplink"), "{err}");
        assert_eq!(fkr_qemu::Error::from(err).exit_code(), 2);
        let cfg = NetConfig {
            uplink: Some("nonexistent0".into()),
            ..config()
        };
        let err = HostNetwork::setup(&cfg).unwrap_err();
        assert!(matches!(err, net::Error::UplinkMissing(_)), "{err}");
        // Nothing was created on the way to these errors.
        assert_eq!(ns.links(), vec!["lo"]);
        assert!(!net::nft::table_exists().unwrap());
    });
}
