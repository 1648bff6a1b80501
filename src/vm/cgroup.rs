//! One cgroup per VM, with limits on memory, tasks and CPU, so one guest (or an escaped QEMU) cannot
//! starve the host, the daemon or other VMs, and an out-of-memory kill ends that VM alone.
//!
//! cgroup v2 (`/sys/fs/cgroup/cgroup.controllers` exists): VMs live under `<parent>/vms/<name>`.
//! `<parent>` is the daemon's own cgroup when it is not the root (systemd's `Delegate=yes` gives the
//! service its subtree; the daemon moves itself into `<parent>/daemon` first, since v2 lets only leaf
//! cgroups hold processes once controllers are enabled for children), else `/sys/fs/cgroup/fkr-qemu`.
//! Limits: `memory.max`, `memory.swap.max = 0`, `memory.oom.group = 1`, `pids.max`, `cpu.max`.
//!
//! cgroup v1 (hybrid hosts): the `memory`, `pids` and `cpu` hierarchies each get
//! `<daemon's cgroup>/fkr-qemu/<name>`, with `memory.limit_in_bytes`, `pids.max` and
//! `cpu.cfs_quota_us`/`cpu.cfs_period_us`.
//!
//! QEMU joins its cgroups between fork and exec (it writes `0` to each `cgroup.procs`), so every
//! byte it allocates is accounted. The directories are removed when the VM is torn down; the sweep
//! removes those a crash left (`fr-…` names only).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Error;

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// CPU bandwidth period (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// Whole CPUs (the VM's vCPUs): `cpu.max = vcpus × period`.
    pub cpus: u32,
}

/// The cgroup layout found on this host, with the directory VM cgroups are created in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    V2 {
        parent: PathBuf,
    },
    /// One parent per controller, in [`V1_CONTROLLERS`] order.
    V1 {
        parents: Vec<PathBuf>,
    },
}

/// The cgroup path of this process in `hierarchy` ("" for v2) from `/proc/self/cgroup`.
fn own_cgroup(proc_cgroup: &str, hierarchy: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == hierarchy)
            .then(|| path.to_owned())
    })
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value)
        .map_err(|e| Error::io(format!("writing `{value}` to {}", path.display()), e))
}

fn mkdir(path: &Path) -> Result<(), Error> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("creating cgroup {}", path.display()), e)),
    }
}

fn join(root: &Path, cgroup: &str) -> PathBuf {
    root.join(cgroup.trim_start_matches('/'))
}

impl Layout {
    /// Finds the layout and prepares the parent of VM cgroups (once per process; idempotent).
    pub fn prepare() -> Result<Layout, Error> {
        Self::prepare_at(Path::new(CGROUP_ROOT), "/proc/self/cgroup")
    }

    fn prepare_at(root: &Path, proc_self: &str) -> Result<Layout, Error> {
        let own = std::fs::read_to_string(proc_self)
            .map_err(|e| Error::io(format!("reading {proc_self}"), e))?;
        if root.join("cgroup.controllers").exists() {
            let me = own_cgroup(&own, "").unwrap_or_else(|| "/".into());
            // Already in our leaf: a second prepare, or the new image of a handover (same process,
            // same cgroup). The subtree is the leaf's parent; moving again would nest deeper.
            let me = match me.strip_suffix("/daemon") {
                Some(svc) if !svc.is_empty() && join(root, svc).join("vms").is_dir() => {
                    svc.to_owned()
                }
                _ => me,
            };
            let enable = "+memory +pids +cpu";
            let parent = if me == "/" {
                // No delegated subtree (no systemd unit): a subtree of our own at the top.
                write(&root.join("cgroup.subtree_control"), enable)?;
                let p = root.join("fkr-qemu");
                mkdir(&p)?;
                p
            } else {
                // A delegated subtree (systemd `Delegate=yes`): move ourselves into a leaf so that
                // controllers can be enabled for the VMs beside it.
                let p = join(root, &me);
                let leaf = p.join("daemon");
                mkdir(&leaf)?;
                write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
                write(&p.join("cgroup.subtree_control"), enable)?;
                p
            };
            let vms = parent.join("vms");
            mkdir(&vms)?;
            write(&vms.join("cgroup.subtree_control"), enable)?;
            return Ok(Layout::V2 { parent: vms });
        }
        let mut parents = Vec::new();
        for c in V1_CONTROLLERS {
            let mount = root.join(c);
            if !mount.join("cgroup.procs").exists() {
                return Err(Error::Cgroup(format!(
                    "no cgroup v2 at {} and no cgroup v1 `{c}` hierarchy at {}: \
                     VMs cannot be confined (mount cgroup2, or run under systemd)",
                    root.display(),
                    mount.display()
                )));
            }
            let me = own_cgroup(&own, c).unwrap_or_else(|| "/".into());
            let p = join(&mount, &me).join("fkr-qemu");
            mkdir(&p)?;
            parents.push(p);
        }
        Ok(Layout::V1 { parents })
    }

