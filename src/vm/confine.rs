//! How this host confines QEMU, decided once per process, and the one way every QEMU (VMs and
//! the accelerator probe) is spawned into it.
//!
//! - **systemd** (it is PID 1): a transient scope per QEMU in `[vm] slice` (`scope.rs`). systemd
//!   owns the VMs, so a restart of the daemon's unit never touches them.
//! - **cgroup** (no systemd, root): the daemon's own cgroups (`cgroup.rs`), v2 or v1.
//! - **unconfined**: the caller is not root (a user's `boot-test`), so QEMU runs as that user.
//!
//! Deciding once matters: the cgroup layout moves the daemon into a leaf of its subtree, and a
//! second decision would start from that leaf.

use std::os::fd::{AsRawFd, OwnedFd};
use tokio::process::{Child, Command};

use super::cgroup::{Layout, VmCgroup};
use super::sandbox::{self, ChildSetup, GateFds};
use super::scope::{self, ScopeSpec, Systemd};
use super::{Error, VmConfig};

/// This host's way of confining QEMU.
#[derive(Debug)]
pub enum Host {
    Systemd { systemd: Systemd, slice: String },
    Cgroup(Layout),
    Unconfined,
}

static HOST: tokio::sync::OnceCell<Host> = tokio::sync::OnceCell::const_new();

/// This host's confinement, decided on the first call (later calls return the same, whatever
/// `config` they pass). A failure is not kept: it is fatal to `serve`, which checks at start.
pub async fn host(config: &VmConfig) -> Result<&'static Host, Error> {
    HOST.get_or_try_init(|| decide(config)).await
}

/// The decision, if made (for code that runs only after a VM exists).
pub fn decided() -> Option<&'static Host> {
    HOST.get()
}

async fn decide(config: &VmConfig) -> Result<Host, Error> {
    if !sandbox::privileged() {
        return Ok(Host::Unconfined);
    }
    if scope::booted() {
        if !config.slice.ends_with(".slice") {
            return Err(Error::Scope(format!(
                "[vm] slice `{}` is not a slice unit name (it must end in `.slice`)",
                config.slice
            )));
        }
        return Ok(Host::Systemd {
            systemd: Systemd::connect().await?,
            slice: config.slice.clone(),
        });
    }
    Ok(Host::Cgroup(Layout::prepare()?))
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Systemd { systemd, slice } => write!(
                f,
                "systemd: one transient scope per VM in {slice}{}",
                if systemd.machined() {
                    ", registered with systemd-machined"
                } else {
                    " (no systemd-machined: machinectl will not list VMs)"
                }
            ),
            Host::Cgroup(Layout::V2 { parent }) => {
                write!(f, "cgroup v2: VM cgroups under {}", parent.display())
            }
            Host::Cgroup(Layout::V1 { parents }) => write!(
                f,
                "cgroup v1: VM cgroups under {}",
                parents
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Host::Unconfined => write!(f, "none: not root, QEMU runs as the calling user"),
        }
    }
}

impl Host {
    /// The daemon's own cgroup layout, when it has one.
    pub fn layout(&self) -> Option<&Layout> {
        match self {
            Host::Cgroup(l) => Some(l),
            _ => None,
        }
    }

    pub fn systemd(&self) -> Option<&Systemd> {
        match self {
            Host::Systemd { systemd, .. } => Some(systemd),
            _ => None,
        }
    }

    /// The cgroup VM `name` will have: created now with its limits (the daemon's own
    /// layout) or planned (a scope exists only once it holds QEMU's pid, see [`Host::spawn`]).
    pub fn vm_cgroup(
        &self,
        name: &str,
        limits: super::cgroup::Limits,
    ) -> Result<Option<VmCgroup>, Error> {
        match self {
            Host::Cgroup(layout) => VmCgroup::create(layout, name, limits).map(Some),
            Host::Systemd { slice, .. } => {
                let unit = scope::unit_name(name);
                let dir = scope::cgroup_dir(slice, &unit);
                Ok(Some(VmCgroup::of_scope(unit, dir)))
            }
            Host::Unconfined => Ok(None),
        }
    }

