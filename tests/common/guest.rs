//! The test guest (image-builder/test-guest.sh) for VM tests: its image, the leftover check every
//! VM test ends with, and when the fake QEMU's KVM failed the guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::vm_config::config;

/// The test guest image, built (or found up to date) by image-builder/test-guest.sh.
pub fn test_guest_image() -> PathBuf {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let image = root.join("target/test-guest/test-guest.qcow2");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let stamp = root.join("target/test-guest/test-guest.qcow2.inputs");
    if !(*built || image.is_file() && stamp.is_file()) {
        let st = Command::new(root.join("image-builder/test-guest.sh"))
            .status()
            .expect("running image-builder/test-guest.sh");
        assert!(st.success(), "image-builder/test-guest.sh failed");
    }
    *built = true;
    image
}

/// Pids of running QEMUs whose command line mentions `dir`.
fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Nothing of ours is left for a driver run with [`config`]`(dir)`: no QEMU mentioning `dir`, and
/// its per-VM directories (the driver's `vms_dir()`) and disk directories are empty.
pub fn assert_nothing_left(dir: &Path) {
    assert_eq!(qemus_under(dir), Vec::<u32>::new(), "QEMU processes left");
    let cfg = config(dir);
    for vms in [cfg.vms_dir(), cfg.disk_dir] {
        if !vms.exists() {
            continue;
        }
        let left: Vec<_> = std::fs::read_dir(&vms)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left in the runtime root: {left:?}");
    }
}

/// The Unix time in milliseconds at which the fake QEMU entered `internal-error`, from its stderr
/// as the driver reports it.
pub fn fake_internal_error_at(detail: &str) -> u128 {
    let at = detail
        .split("unix_ms=")
        .nth(1)
        .unwrap_or_else(|| panic!("no unix_ms= in {detail:?}"));
    at.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}
