//! Who QEMU runs as, and what it can reach.
//!
//! The model (README "Security"): when the daemon is root, every QEMU — VMs and the accelerator
//! probe alike — runs under a uid of its own, taken from the range `[vm] uid_base ..
//! uid_base + uid_count` (one per running VM: VMs cannot signal, ptrace or read each other), with
//! the gid of the same number, no supplementary group but the one that owns `/dev/kvm` (when that
//! group may use it), no capabilities (a uid change from root clears them all), `no_new_privs`, no
//! core dumps, an empty environment, and QEMU's own seccomp filter (`-sandbox on`). QEMU opens no
//! file by path: the daemon opens the firmware, VARS copy, overlay, base image and seed and hands
//! QEMU their descriptors (`-add-fd` + `/dev/fdset/N`), binds the QMP socket itself (`fd=`), and
//! reads the serial console from QEMU's stdout. The per-VM directories stay root's (0700), so an
//! escaped QEMU reaches none of the daemon's state, the token, other VMs' files or the base image
//! (which it only has open read-only).
//!
//! A uid is held through an exclusive `flock` on `<runtime_root>/uids/<uid>.lock` for the VM's life:
//! two processes (serve and a root `boot-test`) never hand out the same uid, and a crashed holder's
//! locks vanish with it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::Error;

/// The identity a QEMU runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the group of `/dev/kvm` when it grants the group read-write.
    pub groups: Vec<u32>,
}

/// One uid of the range, held until dropped.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    _lock: Flock<File>,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The identity QEMU gets with this uid.
    pub fn identity(&self) -> Identity {
        Identity {
            uid: self.uid,
            gid: self.uid,
            groups: kvm_group().into_iter().collect(),
        }
    }
}

/// Whether this process can change QEMU's identity and cgroup at all (root). Unprivileged callers
/// (a user's `boot-test`) run QEMU as themselves, which is unprivileged already.
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Takes the lowest free uid of `base .. base + count`.
pub fn acquire_uid(runtime_root: &Path, base: u32, count: u32) -> Result<UidLease, Error> {
    let dir = runtime_root.join("uids");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    for uid in (0..count).filter_map(|i| base.checked_add(i)) {
        if let Some(lease) = lease_uid(runtime_root, uid)? {
            // The lock dies with the daemon that held it, while its QEMU may still run (a crash,
            // a QEMU that outlived its cgroup's kill): a uid with a live process is not free.
            if let Some(pid) = process_of_uid(uid) {
                tracing::warn!(
                    uid,
                    pid,
                    "VM uid still has a running process though no daemon holds it; skipping it"
                );
                continue;
            }
            return Ok(lease);
        }
    }
    Err(Error::UidsExhausted { base, count })
}

/// Takes the lease of `uid` if no process holds it (`flock` on `<runtime_root>/uids/<uid>.lock`);
/// also how a VM taken over after a restart gets its own uid back.
pub fn lease_uid(runtime_root: &Path, uid: u32) -> Result<Option<UidLease>, Error> {
    let path = runtime_root.join("uids").join(format!("{uid}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .ok()
        .map(|lock| UidLease { uid, _lock: lock }))
}

/// A process running with `uid` as its real, effective or saved uid, if any (`/proc/*/status`).
pub(crate) fn process_of_uid(uid: u32) -> Option<u32> {
    let uid = uid.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let ids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
        ids.split_whitespace()
            .take(3)
            .any(|u| u == uid)
            .then_some(pid)
    })
}

/// The group owning `/dev/kvm`, if that group may read and write it (Debian: `root:kvm 0660`).
fn kvm_group() -> Option<u32> {
    let m = std::fs::metadata("/dev/kvm").ok()?;
    (m.mode() & 0o060 == 0o060 && m.gid() != 0).then_some(m.gid())
}

/// The child's end of the handshake with a confinement that must take the child's pid before
/// QEMU runs (a systemd scope: systemd moves the pid, the child cannot join by itself): the child
/// writes its pid to `report`, then waits for one byte `1` on `go`. Anything else (the parent
/// closing `go`) fails the spawn, so QEMU never runs outside its scope.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GateFds {
    pub report: RawFd,
    pub go: RawFd,
}

/// What the child does between fork and exec, prepared (allocated) before the fork.
#[derive(Debug, Default)]
pub(crate) struct ChildSetup {
    /// Wait until the parent has confined the child (see [`GateFds`]).
    pub gate: Option<GateFds>,
    /// `cgroup.procs` files to join, before the identity change (root may write them).
    pub cgroup_procs: Vec<CString>,
    /// Descriptors QEMU inherits (their numbers appear in its arguments).
    pub keep_fds: Vec<RawFd>,
    pub identity: Option<Identity>,
}

impl ChildSetup {
    /// Installs the setup on `cmd` and clears its environment.
    pub fn apply(self, cmd: &mut tokio::process::Command) {
        // QEMU needs no environment; the daemon's may hold the admin token or credential paths.
        cmd.env_clear();
        // SAFETY: the closure runs in the forked child before exec. It calls only async-signal-safe
        // system calls (open, write, close, fcntl, setgroups, setresgid, setresuid, prctl,
        // setrlimit) on data prepared before the fork, allocates nothing and touches no lock.
        unsafe {
            cmd.pre_exec(move || self.in_child());
        }
    }

    fn in_child(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        if let Some(gate) = self.gate {
            wait_at_gate(gate)?;
        }
        for procs in &self.cgroup_procs {
            // SAFETY (for each call below): plain system calls on valid pointers and descriptors.
            let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            check(fd)?;
            // "0" means the writing process itself, in cgroup v1 and v2.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = std::io::Error::last_os_error();
            unsafe { libc::close(fd) };
            if n != 1 {
                return Err(err);
            }
        }
        for &fd in &self.keep_fds {
            check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) })?;
        }
        if let Some(id) = &self.identity {
            let groups: &[libc::gid_t] = &id.groups;
            check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
            check(unsafe { libc::setresgid(id.gid, id.gid, id.gid) })?;
            // From root to another uid: the kernel clears the permitted, effective and ambient
            // capability sets.
            check(unsafe { libc::setresuid(id.uid, id.uid, id.uid) })?;
        }
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        // No core dump of a process that holds guest memory.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) })?;
        Ok(())
    }
}

/// The child's side of [`GateFds`]: async-signal-safe (getpid, write, read) and allocation-free.
fn wait_at_gate(gate: GateFds) -> std::io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() }.to_ne_bytes();
    // SAFETY: writes 4 bytes from a live stack buffer to a descriptor the parent prepared.
    let n = unsafe { libc::write(gate.report, pid.as_ptr().cast(), pid.len()) };
    if n != pid.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    let mut go = [0u8; 1];
    loop {
        // SAFETY: reads at most 1 byte into a live stack buffer.
        let n = unsafe { libc::read(gate.go, go.as_mut_ptr().cast(), 1) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return if n == 1 && go[0] == 1 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_handed_out_once_and_come_back_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = acquire_uid(dir.path(), 5000, 2).unwrap();
        let b = acquire_uid(dir.path(), 5000, 2).unwrap();
        assert_eq!((a.uid(), b.uid()), (5000, 5001));
        assert!(matches!(
            acquire_uid(dir.path(), 5000, 2),
            Err(Error::UidsExhausted { .. })
        ));
        drop(a);
        assert_eq!(acquire_uid(dir.path(), 5000, 2).unwrap().uid(), 5000);
        let id = b.identity();
        assert_eq!((id.uid, id.gid), (5001, 5001));
        assert!(!id.groups.contains(&0), "never root's group");
    }
}
