//! What the daemon reports about itself: readiness, queue, running VMs, last Forgejo error.
//!
//! The JSON form of [`DaemonStatus`] and [`VmInfo`] is a stable interface (the control socket's
//! answers and `fkr-qemu list --json` / `status --json` print it): fields are only ever added,
//! never renamed or removed. Times are RFC 3339 in UTC; absent optional values are `null`.
//!
//! The controller owns a [`StatusBoard`] and updates it as jobs move; the control socket reads it
//! through the [`StatusSource`] trait.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::metrics::Metrics;
use crate::types::{Accel, JobState};

/// Where a VM is in its life: the state of the job that owns it (the controller's
/// [`JobState`] machine, exactly), or, when `list` reads the runtime dir without a daemon, what is
/// left on disk. Serialised as the bare state name (`"booting"`, `"stale"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VmState {
    /// Owned by a running daemon's job: `preparing`, `booting`, `running` or `cleaning`.
    Job(JobState),
    /// Found on disk with no daemon answering.
    Left(LeftState),
    /// A warm VM of the pool, holding no job (`warming`, `warm`).
    Pool(PoolState),
}

/// A warm VM's state before a job is bound to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    /// Booting; its agent has not said READY yet.
    Warming,
    /// Ready for the next job.
    Warm,
}

/// What `list` finds in the runtime dir when no daemon answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftState {
    /// A live qemu: the next start's sweep removes it.
    Orphaned,
    /// A per-VM dir whose qemu is gone, left for the sweep.
    Stale,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Job(s) => s.as_str(),
            VmState::Left(LeftState::Orphaned) => "orphaned",
            VmState::Left(LeftState::Stale) => "stale",
            VmState::Pool(PoolState::Warming) => "warming",
            VmState::Pool(PoolState::Warm) => "warm",
        }
    }
}

impl From<JobState> for VmState {
    fn from(s: JobState) -> Self {
        VmState::Job(s)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `fr-<8 hex>`; also its tap and runner name.
    pub name: String,
    /// The Forgejo job id it runs.
    pub job_id: i64,
    pub owner: String,
    pub repo: String,
    pub state: VmState,
    /// The guest's IP address, when known.
    pub address: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// `kvm` or `tcg`, once QEMU runs.
    pub accel: Option<Accel>,
    /// The qemu process id, once spawned.
    pub pid: Option<u32>,
    /// The serial console log (`fkr-qemu console` reads it).
    pub serial_log: Option<PathBuf>,
    /// Its sandbox and its use of memory and disk against their limits, once QEMU runs.
    #[serde(default)]
    pub limits: Option<VmLimits>,
}

impl VmInfo {
    /// A VM entering the board now, before its QEMU runs (no address, pid or limits yet).
    pub fn new(name: &str, job_id: i64, owner: &str, repo: &str, state: VmState) -> VmInfo {
        VmInfo {
            name: name.to_owned(),
            job_id,
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            state,
            address: None,
            started_at: OffsetDateTime::now_utc(),
            accel: None,
            pid: None,
            serial_log: None,
            limits: None,
        }
    }
}

/// Who a VM's QEMU runs as and what it may use; `*_used` are read when the status is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLimits {
    /// QEMU's uid (`null` when the daemon is not root and QEMU runs as the daemon's user).
    pub uid: Option<u32>,
    /// The VM's cgroup directory (v1: the memory hierarchy's).
    pub cgroup: Option<PathBuf>,
    /// systemd hosts: the VM's scope unit (`systemctl status <scope>`).
    #[serde(default)]
    pub scope: Option<String>,
    pub memory_used: Option<u64>,
    pub memory_max: Option<u64>,
    /// The overlay's allocated bytes on the host, against `disk_max`.
    pub disk_used: Option<u64>,
    pub disk_max: u64,
    pub overlay: PathBuf,
}

impl VmLimits {
    /// Reads the live figures (cgroup memory, the overlay's allocated size).
    pub fn refresh(&mut self) {
        if let Some(cg) = &self.cgroup {
            self.memory_used = crate::vm::cgroup::memory_current(cg);
            self.memory_max = crate::vm::cgroup::memory_max(cg);
        }
        self.disk_used = Some(crate::vm::allocated_bytes(&self.overlay));
    }
}

/// The last error a Forgejo call returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The error's message (never contains a secret: errors are built from `Secret`-redacted values).
    pub message: String,
}

