//! `[net]` configuration and the small value types it is made of.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Error;
use crate::types::{MacAddr, VmName};

/// Host networking configuration (the `[net]` table of the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// Name of the host bridge the VMs' taps join (created if missing).
    pub bridge: String,
    /// The bridge's address and the VM subnet's prefix, e.g. `10.88.0.1/24`. The address is the VMs'
    /// gateway; the other host addresses of the prefix are handed to VMs.
    pub subnet: Ipv4Cidr,
    /// The bridge's MAC address. Default: a locally administered address derived from the bridge name.
    pub bridge_mac: Option<MacAddr>,
    /// DNS servers written into each VM's network-config. Default: the host's non-loopback IPv4
    /// `nameserver`s from `/etc/resolv.conf`. VMs may reach them on port 53 even in private ranges.
    pub dns_servers: Option<Vec<Ipv4Addr>>,
    /// Private destinations VMs may reach anyway (e.g. a Forgejo on the LAN): `ADDR`, `ADDR/LEN`,
    /// optionally with `:PORT` (TCP) to allow only that port.
    pub allow: Vec<AllowedDestination>,
    /// Ports (TCP and UDP) VMs may reach on the bridge address, e.g. a caching proxy or a local DNS
    /// resolver. None by default: everything from the VMs to the host itself is dropped.
    pub host_ports: Vec<u16>,
    /// Interface VM traffic leaves through (masqueraded). Default: the interface of the IPv4 default
    /// route.
    pub uplink: Option<String>,
    /// New connections (conntrack entries: TCP, UDP flows, pings) one VM may open per second, on
    /// average; bursts of twice as many pass. Excess new packets are dropped (TCP retries them).
    pub conn_rate_per_sec: u32,
    /// Connections one VM may have tracked at a time (TCP in TIME_WAIT/CLOSE not counted); further
    /// new ones are rejected. Keeps one guest from filling the host's conntrack table.
    pub max_conns_per_vm: u32,
}

/// Default of `net.conn_rate_per_sec`: far above what package managers and `docker pull` need,
/// far below what fills a conntrack table.
pub const DEFAULT_CONN_RATE_PER_SEC: u32 = 50;
/// Default of `net.max_conns_per_vm`.
pub const DEFAULT_MAX_CONNS_PER_VM: u32 = 1024;

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            bridge: "fkr0".to_owned(),
            subnet: Ipv4Cidr {
                address: Ipv4Addr::new(10, 88, 0, 1),
                prefix_len: 24,
            },
            bridge_mac: None,
            dns_servers: None,
            allow: Vec::new(),
            host_ports: Vec::new(),
            uplink: None,
            conn_rate_per_sec: DEFAULT_CONN_RATE_PER_SEC,
            max_conns_per_vm: DEFAULT_MAX_CONNS_PER_VM,
        }
    }
}

impl NetConfig {
    /// Checks what serde cannot: interface names, a usable subnet.
    pub fn validate(&self) -> Result<(), Error> {
        check_ifname("net.bridge", &self.bridge)?;
        if self.bridge.starts_with(VmName::PREFIX) {
            return Err(Error::invalid(
                "net.bridge",
                &self.bridge,
                format!(
                    "must not start with {:?}: that prefix is reserved for VM taps",
                    VmName::PREFIX
                ),
            ));
        }
        if let Some(uplink) = &self.uplink {
            check_ifname("net.uplink", uplink)?;
        }
        let s = &self.subnet;
        if !(8..=30).contains(&s.prefix_len) {
            return Err(Error::invalid(
                "net.subnet",
                s,
                "the prefix length must be between 8 and 30",
            ));
        }
        if s.address == s.network() || s.address == s.broadcast() {
            return Err(Error::invalid(
                "net.subnet",
                s,
                format!(
                    "give the bridge's own address (e.g. {}/{}), not the network or broadcast \
                     address",
                    Ipv4Addr::from(u32::from(s.network()) + 1),
                    s.prefix_len
                ),
            ));
        }
        if self.host_ports.contains(&0) {
            return Err(Error::invalid("net.host_ports", 0, "port 0 is not a port"));
        }
        // nft's `limit rate` takes a 32-bit packet count; the burst is twice the rate.
        if self.conn_rate_per_sec == 0 || self.conn_rate_per_sec > u32::MAX / 2 {
            return Err(Error::invalid(
                "net.conn_rate_per_sec",
                self.conn_rate_per_sec,
                format!("must be between 1 and {}", u32::MAX / 2),
            ));
        }
        if self.max_conns_per_vm == 0 {
            return Err(Error::invalid(
                "net.max_conns_per_vm",
                0,
                "a VM needs at least one connection",
            ));
        }
        Ok(())
    }

