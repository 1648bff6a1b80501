//! The sandbox a VM's QEMU runs in, checked from the outside (`/proc`, cgroups, modes).

use std::path::Path;

/// What `/proc/<pid>/status` says about a line such as `Uid:` or `CapEff:` (its fields).
fn proc_status(pid: u32, key: &str) -> Vec<String> {
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
    // Network and mount namespaces of its own: none of the host's sockets, no mount propagation.
    for ns in ["net", "mnt"] {
        let of = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_ne!(of(&pid.to_string()), of("self"), "QEMU's {ns} namespace");
    }
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
