//! The test guest (image-builder/test-guest.sh) for VM tests: its image, a driver config confined to a
//! temporary directory, user-data builders, reading files the guest reported over the serial console
//! (`fkr-report`), and the leftover checks every VM test ends with.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use base64::Engine;
use fkr_qemu::vm::{Accel, VmConfig};

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

/// A driver config whose runtime root and log dir live under `dir`, TCG, small guest, short graces.
pub fn config(dir: &Path) -> VmConfig {
    VmConfig {
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 256,
        runtime_root: dir.join("run"),
        log_dir: dir.join("logs"),
        keep_serial_log: true,
        powerdown_grace_secs: 10,
        quit_grace_secs: 5,
        ..VmConfig::default()
    }
}

/// One `write_files` item: path, permissions, content (base64-encoded here).
pub struct WriteFile<'a> {
    pub path: &'a str,
    pub permissions: &'a str,
    pub content: &'a [u8],
}

/// `#cloud-config` in the exact shape of CONTRACTS.md §B.
pub fn user_data(files: &[WriteFile], runcmd: &[&str], poweroff: bool) -> String {
    let mut s = String::from("#cloud-config\n");
    if !files.is_empty() {
        s.push_str("write_files:\n");
        for f in files {
            s.push_str(&format!(
                "- path: {}\n  owner: root:root\n  permissions: '{}'\n  encoding: b64\n  content: {}\n",
                f.path,
                f.permissions,
                base64::engine::general_purpose::STANDARD.encode(f.content)
            ));
        }
    }
    if !runcmd.is_empty() {
        s.push_str("runcmd:\n");
        for c in runcmd {
            s.push_str(&format!("- '{}'\n", c.replace('\'', "''")));
        }
    }
    if poweroff {
        s.push_str("power_state:\n  mode: poweroff\n  timeout: 30\n  condition: true\n");
    }
    s
}

/// Files the guest printed with `fkr-report`, by guest path.
pub fn reported_files(serial: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(p) = line.strip_prefix("fkr-report-begin ") {
            current = Some((p.to_owned(), String::new()));
        } else if let Some(p) = line.strip_prefix("fkr-report-end ") {
            if let Some((path, b64)) = current.take() {
                assert_eq!(path, p, "interleaved fkr-report blocks");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("fkr-report content is base64");
                out.insert(path, bytes);
            }
        } else if let Some((_, b64)) = current.as_mut() {
            b64.push_str(line.trim());
        }
    }
    out
}

/// Pids of running QEMUs whose command line mentions `dir`.
pub fn qemus_under(dir: &Path) -> Vec<u32> {
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

/// Nothing of ours is left: no QEMU mentioning `dir`, and `<dir>/run/vms` is empty.
pub fn assert_nothing_left(dir: &Path) {
    assert_eq!(qemus_under(dir), Vec::<u32>::new(), "QEMU processes left");
    let vms = dir.join("run/vms");
    if vms.exists() {
        let left: Vec<_> = std::fs::read_dir(&vms)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left in the runtime root: {left:?}");
    }
}

/// A `qemu-system-x86_64` whose KVM passes the firmware probe and then fails every guest with run
/// state `internal-error` (tests/fakes/qemu_kvm_internal_error.rs); under TCG it runs the real QEMU.
/// A symlink of that name in `dir/fakebin`, since "our QEMU" is recognised by argv0.
pub fn fake_qemu_kvm_internal_error(dir: &Path) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_fkr-qemu"))
        .parent()
        .unwrap()
        .join("examples/fake-qemu-kvm-internal-error");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test`/`nextest` build it; else `cargo build --examples`",
        bin.display()
    );
    let fakebin = dir.join("fakebin");
    std::fs::create_dir_all(&fakebin).unwrap();
    let link = fakebin.join("qemu-system-x86_64");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&bin, &link).unwrap();
    link
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
