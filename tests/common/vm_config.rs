//! The VM driver's config for tests: everything under one temporary directory, TCG, a small
//! guest, short graces.

use std::path::Path;

use fkr_qemu::types::Accel;
use fkr_qemu::vm::VmConfig;

/// A driver config whose runtime root, log dir and disk dir live under `dir`, TCG, small guest, short graces.
pub fn config(dir: &Path) -> VmConfig {
    VmConfig {
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 256,
        runtime_root: dir.join("run"),
        log_dir: dir.join("logs"),
        disk_dir: dir.join("disks"),
        keep_serial_log: true,
        powerdown_grace_secs: 10,
        quit_grace_secs: 5,
        ..VmConfig::default()
    }
}
