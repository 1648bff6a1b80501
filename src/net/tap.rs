//! Per-VM tap devices.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use netlink_packet_route::link::InfoKind;

use super::config::MacAddr;
use super::netlink::Netlink;
use super::{ioctl, mac_for, Error, TAP_PREFIX};

/// Whether `name` is a VM tap name: `fr-` then lowercase letters or digits, within the 15-byte
/// interface name limit.
pub fn is_tap_name(name: &str) -> bool {
    name.len() < libc::IFNAMSIZ
        && name.strip_prefix(TAP_PREFIX).is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// A VM's tap: created through `/dev/net/tun`, a port of the bridge in isolated mode, up.
/// The tap is owned here: Drop deletes the interface (even if QEMU still holds a duplicate of the
/// fd) and closes our fd.
#[derive(Debug)]
pub struct Tap {
    name: String,
    index: u32,
    mac: MacAddr,
    file: File,
    /// Opened in the tap's network namespace, so Drop deletes the right interface from any thread.
    netlink: Netlink,
}

impl Tap {
    /// Creates the tap `vm_name` (VM and tap share the name) and attaches it to `bridge`.
    pub fn create(vm_name: &str, bridge: &str) -> Result<Tap, Error> {
        if !is_tap_name(vm_name) {
            return Err(Error::InvalidTapName(vm_name.to_owned()));
        }
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
            file,
            netlink,
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
        self.file
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io(format!("duplicating the tap fd of {}", self.name), e))
    }

    /// The VM driver's network device: a duplicate of the tap fd and the VM's MAC.
    pub fn net_device(&self) -> Result<crate::vm::NetDevice, Error> {
        Ok(crate::vm::NetDevice {
            tap: self.fd_for_qemu()?,
            mac: self.mac.to_string(),
        })
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Delete while our fd still pins the device, so the index cannot belong to anything else.
        match self.netlink.delete_link(self.index) {
            Ok(()) => tracing::debug!(tap = %self.name, "tap removed"),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => tracing::warn!(tap = %self.name, error = %e, "could not remove the tap"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        assert!(is_tap_name("fr-0123abcd"));
        assert!(is_tap_name("fr-x"));
        assert!(!is_tap_name("fr-"));
        assert!(!is_tap_name("fr-ABC"));
        assert!(!is_tap_name("fr-0123456789abc"));
        assert!(!is_tap_name("tap0"));
        assert!(!is_tap_name("xfr-1"));
    }
}
