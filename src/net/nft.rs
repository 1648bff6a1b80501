//! The nftables rule set, applied with the `nft` tool in one atomic transaction: the `inet` table
//! (NAT, isolation, per-VM connection limits) and the `bridge` table (per-port anti-spoofing, whose
//! sets get one element per VM while it runs).

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::config::{AllowedDestination, Ipv4Cidr};
use super::Error;
use crate::types::{MacAddr, VmName};

/// Our routing-level table. Nothing else of the host's rule set is touched.
pub const TABLE: &str = "inet fkr_qemu";
/// Our bridge-level table: frames entering the bridge from VM taps.
pub const BRIDGE_TABLE: &str = "bridge fkr_qemu";

/// Destinations VMs never reach unless allow-listed: "this network", RFC 1918 private ranges,
/// carrier-grade NAT, loopback, link-local (cloud metadata 169.254.169.254), multicast,
/// reserved/broadcast, and Azure's wire server (a public address that hands out VM secrets).
pub const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "168.63.129.16/32",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Everything the rule set depends on.
#[derive(Debug, Clone)]
pub struct RuleSet<'a> {
    pub bridge: &'a str,
    pub subnet: Ipv4Cidr,
    pub uplink: &'a str,
    pub dns_servers: &'a [Ipv4Addr],
    pub allow: &'a [AllowedDestination],
    pub host_ports: &'a [u16],
    /// New connections per second per VM address (bursts of twice as many).
    pub conn_rate_per_sec: u32,
    /// Tracked connections per VM address.
    pub max_conns_per_vm: u32,
    /// VMs that run already (taken over after a restart): their elements go into the new table
    /// in the same transaction, so they are never unfiltered nor cut off.
    pub ports: &'a [VmPort<'a>],
}

impl RuleSet<'_> {
    /// The `nft -f` script: create-then-delete makes the delete succeed whether or not the table
    /// existed, and the whole file is one transaction, so the old rules are replaced atomically
    /// (there is never a moment without them).
    pub fn render(&self) -> String {
        let bridge = self.bridge;
        let gateway = self.subnet.address;
        let net = self.subnet.network_cidr();
        let dns = join(self.dns_servers.iter());
        let mut s = String::new();
        let _ = writeln!(s, "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{");
        let _ = writeln!(
            s,
            "\tset blocked_v4 {{\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\tauto-merge\n\
             \t\telements = {{ {} }}\n\t}}",
            BLOCKED_V4.join(", ")
        );

        // Traffic from the VMs to the host itself.
        let _ = writeln!(
            s,
            "\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{bridge}\" jump vm_to_host\n\t}}"
        );
        // Per-VM connection limits, keyed by source address (the bridge table guarantees that a
        // VM's packets carry its own address). Only new connections pass here: the rate limit
        // drops (a TCP client retries, so a short burst above the rate only slows it down), the
        // concurrency limit rejects (the job fails fast with a clear error instead of hanging).
        // Entries of the dynamic sets expire (rate) or are collected when their count reaches 0.
        let rate = self.conn_rate_per_sec;
        let burst = rate.saturating_mul(2);
        let max = self.max_conns_per_vm;
        let _ = writeln!(
            s,
            "\tset vm_conn_rate {{\n\t\ttype ipv4_addr\n\t\tsize 65535\n\t\t\
             flags dynamic,timeout\n\t\ttimeout 1m\n\t}}\n\
             \tset vm_conn_count {{\n\t\ttype ipv4_addr\n\t\tsize 65535\n\t\t\
             flags dynamic\n\t}}\n\
             \tchain vm_limits {{\n\
             \t\tupdate @vm_conn_rate {{ ip saddr limit rate over {rate}/second burst {burst} \
             packets }} counter drop\n\
             \t\tadd @vm_conn_count {{ ip saddr ct count over {max} }} counter \
             reject with icmpx admin-prohibited\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain vm_to_host {{\n\t\tct state established,related accept\n\
             \t\tct state new jump vm_limits"
        );
        if !self.host_ports.is_empty() {
            let _ = writeln!(
                s,
                "\t\tip daddr {gateway} meta l4proto {{ tcp, udp }} th dport {{ {} }} accept",
                join(self.host_ports.iter())
            );
        }
        let _ = writeln!(s, "\t\tdrop\n\t}}");

        // Routed traffic from and to the VMs.
        let _ = writeln!(
            s,
            "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{bridge}\" jump from_vms\n\t\toifname \"{bridge}\" jump to_vms\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain to_vms {{\n\t\tct state established,related accept\n\t\tdrop\n\t}}"
        );
        let _ = writeln!(s, "\tchain from_vms {{");
        let _ = writeln!(s, "\t\tmeta nfproto ipv6 drop");
        let _ = writeln!(s, "\t\toifname \"{bridge}\" drop");
        let _ = writeln!(s, "\t\tip saddr != {net} drop");
        let _ = writeln!(s, "\t\tct state established,related accept");
        let _ = writeln!(s, "\t\tct state new jump vm_limits");
        let _ = writeln!(
            s,
            "\t\tip daddr {{ {dns} }} meta l4proto {{ tcp, udp }} th dport 53 accept"
        );
        for a in self.allow {
            match a.tcp_port {
                Some(port) => {
                    let _ = writeln!(s, "\t\tip daddr {} tcp dport {port} accept", a.net);
                }
                None => {
                    let _ = writeln!(s, "\t\tip daddr {} accept", a.net);
                }
            }
        }
        let _ = writeln!(s, "\t\tip daddr @blocked_v4 drop");
        let _ = writeln!(s, "\t\toifname \"{}\" accept", self.uplink);
        let _ = writeln!(s, "\t\tdrop\n\t}}");

        // NAT: whatever leaves the host (through the uplink, or to an allow-listed address behind
        // another interface) carries the host's address.
        let _ = writeln!(
            s,
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {net} oifname != \"{bridge}\" masquerade\n\t}}"
        );
        s.push_str("}\n");
        s.push_str(&render_bridge_table());
        for port in self.ports {
            s.push_str(&port.render("add"));
        }
        s
    }
}

