//! The standard test network: a `host` namespace (where fkr-qemu's networking code runs) and an
//! `upstream` namespace standing in for the internet, joined by a veth pair.

use std::net::Ipv4Addr;

use super::netns::NetNs;

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
        let topo = Topology {
            host: NetNs::create("fkrt-host"),
            upstream: NetNs::create("fkrt-up"),
        };
        topo.host.ip(&[
            "link",
            "add",
            Self::HOST_VETH,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            topo.upstream.name(),
        ]);
        let cidr = |a: Ipv4Addr| format!("{a}/24");
        topo.host.ip(&[
            "addr",
            "add",
            &cidr(Self::HOST_ADDR),
            "dev",
            Self::HOST_VETH,
        ]);
        topo.host.ip(&["link", "set", Self::HOST_VETH, "up"]);
        topo.host.ip(&[
            "route",
            "add",
            "default",
            "via",
            &Self::UPSTREAM_ADDR.to_string(),
        ]);
        for a in [
            Self::UPSTREAM_ADDR,
            Self::UPSTREAM_PRIVATE,
            Self::UPSTREAM_ALLOWED,
        ] {
            topo.upstream.ip(&["addr", "add", &cidr(a), "dev", "eth0"]);
        }
        topo.upstream.ip(&["link", "set", "eth0", "up"]);
        topo
    }
}
