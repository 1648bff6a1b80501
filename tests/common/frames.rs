//! Raw Ethernet frames for attacking the bridge from a tap without a VM: the test writes what a
//! hostile guest's NIC would send straight into the tap fd (the same fd QEMU gets), and reads what
//! the host sends back.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

pub const BROADCAST: [u8; 6] = [0xff; 6];
pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_VLAN: u16 = 0x8100;
/// Our taps are `IFF_VNET_HDR`: every frame starts with a 10-byte `virtio_net_hdr` (all zero:
/// no offloads).
const VNET_HDR: usize = 10;

pub fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP packet (Ethernet/IPv4); `op` 1 request, 2 reply.
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa.octets());
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP datagram (UDP checksum 0: "none", valid for IPv4).
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The guest end of a tap: writes frames into the bridge, reads frames the bridge sends out.
pub struct TapEnd(File);

impl TapEnd {
    pub fn new(fd: OwnedFd) -> TapEnd {
        // SAFETY: plain fcntl on an fd we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            assert!(flags >= 0);
            assert_eq!(
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK),
                0
            );
        }
        TapEnd(File::from(fd))
    }

    pub fn send(&mut self, frame: &[u8]) {
        let mut buf = vec![0u8; VNET_HDR];
        buf.extend_from_slice(frame);
        self.0.write_all(&buf).expect("write a frame into the tap");
    }

    /// Frames the bridge sent to this tap within `wait` (without the vnet header).
    pub fn received(&mut self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            match self.0.read(&mut buf) {
                Ok(n) if n > VNET_HDR => out.push(buf[VNET_HDR..n].to_vec()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return out;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("reading the tap: {e}"),
            }
        }
    }

    /// Drops whatever is queued.
    pub fn drain(&mut self) {
        let _ = self.received(Duration::ZERO);
    }
}

/// ARP replies in `frames` addressed to `to` (their target protocol address).
pub fn arp_replies_to(frames: &[Vec<u8>], to: Ipv4Addr) -> usize {
    frames
        .iter()
        .filter(|f| {
            f.len() >= 42
                && f[12..14] == ETH_ARP.to_be_bytes()
                && f[20..22] == [0, 2]
                && f[38..42] == to.octets()
        })
        .count()
}
