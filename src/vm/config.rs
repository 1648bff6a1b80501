use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe VM really runs, otherwise TCG (the choice and its reason are logged).
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

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
}

impl Default for VmConfig {
    fn default() -> Self {
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
            runtime_root: "/run/fkr-qemu".into(),
            log_dir: "/var/lib/fkr-qemu/logs".into(),
            keep_serial_log: true,
            powerdown_grace_secs: 30,
            quit_grace_secs: 5,
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
        self.runtime_root.join("vms")
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
