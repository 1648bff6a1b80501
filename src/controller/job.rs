//! One job, from dispatch to cleanup: resolve the repository, ensure its CI user, mint the job's
//! token, register the ephemeral runner, lease an address and a tap, write the seed, launch the VM
//! with the job deadline, wait for it, then release everything.
//!
//! Ownership: every Forgejo-side and host-side resource of the job lives in one [`JobResources`]. Its
//! [`JobResources::release`] runs each release step even when an earlier one failed (failures are
//! logged; the startup sweep finds what is left). If the job's task is cancelled or panics before that,
//! `Drop` releases what it can: the tap and address synchronously (their own `Drop`), the token and
//! the runner on a spawned task. The VM process and its directory belong to the driver's `VmHandle`,
//! whose `Drop` stops the VM and removes its files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ciuser::{ci_username, CiUser};
use super::state::JobState;
use super::userdata::{self, RegistryAuth, RunnerParams};
use super::Ctx;
use crate::forgejo::{self, Job, UserCreation, TOKEN_SCOPES};
use crate::ops::{JobOutcome, RemovalReason, VmInfo, VmState};
use crate::secret::Secret;
use crate::vm::{self, Outcome, Seed, VmName, VmSpec};

/// A job taken from the queue, and how the scheduler tells it that Forgejo shows it picked up.
pub(crate) struct Ticket {
    pub job: Job,
    pub seen_at: Instant,
    pub picked_up: watch::Receiver<bool>,
}

/// What the scheduler learns when a job's task ends.
#[derive(Debug)]
pub(crate) struct Report {
    pub outcome: JobOutcome,
    /// The runner picked the job up (Forgejo showed it running).
    pub picked_up: bool,
}

/// A job-level failure before or while launching (logged, then cleanup runs).
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error(transparent)]
    Forgejo(#[from] forgejo::Error),
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error(transparent)]
    Net(#[from] crate::net::Error),
    #[error(transparent)]
    Controller(#[from] super::Error),
}

/// The job's token: enough to revoke it.
#[derive(Debug, Clone)]
struct TokenRef {
    username: String,
    password: Secret,
    id: i64,
    name: String,
}

/// Every resource of one job; see the module docs.
pub(crate) struct JobResources {
    ctx: Arc<Ctx>,
    vm_name: String,
    owner_repo: (String, String),
    token: Option<TokenRef>,
    runner_id: Option<i64>,
    tap: Option<crate::net::Tap>,
    lease: Option<crate::net::Lease>,
}

impl JobResources {
    fn new(ctx: Arc<Ctx>, vm_name: String) -> Self {
        Self {
            ctx,
            vm_name,
            owner_repo: Default::default(),
            token: None,
            runner_id: None,
            tap: None,
            lease: None,
        }
    }

    /// Releases everything, each step regardless of the others; returns how many steps failed.
    async fn release(&mut self) -> usize {
        let mut failed = 0;
        if let Some(t) = self.token.take() {
            if let Err(e) = revoke_token(&self.ctx, &self.owner_repo, &t).await {
                tracing::warn!(vm = %self.vm_name, "cannot revoke token {} of {}: {e} (left for the startup sweep)", t.name, t.username);
                failed += 1;
            }
        }
        if let Some(id) = self.runner_id.take() {
            match self.ctx.forgejo.delete_runner(id).await {
                Ok(true) => tracing::debug!(vm = %self.vm_name, "deleted runner {id}"),
                Ok(false) => tracing::debug!(vm = %self.vm_name, "runner {id} was already gone"),
                Err(e) => {
                    tracing::warn!(vm = %self.vm_name, "cannot delete runner {id}: {e} (left for the startup sweep)");
                    failed += 1;
                }
            }
        }
        // Tap and lease release themselves when dropped (the tap deletes its link).
        self.tap.take();
        self.lease.take();
        failed
    }
}

impl Drop for JobResources {
    fn drop(&mut self) {
        if self.token.is_none() && self.runner_id.is_none() {
            return;
        }
        // Only reached when the job's task was cancelled or panicked before `release`.
        let (ctx, owner_repo, token, runner) = (
            self.ctx.clone(),
            self.owner_repo.clone(),
            self.token.take(),
            self.runner_id.take(),
        );
        let vm_name = self.vm_name.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Some(t) = token {
                        if let Err(e) = revoke_token(&ctx, &owner_repo, &t).await {
                            tracing::warn!(vm = %vm_name, "cannot revoke token {}: {e} (left for the startup sweep)", t.name);
                        }
                    }
                    if let Some(id) = runner {
                        if let Err(e) = ctx.forgejo.delete_runner(id).await {
                            tracing::warn!(vm = %vm_name, "cannot delete runner {id}: {e} (left for the startup sweep)");
                        }
                    }
                });
            }
            Err(_) => {
                tracing::warn!(vm = %vm_name, "no runtime left to revoke the token and delete the runner; the startup sweep will")
            }
        }
    }
}