    /// The bridge MAC: configured, or derived from the bridge name.
    pub fn bridge_mac(&self) -> MacAddr {
        self.bridge_mac
            .unwrap_or_else(|| MacAddr::derived(&format!("bridge:{}", self.bridge)))
    }

    /// The DNS servers for the VMs: configured, or the host's from `/etc/resolv.conf`.
    pub fn resolved_dns_servers(&self) -> Result<Vec<Ipv4Addr>, Error> {
        match &self.dns_servers {
            Some(list) if !list.is_empty() => Ok(list.clone()),
            Some(_) => Err(Error::invalid(
                "net.dns_servers",
                "[]",
                "list at least one server, or leave it out to use the host's resolvers",
            )),
            None => resolvers_from_file(Path::new("/etc/resolv.conf")),
        }
    }
}

fn check_ifname(what: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            name,
            "not a valid interface name (1-15 of [A-Za-z0-9._-])",
        ))
    }
}

/// The non-loopback IPv4 `nameserver` lines of a resolv.conf file.
pub fn resolvers_from_file(path: &Path) -> Result<Vec<Ipv4Addr>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::NoResolvers {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        return Err(Error::NoResolvers {
            path: path.to_owned(),
            reason: "it lists no non-loopback IPv4 nameserver (a local stub resolver such as \
                     127.0.0.53 is unreachable from VMs)"
                .into(),
        });
    }
    Ok(servers)
}

fn parse_resolv_conf(text: &str) -> Vec<Ipv4Addr> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(addr)) = words.next().map(Ipv4Addr::from_str) {
            if !addr.is_loopback() && !addr.is_unspecified() && !servers.contains(&addr) {
                servers.push(addr);
            }
        }
    }
    servers
}

/// An IPv4 address with a prefix length, e.g. `10.88.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> Result<Self, Error> {
        if prefix_len > 32 {
            return Err(Error::invalid(
                "an IPv4 prefix",
                format!("{address}/{prefix_len}"),
                "prefix length above 32",
            ));
        }
        Ok(Self {
            address,
            prefix_len,
        })
    }

    pub fn netmask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n)),
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & self.netmask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) | !self.netmask())
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.netmask() == u32::from(self.network())
    }

    /// The same prefix in network form (`10.88.0.0/24`), as nftables wants it.
    pub fn network_cidr(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            address: self.network(),
            prefix_len: self.prefix_len,
        }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::invalid(
                "an IPv4 prefix",
                s,
                "not an IPv4 address with a prefix (a.b.c.d/n)",
            )
        };
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let address = addr.parse().map_err(|_| bad())?;
        let prefix_len = len.parse().map_err(|_| bad())?;
        Self::new(address, prefix_len)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

/// A private destination VMs may reach: `ADDR[/LEN][:PORT]` (TCP port; all ports when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AllowedDestination {
    pub net: Ipv4Cidr,
    pub tcp_port: Option<u16>,
}

