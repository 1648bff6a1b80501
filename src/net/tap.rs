//! Per-VM tap devices.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};

use netlink_packet_route::link::InfoKind;

use super::netlink::Netlink;
use super::{current_netns, ioctl, mac_for, nft, Error};
use crate::types::MacAddr;
use crate::types::VmName;

/// A VM's tap: created through `/dev/net/tun`, an isolated port of the bridge, up. Bound to a lease
/// ([`super::HostNetwork::create_tap`]), the port also stops learning and flooding, and the tap
/// owns the VM's static FDB entry, its permanent neighbour entry on the bridge and its elements in
/// the anti-spoofing sets. The tap is owned here: Drop removes all that and deletes the interface
/// (even if QEMU still holds a duplicate of the fd) and closes our fd.
#[derive(Debug)]
pub struct Tap {
    name: String,
    index: u32,
    mac: MacAddr,
    /// Our descriptor of the tap; `None` for a tap taken over after a restart (QEMU's descriptor
    /// keeps it alive then).
    file: Option<File>,
    /// Opened in the tap's network namespace, so Drop deletes the right interface from any thread.
    netlink: Netlink,
    binding: Option<Binding>,
}

/// What [`Tap::bind`] set up, so Drop undoes exactly that.
#[derive(Debug)]
struct Binding {
    address: Ipv4Addr,
    bridge_index: u32,
    neighbour: bool,
    nft: bool,
    /// `nft` acts on the namespace of the thread that runs it: Drop only removes the elements
    /// when it runs in the tap's namespace (elsewhere the elements are left to die with the table:
    /// tap names are never reused).
    netns: (u64, u64),
}