    /// The parent directories that hold VM cgroups (for the sweep).
    pub fn parents(&self) -> Vec<PathBuf> {
        match self {
            Layout::V2 { parent } => vec![parent.clone()],
            Layout::V1 { parents } => parents.clone(),
        }
    }
}

/// Who made a VM's cgroup, and so who removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// The daemon (`<parent>/<name>` of a [`Layout`]): removed when dropped.
    Daemon,
    /// systemd (the transient scope `unit`): systemd removes it with its last process.
    Systemd { unit: String },
}

/// One VM's cgroup(s): where its processes are, how to kill them all, and its memory figures.
/// The cgroup is the VM's identity: its processes are the ones in it, whatever their command line
/// says and whatever pid they got.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    owner: Owner,
}

impl VmCgroup {
    /// Creates `<parent>/<name>` with `limits`.
    pub fn create(layout: &Layout, name: &str, limits: Limits) -> Result<VmCgroup, Error> {
        let mut cg = VmCgroup {
            dirs: Vec::new(),
            owner: Owner::Daemon,
        };
        for parent in layout.parents() {
            let dir = parent.join(name);
            mkdir(&dir)?;
            cg.dirs.push(dir);
        }
        let quota = u64::from(limits.cpus.max(1)) * CPU_PERIOD_US;
        match layout {
            Layout::V2 { .. } => {
                let d = &cg.dirs[0];
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                // Swap would let a VM exceed its limit on the host's disk.
                if d.join("memory.swap.max").exists() {
                    write(&d.join("memory.swap.max"), "0")?;
                }
                // An OOM kill takes the whole VM, never a part of QEMU.
                write(&d.join("memory.oom.group"), "1")?;
                write(&d.join("pids.max"), &limits.pids.to_string())?;
                write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            Layout::V1 { .. } => {
                let [mem, pids, cpu] = [&cg.dirs[0], &cg.dirs[1], &cg.dirs[2]];
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                // With swap accounting, memory+swap gets the same limit: no escape into swap.
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_bytes.to_string())?;
                }
                write(&pids.join("pids.max"), &limits.pids.to_string())?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(cg)
    }

    /// The cgroup of systemd scope `unit` at `dir` (planned before the scope exists, or found).
    pub fn of_scope(unit: String, dir: PathBuf) -> VmCgroup {
        VmCgroup {
            dirs: vec![dir],
            owner: Owner::Systemd { unit },
        }
    }

    /// The cgroup of a VM taken over after a restart, from what its record says: the scope's
    /// directory (systemd) or `<parent>/<name>` of this host's layout; `None` when it is gone.
    pub fn existing(
        layout: Option<&Layout>,
        scope: Option<&str>,
        recorded: &Path,
        name: &str,
    ) -> Option<VmCgroup> {
        let cg = match (scope, layout) {
            (Some(unit), _) => VmCgroup::of_scope(unit.to_owned(), recorded.to_owned()),
            (None, Some(layout)) => VmCgroup {
                dirs: layout.parents().into_iter().map(|p| p.join(name)).collect(),
                owner: Owner::Daemon,
            },
            (None, None) => return None,
        };
        if cg.dirs.iter().all(|d| d.is_dir()) {
            Some(cg)
        } else {
            let mut cg = cg;
            // Nothing to remove: do not let Drop try.
            cg.dirs.clear();
            None
        }
    }

    /// The systemd scope, when systemd made this cgroup.
    pub fn scope(&self) -> Option<&str> {
        match &self.owner {
            Owner::Systemd { unit } => Some(unit),
            Owner::Daemon => None,
        }
    }

    /// Whether QEMU joins it by itself before exec (the daemon's own cgroups); a scope takes the
    /// pid from systemd instead.
    pub(crate) fn joined_by_child(&self) -> bool {
        self.owner == Owner::Daemon
    }

    /// Where systemd really put the scope (it may differ from the planned path).
    pub(crate) fn set_scope_dir(&mut self, dir: PathBuf) {
        self.dirs = vec![dir];
    }

    /// The VM's (first) cgroup directory, unless already removed.
    pub(crate) fn dirs_first(&self) -> Option<&Path> {
        self.dirs.first().map(PathBuf::as_path)
    }

    /// The processes in the VM's cgroup (all of QEMU's; in v1 the memory hierarchy's view).
    pub fn procs(&self) -> Vec<u32> {
        self.dirs.first().map_or_else(Vec::new, |d| procs_of(d))
    }

    /// Kills every process of the VM: `cgroup.kill` where the kernel has it (5.14+, v2), which
    /// also catches a process forking at that moment; else SIGKILL to each listed process.
    pub fn kill(&self) {
        if let Some(d) = self.dirs.first() {
            kill_cgroup(d);
        }
    }

    /// The `cgroup.procs` files QEMU writes itself into before exec.
    pub(crate) fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").as_os_str().as_bytes())
                    .expect("cgroup paths have no NUL byte")
            })
            .collect()
    }

    /// The memory cgroup's directory (v2: the one directory), for `status`.
    pub fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// Memory in use now, in bytes.
    pub fn memory_current(&self) -> Option<u64> {
        memory_current(self.memory_dir())
    }

    /// How often the kernel's OOM killer acted in this cgroup (v2 `memory.events`, v1
    /// `memory.oom_control`).
    pub fn oom_kills(&self) -> Option<u64> {
        ["memory.events", "memory.oom_control"]
            .iter()
            .find_map(|f| std::fs::read_to_string(self.memory_dir().join(f)).ok())
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
    }

    /// Removes the directories the daemon made; a cgroup whose last process just exited may be
    /// busy for a moment. A scope's are systemd's: it removes them with the scope.
    pub fn remove(&mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        if self.owner == Owner::Daemon {
            for d in dirs {
                remove_dir(&d);
            }
        }
    }
}

