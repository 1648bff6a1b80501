//! The nftables rule set, applied with the `nft` tool in one atomic transaction.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::config::{AllowedDestination, Ipv4Cidr};
use super::Error;

/// Our table. Nothing else of the host's rule set is touched.
pub const TABLE: &str = "inet fkr_qemu";

/// Destinations VMs never reach unless allow-listed: "this network", RFC 1918 private ranges,
/// carrier-grade NAT, loopback, link-local, multicast and reserved/broadcast.
pub const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
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
        let _ = writeln!(
            s,
            "\tchain vm_to_host {{\n\t\tct state established,related accept"
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
        s
    }
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

/// Removes our table if it exists (idempotent, one transaction).
pub fn remove() -> Result<(), Error> {
    apply(
        &format!("table {TABLE}\ndelete table {TABLE}\n"),
        "removing the firewall table",
    )
}

/// Whether our table exists in the calling thread's network namespace.
pub fn table_exists() -> Result<bool, Error> {
    let output = Command::new("nft")
        .args(["list", "table"])
        .args(TABLE.split(' '))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(nft_spawn_error)?;
    Ok(output.status.success())
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
            "10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16",
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

    #[test]
    fn kernel_trouble_is_told_apart() {
        let e = classify(
            "installing the firewall table",
            "Error: Could not process rule: Operation not supported".into(),
        );
        assert!(matches!(e, Error::NftKernel { .. }));
        assert!(e.to_string().contains("nf_tables"), "{e}");
        assert_eq!(e.exit_code(), crate::error::exit::MISSING_DEPENDENCY);
        let e = classify(
            "installing the firewall table",
            "Error: syntax error".into(),
        );
        assert!(matches!(e, Error::Nft { .. }));
        assert_eq!(e.exit_code(), crate::error::exit::NETWORK);
        assert!(Error::NftMissing
            .to_string()
            .contains("apt-get install nftables"));
    }

    fn rules_without_ports() -> String {
        RuleSet {
            bridge: "fkr0",
            subnet: "10.88.0.1/24".parse().unwrap(),
            uplink: "eth0",
            dns_servers: &[Ipv4Addr::new(9, 9, 9, 9)],
            allow: &[],
            host_ports: &[],
        }
        .render()
    }
}
