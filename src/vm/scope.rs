//! systemd hosts: every QEMU in a transient scope of its own, registered with systemd-machined.
//!
//! The scope (`machine-<vm>.scope` in `[vm] slice`, `machine.slice` by default) is created with
//! `StartTransientUnit` and the VM's limits as unit properties, and takes over QEMU's pid before
//! QEMU runs (see `sandbox::Gate`). systemd, not the daemon's unit, then owns the VM: a crash, an
//! OOM kill or a restart of `fkr-qemu.service` leaves it running, and the next daemon takes it over
//! (`adopt.rs`). systemd-machined, where installed (`systemd-container`), lists the VM for
//! `machinectl`; without it the scope alone confines and identifies the VM.
//!
//! Everything here talks D-Bus through zbus' generated proxies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use zbus::zvariant::{OwnedObjectPath, Value};

use super::cgroup::Limits;
use super::Error;
use crate::types::VmName;

/// Where systemd mounts the unified hierarchy.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long systemd may take to start a scope (it moves one pid: milliseconds when healthy).
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    #[allow(clippy::type_complexity)]
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<OwnedObjectPath>;

    fn subscribe(&self) -> zbus::Result<()>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn job(&self) -> zbus::Result<(u32, OwnedObjectPath)>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Job",
    default_service = "org.freedesktop.systemd1"
)]
trait Job {
    #[zbus(property)]
    fn job_type(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.machine1.Manager",
    default_service = "org.freedesktop.machine1",
    default_path = "/org/freedesktop/machine1"
)]
trait Machines {
    #[allow(clippy::too_many_arguments)]
    fn register_machine_with_network(
        &self,
        name: &str,
        id: &[u8],
        service: &str,
        class: &str,
        leader: u32,
        root_directory: &str,
        ifindices: &[i32],
    ) -> zbus::Result<OwnedObjectPath>;
}

/// Whether systemd is this host's init (`sd_booted()`: it creates `/run/systemd/system`).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The scope unit of VM (or probe) `name`.
pub fn unit_name(name: &str) -> String {
    format!("machine-{name}.scope")
}

/// The cgroup directory systemd gives unit `unit` in slice `slice`: a slice `a-b.slice` nests in
/// `a.slice` (systemd.slice(5)), so `a-b.slice` → `a.slice/a-b.slice/<unit>`.
pub fn cgroup_dir(slice: &str, unit: &str) -> PathBuf {
    let mut dir = PathBuf::from(CGROUP_ROOT);
    let stem = slice.strip_suffix(".slice").unwrap_or(slice);
    if stem != "-" {
        let parts: Vec<&str> = stem.split('-').collect();
        for i in 1..=parts.len() {
            dir.push(format!("{}.slice", parts[..i].join("-")));
        }
    }
    dir.join(unit)
}

/// What a VM's scope is made with.
#[derive(Debug, Clone)]
pub struct ScopeSpec<'a> {
    /// The scope unit ([`unit_name`]).
    pub unit: String,
    /// The machine to register with systemd-machined (VMs; the accelerator probe is none).
    pub machine: Option<&'a VmName>,
    pub slice: &'a str,
    pub limits: Limits,
    /// `IOWeight=` (1–10000), where configured.
    pub io_weight: Option<u64>,
    /// Shown by `systemctl status` and `machinectl status`: the VM, its job and address.
    pub description: String,
    /// The tap's interface index, for machined (`machinectl status` names the interface).
    pub ifindex: Option<i32>,
}

/// The unit properties of a VM's scope (`systemd.resource-control(5)`).
fn properties<'a>(spec: &'a ScopeSpec<'a>, pid: u32) -> Vec<(&'static str, Value<'a>)> {
    let mut p = vec![
        ("Description", Value::from(spec.description.as_str())),
        ("Slice", Value::from(spec.slice)),
        ("PIDs", Value::from(vec![pid])),
        // An ended or failed scope is removed at once: nothing of a VM outlives it.
        ("CollectMode", Value::from("inactive-or-failed")),
        ("MemoryAccounting", Value::from(true)),
        ("MemoryMax", Value::from(spec.limits.memory_bytes)),
        // Swap would let a VM exceed its limit on the host's disk.
        ("MemorySwapMax", Value::from(0u64)),
        ("TasksAccounting", Value::from(true)),
        ("TasksMax", Value::from(spec.limits.pids)),
        // Like the daemon's unit: only the standard pseudo devices, and KVM.
        ("DevicePolicy", Value::from("closed")),
        ("DeviceAllow", Value::from(vec![("/dev/kvm", "rw")])),
        ("CPUAccounting", Value::from(true)),
        (
            "CPUQuotaPerSecUSec",
            Value::from(u64::from(spec.limits.cpus.max(1)) * 1_000_000),
        ),
    ];
    if let Some(w) = spec.io_weight {
        p.push(("IOAccounting", Value::from(true)));
        p.push(("IOWeight", Value::from(w)));
    }
    p
}