/// The processes listed in `<dir>/cgroup.procs`.
pub fn procs_of(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process of the cgroup at `dir` (see [`VmCgroup::kill`]).
pub fn kill_cgroup(dir: &Path) {
    let knob = dir.join("cgroup.kill");
    if knob.exists() && std::fs::write(&knob, "1").is_ok() {
        return;
    }
    // v1 or an older kernel: a process forking right now could escape one round; the caller
    // waits for the cgroup to empty and kills again.
    for pid in procs_of(dir) {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Kills every process of the cgroup at `dir` and waits (bounded) until none is left.
pub fn kill_cgroup_and_wait(dir: &Path, timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        let procs = procs_of(dir);
        if procs.is_empty() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        kill_cgroup(dir);
        for pid in procs {
            // Reap it if it is our child (the daemon restarted in-process); else init reaps it.
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Memory in use by the cgroup at `dir` (v2 `memory.current`, v1 `memory.usage_in_bytes`).
pub fn memory_current(dir: &Path) -> Option<u64> {
    ["memory.current", "memory.usage_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|s| s.trim().parse().ok())
}

/// The memory limit of the cgroup at `dir`.
pub fn memory_max(dir: &Path) -> Option<u64> {
    ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|s| s.trim().parse().ok())
}

fn remove_dir(d: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(d) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    tracing::warn!(cgroup = %d.display(), "cannot remove the VM's cgroup (left for the sweep)");
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// How old an empty VM cgroup of no VM of ours must be before the sweep takes it: another daemon
/// sharing the parent (a handover's two processes, hosts of a test fleet) creates each VM's cgroup
/// seconds before its QEMU joins it, and removing it then fails that QEMU's start.
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// Removes VM cgroups (`fr-…` names) that no process uses: those of `ours` (VMs whose files the
/// sweep found), and others once they are [`SWEEP_MIN_AGE`] old. Returns how many.
pub fn sweep(layout: &Layout, ours: &[crate::types::VmName]) -> usize {
    let mut n = 0;
    for parent in layout.parents() {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(name) = crate::types::VmName::parse(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map_or(true, |age| age >= SWEEP_MIN_AGE);
            if !(ours.contains(&name) || old) {
                continue;
            }
            let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() && std::fs::remove_dir(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_reads_v1_and_v2_lines() {
        let text = "9:name=systemd:/\n4:memory:/process_api/e20\n1:cpu,cpuacct:/a\n0::/system.slice/fkr-qemu.service\n";
        assert_eq!(
            own_cgroup(text, "memory").as_deref(),
            Some("/process_api/e20")
        );
        assert_eq!(own_cgroup(text, "cpu").as_deref(), Some("/a"));
        assert_eq!(
            own_cgroup(text, "").as_deref(),
            Some("/system.slice/fkr-qemu.service")
        );
        assert_eq!(own_cgroup(text, "pids"), None);
    }

    /// Another daemon's VM cgroup, made moments ago and still empty (its QEMU not spawned yet), is
    /// not this sweep's: it waits a minute. Ours and old ones go; non-VM names never do.
    #[test]
    fn sweep_leaves_a_young_cgroup_of_another_daemon_alone() {
        use crate::types::VmName;
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::V2 {
            parent: root.path().to_owned(),
        };
        let [young, ours, old] = ["fr-0000000a", "fr-0000000b", "fr-0000000c"];
        for d in [young, ours, old, "system.slice"] {
            std::fs::create_dir(root.path().join(d)).unwrap();
        }
        let two_minutes_ago = std::time::SystemTime::now() - Duration::from_secs(120);
        for d in [old, "system.slice"] {
            std::fs::File::open(root.path().join(d))
                .unwrap()
                .set_modified(two_minutes_ago)
                .unwrap();
        }
        assert_eq!(sweep(&layout, &[VmName::parse(ours).unwrap()]), 2);
        assert!(root.path().join(young).exists());
        assert!(root.path().join("system.slice").exists());
        assert!(!root.path().join(ours).exists() && !root.path().join(old).exists());
    }

    /// A v2 tree as files: the daemon in a delegated service cgroup.
    #[test]
    fn v2_delegated_subtree_gets_a_daemon_leaf_and_vm_limits() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("cgroup.controllers"), "cpu memory pids").unwrap();
        let svc = r.join("system.slice/fkr-qemu.service");
        std::fs::create_dir_all(&svc).unwrap();
        let proc_self = r.join("self-cgroup");
        std::fs::write(&proc_self, "0::/system.slice/fkr-qemu.service\n").unwrap();
        let layout = Layout::prepare_at(r, proc_self.to_str().unwrap()).unwrap();
        assert_eq!(
            layout,
            Layout::V2 {
                parent: svc.join("vms")
            }
        );
        assert_eq!(
            std::fs::read_to_string(svc.join("daemon/cgroup.procs")).unwrap(),
            std::process::id().to_string()
        );
        assert_eq!(
            std::fs::read_to_string(svc.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        let cg = VmCgroup::create(
            &layout,
            "fr-0123abcd",
            Limits {
                memory_bytes: 512 << 20,
                pids: 128,
                cpus: 2,
            },
        )
        .unwrap();
        let d = svc.join("vms/fr-0123abcd");
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(read("memory.max"), (512u64 << 20).to_string());
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("pids.max"), "128");
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(
            cg.procs_files(),
            vec![CString::new(d.join("cgroup.procs").to_str().unwrap()).unwrap()]
        );
        assert_eq!(memory_max(&d), Some(512 << 20));
    }

    /// The layout is the host's, not the call's: a second prepare in the same process, and the
    /// new image of a handover (same process, now in the `daemon` leaf the first one made), find
    /// the same parent instead of nesting one level deeper each time.
    #[test]
    fn v2_a_second_prepare_and_a_handover_do_not_nest_deeper() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("cgroup.controllers"), "cpu memory pids").unwrap();
        let svc = r.join("system.slice/fkr-qemu.service");
        std::fs::create_dir_all(&svc).unwrap();
        let proc_self = r.join("self-cgroup");
        let proc_self = proc_self.to_str().unwrap();
        std::fs::write(proc_self, "0::/system.slice/fkr-qemu.service\n").unwrap();
        let first = Layout::prepare_at(r, proc_self).unwrap();
        let again = Layout::prepare_at(r, proc_self).unwrap();
        assert_eq!(first, again);
        // What /proc/self/cgroup says once the first prepare moved the daemon into its leaf.
        std::fs::write(proc_self, "0::/system.slice/fkr-qemu.service/daemon\n").unwrap();
        for _ in 0..2 {
            let after_handover = Layout::prepare_at(r, proc_self).unwrap();
            assert_eq!(after_handover, first, "a handover must not nest deeper");
        }
        assert!(!svc.join("daemon/daemon").exists());
        assert!(!svc.join("daemon/vms").exists());
        // A VM made before the handover is found where it was made.
        VmCgroup::create(
            &first,
            "fr-0123abcd",
            Limits {
                memory_bytes: 1 << 30,
                pids: 64,
                cpus: 1,
            },
        )
        .map(|mut cg| cg.dirs.clear())
        .unwrap();
        let found = VmCgroup::existing(
            Some(&Layout::prepare_at(r, proc_self).unwrap()),
            None,
            Path::new("/unused"),
            "fr-0123abcd",
        )
        .expect("the VM's cgroup after the handover");
        assert_eq!(found.memory_dir(), svc.join("vms/fr-0123abcd"));
    }

    /// A v1 tree as files: each controller's hierarchy, the daemon in `/box` of each.
    fn v1_tree() -> (tempfile::TempDir, std::path::PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for c in V1_CONTROLLERS {
            std::fs::create_dir_all(r.join(c).join("box")).unwrap();
            std::fs::write(r.join(c).join("cgroup.procs"), "").unwrap();
        }
        let proc_self = r.join("self-cgroup");
        std::fs::write(&proc_self, "4:memory:/box\n8:pids:/box\n1:cpu:/box\n").unwrap();
        (root, proc_self)
    }

    #[test]
    fn v1_a_second_prepare_finds_the_same_parents() {
        let (root, proc_self) = v1_tree();
        let r = root.path();
        let first = Layout::prepare_at(r, proc_self.to_str().unwrap()).unwrap();
        let again = Layout::prepare_at(r, proc_self.to_str().unwrap()).unwrap();
        assert_eq!(first, again);
        assert!(!r.join("memory/box/fkr-qemu/fkr-qemu").exists());
    }

    #[test]
    fn v1_hierarchies_each_get_the_vm() {
        let (root, proc_self) = v1_tree();
        let r = root.path();
        let layout = Layout::prepare_at(r, proc_self.to_str().unwrap()).unwrap();
        let cg = VmCgroup::create(
            &layout,
            "fr-0123abcd",
            Limits {
                memory_bytes: 1 << 30,
                pids: 64,
                cpus: 1,
            },
        )
        .unwrap();
        let at = |c: &str, f: &str| {
            std::fs::read_to_string(r.join(c).join("box/fkr-qemu/fr-0123abcd").join(f)).unwrap()
        };
        assert_eq!(
            at("memory", "memory.limit_in_bytes"),
            (1u64 << 30).to_string()
        );
        assert_eq!(at("pids", "pids.max"), "64");
        assert_eq!(at("cpu", "cpu.cfs_quota_us"), "100000");
        assert_eq!(cg.procs_files().len(), 3);
    }

    #[test]
    fn no_cgroups_at_all_is_an_error_that_says_what_to_do() {
        let root = tempfile::tempdir().unwrap();
        let proc_self = root.path().join("self-cgroup");
        std::fs::write(&proc_self, "0::/\n").unwrap();
        let err = Layout::prepare_at(root.path(), proc_self.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("cannot be confined"), "{err}");
    }
}