/// The daemon's health and VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The startup sweep is done and discovery runs.
    pub ready: bool,
    /// Discovery stopped (first SIGINT/SIGTERM): waiting for in-flight VMs.
    pub draining: bool,
    /// Jobs waiting for a free VM slot.
    pub queued: usize,
    /// VMs that exist (any state).
    pub running: usize,
    pub last_forgejo_error: Option<LastError>,
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub version: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    pub vms: Vec<VmInfo>,
    /// The runners every host serving this Forgejo holds (this one included), as Forgejo listed
    /// them at `fleet_at`; empty until the first listing.
    #[serde(default)]
    pub fleet: Vec<FleetRunner>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub fleet_at: Option<OffsetDateTime>,
    /// The daemon hands its VMs over on SIGUSR2 (`fkr-qemu handover`). Absent (false) from
    /// versions before that, to which SIGUSR2 is fatal.
    #[serde(default)]
    pub handover: bool,
    /// Revocations, runner deletions and looks for lost creations on Forgejo that the background
    /// cleanup still has to do (it retries them while the daemon runs).
    #[serde(default)]
    pub forgejo_cleanup_pending: usize,
}

/// One runner of a host of the fleet (from its description `fkr-qemu@<host> job <id> …`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRunner {
    pub host: String,
    pub job_id: i64,
    /// `fr-<8 hex>`: the VM's name on that host.
    pub name: String,
    /// Forgejo's view: `offline` (booting, or its host died), `idle`, `active`.
    pub status: String,
}

impl DaemonStatus {
    /// A fresh status of this process: not ready, nothing queued, no VMs.
    pub fn new() -> Self {
        DaemonStatus {
            ready: false,
            draining: false,
            queued: 0,
            running: 0,
            last_forgejo_error: None,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: OffsetDateTime::now_utc(),
            vms: Vec::new(),
            fleet: Vec::new(),
            fleet_at: None,
            handover: true,
            forgejo_cleanup_pending: 0,
        }
    }
}

impl Default for DaemonStatus {
    fn default() -> Self {
        Self::new()
    }
}

/// Anything that can produce the current status (the control socket asks on every request).
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> DaemonStatus;
}

impl<F> StatusSource for F
where
    F: Fn() -> DaemonStatus + Send + Sync + 'static,
{
    fn status(&self) -> DaemonStatus {
        self()
    }
}

impl StatusSource for tokio::sync::watch::Receiver<DaemonStatus> {
    fn status(&self) -> DaemonStatus {
        self.borrow().clone()
    }
}

/// The controller's live status: cheap to clone (shared), updated with typed methods. When given
/// a [`Metrics`], it keeps the `vms_running` and `jobs_queued` gauges equal to what it reports.
#[derive(Clone, Debug)]
pub struct StatusBoard {
    state: Arc<RwLock<DaemonStatus>>,
    metrics: Option<Metrics>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self::new(None)
    }
}

impl StatusBoard {
    pub fn new(metrics: Option<Metrics>) -> Self {
        StatusBoard {
            state: Arc::new(RwLock::new(DaemonStatus::new())),
            metrics,
        }
    }