fn dbus_error(what: &str, e: zbus::Error) -> Error {
    Error::Scope(format!("{what}: {e}"))
}

/// The host's systemd over D-Bus (one connection for the daemon's life).
#[derive(Debug, Clone)]
pub struct Systemd {
    bus: zbus::Connection,
    /// Whether systemd-machined answered when the daemon started.
    machined: bool,
}

impl Systemd {
    /// Connects to the system bus and checks that systemd answers on it.
    pub async fn connect() -> Result<Systemd, Error> {
        let bus = zbus::Connection::system().await.map_err(|e| {
            Error::Scope(format!(
                "systemd is this host's init, but its D-Bus system bus does not answer ({e}): \
                 install and start dbus (Debian: `apt-get install dbus`)"
            ))
        })?;
        let manager = ManagerProxy::new(&bus)
            .await
            .map_err(|e| dbus_error("reaching systemd", e))?;
        manager
            .get_unit_by_pid(std::process::id())
            .await
            .map_err(|e| dbus_error("asking systemd for this process's unit", e))?;
        // systemd sends JobRemoved (how a scope's start is seen to finish) only while some client
        // has subscribed; on a host without machined or logind that may be no one but us.
        manager
            .subscribe()
            .await
            .map_err(|e| dbus_error("subscribing to systemd's signals", e))?;
        let machined = machined_available(&bus).await;
        if !machined {
            tracing::info!(
                "systemd-machined is not installed: VMs run in their own scopes but \
                 `machinectl list` will not show them (Debian: `apt-get install systemd-container`)"
            );
        }
        Ok(Systemd { bus, machined })
    }

    pub fn machined(&self) -> bool {
        self.machined
    }

    /// Creates the scope of `spec` holding `pid` (a QEMU still waiting before its exec) and
    /// returns its cgroup directory once systemd has moved the pid there.
    pub async fn create_scope(&self, spec: &ScopeSpec<'_>, pid: u32) -> Result<PathBuf, Error> {
        let unit = spec.unit.as_str();
        let manager = ManagerProxy::new(&self.bus)
            .await
            .map_err(|e| dbus_error("reaching systemd", e))?;
        // Subscribed before the call: the job may end before the call returns.
        let mut removed = manager
            .receive_job_removed()
            .await
            .map_err(|e| dbus_error("watching systemd's jobs", e))?;
        let props = properties(spec, pid);
        let job = manager
            .start_transient_unit(unit, "fail", &props, &[])
            .await
            .map_err(|e| dbus_error(&format!("creating scope {unit}"), e))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job == job {
                    return Some(args.result);
                }
            }
            None
        };
        match tokio::time::timeout(START_TIMEOUT, wait).await {
            Ok(Some(result)) if result == "done" => {}
            Ok(Some(result)) => {
                return Err(Error::Scope(format!(
                    "systemd could not start scope {unit}: job {result}"
                )))
            }
            Ok(None) => return Err(Error::Scope(format!("lost systemd while starting {unit}"))),
            Err(_) => {
                return Err(Error::Scope(format!(
                    "systemd did not start scope {unit} within {}s",
                    START_TIMEOUT.as_secs()
                )))
            }
        }
        let dir = scope_dir_of(pid).ok_or_else(|| {
            Error::Scope(format!(
                "pid {pid} is not in a cgroup of scope {unit} after systemd started it"
            ))
        })?;
        if dir.file_name().and_then(|n| n.to_str()) != Some(unit) {
            return Err(Error::Scope(format!(
                "pid {pid} is in {} instead of scope {unit}",
                dir.display()
            )));
        }
        // An OOM kill takes the whole VM, never a part of QEMU (systemd 252 has no OOMPolicy for
        // scopes; the daemon is root and may write the knob).
        let _ = std::fs::write(dir.join("memory.oom.group"), "1");
        Ok(dir)
    }

    /// Registers VM `name` (leader `pid`) with systemd-machined, where installed. A failure only
    /// costs the `machinectl` view: it is logged, not fatal.
    pub async fn register(&self, spec: &ScopeSpec<'_>, pid: u32) {
        let Some(name) = spec.machine.filter(|_| self.machined) else {
            return;
        };
        let result = async {
            let machines = MachinesProxy::new(&self.bus).await?;
            let ifindices: Vec<i32> = spec.ifindex.into_iter().collect();
            machines
                .register_machine_with_network(
                    name.as_str(),
                    &[],
                    "fkr-qemu",
                    "vm",
                    pid,
                    "",
                    &ifindices,
                )
                .await
                .map(drop)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(vm = %name, "systemd-machined did not register the VM: {e}");
        }
    }

    /// The type of the job systemd is running on this process's own unit (`"restart"` while
    /// `systemctl restart` stops it), if any.
    pub async fn own_job_type(&self) -> Option<String> {
        let manager = ManagerProxy::new(&self.bus).await.ok()?;
        let unit_path = manager.get_unit_by_pid(std::process::id()).await.ok()?;
        let unit = UnitProxy::builder(&self.bus)
            .path(unit_path)
            .ok()?
            .build()
            .await
            .ok()?;
        let (id, job_path) = unit.job().await.ok()?;
        if id == 0 {
            return None;
        }
        let job = JobProxy::builder(&self.bus)
            .path(job_path)
            .ok()?
            .build()
            .await
            .ok()?;
        job.job_type().await.ok()
    }
}

