use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::Accel;

/// Driver settings shared by every VM of a host (embedded in the daemon's TOML config as `[vm]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// `qemu-system-x86_64`, looked up in `PATH` unless it contains a `/`.
    pub qemu: PathBuf,
    /// `qemu-img`, looked up in `PATH` unless it contains a `/`.
    pub qemu_img: PathBuf,
    pub accel: Accel,
    /// UEFI code file; set together with `firmware_vars` to bypass firmware discovery.
    pub firmware_code: Option<PathBuf>,
    /// UEFI VARS template (copied per VM).
    pub firmware_vars: Option<PathBuf>,
    /// Where QEMU firmware descriptors are looked for, in priority order.
    pub firmware_descriptor_dirs: Vec<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Per-VM directories live in `<runtime_root>/vms/<name>/`.
    pub runtime_root: PathBuf,
    /// Serial logs: `<log_dir>/<name>.serial.log`.
    pub log_dir: PathBuf,
    /// Keep the serial log after teardown (otherwise it is removed with the VM).
    pub keep_serial_log: bool,
    /// Seconds between `system_powerdown` and `quit` when stopping a VM.
    pub powerdown_grace_secs: u64,
    /// Seconds between `quit` and SIGKILL.
    pub quit_grace_secs: u64,
    /// Overlays, seeds and VARS copies: `<disk_dir>/<name>/` (disk-backed, never tmpfs; the
    /// daemon's default is `<state_dir>/disks`).
    pub disk_dir: PathBuf,
    /// How far one VM's overlay may grow on the host (MiB); past it the VM is stopped.
    pub disk_max_mib: u64,
    /// All VMs' overlays together may claim at most this much (MiB); unset: the free space.
    pub disk_budget_mib: Option<u64>,
    /// QEMUs run as uids `uid_base .. uid_base + uid_count` (gid = uid) when the daemon is root.
    pub uid_base: u32,
    pub uid_count: u32,
    /// The VM cgroup's `memory.max` is guest RAM plus this (MiB): QEMU itself, device buffers and
    /// TCG's translation cache (`tcg_tb_size_mib` of it).
    pub memory_overhead_mib: u32,
    /// TCG's translation cache (MiB).
    pub tcg_tb_size_mib: u32,
    /// The VM cgroup's `pids.max` (QEMU's threads: vCPUs, I/O workers, …).
    pub pids_max: u64,
    /// The serial log keeps the first `serial_head_kib` KiB and the last `serial_tail_kib` KiB.
    pub serial_head_kib: u64,
    pub serial_tail_kib: u64,
    /// Kept serial logs: at most this many, none older than `serial_logs_max_age_days`.
    pub serial_logs_keep: usize,
    pub serial_logs_max_age_days: u64,
    /// systemd hosts: the slice every VM's scope (`machine-<vm>.scope`) is created in.
    pub slice: String,
    /// systemd hosts: the scopes' `IOWeight=` (1–10000); unset: systemd's default (100).
    pub io_weight: Option<u64>,
}

impl Default for VmConfig {
    fn default() -> Self {
        let dirs = crate::paths::Dirs::default();
        Self {
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            accel: Accel::Auto,
            firmware_code: None,
            firmware_vars: None,
            firmware_descriptor_dirs: vec![
                "/etc/qemu/firmware".into(),
                "/usr/share/qemu/firmware".into(),
            ],
            vcpus: 2,
            memory_mib: 2048,
            runtime_root: dirs.runtime_dir.clone(),
            log_dir: dirs.log_dir.clone(),
            keep_serial_log: true,
            powerdown_grace_secs: 30,
            quit_grace_secs: 5,
            disk_dir: dirs.default_disk_dir(),
            // The runner image's 20 GiB virtual disk, fully written, plus qcow2 metadata.
            disk_max_mib: 21 * 1024,
            disk_budget_mib: None,
            uid_base: 1_960_000_000,
            uid_count: 256,
            memory_overhead_mib: 320,
            tcg_tb_size_mib: 128,
            pids_max: 256,
            serial_head_kib: 1024,
            serial_tail_kib: 4096,
            serial_logs_keep: 200,
            serial_logs_max_age_days: 14,
            // Where libvirt and systemd-nspawn put theirs: `systemd-cgtop` groups all VMs.
            slice: "machine.slice".into(),
            io_weight: None,
        }
    }
}

impl VmConfig {
    pub fn powerdown_grace(&self) -> Duration {
        Duration::from_secs(self.powerdown_grace_secs)
    }

    pub fn quit_grace(&self) -> Duration {
        Duration::from_secs(self.quit_grace_secs)
    }

    /// `<runtime_root>/vms`.
    pub fn vms_dir(&self) -> PathBuf {
        crate::paths::vms_dir(&self.runtime_root)
    }

    pub fn disk_max(&self) -> u64 {
        self.disk_max_mib.saturating_mul(1 << 20)
    }

    pub fn disk_budget(&self) -> Option<u64> {
        self.disk_budget_mib.map(|b| b.saturating_mul(1 << 20))
    }

    /// The VM cgroup's memory limit in bytes.
    pub fn memory_max(&self) -> u64 {
        (u64::from(self.memory_mib) + u64::from(self.memory_overhead_mib)) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_gives_defaults_and_unknown_keys_are_refused() {
        let c: VmConfig = toml::from_str("").unwrap();
        assert_eq!(c, VmConfig::default());
        let c: VmConfig = toml::from_str("accel = \"tcg\"\nmemory_mib = 512").unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.memory_mib, 512);
        assert!(toml::from_str::<VmConfig>("memroy_mib = 1").is_err());
    }
}