    fn update<R>(&self, f: impl FnOnce(&mut DaemonStatus) -> R) -> R {
        // A panic while holding the lock cannot leave the status half-updated in a way that
        // matters (every field is independently meaningful), so recover from poisoning.
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut s);
        s.running = s.vms.len();
        if let Some(m) = &self.metrics {
            m.set_vms_running(s.running);
            m.set_jobs_queued(s.queued);
            let cgroups: Vec<(&str, String)> = s
                .vms
                .iter()
                .filter_map(|v| {
                    let l = v.limits.as_ref()?;
                    let at = match (&l.scope, &l.cgroup) {
                        (Some(scope), _) => scope.clone(),
                        (None, Some(dir)) => dir.display().to_string(),
                        (None, None) => return None,
                    };
                    Some((v.name.as_str(), at))
                })
                .collect();
            m.set_vm_cgroups(cgroups.iter().map(|(v, c)| (*v, c.as_str())));
        }
        r
    }

    /// The startup sweep is done; discovery begins.
    pub fn set_ready(&self, ready: bool) {
        self.update(|s| s.ready = ready);
    }

    /// Shutdown began: no new jobs, waiting for in-flight VMs.
    pub fn set_draining(&self) {
        self.update(|s| s.draining = true);
    }

    pub fn set_queued(&self, queued: usize) {
        self.update(|s| s.queued = queued);
    }

    /// The fleet's runners as Forgejo just listed them.
    pub fn set_fleet(&self, fleet: Vec<FleetRunner>) {
        self.update(|s| {
            s.fleet = fleet;
            s.fleet_at = Some(OffsetDateTime::now_utc());
        });
    }

    /// The background cleanup has `n` chores left.
    pub fn set_cleanup_pending(&self, n: usize) {
        self.update(|s| s.forgejo_cleanup_pending = n);
    }

    /// Records a Forgejo error (the last one wins).
    pub fn forgejo_error(&self, message: impl Into<String>) {
        let e = LastError {
            at: OffsetDateTime::now_utc(),
            message: message.into(),
        };
        self.update(|s| s.last_forgejo_error = Some(e));
    }

    /// Adds a VM (or replaces the one with the same name).
    pub fn vm_added(&self, vm: VmInfo) {
        self.update(|s| {
            s.vms.retain(|v| v.name != vm.name);
            s.vms.push(vm);
        });
    }

    /// Changes a VM's fields in place; returns false when no VM has that name.
    pub fn vm_update(&self, name: &str, f: impl FnOnce(&mut VmInfo)) -> bool {
        self.update(|s| match s.vms.iter_mut().find(|v| v.name == name) {
            Some(v) => {
                f(v);
                true
            }
            None => false,
        })
    }

    /// Sets a VM's state; returns false when no VM has that name.
    pub fn vm_state(&self, name: &str, state: JobState) -> bool {
        self.vm_update(name, |v| v.state = state.into())
    }

    /// Removes a VM once it is torn down.
    pub fn vm_removed(&self, name: &str) {
        self.update(|s| s.vms.retain(|v| v.name != name));
    }

    pub fn snapshot(&self) -> DaemonStatus {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl StatusSource for StatusBoard {
    fn status(&self) -> DaemonStatus {
        let mut s = self.snapshot();
        for limits in s.vms.iter_mut().filter_map(|v| v.limits.as_mut()) {
            limits.refresh();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn vm(name: &str) -> VmInfo {
        VmInfo {
            name: name.into(),
            job_id: 7,
            owner: "alice".into(),
            repo: "proj".into(),
            state: VmState::Job(JobState::Preparing),
            address: None,
            started_at: OffsetDateTime::UNIX_EPOCH,
            accel: None,
            pid: None,
            serial_log: None,
            limits: None,
        }
    }

    #[test]
    fn board_tracks_vms_and_gauges() {
        let m = Metrics::new();
        let b = StatusBoard::new(Some(m.clone()));
        b.set_queued(4);
        b.vm_added(vm("fr-00000001"));
        b.vm_added(vm("fr-00000002"));
        assert!(b.vm_state("fr-00000001", JobState::Running));
        assert!(!b.vm_state("fr-ffffffff", JobState::Running));
        let s = b.snapshot();
        assert_eq!(s.running, 2);
        assert_eq!(s.vms[0].state, VmState::Job(JobState::Running));
        assert!(m.encode().contains("fkr_qemu_vms_running 2\n"));
        assert!(m.encode().contains("fkr_qemu_jobs_queued 4\n"));
        b.vm_removed("fr-00000001");
        assert_eq!(b.snapshot().running, 1);
        assert!(m.encode().contains("fkr_qemu_vms_running 1\n"));
    }

    #[test]
    fn json_shape_is_stable() {
        let mut s = DaemonStatus::new();
        s.pid = 1;
        s.version = "0.1.0".into();
        s.started_at = OffsetDateTime::UNIX_EPOCH;
        s.vms.push(vm("fr-0000000a"));
        s.running = 1;
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ready": false, "draining": false, "queued": 0, "running": 1,
                "last_forgejo_error": null, "pid": 1, "version": "0.1.0",
                "started_at": "1970-01-01T00:00:00Z",
                "fleet": [], "fleet_at": null, "handover": true, "forgejo_cleanup_pending": 0,
                "vms": [{
                    "name": "fr-0000000a", "job_id": 7, "owner": "alice", "repo": "proj",
                    "state": "preparing", "address": null, "started_at": "1970-01-01T00:00:00Z",
                    "accel": null, "pid": null, "serial_log": null, "limits": null
                }]
            })
        );
        let back: DaemonStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
