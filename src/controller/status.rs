//! What the running daemon tells operators: a status snapshot (for the control socket, `status`,
//! `list`), `vm.json` per VM (for `list` when the daemon is down), and events (for metrics).
//!
//! Hook points for `ops`: [`StatusHandle::snapshot`] gives the current [`Status`]; an [`EventSink`]
//! passed to the daemon receives every [`Event`]. Both are cheap and never block on I/O.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::state::JobState;
use super::Error;

/// One VM (one job) as operators see it. Also the content of `<vm dir>/vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `fr-<8 hex>`.
    pub name: String,
    pub job_id: i64,
    /// `owner/repo`, empty until resolved.
    pub repository: String,
    pub state: JobState,
    /// The guest's IPv4 address (without prefix), once assigned.
    pub address: Option<String>,
    /// When the job's VM name was assigned (dispatch time).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `kvm` or `tcg`, once QEMU runs.
    pub accel: Option<String>,
    /// QEMU's pid, once it runs.
    pub pid: Option<u32>,
}

/// The daemon's health and VMs, as the control socket reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// True once the startup sweep finished and discovery runs; false again while shutting down.
    pub ready: bool,
    /// True once a stop signal was received.
    pub stopping: bool,
    /// Jobs seen and waiting for a free VM slot.
    pub queued: usize,
    /// Jobs with a VM slot (preparing, booting, running or cleaning).
    pub running: usize,
    /// The last Forgejo error of the discovery loop, cleared by the next successful poll.
    pub last_forgejo_error: Option<String>,
    pub vms: Vec<VmInfo>,
}

/// Why a VM was removed (the `reason` of the removal counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    /// The guest powered off after its runner exited.
    JobDone,
    /// The job deadline hit.
    Deadline,
    /// The VM never started running the job: launch failed, boot deadline, crash before pick-up.
    BootFailure,
    /// The guest crashed or QEMU died after the job was picked up.
    Crash,
    /// The daemon stopped it (second Ctrl+C).
    Shutdown,
    /// The startup sweep removed a leftover.
    Sweep,
}

impl RemovalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RemovalReason::JobDone => "job_done",
            RemovalReason::Deadline => "deadline",
            RemovalReason::BootFailure => "boot_failure",
            RemovalReason::Crash => "crash",
            RemovalReason::Shutdown => "shutdown",
            RemovalReason::Sweep => "sweep",
        }
    }
}

/// Things that happen, for metrics. Durations are measured by the controller.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A job handle entered the queue for the first time.
    JobSeen { job_id: i64 },
    /// A job left the queue for a VM slot, after `queue_wait`.
    JobDispatched { job_id: i64, queue_wait: Duration },
    /// A queued job was dropped: it was no longer waiting when its turn came.
    JobDropped { job_id: i64 },
    /// QEMU was spawned and answers QMP, `prepare` after dispatch.
    VmStarted { job_id: i64, prepare: Duration },
    /// Forgejo shows the job picked up, `boot` after QEMU started.
    RunnerStarted { job_id: i64, boot: Duration },
    /// The job's VM is gone and cleanup ran; `duration` from dispatch to the VM's end,
    /// `teardown` for the cleanup steps; `outcome` is `done` or `failed`.
    JobFinished {
        job_id: i64,
        outcome: JobState,
        reason: RemovalReason,
        duration: Duration,
        teardown: Duration,
    },
    /// The startup sweep found and removed `count` leftovers of `kind`
    /// (`vm`, `tap`, `token`, `runner`).
    SweepFound { kind: &'static str, count: usize },
    /// A discovery poll failed (the message is in the status).
    PollFailed,
}

/// Receives events (metrics). Must not block.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: &Event);
}

/// An `EventSink` that drops everything.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _: &Event) {}
}

#[derive(Debug, Default)]
struct Inner {
    ready: bool,
    stopping: bool,
    queued: usize,
    last_forgejo_error: Option<String>,
    vms: BTreeMap<String, VmInfo>,
}

/// The shared, live status; clones share it.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle(Arc<Mutex<Inner>>);

