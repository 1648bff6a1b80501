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
//! A uid is held through an exclusive `flock` on `<runtime_root>/uid-locks/<uid>.lock` for the VM's
//! life: two processes (serve and a root `boot-test`) never hand out the same uid, and a crashed
//! holder's locks vanish with it. The directory is root's (0700), so no other user can hold a lock.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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

/// Where the uid locks live: root's alone (0700, files 0600). Another user who could open a lock
/// file could `flock` it and so starve VM starts, and `flock` needs only a read-only descriptor.
/// (Not the former `uids/`, whose files were world-readable: anyone may still hold one open.)
pub fn uid_lock_dir(runtime_root: &Path) -> PathBuf {
    runtime_root.join("uid-locks")
}

/// Creates [`uid_lock_dir`] root-only, or makes it so.
fn private_lock_dir(runtime_root: &Path) -> Result<PathBuf, Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = uid_lock_dir(runtime_root);
    std::fs::create_dir_all(runtime_root)
        .map_err(|e| Error::io(format!("creating {}", runtime_root.display()), e))?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
    }
    let m = std::fs::symlink_metadata(&dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(Error::io(
            format!("checking {}", dir.display()),
            std::io::Error::other("not a directory of this user's"),
        ));
    }
    if m.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("restricting {}", dir.display()), e))?;
    }
    Ok(dir)
}

/// Takes the lease of `uid` if no process holds it (`flock` on `<uid_lock_dir>/<uid>.lock`);
/// also how a VM taken over after a restart gets its own uid back.
pub fn lease_uid(runtime_root: &Path, uid: u32) -> Result<Option<UidLease>, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = private_lock_dir(runtime_root)?.join(format!("{uid}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .ok()
        .map(|lock| UidLease { uid, _lock: lock }))
}

