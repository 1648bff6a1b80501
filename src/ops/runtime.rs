//! Reading the per-VM runtime dirs (`<runtime_dir>/vms/<name>/`) directly, for `list` and
//! `console` when no daemon answers.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use super::paths::{check_vm_name, Dirs};
use super::status::{LeftState, VmInfo, VmState};
use super::Error;
use crate::vm::{files, VmMeta};

/// The pid in `<vm_dir>/qemu.pid`, if the file exists and holds a number.
pub fn read_pid(vm_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(vm_dir.join(files::PID))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the VM still exists: its dir is there and either its qemu has not been spawned yet
/// (no pid file) or that qemu is alive.
pub fn vm_alive(dirs: &Dirs, name: &str) -> bool {
    let vm_dir = dirs.vm_dir(name);
    if !vm_dir.is_dir() {
        return false;
    }
    if !vm_dir.join(files::PID).exists() {
        return true;
    }
    qemu_alive(&vm_dir, VmMeta::read(&vm_dir).as_ref())
}

/// Whether the VM's QEMU runs: its cgroup holds a process (a confined VM is its cgroup, whatever
/// its command line says), else the pid file names our QEMU.
fn qemu_alive(vm_dir: &Path, meta: Option<&VmMeta>) -> bool {
    match meta.and_then(|m| m.cgroup.as_deref()) {
        Some(cg) if cg.is_dir() => !crate::vm::cgroup::procs_of(cg).is_empty(),
        _ => read_pid(vm_dir).is_some_and(|pid| crate::vm::is_our_qemu(pid, vm_dir)),
    }
}

/// Where the VM's serial log is: as its `vm.json` records it, else `<log_dir>/<name>.serial.log`
/// (an ended VM's dir is gone, but its log may be kept).
pub fn serial_log_of(dirs: &Dirs, name: &str) -> PathBuf {
    VmMeta::read(&dirs.vm_dir(name)).map_or_else(|| dirs.serial_log(name), |m| m.serial_log)
}

/// The VMs found on disk, sorted by name. Those with a live qemu are `orphaned` (no daemon owns
/// them), the others `stale`; the next daemon start sweeps both.
pub fn scan(dirs: &Dirs) -> Result<Vec<VmInfo>, Error> {
    let vms_dir = dirs.vms_dir();
    let entries = match std::fs::read_dir(&vms_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                what: "reading the VM dirs",
                path: vms_dir,
                source: e,
            })
        }
    };
    let mut vms = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // Only our names: anything else in the dir is not a VM of ours.
        if check_vm_name(&name).is_err() || !entry.path().is_dir() {
            continue;
        }
        let vm_dir = entry.path();
        // A VM whose QEMU is not spawned yet (or a foreign file) has no record: blanks in the table.
        let meta = VmMeta::read(&vm_dir);
        let job = meta.as_ref().and_then(|m| m.job.clone());
        let pid = read_pid(&vm_dir);
        let alive = qemu_alive(&vm_dir, meta.as_ref());
        let started_at = meta.as_ref().map(|m| m.created_at).unwrap_or_else(|| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .map(OffsetDateTime::from)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        });
        // The driver records where it writes the log; older or partial vm.json: the default place.
        let serial_log = meta
            .as_ref()
            .map_or_else(|| dirs.serial_log(&name), |m| m.serial_log.clone());
        vms.push(VmInfo {
            job_id: job.as_ref().map_or(0, |j| j.job_id),
            owner: job.as_ref().map(|j| j.owner.clone()).unwrap_or_default(),
            repo: job.as_ref().map(|j| j.repo.clone()).unwrap_or_default(),
            state: if alive {
                VmState::Left(LeftState::Orphaned)
            } else {
                VmState::Left(LeftState::Stale)
            },
            address: job.as_ref().and_then(|j| j.address).map(|a| a.to_string()),
            started_at,
            accel: meta.as_ref().and_then(|m| m.accel),
            pid,
            serial_log: Some(serial_log),
            limits: meta.as_ref().map(|m| super::status::VmLimits {
                uid: m.uid,
                cgroup: m.cgroup.clone(),
                scope: m.scope.clone(),
                memory_used: None,
                memory_max: None,
                disk_used: None,
                disk_max: m.disk_max,
                overlay: m.disk_dir.join(files::OVERLAY),
            }),
            name,
        });
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Kills the stand-in qemu even when an assertion fails first.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn dirs(root: &Path) -> Dirs {
        Dirs {
            runtime_dir: root.join("run"),
            state_dir: root.join("state"),
            log_dir: root.join("logs"),
        }
    }

    #[test]
    fn scan_reads_vm_json_and_tells_orphans_from_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dirs(tmp.path());
        assert!(scan(&d).unwrap().is_empty(), "no vms dir yet");

        let live = d.vm_dir("fr-0000000a");
        std::fs::create_dir_all(&live).unwrap();
        std::fs::write(
            live.join("vm.json"),
            r#"{"name":"fr-0000000a","job_id":12,"owner":"o","repo":"r","address":"10.88.0.9",
                "accel":"tcg","created_at":"2026-01-02T03:04:05Z","pid":1,"extra":true,
                "serial_log":"/elsewhere/fr-0000000a.serial.log",
                "disk_dir":"/var/lib/fkr-qemu/disks/fr-0000000a","disk_max":1024}"#,
        )
        .unwrap();
        // A shell named qemu-system-x86_64 with the VM dir as an argument stands in for its qemu;
        // it waits in the `read` builtin (no child process to leave behind).
        let mut child = KillOnDrop(
            std::process::Command::new("sh")
                .arg0("qemu-system-x86_64")
                .args(["-c", "read x", "sh"])
                .arg(&live)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        std::fs::write(live.join("qemu.pid"), child.0.id().to_string()).unwrap();
        // Until the child has exec'd, its command line is still ours.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !crate::vm::is_our_qemu(child.0.id(), &live) {
            assert!(
                std::time::Instant::now() < deadline,
                "the stand-in never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }

        let stale = d.vm_dir("fr-0000000b");
        std::fs::create_dir_all(&stale).unwrap();
        // pid 1 is alive but is not this VM's qemu; neither is a process merely naming the dir.
        std::fs::write(stale.join("qemu.pid"), "1\n").unwrap();
        std::fs::create_dir_all(d.vm_dir("not-a-vm")).unwrap();
        let impostor_dir = d.vm_dir("fr-0000000d");
        std::fs::create_dir_all(&impostor_dir).unwrap();
        let impostor = KillOnDrop(
            std::process::Command::new("sh")
                .args(["-c", "read x", "sh"])
                .arg(&impostor_dir)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        std::fs::write(impostor_dir.join("qemu.pid"), impostor.0.id().to_string()).unwrap();

        let vms = scan(&d).unwrap();
        assert_eq!(vms.len(), 3);
        assert_eq!(vms[2].name, "fr-0000000d");
        assert_eq!(vms[2].state, VmState::Left(LeftState::Stale), "not a qemu");
        assert_eq!(vms[0].name, "fr-0000000a");
        assert_eq!(vms[0].state, VmState::Left(LeftState::Orphaned));
        assert_eq!(vms[0].job_id, 12);
        assert_eq!((vms[0].owner.as_str(), vms[0].repo.as_str()), ("o", "r"));
        // Reported even though it does not exist: the VM's own record says where it goes.
        assert_eq!(
            vms[0].serial_log.as_deref(),
            Some(Path::new("/elsewhere/fr-0000000a.serial.log"))
        );
        assert_eq!(vms[0].address.as_deref(), Some("10.88.0.9"));
        assert_eq!(vms[0].started_at.unix_timestamp(), 1_767_323_045);
        assert_eq!(vms[1].state, VmState::Left(LeftState::Stale));
        assert_eq!(vms[1].pid, Some(1));
        assert_eq!(
            serial_log_of(&d, "fr-0000000a"),
            Path::new("/elsewhere/fr-0000000a.serial.log")
        );
        assert_eq!(
            serial_log_of(&d, "fr-0000000b"),
            d.log_dir.join("fr-0000000b.serial.log")
        );
        assert!(vm_alive(&d, "fr-0000000a"));
        assert!(!vm_alive(&d, "fr-0000000b"));
        assert!(!vm_alive(&d, "fr-0000000c"));

        child.0.kill().unwrap();
        child.0.wait().unwrap();
        assert!(!vm_alive(&d, "fr-0000000a"));
        std::fs::remove_file(live.join("qemu.pid")).unwrap();
        assert!(
            vm_alive(&d, "fr-0000000a"),
            "not spawned yet counts as alive"
        );
    }
}