impl StatusHandle {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding the lock leaves plain data behind: keep using it.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn snapshot(&self) -> Status {
        self.with(|i| Status {
            ready: i.ready,
            stopping: i.stopping,
            queued: i.queued,
            running: i.vms.len(),
            last_forgejo_error: i.last_forgejo_error.clone(),
            vms: i.vms.values().cloned().collect(),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.with(|i| i.ready = ready);
    }

    pub fn set_stopping(&self) {
        self.with(|i| {
            i.stopping = true;
            i.ready = false;
        });
    }

    pub fn set_queued(&self, n: usize) {
        self.with(|i| i.queued = n);
    }

    pub fn set_forgejo_error(&self, e: Option<String>) {
        self.with(|i| i.last_forgejo_error = e);
    }

    /// Adds or replaces a VM's entry.
    pub fn put_vm(&self, info: VmInfo) {
        self.with(|i| i.vms.insert(info.name.clone(), info));
    }

    /// Changes a VM's entry in place (no-op if it is gone).
    pub fn update_vm(&self, name: &str, f: impl FnOnce(&mut VmInfo)) {
        self.with(|i| {
            if let Some(v) = i.vms.get_mut(name) {
                f(v)
            }
        });
    }

    pub fn vm(&self, name: &str) -> Option<VmInfo> {
        self.with(|i| i.vms.get(name).cloned())
    }

    pub fn remove_vm(&self, name: &str) {
        self.with(|i| i.vms.remove(name));
    }
}

/// Writes `vm.json` into a VM's directory (0600, via a temp file and rename so readers never see half a
/// file). The directory itself belongs to the VM driver, which removes it with the VM.
pub fn write_vm_json(vm_dir: &Path, info: &VmInfo) -> Result<(), Error> {
    use std::io::Write;
    let mut tmp = tempfile::Builder::new()
        .prefix(".vm.json.")
        .tempfile_in(vm_dir)
        .map_err(|e| Error::io("cannot create a temp file in", vm_dir, e))?;
    let json = serde_json::to_vec_pretty(info).expect("VmInfo serialises");
    tmp.write_all(&json)
        .map_err(|e| Error::io("cannot write", tmp.path(), e))?;
    let path = vm_dir.join("vm.json");
    tmp.persist(&path)
        .map_err(|e| Error::io("cannot rename into place", &path, e.error))?;
    Ok(())
}

/// Reads a `vm.json` (for `list` when the daemon is down).
pub fn read_vm_json(vm_dir: &Path) -> Result<VmInfo, Error> {
    let path = vm_dir.join("vm.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io("cannot read", &path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::StateCorrupt {
        path,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> VmInfo {
        VmInfo {
            name: name.into(),
            job_id: 7,
            repository: "alice/web".into(),
            state: JobState::Booting,
            address: Some("10.88.0.5".into()),
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            accel: Some("tcg".into()),
            pid: Some(1234),
        }
    }

    #[test]
    fn snapshot_tracks_vms_and_counts() {
        let h = StatusHandle::default();
        assert_eq!(h.snapshot(), Status::default());
        h.set_ready(true);
        h.set_queued(2);
        h.put_vm(info("fr-00000001"));
        h.put_vm(info("fr-00000002"));
        h.update_vm("fr-00000001", |v| v.state = JobState::Running);
        let s = h.snapshot();
        assert!(s.ready && !s.stopping);
        assert_eq!((s.queued, s.running), (2, 2));
        assert_eq!(s.vms[0].state, JobState::Running);
        h.remove_vm("fr-00000001");
        h.set_stopping();
        let s = h.snapshot();
        assert!(!s.ready && s.stopping);
        assert_eq!(s.running, 1);
        // The snapshot is the control socket's wire format.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
    }

    #[test]
    fn vm_json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        write_vm_json(dir.path(), &info("fr-0000000a")).unwrap();
        let text = std::fs::read_to_string(dir.path().join("vm.json")).unwrap();
        assert!(
            text.contains("\"state\": \"booting\"") && text.contains("\"job_id\": 7"),
            "{text}"
        );
        assert_eq!(read_vm_json(dir.path()).unwrap(), info("fr-0000000a"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
