//! Re-adoption at start: a daemon that restarts (after a crash, a kill, or a handover for an
//! upgrade) takes over the VMs the previous one left running instead of killing them.
//!
//! Before the sweep, each VM dir is judged from its `vm.json` (written before QEMU was spawned,
//! see `vm::VmMeta`): the VM is taken over when its record names a job with its runner, the VM
//! is within its deadline, Forgejo still lists the job (same id and handle) as waiting or
//! running, the job's runner is still registered, and the driver finds the very QEMU it recorded
//! (pid, start time and command line) with QMP answering (`vm::adopt`). Everything else is left to
//! the sweep, which now skips exactly what was taken over: those VM dirs, their taps and
//! addresses, their tokens and their runners. The log says per VM which and why.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use time::OffsetDateTime;

use super::credentials::{CiUserRef, Credentials, TokenRef};
use super::Config;
use crate::forgejo::{Job, JobStatus, Runner};
use crate::ops::{Metrics, RestartResult};
use crate::secret::Secret;
use crate::types::VmName;
use crate::vm::{self, JobMeta, VmHandle};

/// A VM taken over, with its job as Forgejo lists it now.
pub(crate) struct Found {
    pub name: VmName,
    pub vm: VmHandle,
    pub job: Job,
    pub meta: JobMeta,
    pub token: Option<TokenRef>,
    /// Forgejo shows the job running: its runner picked it up.
    pub picked_up: bool,
    /// What is left of the boot deadline (zero once picked up: it no longer applies).
    pub boot_deadline_left: Duration,
}

/// What the startup sweep must leave alone: everything the taken-over jobs hold.
#[derive(Debug, Default)]
pub(crate) struct Keep {
    pub vms: Vec<VmName>,
    pub taps: Vec<(VmName, Ipv4Addr)>,
    pub tokens: HashSet<String>,
    pub runners: HashSet<i64>,
}

impl Keep {
    pub fn of(found: &[Found]) -> Keep {
        let mut keep = Keep::default();
        for f in found {
            keep.vms.push(f.name.clone());
            if let Some(address) = f.meta.address {
                keep.taps.push((f.name.clone(), address));
            }
            if let Some(t) = &f.meta.token {
                keep.tokens.insert(t.name.clone());
            }
            if let Some(id) = f.meta.runner_id {
                keep.runners.insert(id);
            }
        }
        keep
    }
}

/// How often the two listings are tried before the VMs are left to the sweep.
const LIST_TRIES: u32 = 3;

/// Judges every VM dir and takes over the VMs that qualify (see the module docs).
pub(crate) async fn take_over(cfg: &Config, creds: &Credentials, metrics: &Metrics) -> Vec<Found> {
    let names = vm::vm_dirs(&cfg.vm);
    if names.is_empty() {
        return Vec::new();
    }
    tracing::info!(
        "restart: {} VM dir(s) from before; taking over what still runs its job",
        names.len()
    );
    let listings = list(creds, &cfg.label).await;
    let mut found = Vec::new();
    for name in names {
        match consider(cfg, creds, &name, listings.as_ref()).await {
            Ok(f) => {
                tracing::info!(
                    vm = %name,
                    "restart: VM {name} (job {} of {}/{}): adopted; {}",
                    f.job.id,
                    f.meta.owner,
                    f.meta.repo,
                    if f.picked_up {
                        "its runner is running the job"
                    } else {
                        "waiting for its runner to pick the job up"
                    }
                );
                metrics.restart_vm(RestartResult::Adopted);
                found.push(f);
            }
            Err(why) => {
                tracing::info!(vm = %name, "restart: VM {name}: swept: {why}");
                metrics.restart_vm(RestartResult::Swept);
            }
        }
    }
    found
}

/// The jobs of our label and every runner, or why they could not be listed.
async fn list(creds: &Credentials, label: &str) -> Result<(Vec<Job>, Vec<Runner>), String> {
    let mut last = String::new();
    for attempt in 0..LIST_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let jobs = match creds.client.jobs(&[label]).await {
            Ok(j) => j,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match creds.client.runners().await {
            Ok(r) => return Ok((jobs, r)),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

async fn consider(
    cfg: &Config,
    creds: &Credentials,
    name: &VmName,
    listings: Result<&(Vec<Job>, Vec<Runner>), &String>,
) -> Result<Found, String> {
    let record = vm::record(&cfg.vm, name).ok_or("its vm.json is missing or unreadable")?;
    let meta = record.job.clone().ok_or("its record names no job")?;
    let runner_id = match meta.runner_id {
        Some(id) if !meta.handle.is_empty() => id,
        _ => return Err("its record has no runner or handle (written by an older version)".into()),
    };
    // The local check first: a dead QEMU or a recycled pid needs no question to Forgejo.
    vm::check_process(&record).map_err(|e| e.to_string())?;
    let now = OffsetDateTime::now_utc();
    if record.deadline_at.is_some_and(|d| d <= now) {
        return Err("it is past its deadline".into());
    }
    let (jobs, runners) =
        listings.map_err(|e| format!("cannot ask Forgejo about job {}: {e}", meta.job_id))?;
    let job = jobs
        .iter()
        .find(|j| {
            j.id == meta.job_id
                && j.handle == meta.handle
                && matches!(j.status, JobStatus::Waiting | JobStatus::Running)
        })
        .ok_or_else(|| {
            format!(
                "Forgejo no longer lists job {} (handle {}) as waiting or running",
                meta.job_id, meta.handle
            )
        })?;
    let picked_up = job.status == JobStatus::Running;
    let boot_deadline_left = match meta.boot_deadline_at {
        _ if picked_up => Duration::ZERO,
        Some(at) => Duration::try_from(at - now).unwrap_or_default(),
        None => Duration::ZERO,
    };
    if !picked_up && boot_deadline_left.is_zero() {
        return Err(format!(
            "its runner did not pick job {} up within the boot deadline",
            meta.job_id
        ));
    }
    if !runners.iter().any(|r| r.id == runner_id) {
        return Err(format!("its runner {runner_id} is no longer registered"));
    }
    let vm = vm::adopt(&cfg.vm, name).await.map_err(|e| e.to_string())?;
    let token = match &meta.token {
        Some(t) => Some(token_ref(creds, t).await),
        None => None,
    };
    Ok(Found {
        name: name.clone(),
        vm,
        job: job.clone(),
        meta,
        token,
        picked_up,
        boot_deadline_left,
    })
}

/// The recorded token as the release path revokes it: with the CI user's stored password, or
/// none when the store does not have it (the admin token routes need none; otherwise the revoke
/// takes the user back first, with proof it is ours, like every other password refusal).
async fn token_ref(creds: &Credentials, t: &vm::TokenMeta) -> TokenRef {
    let user = creds
        .stored_users()
        .await
        .into_iter()
        .find(|u| u.username == t.username)
        .unwrap_or_else(|| CiUserRef {
            repo_id: t.user_repo_id,
            username: t.username.clone(),
            password: Secret::new(""),
        });
    TokenRef {
        user,
        id: t.id,
        name: t.name.clone(),
    }
}
