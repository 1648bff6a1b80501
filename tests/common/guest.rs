//! The test guest (image-builder/test-guest.sh) for VM tests: its image, a driver config confined to a
//! temporary directory, user-data builders, reading files the guest reported over the serial console
//! (`fkr-report`), and the leftover checks every VM test ends with.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use base64::Engine;
use fkr_qemu::types::Accel;
use fkr_qemu::vm::VmConfig;

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
        disk_dir: dir.join("disks"),
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

/// Nothing of ours is left: no QEMU mentioning `dir`, and `<dir>/run/vms` and `<dir>/disks` are
/// empty.
pub fn assert_nothing_left(dir: &Path) {
    assert_eq!(qemus_under(dir), Vec::<u32>::new(), "QEMU processes left");
    for vms in [dir.join("run/vms"), dir.join("disks")] {
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

/// A `qemu-system-x86_64` whose KVM passes the firmware probe and then fails every guest with run
/// state `internal-error` (tests/fakes/qemu_kvm_internal_error.rs); under TCG it runs the real QEMU.
/// A symlink of that name in `dir/fakebin`, since "our QEMU" is recognised by argv0.
pub fn fake_qemu_kvm_internal_error(dir: &Path) -> PathBuf {
    fake_qemu(dir, "fakebin")
}

/// A `qemu-system-x86_64` that allocates memory without bound (the same fake, called from a
/// directory named `oom`).
pub fn fake_qemu_that_allocates_forever(dir: &Path) -> PathBuf {
    fake_qemu(dir, "oom")
}

fn fake_qemu(dir: &Path, subdir: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_fkr-qemu"))
        .parent()
        .unwrap()
        .join("examples/fake-qemu-kvm-internal-error");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test`/`nextest` build it; else `cargo build --examples`",
        bin.display()
    );
    let fakebin = dir.join(subdir);
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

/// What `/proc/<pid>/status` says about a line such as `Uid:` or `CapEff:` (its fields).
pub fn proc_status(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The sandbox of a running VM's QEMU (the tests run as root): a uid and gid of the VM range, no
/// capability, `no_new_privs`, an empty environment, its own cgroup with limits, and directories
/// it cannot read.
pub fn assert_sandboxed(pid: u32, run_dir: &Path, disk_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let uid: Vec<u32> = proc_status(pid, "Uid")
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uid.iter().all(|u| *u >= 1_960_000_000), "uids {uid:?}");
    let gid: Vec<u32> = proc_status(pid, "Gid")
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(gid.iter().all(|g| *g == uid[0]), "gids {gid:?}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(proc_status(pid, caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), ["1"]);
    // QEMU installs its -sandbox filter while it starts: give it that moment.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while proc_status(pid, "Seccomp") != ["2"] && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(proc_status(pid, "Seccomp"), ["2"], "QEMU's -sandbox filter");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "environment: {}",
        String::from_utf8_lossy(&environ)
    );
    // Its cgroup: a VM cgroup named after the VM, with limits.
    let name = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mem = cgroups
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            (ctrl == "memory" || ctrl.is_empty()).then(|| path.to_owned())
        })
        .unwrap();
    assert!(
        mem.ends_with(&format!("/fkr-qemu/{name}")) || mem.ends_with(&format!("/vms/{name}")),
        "{cgroups}"
    );
    let mem_dir = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Path::new("/sys/fs/cgroup").join(mem.trim_start_matches('/'))
    } else {
        Path::new("/sys/fs/cgroup/memory").join(mem.trim_start_matches('/'))
    };
    let limit = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(mem_dir.join(f)).ok())
        .unwrap();
    assert!(
        limit.trim().parse::<u64>().unwrap() < 64 << 30,
        "memory limit {limit}"
    );
    // Its files are root's, 0700: QEMU (and any other VM's uid) cannot open them by path.
    for d in [run_dir, disk_dir] {
        let m = std::fs::metadata(d).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o700), "{}", d.display());
    }
}

/// Every cgroup directory named `vm` under this process's cgroups (serve's VMs go below the
/// cgroup serve runs in, which is the test's own).
pub fn vm_cgroup_dirs(vm: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut found = Vec::new();
    for line in own.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
        let mount = if ctrls.is_empty() {
            PathBuf::from("/sys/fs/cgroup")
        } else if let Some(c) = ["memory", "pids", "cpu"]
            .iter()
            .find(|c| ctrls.split(',').any(|x| x == **c))
        {
            Path::new("/sys/fs/cgroup").join(c)
        } else {
            continue;
        };
        let base = mount.join(path.trim_start_matches('/'));
        for candidate in [
            base.join("fkr-qemu").join(vm),
            base.join("vms").join(vm),
            mount.join("fkr-qemu/vms").join(vm),
        ] {
            if candidate.exists() {
                found.push(candidate);
            }
        }
    }
    found
}