    /// Spawns `cmd` with `setup` inside `cgroup`: a daemon-made cgroup is joined by the child
    /// itself before exec; a scope is created by systemd around the child's pid while the child
    /// waits before exec (`sandbox::GateFds`), so QEMU's first instruction already runs confined.
    /// `scope` describes the scope (its limits, the machine to register).
    pub(crate) async fn spawn(
        &self,
        mut cmd: Command,
        mut setup: ChildSetup,
        cgroup: Option<&mut VmCgroup>,
        scope: Option<ScopeSpec<'_>>,
    ) -> Result<Child, SpawnError> {
        let (Host::Systemd { systemd, .. }, Some(cg), Some(spec)) = (self, cgroup, scope) else {
            // The daemon's own cgroups (or none): the child joins by itself.
            return plain_spawn(cmd, setup);
        };
        if cg.joined_by_child() {
            return plain_spawn(cmd, setup);
        }
        let pipe =
            || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from);
        let (report_r, report_w) = pipe().map_err(SpawnError::Io)?;
        let (go_r, go_w) = pipe().map_err(SpawnError::Io)?;
        setup.gate = Some(GateFds {
            report: report_w.as_raw_fd(),
            go: go_r.as_raw_fd(),
        });
        setup.apply(&mut cmd);
        // `spawn` returns only after the exec, which waits for the gate: it runs on a thread of
        // its own while this task creates the scope.
        let spawner = tokio::task::spawn_blocking(move || {
            let child = cmd.spawn();
            // The parent's copies of the child's ends: closing them is what lets a reader see EOF
            // when the child died before reporting.
            drop((report_w, go_r));
            child
        });
        let pid = tokio::task::spawn_blocking(move || read_pid(report_r))
            .await
            .ok()
            .flatten();
        let confined = match pid {
            Some(pid) => match systemd.create_scope(&spec, pid).await {
                Ok(dir) => {
                    cg.set_scope_dir(dir);
                    open_gate(&go_w).map_err(SpawnError::Io)
                }
                Err(e) => Err(SpawnError::Confine(e)),
            },
            None => Ok(()),
        };
        // Closing `go` without the byte fails a child still waiting: it never runs unconfined.
        drop(go_w);
        let spawned = spawner
            .await
            .map_err(|e| SpawnError::Io(std::io::Error::other(e.to_string())))?;
        confined?;
        let child = spawned.map_err(SpawnError::Io)?;
        if let Some(pid) = child.id() {
            systemd.register(&spec, pid).await;
        }
        Ok(child)
    }
}

impl Host {
    /// Spawns the accelerator probe's QEMU: on systemd hosts in a short-lived scope of its own
    /// (`fkr-qemu-probe-<random>.scope`, gone with the probe), like a VM's.
    pub(crate) async fn spawn_probe(
        &self,
        cmd: Command,
        setup: ChildSetup,
        memory_bytes: u64,
    ) -> Result<Child, SpawnError> {
        let Host::Systemd { slice, .. } = self else {
            return plain_spawn(cmd, setup);
        };
        let unit = format!("fkr-qemu-probe-{:08x}.scope", rand::random::<u32>());
        let mut cg = VmCgroup::of_scope(unit.clone(), scope::cgroup_dir(slice, &unit));
        let spec = ScopeSpec {
            unit,
            machine: None,
            slice,
            limits: super::cgroup::Limits {
                memory_bytes,
                pids: 64,
                cpus: 1,
            },
            io_weight: None,
            description: "fkr-qemu accelerator probe".into(),
            ifindex: None,
        };
        self.spawn(cmd, setup, Some(&mut cg), Some(spec)).await
    }
}

/// Why a confined spawn failed.
#[derive(Debug)]
pub enum SpawnError {
    /// The spawn itself (a missing binary, the child's setup).
    Io(std::io::Error),
    /// systemd did not create the scope.
    Confine(Error),
}

fn plain_spawn(mut cmd: Command, setup: ChildSetup) -> Result<Child, SpawnError> {
    setup.apply(&mut cmd);
    cmd.spawn().map_err(SpawnError::Io)
}

fn read_pid(report: OwnedFd) -> Option<u32> {
    use std::io::Read;
    let mut buf = [0u8; 4];
    std::fs::File::from(report).read_exact(&mut buf).ok()?;
    u32::try_from(i32::from_ne_bytes(buf)).ok()
}

fn open_gate(go: &OwnedFd) -> std::io::Result<()> {
    let n = nix::unistd::write(go, &[1u8]).map_err(std::io::Error::from)?;
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::other("short write to the spawn gate"))
    }
}

/// What a VM's scope is described as: the VM, its job and address (`systemctl status`).
pub fn describe_vm(name: &str, job: Option<&super::JobMeta>) -> String {
    match job {
        Some(j) => format!(
            "fkr-qemu VM {name}: job {} of {}/{}{}",
            j.job_id,
            j.owner,
            j.repo,
            j.address.map(|a| format!(" at {a}")).unwrap_or_default()
        ),
        None => format!("fkr-qemu VM {name} (warm, no job yet)"),
    }
}