/// Revokes a job token; when the stored password no longer works (someone changed it), takes the
/// user back with a new password and retries once.
async fn revoke_token(
    ctx: &Ctx,
    owner_repo: &(String, String),
    t: &TokenRef,
) -> Result<(), JobError> {
    match ctx
        .forgejo
        .delete_token(&t.username, &t.password, t.id)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(401) => {
            let password = reset_password(ctx, &owner_repo.0, &owner_repo.1, &t.username).await?;
            ctx.forgejo
                .delete_token(&t.username, &password, t.id)
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets a new password for a CI user we own and stores it.
pub(crate) async fn reset_password(
    ctx: &Ctx,
    owner: &str,
    repo: &str,
    username: &str,
) -> Result<Secret, JobError> {
    let mut store = ctx.users.lock().await;
    let password = forgejo::generate_password();
    ctx.forgejo.set_user_password(username, &password).await?;
    let created_at = store
        .get(owner, repo)
        .map_or_else(OffsetDateTime::now_utc, |u| u.created_at);
    store.put(
        owner,
        repo,
        CiUser {
            username: username.to_owned(),
            repository: format!("{owner}/{repo}"),
            password: password.clone(),
            created_at,
        },
    )?;
    tracing::info!("reset the password of CI user {username} (the stored one was refused)");
    Ok(password)
}

/// The CI user of `owner/repo`, created on first use. Concurrent jobs of one repository create it
/// once (the store's lock is held across the creation).
pub(crate) async fn ensure_ci_user(
    ctx: &Ctx,
    owner: &str,
    repo: &str,
) -> Result<(String, Secret), JobError> {
    let mut store = ctx.users.lock().await;
    if let Some(u) = store.get(owner, repo) {
        return Ok((u.username.clone(), u.password.clone()));
    }
    let username = ci_username(owner, repo);
    let new = ctx.forgejo.new_ci_user(&username);
    let (email, password) = (new.email.clone(), new.password.clone());
    tracing::info!("creating CI user {username} for {owner}/{repo}");
    match ctx.forgejo.create_user(&new).await? {
        UserCreation::Created(_) => {}
        UserCreation::AlreadyExists { message } => {
            // We lost its password (state dir wiped, another host). Take it back only if it is
            // recognisably ours: our e-mail address. A human's account of that name is left alone.
            let existing = ctx.forgejo.user(&username).await?;
            match existing {
                Some(u) if u.email.eq_ignore_ascii_case(&email) => {
                    tracing::info!("CI user {username} exists already; resetting its password");
                    ctx.forgejo.set_user_password(&username, &password).await?;
                }
                _ => {
                    return Err(super::Error::InvalidInput(format!(
                        "cannot create CI user {username} for {owner}/{repo}: {message}; an account of \
                         that name exists and is not one of ours (its e-mail is not {email})"
                    ))
                    .into())
                }
            }
        }
    }
    store.put(
        owner,
        repo,
        CiUser {
            username: username.clone(),
            repository: format!("{owner}/{repo}"),
            password: password.clone(),
            created_at: OffsetDateTime::now_utc(),
        },
    )?;
    Ok((username, password))
}

fn outcome_of(exit: &Outcome, picked_up: bool, boot_timeout: bool) -> JobOutcome {
    match exit {
        Outcome::GuestPoweredOff => JobOutcome::Completed,
        Outcome::DeadlineExceeded { .. } => JobOutcome::Deadline,
        Outcome::HostStopped { .. } if boot_timeout => JobOutcome::BootFailure,
        Outcome::HostStopped { .. } => JobOutcome::Shutdown,
        Outcome::GuestCrashed { .. } | Outcome::QemuExited { .. } if picked_up => {
            JobOutcome::Crashed
        }
        Outcome::GuestCrashed { .. } | Outcome::QemuExited { .. } => JobOutcome::BootFailure,
    }
}

fn removal_reason(o: JobOutcome) -> RemovalReason {
    match o {
        JobOutcome::Completed | JobOutcome::Crashed => RemovalReason::JobDone,
        JobOutcome::Deadline => RemovalReason::Deadline,
        JobOutcome::BootFailure | JobOutcome::PrepareFailed => RemovalReason::BootFailure,
        JobOutcome::Shutdown => RemovalReason::Shutdown,
    }
}

fn move_to(state: &mut JobState, to: JobState, vm: &str) {
    if let Err(e) = state.transition(to) {
        // A bug, not an operational error: say so loudly, keep going with cleanup.
        tracing::error!(vm, "{e}");
    } else {
        tracing::debug!(vm, "job state: {to}");
    }
}

/// Runs one job to the end. Never fails: every failure becomes the outcome and a log line.
pub(crate) async fn run(ctx: Arc<Ctx>, mut ticket: Ticket, stop: CancellationToken) -> Report {
    let job_id = ticket.job.id;
    let name = VmName::generate();
    let dispatched = Instant::now();
    let mut state = JobState::Queued;
    move_to(&mut state, JobState::Preparing, name.as_str());
    ctx.board.vm_added(VmInfo {
        name: name.to_string(),
        job_id: u64::try_from(job_id).unwrap_or_default(),
        owner: String::new(),
        repo: String::new(),
        state: VmState::Preparing,
        address: None,
        started_at: OffsetDateTime::now_utc(),
        accel: None,
        pid: None,
        serial_log: None,
    });
    ctx.metrics
        .job_dispatched(dispatched.saturating_duration_since(ticket.seen_at));

    let mut res = JobResources::new(ctx.clone(), name.to_string());
    let mut picked_up = false;
    let mut launched = false;
    let outcome = match prepare_and_launch(&ctx, &ticket, &name, &mut res, dispatched).await {
        Err(e) => {
            tracing::error!(vm = %name, "job {job_id}: preparing the VM failed: {e}");
            JobOutcome::PrepareFailed
        }
        Ok(handle) => {
            launched = true;
            tracing::info!("VM {name} started for job {job_id}");
            move_to(&mut state, JobState::Booting, name.as_str());
            ctx.board.vm_update(name.as_str(), |v| {
                v.state = VmState::Booting;
                v.pid = Some(handle.pid());
                v.accel = Some(handle.accel().accel.to_string());
                v.serial_log = Some(handle.serial_log().to_owned());
            });
            let started = Instant::now();
            let vm_stop = handle.stop_token();
            let wait = handle.wait();
            tokio::pin!(wait);
            let boot_deadline = tokio::time::sleep(ctx.cfg.boot_deadline);
            tokio::pin!(boot_deadline);
            let mut boot_timeout = false;
            let mut host_stop = false;
            let exit = loop {
                tokio::select! {
                    exit = &mut wait => break exit,
                    changed = ticket.picked_up.changed(), if !picked_up => {
                        if changed.is_ok() && *ticket.picked_up.borrow() {
                            picked_up = true;
                            move_to(&mut state, JobState::Running, name.as_str());
                            ctx.board.vm_state(name.as_str(), VmState::Running);
                            ctx.metrics.observe_boot(started.elapsed());
                            tracing::info!(vm = %name, "job {job_id} picked up by its runner");
                        } else if changed.is_err() {
                            // The scheduler is gone (daemon exiting): nothing more to learn.
                            picked_up = true;
                        }
                    }
                    () = &mut boot_deadline, if !picked_up && !boot_timeout => {
                        tracing::warn!(vm = %name, "job {job_id}: the runner did not pick the job up within {}s; stopping the VM", ctx.cfg.boot_deadline.as_secs());
                        boot_timeout = true;
                        vm_stop.cancel();
                    }
                    () = stop.cancelled(), if !host_stop => {
                        tracing::info!(vm = %name, "stopping VM {name} (job {job_id}): the daemon is shutting down");
                        host_stop = true;
                        vm_stop.cancel();
                    }
                }
            };
            move_to(&mut state, JobState::Cleaning, name.as_str());
            match exit {
                Ok(exit) => {
                    if let Some(e) = &exit.teardown_error {
                        tracing::warn!(vm = %name, "VM teardown: {e}");
                    }
                    let o = outcome_of(&exit.outcome, picked_up, boot_timeout);
                    tracing::debug!(vm = %name, "VM outcome: {:?}", exit.outcome);
                    o
                }
                Err(e) => {
                    tracing::error!(vm = %name, "job {job_id}: the VM failed: {e}");
                    if picked_up {
                        JobOutcome::Crashed
                    } else {
                        JobOutcome::BootFailure
                    }
                }
            }
        }
    };
    if state != JobState::Cleaning {
        move_to(&mut state, JobState::Cleaning, name.as_str());
    }
    ctx.board.vm_state(name.as_str(), VmState::Stopping);
    let ended = Instant::now();
    let failed = res.release().await;
    let teardown = ended.elapsed();
    ctx.metrics.observe_teardown(teardown);
    ctx.metrics.job_finished(outcome, dispatched.elapsed());
    if launched {
        ctx.metrics.vm_removed(removal_reason(outcome));
    }
    ctx.board.vm_removed(name.as_str());
    move_to(
        &mut state,
        if outcome == JobOutcome::Completed {
            JobState::Done
        } else {
            JobState::Failed
        },
        name.as_str(),
    );
    if launched {
        tracing::info!("VM {name} finished (job {job_id})");
    }
    tracing::info!(
        vm = %name,
        "job {job_id}: {state} ({}), cleanup {}",
        outcome.as_str(),
        if failed == 0 { "complete".to_owned() } else { format!("left {failed} step(s) for the sweep") }
    );
    Report { outcome, picked_up }
}

async fn prepare_and_launch(
    ctx: &Arc<Ctx>,
    ticket: &Ticket,
    name: &VmName,
    res: &mut JobResources,
    dispatched: Instant,
) -> Result<vm::VmHandle, JobError> {
    let job = &ticket.job;
    let repo = ctx.forgejo.repository(job.repo_id).await?;
    let (owner, repo_name) = (repo.owner.clone(), repo.name.clone());
    tracing::info!(
        "dispatch job {} for {owner}/{repo_name} (vm={name})",
        job.id
    );
    res.owner_repo = (owner.clone(), repo_name.clone());
    ctx.board.vm_update(name.as_str(), |v| {
        v.owner.clone_from(&owner);
        v.repo.clone_from(&repo_name);
    });

    let (username, mut password) = ensure_ci_user(ctx, &owner, &repo_name).await?;
    let token_name = forgejo::token_name(job.id);
    let minted = match ctx
        .forgejo
        .create_token(&username, &password, &token_name, &TOKEN_SCOPES)
        .await
    {
        Err(e) if e.status() == Some(401) => {
            password = reset_password(ctx, &owner, &repo_name, &username).await?;
            ctx.forgejo
                .create_token(&username, &password, &token_name, &TOKEN_SCOPES)
                .await?
        }
        other => other?,
    };
    res.token = Some(TokenRef {
        username: username.clone(),
        password,
        id: minted.id,
        name: minted.name.clone(),
    });

    let description = format!("{} job {} {owner}/{repo_name}", ctx.runner_marker, job.id);
    let runner = ctx
        .forgejo
        .register_runner(name.as_str(), &description)
        .await?;
    res.runner_id = Some(runner.id);

    let lease = ctx.net().allocate_address()?;
    let address = lease.address();
    let tap = ctx.net().create_tap(name.as_str(), &lease)?;
    let mac = tap.mac();
    let network_config = ctx.net().network_config(&lease, mac);
    let net_device = tap.net_device()?;
    res.lease = Some(lease);
    res.tap = Some(tap);
    ctx.board
        .vm_update(name.as_str(), |v| v.address = Some(address.to_string()));

    let runner_url = ctx.cfg.runner_url();
    let user_data = userdata::render(
        &RunnerParams {
            forgejo_url: runner_url,
            runner_uuid: &runner.uuid,
            runner_token: &runner.token,
            label: &ctx.cfg.label,
            handle: &job.handle,
        },
        &RegistryAuth {
            host: RegistryAuth::host_of(runner_url),
            username: &username,
            token: &minted.token,
        },
    )?;
    let seed = Seed {
        instance_id: name.to_string(),
        hostname: name.to_string(),
        user_data,
        network_config: Some(network_config),
    };
    let mut spec = VmSpec::new(
        name.clone(),
        ctx.cfg.base_image.clone(),
        seed,
        ctx.cfg.job_deadline,
    );
    spec.net = Some(net_device);
    spec.meta = BTreeMap::from([
        ("job_id".to_owned(), job.id.into()),
        ("owner".to_owned(), owner.clone().into()),
        ("repo".to_owned(), repo_name.clone().into()),
        ("address".to_owned(), address.to_string().into()),
    ]);
    let handle = vm::launch(&ctx.cfg.vm, spec).await?;
    ctx.metrics.observe_prepare(dispatched.elapsed());
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::StopStep;

    #[test]
    fn outcomes_from_vm_exits() {
        let off = Outcome::GuestPoweredOff;
        assert_eq!(outcome_of(&off, true, false), JobOutcome::Completed);
        let dl = Outcome::DeadlineExceeded {
            stopped_by: StopStep::Quit,
        };
        assert_eq!(outcome_of(&dl, true, false), JobOutcome::Deadline);
        let host = Outcome::HostStopped {
            stopped_by: StopStep::Powerdown,
        };
        assert_eq!(outcome_of(&host, false, true), JobOutcome::BootFailure);
        assert_eq!(outcome_of(&host, true, false), JobOutcome::Shutdown);
        let crash = Outcome::GuestCrashed {
            reason: "guest-reset".into(),
        };
        assert_eq!(outcome_of(&crash, true, false), JobOutcome::Crashed);
        assert_eq!(outcome_of(&crash, false, false), JobOutcome::BootFailure);
        assert_eq!(
            removal_reason(JobOutcome::Completed),
            RemovalReason::JobDone
        );
        assert_eq!(
            removal_reason(JobOutcome::Deadline),
            RemovalReason::Deadline
        );
        assert_eq!(
            removal_reason(JobOutcome::Shutdown),
            RemovalReason::Shutdown
        );
    }
}
