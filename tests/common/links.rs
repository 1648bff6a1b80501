//! The interfaces in a namespace, and ours among them (the VMs' taps, named like the VMs).

use fkr_qemu::types::VmName;

use super::netns::NetNs;

/// Interface names in `ns`.
pub fn links(ns: &NetNs) -> Vec<String> {
    ns.ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// Interfaces in `ns` whose name has our VM prefix (`VmName::PREFIX`): taps left behind, or taps
/// that should be there.
pub fn vm_links(ns: &NetNs) -> Vec<String> {
    links(ns)
        .into_iter()
        .filter(|n| n.starts_with(VmName::PREFIX))
        .collect()
}