/// A live (not zombie) process with `uid` as its real, effective or saved uid (`/proc/*/status`).
pub(crate) fn process_of_uid(uid: u32) -> Option<u32> {
    let uid = uid.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        // A zombie holds nothing and can do nothing: it only waits for its parent.
        let state = status.lines().find_map(|l| l.strip_prefix("State:"))?;
        if state.trim_start().starts_with('Z') {
            return None;
        }
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
        // system calls (open, write, close, fcntl, unshare, mount, socket, ioctl, setgroups,
        // setresgid, setresuid, prctl, setrlimit) on data prepared before the fork or on the
        // stack, allocates nothing and touches no lock.
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
        // Namespaces of its own (`enter_own_namespaces`): directly while root has CAP_SYS_ADMIN,
        // else (the systemd unit withholds it) after the identity change, in a user namespace.
        let isolated = self.identity.is_some() && enter_own_namespaces(false).is_ok();
        if let Some(id) = &self.identity {
            let groups: &[libc::gid_t] = &id.groups;
            check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
            check(unsafe { libc::setresgid(id.gid, id.gid, id.gid) })?;
            // From root to another uid: the kernel clears the permitted, effective and ambient
            // capability sets.
            check(unsafe { libc::setresuid(id.uid, id.uid, id.uid) })?;
            if !isolated {
                enter_own_namespaces(true)?;
            }
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

/// Puts the calling process (the forked child) in a network namespace of its own, with nothing
/// but loopback, and a mount namespace of its own. An escaped QEMU then reaches no socket of the
/// host's: not its 127.0.0.1 services, not the bridge, the LAN or a cloud's metadata address, not
/// an abstract unix socket. QEMU needs no network of its own: the tap and every socket it uses
/// arrive as descriptors, which work across namespaces. Mounts turn private so that nothing the
/// host mounts later propagates in (and nothing leaks out). Async-signal-safe, allocation-free.
///
/// `in_user_ns`: without CAP_SYS_ADMIN (the VM's uid, or root under the unit's bounding set),
/// inside a new user namespace, which grants the capabilities for the set-up within it. QEMU
/// keeps none of them: its uid there is unmapped (not 0), so `execve` empties its sets.
fn enter_own_namespaces(in_user_ns: bool) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls; every pointer is a static C string or this frame's `ifreq`.
    let user = if in_user_ns { libc::CLONE_NEWUSER } else { 0 };
    check(unsafe { libc::unshare(user | libc::CLONE_NEWNET | libc::CLONE_NEWNS) })?;
    check(unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // Loopback up (a new namespace's is down): QEMU's own 127.0.0.1, which reaches nothing else.
    // SAFETY: as above; `req` is a zeroed `ifreq` on this frame, valid for both ioctls.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(sock)?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    let mut r = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) };
    if r >= 0 {
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        r = unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) };
    }
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(sock) };
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

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

    /// What a stand-in QEMU spawned through the real child setup gets when it `connect()`s to
    /// `addr` (bash's `/dev/tcp` is a plain `connect`): `true` if it got through.
    async fn stand_in_connects(setup: ChildSetup, addr: std::net::SocketAddr) -> bool {
        let mut cmd = tokio::process::Command::new("/bin/bash");
        cmd.arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/{}/{} && echo connected",
                addr.ip(),
                addr.port()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        setup.apply(&mut cmd);
        let out = tokio::time::timeout(std::time::Duration::from_secs(20), cmd.output())
            .await
            .expect("the stand-in finishes")
            .expect("the stand-in runs");
        String::from_utf8_lossy(&out.stdout).contains("connected")
    }

    /// Drops CAP_SYS_ADMIN from this thread's effective and permitted sets (what it spawns
    /// inherits that).
    fn drop_sys_admin() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SYS_ADMIN: u32 = 21;
        let header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and the two data structs v3 takes.
        let r = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
        assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
        data[0].effective &= !(1 << CAP_SYS_ADMIN);
        data[0].permitted &= !(1 << CAP_SYS_ADMIN);
        let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
        assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
    }

    /// An escaped QEMU tries the host's loopback services and the bridge's address (here: in a
    /// network namespace the test creates, with a bridge of its own): neither answers, while the
    /// same stand-in without the sandbox reaches both (so the probe itself works). Also without
    /// CAP_SYS_ADMIN, as under the systemd unit (through a user namespace then).
    #[test]
    fn an_escaped_qemu_reaches_neither_host_loopback_nor_the_bridge() {
        assert!(
            privileged(),
            "needs root: it creates a network namespace, changes uids"
        );
        std::thread::spawn(|| {
            // This thread only: its own network namespace, which the spawned processes inherit.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(st.success(), "ip {args:?}");
            };
            ip(&["link", "set", "lo", "up"]);
            ip(&["link", "add", "fkrbr-test", "type", "bridge"]);
            ip(&["addr", "add", "10.213.0.1/24", "dev", "fkrbr-test"]);
            ip(&["link", "set", "fkrbr-test", "up"]);
            let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let bridge = std::net::TcpListener::bind("10.213.0.1:0").unwrap();
            let targets = [local.local_addr().unwrap(), bridge.local_addr().unwrap()];
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let sandboxed = || ChildSetup {
                identity: Some(Identity {
                    uid: 1_960_999_999,
                    gid: 1_960_999_999,
                    groups: Vec::new(),
                }),
                ..ChildSetup::default()
            };
            rt.block_on(async {
                for addr in targets {
                    assert!(
                        stand_in_connects(ChildSetup::default(), addr).await,
                        "the unsandboxed control reaches {addr}"
                    );
                    assert!(
                        !stand_in_connects(sandboxed(), addr).await,
                        "the sandboxed stand-in reached {addr}"
                    );
                }
                // As under the systemd unit, whose bounding set has no CAP_SYS_ADMIN.
                drop_sys_admin();
                for addr in targets {
                    assert!(
                        !stand_in_connects(sandboxed(), addr).await,
                        "without CAP_SYS_ADMIN, the sandboxed stand-in reached {addr}"
                    );
                }
            });
        })
        .join()
        .unwrap();
    }

    /// Another local user (`nobody`) tries to hold every lock of the range, as a way to starve VM
    /// starts: it cannot open them, and the leases are still handed out.
    #[test]
    fn a_uid_lock_held_by_nobody_does_not_stop_vm_starts() {
        assert!(privileged(), "needs root: it runs a process as nobody");
        let dir = tempfile::tempdir().unwrap();
        // VMs ran before: their lock files exist.
        drop((
            acquire_uid(dir.path(), 5000, 2).unwrap(),
            acquire_uid(dir.path(), 5000, 2).unwrap(),
        ));
        let locks: Vec<PathBuf> = std::fs::read_dir(uid_lock_dir(dir.path()))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(locks.len(), 2, "{locks:?}");
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let script = format!(
            "exec 3<'{}' 4<'{}' && flock -xn 3 && flock -xn 4 && echo held && sleep 60",
            locks[0].display(),
            locks[1].display()
        );
        let mut holder = std::process::Command::new("/bin/bash")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .spawn()
            .unwrap();
        // Wait for the holder to hold both locks or to give up.
        let mut said = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(holder.stdout.take().unwrap(), 5),
            &mut said,
        )
        .unwrap();
        let leases = (
            acquire_uid(dir.path(), 5000, 2),
            acquire_uid(dir.path(), 5000, 2),
        );
        let _ = holder.kill();
        let _ = holder.wait();
        assert_ne!(said.trim(), "held", "nobody holds the uid locks");
        assert_eq!(
            (leases.0.unwrap().uid(), leases.1.unwrap().uid()),
            (5000, 5001)
        );
        let m = std::fs::metadata(uid_lock_dir(dir.path())).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        for l in &locks {
            assert_eq!(std::fs::metadata(l).unwrap().mode() & 0o777, 0o600);
        }
    }
}
