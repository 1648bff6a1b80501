//! The host side shared by all VMs: bridge, forwarding, nftables tables; and the startup sweep.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use netlink_packet_route::link::InfoKind;

use super::addr::{mac_for, render_network_config, AddressPool, Lease};
use super::config::NetConfig;
use super::netlink::Netlink;
use super::{current_netns, ioctl, nft, Error, Tap};
use crate::types::{MacAddr, VmName};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The host network while the daemon runs. [`HostNetwork::teardown`] removes the nftables table on
/// a clean exit. Dropping it without teardown (a panic) leaves the table in place on purpose: the
/// rules fail closed, and the next start replaces them (or `sweep` removes them). The bridge and
/// IPv4 forwarding stay as they are (see README.md, "Host networking").
#[derive(Debug)]
pub struct HostNetwork {
    config: NetConfig,
    uplink: String,
    dns_servers: Vec<Ipv4Addr>,
    bridge_index: u32,
    pool: AddressPool,
    netlink: Mutex<Netlink>,
    netns: (u64, u64),
    torn_down: bool,
}

impl HostNetwork {
    /// Installs (atomically replaces) the `inet fkr_qemu` table, creates (or adopts) the bridge,
    /// gives it its MAC and address, brings it up, and enables IPv4 forwarding. `running`: the taps
    /// and addresses of VMs that survived a restart; their anti-spoofing elements are part of the
    /// same transaction that replaces the table.
    pub fn setup(config: &NetConfig, running: &[(VmName, Ipv4Addr)]) -> Result<HostNetwork, Error> {
        config.validate()?;
        let dns_servers = config.resolved_dns_servers()?;
        if !Path::new("/dev/net/tun").exists() {
            return Err(Error::TunMissing);
        }
        let mut netlink = Netlink::open().map_err(|e| Error::io("opening a netlink socket", e))?;
        let uplink = uplink_name(&mut netlink, config)?;

        let bridge = &config.bridge;
        if uplink == *bridge {
            return Err(Error::invalid(
                "net.uplink",
                bridge,
                "the uplink cannot be the VM bridge: set net.uplink",
            ));
        }
        // The firewall goes in first (its rules match interface names, so the bridge need not
        // exist yet), and forwarding is switched on last: no moment where VMs route unfiltered.
        let rules = nft::RuleSet {
            bridge,
            subnet: config.subnet,
            uplink: &uplink,
            dns_servers: &dns_servers,
            allow: &config.allow,
            host_ports: &config.host_ports,
            conn_rate_per_sec: config.conn_rate_per_sec,
            max_conns_per_vm: config.max_conns_per_vm,
            ports: &running
                .iter()
                .map(|(name, address)| nft::VmPort {
                    tap: name.as_str(),
                    mac: mac_for(name.as_str()),
                    address: *address,
                })
                .collect::<Vec<_>>(),
        };
        nft::install(&rules)?;
        let nl_err = |e| Error::io(format!("looking up {bridge}"), e);
        let link = match netlink.link_by_name(bridge).map_err(nl_err)? {
            Some(link) => link,
            None => {
                ioctl::add_bridge(bridge).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOPKG) => Error::BridgeModuleMissing,
                    _ => Error::io(format!("creating the bridge {bridge}"), e),
                })?;
                tracing::info!(bridge = %bridge, "created the bridge");
                netlink
                    .link_by_name(bridge)
                    .map_err(nl_err)?
                    .ok_or_else(|| Error::BridgeMissing(bridge.clone()))?
            }
        };
        if link.kind != Some(InfoKind::Bridge) {
            return Err(Error::NotABridge(bridge.clone()));
        }
        let mac = config.bridge_mac();
        ioctl::set_mac(bridge, mac)
            .map_err(|e| Error::io(format!("setting the MAC of {bridge} to {mac}"), e))?;
        netlink
            .add_address(link.index, config.subnet)
            .map_err(|e| Error::io(format!("adding {} to {bridge}", config.subnet), e))?;
        ioctl::set_up(bridge).map_err(|e| Error::io(format!("bringing up {bridge}"), e))?;
        enable_ip_forwarding()?;

        tracing::info!(
            bridge = %bridge,
            subnet = %config.subnet,
            uplink = %uplink,
            dns = ?dns_servers,
            table = nft::TABLE,
            "host network ready"
        );
        Ok(HostNetwork {
            config: config.clone(),
            uplink,
            dns_servers,
            bridge_index: link.index,
            pool: AddressPool::new(config.subnet),
            netlink: Mutex::new(netlink),
            netns: current_netns()?,
            torn_down: false,
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    pub fn bridge(&self) -> &str {
        &self.config.bridge
    }

    /// The VMs' gateway: the bridge address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.config.subnet.address
    }

    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    pub fn dns_servers(&self) -> &[Ipv4Addr] {
        &self.dns_servers
    }

    pub fn bridge_mac(&self) -> MacAddr {
        self.config.bridge_mac()
    }

    fn netlink(&self) -> MutexGuard<'_, Netlink> {
        self.netlink.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the VM's tap on our bridge, bound to the VM's lease: only frames with the VM's MAC
    /// and address pass it, and the host pins the address to that MAC (see [`Tap`]).
    pub fn create_tap(&self, vm_name: &VmName, lease: &Lease) -> Result<Tap, Error> {
        let mut tap = Tap::create(vm_name, &self.config.bridge)?;
        tap.bind(self.bridge_index, lease.address())?;
        Ok(tap)
    }

    /// Takes over the tap and the address of a VM that survived a restart (see
    /// [`Tap::adopt`]); the address is leased again so no new VM gets it.
    pub fn adopt_tap(&self, vm_name: &VmName, address: Ipv4Addr) -> Result<(Tap, Lease), Error> {
        let lease = self.pool.reserve(address)?;
        let tap = Tap::adopt(vm_name, self.bridge_index, address)?;
        Ok((tap, lease))
    }

    /// Leases a VM address that is neither leased nor one of the bridge's own. What guests
    /// announce (the neighbour table) never counts: a guest could otherwise claim every free
    /// address and starve new VMs.
    pub fn allocate_address(&self) -> Result<Lease, Error> {
        let own = self
            .netlink()
            .addresses(self.bridge_index)
            .map_err(|e| Error::io("reading the bridge's addresses", e))?;
        let busy: Vec<Ipv4Addr> = own.iter().map(|a| a.address).collect();
        self.pool.allocate(&busy)
    }

    /// The pool behind [`HostNetwork::allocate_address`] (e.g. to `reserve` an address recorded
    /// for a VM that survived a restart).
    pub fn pool(&self) -> &AddressPool {
        &self.pool
    }

    /// The VM's NoCloud network-config: its lease and MAC, our gateway and DNS servers.
    pub fn network_config(&self, lease: &Lease, mac: MacAddr) -> String {
        render_network_config(mac, lease.cidr(), self.gateway(), &self.dns_servers)
    }

    /// Clean exit: removes the nftables table. Call it after every VM is gone.
    pub fn teardown(mut self) -> Result<(), Error> {
        if current_netns()? != self.netns {
            return Err(Error::WrongNamespace);
        }
        nft::remove()?;
        self.torn_down = true;
        tracing::info!(table = nft::TABLE, "removed the firewall table");
        Ok(())
    }
}