/// Whether systemd-machined runs or can be started on demand (D-Bus activation).
async fn machined_available(bus: &zbus::Connection) -> bool {
    const MACHINED: &str = "org.freedesktop.machine1";
    let Ok(dbus) = zbus::fdo::DBusProxy::new(bus).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from(MACHINED) else {
        return false;
    };
    if dbus.name_has_owner(name).await.unwrap_or(false) {
        return true;
    }
    dbus.list_activatable_names()
        .await
        .is_ok_and(|names| names.iter().any(|n| n.as_str() == MACHINED))
}

/// The unified-hierarchy cgroup directory of process `pid` (`0::<path>` of `/proc/<pid>/cgroup`).
pub fn scope_dir_of(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(Path::new(CGROUP_ROOT).join(path.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_nest_by_their_dashes() {
        assert_eq!(
            cgroup_dir("machine.slice", "machine-fr-0123abcd.scope"),
            Path::new("/sys/fs/cgroup/machine.slice/machine-fr-0123abcd.scope")
        );
        assert_eq!(
            cgroup_dir("fkr-vms.slice", "machine-fr-0123abcd.scope"),
            Path::new("/sys/fs/cgroup/fkr.slice/fkr-vms.slice/machine-fr-0123abcd.scope")
        );
        assert_eq!(
            cgroup_dir("-.slice", "x.scope"),
            Path::new("/sys/fs/cgroup/x.scope")
        );
    }

    #[test]
    fn a_scope_carries_the_vm_limits_and_its_one_pid() {
        let name = VmName::parse("fr-0123abcd").unwrap();
        let spec = ScopeSpec {
            unit: unit_name(name.as_str()),
            machine: Some(&name),
            slice: "machine.slice",
            limits: Limits {
                memory_bytes: 3 << 30,
                pids: 512,
                cpus: 2,
            },
            io_weight: Some(50),
            description: "fkr-qemu VM fr-0123abcd".into(),
            ifindex: Some(7),
        };
        let props = properties(&spec, 4242);
        let get = |k: &str| {
            props
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        assert_eq!(get("MemoryMax"), Value::from(3u64 << 30));
        assert_eq!(get("MemorySwapMax"), Value::from(0u64));
        assert_eq!(get("TasksMax"), Value::from(512u64));
        assert_eq!(get("CPUQuotaPerSecUSec"), Value::from(2_000_000u64));
        assert_eq!(get("IOWeight"), Value::from(50u64));
        assert_eq!(get("PIDs"), Value::from(vec![4242u32]));
        assert_eq!(get("Slice"), Value::from("machine.slice"));
        assert_eq!(spec.unit, "machine-fr-0123abcd.scope");
    }
}
