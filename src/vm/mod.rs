//! The VM driver: firmware, qcow2 overlay, NoCloud seed, qemu argv, QMP, lifecycle.
//!
//! One VM = one [`VmHandle`] returned by [`launch`]. The handle's supervisor task owns every per-VM
//! resource (the QEMU process, the per-VM directory with overlay, seed, VARS copy, QMP socket and pid
//! file) and releases them on every path: guest power-off, crash, deadline, host stop, and — through
//! `Drop` — cancellation or panic of whoever owns the handle. [`sweep`] finds what a crashed daemon left.
//! See ARCHITECTURE.md (`## VM driver`).

mod accel;
mod adopt;
pub mod agent;
mod argv;
pub mod cgroup;
mod config;
pub mod confine;
mod disk;
mod driver;
mod error;
mod firmware;
mod meta;
pub mod phases;
pub mod qmp;
pub mod sandbox;
pub mod scope;
mod seed;
pub mod serial;
mod state;
mod sweep;

pub use accel::{mark_kvm_broken, probe_accel, resolve_accel, AccelChoice, KVM_PROBE_TIMEOUT};
pub use adopt::{adopt, check_process, record, start_time, vm_dirs, AdoptError};
pub use argv::{build_argv, DiskFds, QemuPlan};
pub use config::VmConfig;
pub use disk::{allocated_bytes, check_base_image, create_overlay, reserve_disk, DiskReservation};
pub use driver::{
    launch, prepare, Outcome, PreparedVm, StopStep, Timings, VmExit, VmHandle, VmResources, VmSpec,
};
pub use error::Error;
pub use firmware::{
    discover_firmware, discover_firmware_with, select_descriptor, Firmware, FirmwareDescriptor,
};
pub use meta::{JobMeta, TokenMeta, VmMeta};
pub use seed::{write_seed, Seed};
pub use serial::PANIC_MARKER;
pub use state::VmState;
pub use sweep::{is_our_qemu, sweep, SweepReport};

use std::os::fd::OwnedFd;

/// A tap device handed to QEMU as an open file descriptor (filled by `net`).
///
/// The driver passes the fd as `-netdev tap,id=net0,fd=N` and clears `FD_CLOEXEC` on exactly this fd in
/// the child only; the parent's copy is closed when the VM is torn down.
#[derive(Debug)]
pub struct NetDevice {
    pub tap: OwnedFd,
    /// The guest NIC's MAC address (`52:54:00:xx:xx:xx`), also used by network-config's `match`.
    pub mac: crate::types::MacAddr,
}

/// Names of the files inside a per-VM directory (`<runtime_root>/vms/<name>/`), see ARCHITECTURE.md.
pub mod files {
    pub const PID: &str = "qemu.pid";
    pub const QMP: &str = "qmp.sock";
    pub const SERIAL: &str = "serial.sock";
    pub const OVERLAY: &str = "overlay.qcow2";
    pub const SEED: &str = "seed.img";
    pub const VARS: &str = "vars.fd";
    pub const META: &str = "vm.json";
    /// Warm pool: the host end of the job agent's virtio-serial port.
    pub const AGENT: &str = "agent.sock";
}
