//! The classic interface ioctls: bridge creation and port attachment, flags, MAC, and the tun
//! device's `TUNSETIFF`. Each acts on the network namespace of the calling thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::types::MacAddr;

// From <linux/sockios.h>; libc does not export the bridge ones for Linux.
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

nix::ioctl_write_ptr_bad!(ioctl_br_add_bridge, SIOCBRADDBR, libc::c_char);
nix::ioctl_write_ptr_bad!(ioctl_br_add_if, SIOCBRADDIF, libc::ifreq);
nix::ioctl_read_bad!(ioctl_get_flags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(ioctl_set_flags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(ioctl_set_hwaddr, libc::SIOCSIFHWADDR, libc::ifreq);
nix::ioctl_readwrite_bad!(ioctl_tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// A NUL-terminated interface name as the kernel's `IFNAMSIZ` array.
fn ifname(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let mut out = [0; libc::IFNAMSIZ];
    for (dst, src) in out.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(out)
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers, sockaddrs and a
    // pointer); all-zero is a valid value for each member.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = ifname(name)?;
    Ok(req)
}

/// A throw-away socket to issue interface ioctls on (any family works; the namespace is the
/// calling thread's).
fn control_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// `SIOCBRADDBR`: creates a bridge (loads the `bridge` module on demand).
pub(crate) fn add_bridge(name: &str) -> io::Result<()> {
    let sock = control_socket()?;
    let name = ifname(name)?;
    // SAFETY: SIOCBRADDBR reads a NUL-terminated name from the pointer; `name` is a live
    // IFNAMSIZ array with a NUL at the end (`ifname` leaves at least one trailing zero).
    unsafe { ioctl_br_add_bridge(sock.as_raw_fd(), name.as_ptr()) }?;
    Ok(())
}

/// `SIOCBRADDIF`: makes interface `port_index` a port of `bridge`.
pub(crate) fn bridge_add_port(bridge: &str, port_index: u32) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(bridge)?;
    req.ifr_ifru.ifru_ifindex = port_index as libc::c_int;
    // SAFETY: the kernel reads `ifr_name` and `ifr_ifindex` from a valid, initialised ifreq.
    unsafe { ioctl_br_add_if(sock.as_raw_fd(), &req) }?;
    Ok(())
}

/// Sets `IFF_UP` (keeping the other flags).
pub(crate) fn set_up(name: &str) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes `ifr_flags` into the ifreq we own.
    unsafe { ioctl_get_flags(sock.as_raw_fd(), &mut req) }?;
    // SAFETY: `ifru_flags` was just written by the kernel.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: the kernel reads the name and flags from a valid, initialised ifreq.
    unsafe { ioctl_set_flags(sock.as_raw_fd(), &req) }?;
    Ok(())
}

/// `SIOCSIFHWADDR`: sets an explicit MAC (for a bridge this pins it, instead of following the
/// lowest port MAC).
pub(crate) fn set_mac(name: &str, mac: MacAddr) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: writing plain integers into the union's sockaddr member of a zeroed ifreq.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac.0) {
            *dst = src as libc::c_char;
        }
    }
    // SAFETY: the kernel reads the name and the sockaddr from a valid, initialised ifreq.
    unsafe { ioctl_set_hwaddr(sock.as_raw_fd(), &req) }?;
    Ok(())
}

/// Opens `/dev/net/tun` and binds it to a new tap named `name` with `IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR` (QEMU probes the vnet header flag on the fd it is given). The tap exists as long
/// as the returned file (or a duplicate of it) is open.
pub(crate) fn create_tap(name: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads the name and flags from a valid ifreq (and may write the final
    // name back into it, which we own).
    unsafe { ioctl_tun_set_iff(file.as_raw_fd(), &mut req) }?;
    Ok(file)
}