/// The bridge table: every frame a VM tap (`fr-*`) brings into a bridge is dropped unless its
/// source MAC is the VM's, and it is IPv4 from the VM's address or ARP announcing exactly the
/// VM's MAC/IP pair. The sets start empty, so an unknown or not yet registered tap gets nothing
/// through (fails closed). The prerouting hook runs before the bridge learns a source MAC or
/// hands the frame to the host, so a dropped frame leaves no trace in the FDB or neighbour table.
/// Matched by tap name, not by bridge (`meta ibrname` needs `nft_meta_bridge`, which kernels
/// without modules may lack); the `fr-` prefix is reserved for our taps.
fn render_bridge_table() -> String {
    let prefix = VmName::PREFIX;
    format!(
        "table {BRIDGE_TABLE}\ndelete table {BRIDGE_TABLE}\ntable {BRIDGE_TABLE} {{\n\
         \tset vm_mac {{\n\t\ttype ifname . ether_addr\n\t}}\n\
         \tset vm_ip {{\n\t\ttype ifname . ipv4_addr\n\t}}\n\
         \tset vm_arp {{\n\t\ttype ifname . ether_addr . ipv4_addr\n\t}}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority -300; policy accept;\n\
         \t\tiifname \"{prefix}*\" jump from_vm\n\t}}\n\
         \tchain from_vm {{\n\
         \t\tiifname . ether saddr != @vm_mac counter drop\n\
         \t\tether type ip iifname . ip saddr @vm_ip accept\n\
         \t\tether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
         iifname . arp saddr ether . arp saddr ip @vm_arp accept\n\
         \t\tcounter drop\n\t}}\n}}\n"
    )
}

/// One VM's entry in the bridge table's sets: its tap, MAC and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmPort<'a> {
    pub tap: &'a str,
    pub mac: MacAddr,
    pub address: Ipv4Addr,
}

impl VmPort<'_> {
    /// The script that adds (`add`) or removes (`delete`) the VM's elements, all three in one
    /// transaction (a VM is never half registered).
    pub fn render(&self, verb: &str) -> String {
        let VmPort { tap, mac, address } = *self;
        format!(
            "{verb} element {BRIDGE_TABLE} vm_mac {{ \"{tap}\" . {mac} }}\n\
             {verb} element {BRIDGE_TABLE} vm_ip {{ \"{tap}\" . {address} }}\n\
             {verb} element {BRIDGE_TABLE} vm_arp {{ \"{tap}\" . {mac} . {address} }}\n"
        )
    }
}

/// Lets the VM's frames through its tap.
pub fn add_vm_port(port: &VmPort<'_>) -> Result<(), Error> {
    apply(&port.render("add"), "registering a VM port")
}

/// Removes the VM's elements (its tap drops everything again).
pub fn remove_vm_port(port: &VmPort<'_>) -> Result<(), Error> {
    apply(&port.render("delete"), "unregistering a VM port")
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// A missing `nft` binary is its own error (it says what to install).
fn nft_spawn_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::NftMissing,
        _ => Error::Io {
            what: "running nft".into(),
            source: e,
        },
    }
}

