//! Finding what a crashed daemon left: per-VM directories under `<runtime_root>/vms/` named like our
//! VMs, and their processes: everything in the cgroup a VM's record names (confined VMs: the
//! cgroup is the VM, so a QEMU that rewrote its command line is found all the same), else the
//! QEMU its pid file names — killed only if `/proc/<pid>` really is a QEMU whose command line
//! contains that VM's directory (a recycled pid is left alone).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{files, Error};
use crate::types::VmName;

/// What [`sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// VMs whose QEMU was still running and was killed.
    pub killed: Vec<(VmName, u32)>,
    /// Per-VM directories removed.
    pub removed: Vec<VmName>,
    /// Entries that could not be cleaned, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// VM cgroups removed.
    pub cgroups: usize,
}

/// Whether `pid` is a QEMU started for `vm_dir`: argv[0] names `qemu-system-*` and an argument
/// mentions the dir (every file QEMU opens is named under it). A recycled pid does not qualify.
/// The one rule the sweep, `list` and `console` use.
pub fn is_our_qemu(pid: u32, vm_dir: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = raw.split(|b| *b == 0).filter(|a| !a.is_empty());
    let Some(argv0) = args.next() else {
        return false;
    };
    let is_qemu = Path::new(std::ffi::OsStr::from_bytes(argv0))
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system"));
    let dir = vm_dir.as_os_str().as_bytes();
    is_qemu && !dir.is_empty() && args.any(|a| a.windows(dir.len()).any(|w| w == dir))
}

/// Kills a stray QEMU of ours and waits (bounded) until it is gone.
pub(crate) fn kill_and_wait(pid: u32, vm_dir: &Path, timeout: Duration) -> bool {
    if !is_our_qemu(pid, vm_dir) {
        return false;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    let start = Instant::now();
    while start.elapsed() < timeout {
        // Reap it if it is our child (the daemon restarted in-process); otherwise init reaps it.
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(raw),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        if !is_our_qemu(pid, vm_dir) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Every running QEMU whose command line names a VM dir under `vms` (`<vms>/fr-…`), by VM: found
/// in `/proc`, so even a QEMU whose pid file was never written (a daemon killed right after the
/// spawn) is found.
fn running_qemus(vms: &Path) -> Vec<(VmName, u32)> {
    let prefix = format!("{}/", vms.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let name = raw
            .split(|b| *b == 0)
            .filter_map(|a| std::str::from_utf8(a).ok())
            .find_map(|a| {
                let at = a.find(&prefix)? + prefix.len();
                let rest = &a[at..];
                VmName::parse(rest.split(['/', ',']).next()?).ok()
            });
        if let Some(name) = name {
            if is_our_qemu(pid, &vms.join(name.as_str())) {
                found.push((name, pid));
            }
        }
    }
    found
}

/// Cleans what VMs of a dead daemon left: kills our QEMUs (those `<runtime_root>/vms/fr-…/qemu.pid`
/// names, and any other QEMU whose command line names such a dir), removes every `fr-…`
/// directory there and in `disk_dir`, and (as root) VM cgroups no process uses. Entries whose name
/// is not a VM name are never touched, nor are the VMs in `keep` (taken over after a restart).
pub fn sweep(config: &super::VmConfig, keep: &[VmName]) -> Result<SweepReport, Error> {
    let mut report = sweep_runtime(&config.runtime_root, keep)?;
    let vms = config.runtime_root.join("vms");
    for (name, pid) in running_qemus(&vms) {
        if keep.contains(&name) {
            continue;
        }
        if kill_and_wait(pid, &vms.join(name.as_str()), Duration::from_secs(10)) {
            tracing::warn!(vm = %name, pid, "sweep killed a leftover QEMU that had no pid file");
            report.killed.push((name, pid));
        }
    }
    // Every QEMU of ours is gone now: no disk dir is in use.
    if let Ok(entries) = std::fs::read_dir(&config.disk_dir) {
        for e in entries.flatten() {
            let Ok(name) = VmName::parse(&e.file_name().to_string_lossy()) else {
                continue;
            };
            if keep.contains(&name) {
                continue;
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    tracing::info!(vm = %name, "sweep removed a leftover disk directory");
                    if !report.removed.contains(&name) {
                        report.removed.push(name);
                    }
                }
                Err(err) => report.failed.push((e.path(), err.to_string())),
            }
        }
    }
    // systemd removes empty scopes by itself; the daemon's own layout needs its empty cgroups
    // removed.
    if let Some(layout) = super::confine::decided().and_then(|h| h.layout()) {
        report.cgroups = super::cgroup::sweep(layout, &report.removed);
    }
    Ok(report)
}

fn sweep_runtime(runtime_root: &Path, keep: &[VmName]) -> Result<SweepReport, Error> {
    let vms = runtime_root.join("vms");
    let mut report = SweepReport::default();
    let entries = match std::fs::read_dir(&vms) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(Error::io(format!("reading {}", vms.display()), e)),
    };
    for entry in entries.flatten() {
        let Ok(name) = VmName::parse(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        if keep.contains(&name) {
            continue;
        }
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        // A confined VM is its cgroup: whatever runs there is killed, whatever its command line
        // says (a QEMU may rewrite it) and even before its pid file was written.
        let recorded = super::meta::VmMeta::read(&dir)
            .and_then(|m| m.cgroup)
            .filter(|_| super::sandbox::privileged());
        if let Some(cg) = recorded.filter(|cg| !super::cgroup::procs_of(cg).is_empty()) {
            let pids = super::cgroup::procs_of(&cg);
            if super::cgroup::kill_cgroup_and_wait(&cg, Duration::from_secs(10)) {
                tracing::warn!(vm = %name, cgroup = %cg.display(), ?pids, "sweep killed a leftover VM");
                for pid in pids {
                    report.killed.push((name.clone(), pid));
                }
            } else {
                report.failed.push((
                    dir.clone(),
                    format!("processes of cgroup {} survived SIGKILL", cg.display()),
                ));
                continue;
            }
        }
        let pid = std::fs::read_to_string(dir.join(files::PID))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            if is_our_qemu(pid, &dir) {
                if kill_and_wait(pid, &dir, Duration::from_secs(10)) {
                    tracing::warn!(vm = %name, pid, "sweep killed a leftover QEMU");
                    report.killed.push((name.clone(), pid));
                } else {
                    report.failed.push((
                        dir.clone(),
                        format!("QEMU pid {pid} did not exit after SIGKILL"),
                    ));
                    continue;
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(vm = %name, "sweep removed a leftover VM directory");
                report.removed.push(name);
            }
            Err(e) => report.failed.push((dir, e.to_string())),
        }
    }
    Ok(report)
}