impl FromStr for AllowedDestination {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::invalid(
                "a net.allow entry",
                s,
                "expected ADDR, ADDR/LEN, ADDR:PORT or ADDR/LEN:PORT",
            )
        };
        let (net, port) = match s.split_once(':') {
            Some((net, port)) => (net, Some(port.parse::<u16>().map_err(|_| bad())?)),
            None => (s, None),
        };
        if port == Some(0) {
            return Err(bad());
        }
        let net = if net.contains('/') {
            net.parse::<Ipv4Cidr>().map_err(|_| bad())?
        } else {
            Ipv4Cidr::new(net.parse().map_err(|_| bad())?, 32)?
        };
        Ok(Self {
            net: net.network_cidr(),
            tcp_port: port,
        })
    }
}

impl TryFrom<String> for AllowedDestination {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl fmt::Display for AllowedDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        if let Some(port) = self.tcp_port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl From<Ipv4Cidr> for String {
    fn from(value: Ipv4Cidr) -> String {
        value.to_string()
    }
}

impl From<AllowedDestination> for String {
    fn from(value: AllowedDestination) -> String {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_deserialize_from_empty_table() {
        let c: NetConfig = toml::from_str("").unwrap();
        assert_eq!(c, NetConfig::default());
        assert_eq!(c.subnet.to_string(), "10.88.0.1/24");
        assert_eq!(c.bridge, "fkr0");
        c.validate().unwrap();
    }

    #[test]
    fn full_config_deserializes() {
        let c: NetConfig = toml::from_str(
            r#"
            bridge = "br-ci"
            subnet = "172.30.5.1/25"
            bridge_mac = "02:00:00:00:00:01"
            dns_servers = ["192.168.1.1"]
            allow = ["192.168.1.10:3000", "10.1.0.0/16"]
            host_ports = [3128]
            uplink = "eth0"
            conn_rate_per_sec = 20
            max_conns_per_vm = 256
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.subnet.network().to_string(), "172.30.5.0");
        assert_eq!(c.subnet.broadcast().to_string(), "172.30.5.127");
        assert_eq!(c.allow[0].to_string(), "192.168.1.10/32:3000");
        assert_eq!(c.allow[1].to_string(), "10.1.0.0/16");
        assert_eq!(c.bridge_mac().to_string(), "02:00:00:00:00:01");
        assert_eq!((c.conn_rate_per_sec, c.max_conns_per_vm), (20, 256));
        assert!(toml::from_str::<NetConfig>("bogus = 1").is_err());
        assert!(toml::from_str::<NetConfig>("subnet = \"10.88.0.1\"").is_err());
    }

    #[test]
    fn validate_rejects_bad_values() {
        let mut c = NetConfig {
            subnet: "10.88.0.0/24".parse().unwrap(),
            ..NetConfig::default()
        };
        assert!(c.validate().is_err());
        c.subnet = "10.88.0.1/31".parse().unwrap();
        assert!(c.validate().is_err());
        c = NetConfig {
            bridge: "fr-bridge".into(),
            ..NetConfig::default()
        };
        assert!(c.validate().is_err());
        c.bridge = "a-very-long-bridge-name".into();
        assert!(c.validate().is_err());
        for (rate, max) in [(0, 10), (10, 0), (u32::MAX, 10)] {
            let c = NetConfig {
                conn_rate_per_sec: rate,
                max_conns_per_vm: max,
                ..NetConfig::default()
            };
            assert!(c.validate().is_err(), "{rate} {max}");
        }
    }

    #[test]
    fn resolv_conf_skips_loopback_and_ipv6() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 2001:db8::1\n\
                    nameserver 192.168.1.1\nsearch lan\nnameserver 9.9.9.9\nnameserver 192.168.1.1\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 127.0.0.53\n").unwrap();
        let err = resolvers_from_file(&path).unwrap_err().to_string();
        assert!(err.contains("net.dns_servers"), "{err}");
    }

    #[test]
    fn derived_macs_are_local_unicast_and_stable() {
        let a = MacAddr::derived("fr-0123abcd");
        assert_eq!(a, MacAddr::derived("fr-0123abcd"));
        assert_ne!(a, MacAddr::derived("fr-0123abce"));
        assert_eq!(a.0[0], 0x02);
        assert_eq!(a.to_string().parse::<MacAddr>().unwrap(), a);
        assert!("03:00:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
    }
}