impl Tap {
    /// Creates the tap `vm_name` (VM and tap share the name) and attaches it to `bridge`.
    pub fn create(name: &VmName, bridge: &str) -> Result<Tap, Error> {
        let vm_name = name.as_str();
        let mut netlink = Netlink::open().map_err(|e| Error::io("opening a netlink socket", e))?;
        match netlink
            .link_by_name(bridge)
            .map_err(|e| Error::io(format!("looking up the bridge {bridge}"), e))?
        {
            Some(link) if link.kind == Some(InfoKind::Bridge) => {}
            Some(_) => return Err(Error::NotABridge(bridge.to_owned())),
            None => return Err(Error::BridgeMissing(bridge.to_owned())),
        }
        let file = ioctl::create_tap(vm_name).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::TunMissing,
            _ => Error::io(format!("creating the tap {vm_name}"), e),
        })?;
        let index = match netlink.link_by_name(vm_name) {
            Ok(Some(link)) => link.index,
            Ok(None) => {
                return Err(Error::io(
                    format!("creating the tap {vm_name}"),
                    io::Error::other("the new tap is not visible over netlink"),
                ))
            }
            Err(e) => return Err(Error::io(format!("looking up the tap {vm_name}"), e)),
        };
        // From here on, Drop removes the tap on every error path.
        let mut tap = Tap {
            name: vm_name.to_owned(),
            index,
            mac: mac_for(vm_name),
            file: Some(file),
            netlink,
            binding: None,
        };
        ioctl::bridge_add_port(bridge, index)
            .map_err(|e| Error::io(format!("attaching the tap {vm_name} to {bridge}"), e))?;
        tap.netlink
            .set_port_isolated(index)
            .map_err(|e| Error::io(format!("isolating the bridge port {vm_name}"), e))?;
        ioctl::set_up(vm_name)
            .map_err(|e| Error::io(format!("bringing up the tap {vm_name}"), e))?;
        tracing::debug!(tap = vm_name, bridge, mac = %tap.mac, "tap created");
        Ok(tap)
    }

    /// Binds the tap to the VM's address: a static FDB entry for the VM's MAC on this port, the
    /// address pinned to that MAC in the bridge's neighbour table (`bridge_index`), and the
    /// tap/MAC/address triple in the anti-spoofing sets (until then the tap passes nothing).
    pub(crate) fn bind(&mut self, bridge_index: u32, address: Ipv4Addr) -> Result<(), Error> {
        let name = self.name.clone();
        let mac = self.mac;
        let binding = self.binding.insert(Binding {
            address,
            bridge_index,
            neighbour: false,
            nft: false,
            netns: current_netns()?,
        });
        // Each step is atomic; the flags record what Drop has to undo.
        self.netlink
            .add_static_fdb(self.index, mac)
            .map_err(|e| Error::io(format!("adding the FDB entry of {name} ({mac})"), e))?;
        // After the static entry: the bridge never has a moment without a way to the VM.
        self.netlink
            .set_port_locked(self.index)
            .map_err(|e| Error::io(format!("locking the bridge port {name}"), e))?;
        self.netlink
            .set_permanent_neighbour(bridge_index, address, mac)
            .map_err(|e| Error::io(format!("pinning {address} to {mac} on the bridge"), e))?;
        binding.neighbour = true;
        nft::add_vm_port(&nft::VmPort {
            tap: &name,
            mac,
            address,
        })?;
        binding.nft = true;
        tracing::debug!(tap = %name, %mac, %address, "tap bound to its VM address");
        Ok(())
    }

    fn port(&self, address: Ipv4Addr) -> nft::VmPort<'_> {
        nft::VmPort {
            tap: &self.name,
            mac: self.mac,
            address,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The MAC the VM's NIC gets ([`mac_for`] of the VM name).
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// A duplicate of the tap fd for QEMU's `-netdev tap,fd=N` (close-on-exec: the VM driver
    /// clears the flag in the child only). The tap stays owned by `self`.
    pub fn fd_for_qemu(&self) -> Result<OwnedFd, Error> {
        let file = self.file.as_ref().ok_or_else(|| {
            Error::io(
                format!("duplicating the tap fd of {}", self.name),
                io::Error::other("a tap taken over after a restart has no descriptor here"),
            )
        })?;
        file.as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io(format!("duplicating the tap fd of {}", self.name), e))
    }

    /// Takes over the tap of a VM that survived a daemon restart: it must exist, be a tap, and be
    /// a port of the bridge `bridge_index`. Its FDB entry, port flags and neighbour entry are still
    /// in place (nothing removed them); its anti-spoofing elements were re-applied with the table
    /// ([`super::HostNetwork::setup`]). Drop undoes all of it, like for a tap created here.
    pub(crate) fn adopt(name: &VmName, bridge_index: u32, address: Ipv4Addr) -> Result<Tap, Error> {
        let vm_name = name.as_str();
        let mut netlink = Netlink::open().map_err(|e| Error::io("opening a netlink socket", e))?;
        let link = netlink
            .link_by_name(vm_name)
            .map_err(|e| Error::io(format!("looking up the tap {vm_name}"), e))?
            .filter(|l| l.is_tap() && l.controller == Some(bridge_index))
            .ok_or_else(|| Error::TapGone(vm_name.to_owned()))?;
        Ok(Tap {
            name: vm_name.to_owned(),
            index: link.index,
            mac: mac_for(vm_name),
            file: None,
            netlink,
            binding: Some(Binding {
                address,
                bridge_index,
                neighbour: true,
                nft: true,
                netns: current_netns()?,
            }),
        })
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(b) = self.binding.take() {
            if b.nft && current_netns().ok() == Some(b.netns) {
                if let Err(e) = nft::remove_vm_port(&self.port(b.address)) {
                    tracing::warn!(tap = %self.name, error = %e, "could not unregister the VM port");
                }
            }
            if b.neighbour {
                let r = self
                    .netlink
                    .delete_neighbour_of(b.bridge_index, b.address, self.mac);
                if let Err(e) = r {
                    tracing::warn!(address = %b.address, error = %e, "could not remove the neighbour entry");
                }
            }
        }
        // Delete while our fd still pins the device, so the index cannot belong to anything else.
        // Without our fd (a tap taken over), the tap vanishes with QEMU's: delete it only if the
        // name still has our index.
        if self.file.is_none() {
            match self.netlink.link_by_name(&self.name) {
                Ok(Some(l)) if l.index == self.index => {}
                _ => return,
            }
        }
        match self.netlink.delete_link(self.index) {
            Ok(()) => tracing::debug!(tap = %self.name, "tap removed"),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => tracing::warn!(tap = %self.name, error = %e, "could not remove the tap"),
        }
    }
}