impl Drop for HostNetwork {
    fn drop(&mut self) {
        if !self.torn_down {
            tracing::warn!(
                table = nft::TABLE,
                "host network dropped without teardown: the firewall table stays until the next \
                 start or sweep"
            );
        }
    }
}

fn uplink_name(netlink: &mut Netlink, config: &NetConfig) -> Result<String, Error> {
    let err = |e| Error::io("reading the routing table", e);
    match &config.uplink {
        Some(name) => match netlink.link_by_name(name).map_err(err)? {
            Some(_) => Ok(name.clone()),
            None => Err(Error::UplinkMissing(name.clone())),
        },
        None => {
            let index = netlink
                .default_route_interface()
                .map_err(err)?
                .ok_or(Error::NoUplink)?;
            let link = netlink
                .link_by_index(index)
                .map_err(err)?
                .ok_or(Error::NoUplink)?;
            Ok(link.name)
        }
    }
}

fn enable_ip_forwarding() -> Result<(), Error> {
    let current = std::fs::read_to_string(IP_FORWARD)
        .map_err(|e| Error::io(format!("reading {IP_FORWARD}"), e))?;
    if current.trim() == "1" {
        tracing::debug!("IPv4 forwarding already enabled");
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1").map_err(|e| Error::io(format!("writing {IP_FORWARD}"), e))?;
    tracing::info!(
        "enabled IPv4 forwarding (net.ipv4.ip_forward=1) so VMs reach the internet; it stays \
         enabled after fkr-qemu exits"
    );
    Ok(())
}

/// What [`sweep`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub taps_removed: Vec<String>,
    /// VM addresses whose pinned (permanent) neighbour entry on the bridge was removed.
    pub neighbours_removed: Vec<Ipv4Addr>,
    pub table_removed: bool,
}

/// Startup sweep: removes leftover VM taps (named `fr-…` AND really taps; nothing else), the
/// permanent neighbour entries of our subnet on our bridge (pinned for VMs of a crashed run), and
/// our nftables tables. The bridge itself stays. `keep`: the taps and addresses of VMs taken over
/// after a restart — left as they are, and so is the table while any is kept (the next
/// [`HostNetwork::setup`] replaces it atomically).
pub fn sweep(config: &NetConfig, keep: &[(VmName, Ipv4Addr)]) -> Result<SweepReport, Error> {
    let mut netlink = Netlink::open().map_err(|e| Error::io("opening a netlink socket", e))?;
    let links = netlink
        .links()
        .map_err(|e| Error::io("listing interfaces", e))?;
    let mut report = SweepReport::default();
    for link in links
        .iter()
        .filter(|l| VmName::is_valid(&l.name) && l.is_tap())
        .filter(|l| !keep.iter().any(|(k, _)| k.as_str() == l.name))
    {
        match netlink.delete_link(link.index) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("removing the leftover tap {}", link.name),
                    e,
                ))
            }
        }
        tracing::info!(tap = %link.name, bridge = %config.bridge, "removed a leftover tap");
        report.taps_removed.push(link.name.clone());
    }
    // Addresses pinned for VMs of a crashed run: in our subnet, on our bridge, permanent.
    let bridge = netlink
        .link_by_name(&config.bridge)
        .map_err(|e| Error::io(format!("looking up {}", config.bridge), e))?;
    if let Some(bridge) = bridge.filter(|b| b.kind == Some(InfoKind::Bridge)) {
        let pinned = netlink
            .permanent_neighbours(bridge.index)
            .map_err(|e| Error::io("reading the bridge's neighbour table", e))?;
        for addr in pinned
            .into_iter()
            .filter(|a| config.subnet.contains(*a) && !keep.iter().any(|(_, k)| k == a))
        {
            netlink
                .delete_neighbour(bridge.index, addr)
                .map_err(|e| Error::io(format!("removing the neighbour entry of {addr}"), e))?;
            tracing::info!(address = %addr, bridge = %config.bridge, "removed a leftover neighbour entry");
            report.neighbours_removed.push(addr);
        }
    }
    if keep.is_empty() && nft::table_exists()? {
        nft::remove()?;
        tracing::info!(table = nft::TABLE, "removed a leftover firewall table");
        report.table_removed = true;
    }
    Ok(report)
}