/// Runs `nft -f -` with `script` on stdin, in the calling thread's network namespace.
pub fn apply(script: &str, action: &'static str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(nft_spawn_error)?;
    let write = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let output = child.wait_with_output().map_err(|e| Error::Io {
        what: "running nft".into(),
        source: e,
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if let Err(e) = write {
        if stderr.is_empty() {
            return Err(Error::Io {
                what: "writing the nft script".into(),
                source: e,
            });
        }
    }
    Err(classify(action, stderr))
}

/// Tells a kernel without nftables (or without its NAT/conntrack parts) from other nft failures.
fn classify(action: &'static str, stderr: String) -> Error {
    let kernel = [
        "Operation not supported",
        "Protocol not supported",
        "Could not process rule: No such file or directory",
    ];
    if kernel.iter().any(|k| stderr.contains(k)) {
        Error::NftKernel { action, stderr }
    } else {
        Error::Nft { action, stderr }
    }
}

/// Installs (or atomically replaces) our table.
pub fn install(rules: &RuleSet<'_>) -> Result<(), Error> {
    apply(&rules.render(), "installing the firewall table")
}

/// Removes our tables if they exist (idempotent, one transaction).
pub fn remove() -> Result<(), Error> {
    apply(
        &format!(
            "table {TABLE}\ndelete table {TABLE}\ntable {BRIDGE_TABLE}\ndelete table {BRIDGE_TABLE}\n"
        ),
        "removing the firewall table",
    )
}

/// Whether one of our tables exists in the calling thread's network namespace.
pub fn table_exists() -> Result<bool, Error> {
    for table in [TABLE, BRIDGE_TABLE] {
        let output = Command::new("nft")
            .args(["list", "table"])
            .args(table.split(' '))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(nft_spawn_error)?;
        if output.status.success() {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_set_has_the_isolation_rules() {
        let allow = [
            "192.168.1.10:3000".parse().unwrap(),
            "10.9.0.0/16".parse().unwrap(),
        ];
        let dns = [Ipv4Addr::new(192, 168, 1, 1)];
        let rules = RuleSet {
            bridge: "fkr0",
            subnet: "10.88.0.1/24".parse().unwrap(),
            uplink: "eth0",
            dns_servers: &dns,
            allow: &allow,
            host_ports: &[3128, 53],
            conn_rate_per_sec: 7,
            max_conns_per_vm: 99,
            ports: &[],
        };
        let s = rules.render();
        assert!(
            s.starts_with("table inet fkr_qemu\ndelete table inet fkr_qemu\ntable inet fkr_qemu {")
        );
        for needle in [
            "iifname \"fkr0\" jump vm_to_host",
            "ip daddr 10.88.0.1 meta l4proto { tcp, udp } th dport { 3128, 53 } accept",
            "oifname \"fkr0\" drop",
            "ip saddr != 10.88.0.0/24 drop",
            "meta nfproto ipv6 drop",
            "ip daddr { 192.168.1.1 } meta l4proto { tcp, udp } th dport 53 accept",
            "ip daddr 192.168.1.10/32 tcp dport 3000 accept",
            "ip daddr 10.9.0.0/16 accept",
            "oifname \"eth0\" accept",
            "ip saddr 10.88.0.0/24 oifname != \"fkr0\" masquerade",
            "10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 168.63.129.16/32, 169.254.0.0/16, 172.16.0.0/12",
        ] {
            assert!(s.contains(needle), "missing {needle:?} in\n{s}");
        }
        // Allow-list entries come before the private-range drop, which comes before the uplink accept.
        let allow_at = s.find("tcp dport 3000 accept").unwrap();
        let drop_at = s.find("@blocked_v4 drop").unwrap();
        let uplink_at = s.find("oifname \"eth0\" accept").unwrap();
        assert!(allow_at < drop_at && drop_at < uplink_at);
        assert!(!rules_without_ports().contains("th dport {"));
    }

    /// The text of one chain (or set) of the rendered script.
    fn block<'a>(script: &'a str, header: &str) -> &'a str {
        let start = script
            .find(header)
            .unwrap_or_else(|| panic!("no {header:?} in\n{script}"));
        let rest = &script[start..];
        &rest[..rest.find("\n\t}").expect("block end")]
    }

    #[test]
    fn every_new_connection_of_a_vm_passes_the_limits_before_any_accept() {
        let s = rules_without_ports();
        let limits = block(&s, "chain vm_limits {");
        assert!(
            limits.contains(
                "update @vm_conn_rate { ip saddr limit rate over 50/second burst 100 packets } \
                 counter drop"
            ),
            "{limits}"
        );
        assert!(
            limits.contains("add @vm_conn_count { ip saddr ct count over 1024 } counter reject"),
            "{limits}"
        );
        // The rate set forgets idle VMs; the count set must not time out (connlimit sets clean up
        // themselves) — nft refuses a timeout there.
        assert!(block(&s, "set vm_conn_rate {").contains("flags dynamic,timeout"));
        assert!(!block(&s, "set vm_conn_count {").contains("timeout"));
        for chain in ["chain from_vms {", "chain vm_to_host {"] {
            let c = block(&s, chain);
            let jump = c
                .find("ct state new jump vm_limits")
                .unwrap_or_else(|| panic!("{chain} has no limits:\n{c}"));
            // Only the established/related accept (and drops) may come first.
            let before = &c[..jump];
            assert_eq!(
                before.matches("accept").count(),
                1,
                "{chain}: an accept before the limits:\n{c}"
            );
            assert!(before.contains("ct state established,related accept"));
        }
        let custom = RuleSet {
            conn_rate_per_sec: 3,
            max_conns_per_vm: 8,
            ports: &[],
            ..rules_struct()
        }
        .render();
        assert!(custom.contains("limit rate over 3/second burst 6 packets"));
        assert!(custom.contains("ct count over 8 }"));
    }

    #[test]
    fn azure_wire_server_and_metadata_are_blocked() {
        let s = rules_without_ports();
        let set = block(&s, "set blocked_v4 {");
        for net in ["168.63.129.16/32", "169.254.0.0/16"] {
            assert!(set.contains(net), "{net} not in {set}");
        }
    }

    #[test]
    fn bridge_table_fails_closed_for_unknown_taps() {
        let s = rules_without_ports();
        // Replaced atomically in the same transaction as the inet table.
        assert!(s.contains(
            "table bridge fkr_qemu\ndelete table bridge fkr_qemu\ntable bridge fkr_qemu {"
        ));
        let pre = block(&s, "chain prerouting {");
        assert!(pre.contains("hook prerouting priority -300; policy accept;"));
        assert!(pre.contains("iifname \"fr-*\" jump from_vm"));
        let c = block(&s, "chain from_vm {");
        let lines: Vec<&str> = c.lines().skip(1).map(str::trim).collect();
        assert_eq!(
            lines,
            [
                "iifname . ether saddr != @vm_mac counter drop",
                "ether type ip iifname . ip saddr @vm_ip accept",
                "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp \
                 saddr ether . arp saddr ip @vm_arp accept",
                "counter drop",
            ],
            "{c}"
        );
        // The sets start empty: nothing passes until a VM port is registered.
        for set in ["set vm_mac {", "set vm_ip {", "set vm_arp {"] {
            assert!(!block(&s, set).contains("elements"), "{set}");
        }
    }

    #[test]
    fn vm_port_elements_are_added_and_removed_together() {
        let port = VmPort {
            tap: "fr-0123abcd",
            mac: "02:11:22:33:44:55".parse().unwrap(),
            address: Ipv4Addr::new(10, 88, 0, 7),
        };
        assert_eq!(
            port.render("add"),
            "add element bridge fkr_qemu vm_mac { \"fr-0123abcd\" . 02:11:22:33:44:55 }\n\
             add element bridge fkr_qemu vm_ip { \"fr-0123abcd\" . 10.88.0.7 }\n\
             add element bridge fkr_qemu vm_arp { \"fr-0123abcd\" . 02:11:22:33:44:55 . 10.88.0.7 }\n"
        );
        assert_eq!(
            port.render("delete").lines().count(),
            3,
            "{}",
            port.render("delete")
        );
        assert!(port
            .render("delete")
            .lines()
            .all(|l| l.starts_with("delete element")));
    }

    #[test]
    fn kernel_trouble_is_told_apart() {
        let e = classify(
            "installing the firewall table",
            "Error: Could not process rule: Operation not supported".into(),
        );
        assert!(matches!(e, Error::NftKernel { .. }));
        assert!(e.to_string().contains("nf_tables"), "{e}");
        assert_eq!(e.class(), crate::types::ErrorClass::MissingDependency);
        let e = classify(
            "installing the firewall table",
            "Error: syntax error".into(),
        );
        assert!(matches!(e, Error::Nft { .. }));
        assert_eq!(e.class(), crate::types::ErrorClass::Network);
        assert!(Error::NftMissing
            .to_string()
            .contains("apt-get install nftables"));
    }

    fn rules_without_ports() -> String {
        rules_struct().render()
    }

    const DNS: &[Ipv4Addr] = &[Ipv4Addr::new(9, 9, 9, 9)];

    fn rules_struct() -> RuleSet<'static> {
        RuleSet {
            bridge: "fkr0",
            subnet: "10.88.0.1/24".parse().unwrap(),
            uplink: "eth0",
            dns_servers: DNS,
            allow: &[],
            host_ports: &[],
            conn_rate_per_sec: 50,
            max_conns_per_vm: 1024,
            ports: &[],
        }
    }
}
