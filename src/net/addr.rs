//! Static addressing: the per-VM MAC, the address pool, and the NoCloud network-config.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::config::Ipv4Cidr;
use super::Error;
use crate::types::MacAddr;

/// The VM's MAC: locally administered, unicast, derived from the VM name (so a VM's MAC is stable
/// and two VMs' MACs differ).
pub fn mac_for(vm_name: &str) -> MacAddr {
    MacAddr::derived(&format!("vm:{vm_name}"))
}

/// NoCloud network-config (version 2) for one VM, exactly the shape of ARCHITECTURE.md's "Seed contract".
pub fn render_network_config(
    mac: MacAddr,
    address: Ipv4Cidr,
    gateway: Ipv4Addr,
    dns_servers: &[Ipv4Addr],
) -> String {
    let mut s = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: '{mac}'\n    \
         set-name: eth0\n    addresses:\n    - {address}\n    routes:\n    - to: 0.0.0.0/0\n      \
         via: {gateway}\n    nameservers:\n      addresses:\n"
    );
    for dns in dns_servers {
        let _ = writeln!(s, "      - {dns}");
    }
    s
}

#[derive(Debug)]
struct PoolState {
    subnet: Ipv4Cidr,
    leased: BTreeSet<Ipv4Addr>,
    /// Where the next search starts: handing addresses out round-robin keeps a just-freed address
    /// (whose ARP entries elsewhere may still be fresh) unused for as long as possible.
    next: u32,
}

/// The VM addresses of the subnet: every host address except the bridge's own.
#[derive(Debug, Clone)]
pub struct AddressPool {
    state: Arc<Mutex<PoolState>>,
}

impl AddressPool {
    /// `subnet` is the bridge address with its prefix (`10.88.0.1/24`).
    pub fn new(subnet: Ipv4Cidr) -> Self {
        Self {
            state: Arc::new(Mutex::new(PoolState {
                subnet,
                leased: BTreeSet::new(),
                next: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state stays consistent even if a holder panicked (each update is one insert/remove).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leases a free address: not leased, not the bridge's, not in `busy` (addresses seen on the
    /// wire, e.g. live neighbour entries, or leases recovered after a restart).
    pub fn allocate(&self, busy: &[Ipv4Addr]) -> Result<Lease, Error> {
        let mut st = self.lock();
        let first = u32::from(st.subnet.network()) + 1;
        let last = u32::from(st.subnet.broadcast()) - 1;
        let count = last - first + 1;
        for i in 0..count {
            let candidate = Ipv4Addr::from(first + (st.next + i) % count);
            if candidate == st.subnet.address
                || st.leased.contains(&candidate)
                || busy.contains(&candidate)
            {
                continue;
            }
            st.next = (st.next + i + 1) % count;
            st.leased.insert(candidate);
            return Ok(self.lease(&st, candidate));
        }
        Err(Error::PoolExhausted {
            subnet: st.subnet.network_cidr(),
        })
    }

    /// Leases a specific address (e.g. one recorded for a VM that survived a restart).
    pub fn reserve(&self, address: Ipv4Addr) -> Result<Lease, Error> {
        let mut st = self.lock();
        let s = st.subnet;
        if !s.contains(address)
            || address == s.address
            || address == s.network()
            || address == s.broadcast()
        {
            return Err(Error::invalid(
                "a VM address",
                address,
                format!("not a VM address of {}", s.network_cidr()),
            ));
        }
        if !st.leased.insert(address) {
            return Err(Error::AddressInUse(address));
        }
        Ok(self.lease(&st, address))
    }

    fn lease(&self, st: &PoolState, address: Ipv4Addr) -> Lease {
        Lease {
            address,
            prefix_len: st.subnet.prefix_len,
            pool: self.clone(),
        }
    }

    /// Addresses currently leased.
    pub fn leased(&self) -> Vec<Ipv4Addr> {
        self.lock().leased.iter().copied().collect()
    }
}

/// One VM's address; returned to the pool on Drop.
#[derive(Debug)]
pub struct Lease {
    address: Ipv4Addr,
    prefix_len: u8,
    pool: AddressPool,
}

impl Lease {
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The address with the subnet's prefix, as written into network-config (`10.88.0.5/24`).
    pub fn cidr(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            address: self.address,
            prefix_len: self.prefix_len,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.lock().leased.remove(&self.address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_config_matches_the_contract() {
        let got = render_network_config(
            "52:54:00:12:34:56".parse().unwrap(),
            "10.88.0.5/24".parse().unwrap(),
            Ipv4Addr::new(10, 88, 0, 1),
            &[Ipv4Addr::new(10, 88, 0, 1)],
        );
        let want = "version: 2
ethernets:
  eth0:
    match:
      macaddress: '52:54:00:12:34:56'
    set-name: eth0
    addresses:
    - 10.88.0.5/24
    routes:
    - to: 0.0.0.0/0
      via: 10.88.0.1
    nameservers:
      addresses:
      - 10.88.0.1
";
        assert_eq!(got, want);
    }

    #[test]
    fn pool_never_hands_out_a_used_address() {
        let pool = AddressPool::new("10.88.0.1/29".parse().unwrap());
        // Hosts .1-.6; .1 is the bridge, .3 is busy on the wire.
        let busy = [Ipv4Addr::new(10, 88, 0, 3)];
        let a = pool.allocate(&busy).unwrap();
        let b = pool.allocate(&busy).unwrap();
        let c = pool.allocate(&busy).unwrap();
        let d = pool.allocate(&busy).unwrap();
        let got: Vec<_> = [&a, &b, &c, &d]
            .iter()
            .map(|l| l.address().octets()[3])
            .collect();
        assert_eq!(got, vec![2, 4, 5, 6]);
        assert!(matches!(
            pool.allocate(&busy),
            Err(Error::PoolExhausted { .. })
        ));
        assert!(matches!(
            pool.reserve(Ipv4Addr::new(10, 88, 0, 4)),
            Err(Error::AddressInUse(_))
        ));
        assert!(pool.reserve(Ipv4Addr::new(10, 88, 0, 1)).is_err());
        drop(b);
        let e = pool.allocate(&busy).unwrap();
        assert_eq!(e.address(), Ipv4Addr::new(10, 88, 0, 4));
        assert_eq!(e.cidr().to_string(), "10.88.0.4/29");
        drop((a, c, d, e));
        assert!(pool.leased().is_empty());
    }

    #[test]
    fn pool_hands_out_round_robin() {
        let pool = AddressPool::new("10.88.0.1/24".parse().unwrap());
        let a = pool.allocate(&[]).unwrap().address();
        let b = pool.allocate(&[]).unwrap().address();
        assert_eq!(a, Ipv4Addr::new(10, 88, 0, 2));
        // `a` was released when its lease dropped, but the next address is handed out first.
        assert_eq!(b, Ipv4Addr::new(10, 88, 0, 3));
        let r = pool.reserve(Ipv4Addr::new(10, 88, 0, 4)).unwrap();
        assert_eq!(
            pool.allocate(&[]).unwrap().address(),
            Ipv4Addr::new(10, 88, 0, 5)
        );
        drop(r);
    }

    #[test]
    fn mac_for_is_stable_and_local() {
        let m = mac_for("fr-0123abcd");
        assert_eq!(m, mac_for("fr-0123abcd"));
        assert_ne!(m, mac_for("fr-0123abce"));
        assert_eq!(m.0[0] & 0b11, 0b10);
    }
}
