//! Host networking without libvirt: a bridge with the VMs' gateway address, one isolated tap per VM,
//! static addressing written into the NoCloud seed, an nftables `inet` table for NAT, isolation and
//! per-VM connection limits, and a `bridge` table that lets a VM's tap pass only its own MAC/IP.
//! See ARCHITECTURE.md ("Networking") for the packet path and the choices.
//!
//! Everything here acts on the network namespace of the calling thread at the time of the call
//! (the daemon's whole process lives in one); objects that must later act on the same namespace
//! (a [`Tap`] deleting itself, [`HostNetwork`]'s neighbour lookups) keep a netlink socket opened
//! in it. The calls are synchronous and short (a few syscalls; one `nft` run at setup/teardown and
//! one each time a VM's tap is bound or dropped).

mod addr;
mod config;
mod host;
mod ioctl;
mod netlink;
pub mod nft;
mod tap;

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use addr::{mac_for, render_network_config, AddressPool, Lease};
pub use config::{
    resolvers_from_file, AllowedDestination, Ipv4Cidr, NetConfig, DEFAULT_CONN_RATE_PER_SEC,
    DEFAULT_MAX_CONNS_PER_VM,
};
pub use host::{sweep, HostNetwork, SweepReport};
pub use tap::Tap;

use crate::types::ErrorClass;

/// Errors of the `net` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting (or a value derived from one) that cannot be used.
    #[error("invalid network configuration: {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "no DNS servers for the VMs: {path}: {reason}; set net.dns_servers in the configuration"
    )]
    NoResolvers { path: PathBuf, reason: String },
    #[error(
        "cannot find the uplink: there is no IPv4 default route; set net.uplink in the \
         configuration"
    )]
    NoUplink,
    #[error("the uplink interface {0:?} does not exist")]
    UplinkMissing(String),
    #[error("{0:?} exists but is not a bridge: choose another net.bridge")]
    NotABridge(String),
    #[error("the bridge {0:?} does not exist (it is created when the daemon sets up networking)")]
    BridgeMissing(String),
    #[error("the kernel has no bridge support: load the bridge module (modprobe bridge)")]
    BridgeModuleMissing,
    #[error("/dev/net/tun is missing: load the tun module (modprobe tun)")]
    TunMissing,
    #[error(
        "the nft tool is missing: install nftables (Debian/Ubuntu: `apt-get install nftables`; \
         Fedora: `dnf install nftables`; Arch: `pacman -S nftables`)"
    )]
    NftMissing,
    #[error(
        "{action}: the kernel lacks nftables support: load the nf_tables, nft_chain_nat, nft_ct, \
         nft_masq, nft_limit and nft_connlimit modules and bridge-family nftables (or install \
         the kernel's modules package): {stderr}"
    )]
    NftKernel {
        action: &'static str,
        stderr: String,
    },
    #[error("{action}: nft failed: {stderr}")]
    Nft {
        action: &'static str,
        stderr: String,
    },
    #[error("no free VM address left in {subnet}")]
    PoolExhausted { subnet: Ipv4Cidr },
    #[error("the VM address {0} is already leased")]
    AddressInUse(Ipv4Addr),
    #[error("the tap {0} of a VM taken over is gone or no longer a port of our bridge")]
    TapGone(String),
    #[error("the host network was set up in another network namespace than the caller's")]
    WrongNamespace,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// The calling thread's network namespace (device and inode of its nsfs file).
pub(crate) fn current_netns() -> Result<(u64, u64), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| Error::io("reading /proc/thread-self/ns/net", e))?;
    Ok((meta.dev(), meta.ino()))
}

impl Error {
    /// What kind of failure this is: configuration, missing dependency, or a network failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Invalid { .. }
            | Error::NoResolvers { .. }
            | Error::NoUplink
            | Error::UplinkMissing(_)
            | Error::NotABridge(_) => ErrorClass::Config,
            Error::BridgeModuleMissing
            | Error::TunMissing
            | Error::NftMissing
            | Error::NftKernel { .. } => ErrorClass::MissingDependency,
            Error::BridgeMissing(_)
            | Error::Nft { .. }
            | Error::PoolExhausted { .. }
            | Error::AddressInUse(_)
            | Error::TapGone(_)
            | Error::WrongNamespace
            | Error::Io { .. } => ErrorClass::Network,
        }
    }

    pub(crate) fn invalid(
        what: &'static str,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            what,
            value: value.to_string(),
            why: why.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
