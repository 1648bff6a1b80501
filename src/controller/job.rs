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

use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ciuser::{candidate_usernames, marked_repo, marker, CiUser};
use super::config::ForkAccess;
use super::userdata::{self, RegistryAuth, RunnerParams};
use super::Ctx;
use crate::forgejo::{self, Job, Repository, UserCreation, READ_TOKEN_SCOPES, TOKEN_SCOPES};
use crate::ops::{JobOutcome, RemovalReason, TokenAccess, VmInfo, VmLimits};
use crate::secret::Secret;
use crate::types::{Accel, JobState, VmName};
use crate::vm::{self, Outcome, Seed, VmSpec};

/// A job taken from the queue, and how the scheduler tells it that Forgejo shows it picked up.
pub(crate) struct Ticket {
    pub job: Job,
    pub seen_at: Instant,
    pub picked_up: watch::Receiver<bool>,
    /// The disk space admitted for the job's VM.
    pub disk: Option<vm::DiskReservation>,
}

/// What the scheduler learns when a job's task ends.
#[derive(Debug)]
pub(crate) struct Report {
    pub outcome: JobOutcome,
    /// The runner picked the job up (Forgejo showed it running).
    pub picked_up: bool,
    /// The host's accelerator failed the guest under `accel = "auto"`: KVM is now marked broken,
    /// and the job should get a fresh VM (under TCG) if it is still waiting.
    pub retry: Option<super::queue::Queued>,
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
    /// The job's repository id (whose CI user holds the token).
    repo_id: i64,
    token: Option<TokenRef>,
    runner_id: Option<i64>,
    tap: Option<crate::net::Tap>,
    lease: Option<crate::net::Lease>,
}

impl JobResources {
    pub(crate) fn new(ctx: Arc<Ctx>, vm_name: String) -> Self {
        Self {
            ctx,
            vm_name,
            repo_id: 0,
            token: None,
            runner_id: None,
            tap: None,
            lease: None,
        }
    }

    /// Releases everything, each step regardless of the others; returns how many steps failed.
    pub(crate) async fn release(&mut self) -> usize {
        let mut failed = 0;
        if let Some(t) = self.token.take() {
            if let Err(e) = revoke_token(&self.ctx, self.repo_id, &t).await {
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
        let (ctx, repo_id, token, runner) = (
            self.ctx.clone(),
            self.repo_id,
            self.token.take(),
            self.runner_id.take(),
        );
        let vm_name = self.vm_name.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Some(t) = token {
                        if let Err(e) = revoke_token(&ctx, repo_id, &t).await {
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
/// user back with a new password (only with proof it is ours) and retries once.
async fn revoke_token(ctx: &Ctx, repo_id: i64, t: &TokenRef) -> Result<(), JobError> {
    match ctx
        .forgejo
        .delete_token(&t.username, &t.password, t.id)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(401) => {
            let password = reset_password(ctx, repo_id, &t.username).await?;
            ctx.forgejo
                .delete_token(&t.username, &password, t.id)
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets a new password for the stored CI user of repository `repo_id` and stores it — only when
/// the Forgejo account of that name still carries our marker for that repository. (A stored name
/// proves nothing once the account may have been deleted and registered again by someone else.)
pub(crate) async fn reset_password(
    ctx: &Ctx,
    repo_id: i64,
    username: &str,
) -> Result<Secret, JobError> {
    let mut store = ctx.users.lock().await;
    let Some(stored) = store.get(repo_id).cloned() else {
        return Err(super::Error::InvalidInput(format!(
            "no CI user of repository id {repo_id} in {}",
            store.path().display()
        ))
        .into());
    };
    let existing = ctx.forgejo.user(username).await?;
    let proven = existing
        .as_ref()
        .and_then(|u| marked_repo(&u.login_name, u.source_id))
        == Some(repo_id);
    if !proven {
        ctx.metrics.ci_user_refused();
        return Err(super::Error::CiUserRefused {
            username: username.to_owned(),
            repository: stored.repository.clone(),
            repo_id,
            why: match existing {
                None => "the account no longer exists in Forgejo".to_owned(),
                Some(_) => "its stored password is refused and the account does not carry \
                            fkr-qemu's marker for this repository"
                    .to_owned(),
            },
        }
        .into());
    }
    let password = forgejo::generate_password();
    ctx.forgejo
        .set_user_password(username, &password, &marker(repo_id))
        .await?;
    store.put(CiUser {
        password: password.clone(),
        ..stored
    })?;
    tracing::info!("reset the password of CI user {username} (the stored one was refused)");
    Ok(password)
}

/// The CI user of `repo`, created on first use (see `ciuser` for the rule and the proof an
/// existing account must carry). Concurrent jobs of one repository create it once (the store's
/// lock is held across the creation).
pub(crate) async fn ensure_ci_user(
    ctx: &Ctx,
    repo: &Repository,
) -> Result<(String, Secret), JobError> {
    let (owner, name, repo_id) = (repo.owner.as_str(), repo.name.as_str(), repo.id);
    let full_name = format!("{owner}/{name}");
    let mut store = ctx.users.lock().await;
    if let Some(u) = store.get(repo_id).cloned() {
        if u.repository != full_name {
            // Renamed or transferred: same id, same user; keep the record readable.
            tracing::info!(
                "repository id {repo_id} is now {full_name} (was {}); it keeps CI user {}",
                u.repository,
                u.username
            );
            store.put(CiUser {
                repository: full_name.clone(),
                ..u.clone()
            })?;
        }
        return Ok((u.username, u.password));
    }
    if let Some(old) = store.unbound(owner, name).cloned() {
        // A version-1 entry: bind it to this id only if its password still works (only we know
        // it), and mark the account so that it can be proven later without the file.
        if ctx
            .forgejo
            .verify_password(&old.username, &old.password)
            .await?
        {
            ctx.forgejo
                .set_user_password(&old.username, &old.password, &marker(repo_id))
                .await?;
            tracing::info!(
                "bound CI user {} to {full_name} (repository id {repo_id})",
                old.username
            );
            let bound = CiUser {
                repo_id,
                repository: full_name,
                ..old
            };
            store.put(bound.clone())?;
            return Ok((bound.username, bound.password));
        }
        tracing::warn!(
            "the stored password of CI user {} ({full_name}, from an older state file) is refused; \
             not using it",
            old.username
        );
    }
    let mut refusal = None;
    for username in candidate_usernames(owner, name, repo_id) {
        if let Some(holder) = store.held_by_other(&username, repo_id) {
            tracing::info!(
                "CI user name {username} belongs to {holder}; trying the next name for {full_name}"
            );
            continue;
        }
        let new = ctx.forgejo.new_ci_user(&username, &marker(repo_id));
        let password = new.password.clone();
        tracing::info!("creating CI user {username} for {full_name}");
        match ctx.forgejo.create_user(&new).await? {
            UserCreation::Created(_) => {}
            UserCreation::AlreadyExists { message } => {
                let existing = ctx.forgejo.user(&username).await?;
                match existing
                    .as_ref()
                    .map(|u| marked_repo(&u.login_name, u.source_id))
                {
                    Some(Some(id)) if id == repo_id => {
                        // Ours for this repository (state lost or another host): take it back.
                        tracing::info!("CI user {username} exists already; resetting its password (it carries our marker for repository id {repo_id})");
                        ctx.forgejo
                            .set_user_password(&username, &password, &marker(repo_id))
                            .await?;
                    }
                    Some(Some(other)) => {
                        tracing::info!("CI user name {username} belongs to repository id {other}; trying the next name for {full_name}");
                        continue;
                    }
                    Some(None) => {
                        refusal = Some((
                            username.clone(),
                            "a Forgejo account of that name exists without fkr-qemu's marker \
                             (its login_name is not fkr-qemu:repo:<id> of this repository)"
                                .to_owned(),
                        ));
                        break;
                    }
                    None => {
                        refusal = Some((
                            username.clone(),
                            format!("Forgejo refused to create it ({message}) and shows no account of that name (the name is reserved or its e-mail address {} is taken)", new.email),
                        ));
                        break;
                    }
                }
            }
        }
        store.put(CiUser {
            username: username.clone(),
            repository: full_name,
            repo_id,
            password: password.clone(),
            created_at: OffsetDateTime::now_utc(),
        })?;
        return Ok((username, password));
    }
    let (username, why) = refusal.unwrap_or_else(|| {
        (
            candidate_usernames(owner, name, repo_id)
                .pop()
                .unwrap_or_default(),
            "every name the rule gives is held by another repository".to_owned(),
        )
    });
    ctx.metrics.ci_user_refused();
    Err(super::Error::CiUserRefused {
        username,
        repository: full_name,
        repo_id,
        why,
    }
    .into())
}

/// The job's registry login: its CI user and a fresh `orch-…` token whose scopes follow
/// [`token_access`]; `None` when the policy gives no token (then no CI user is needed either). The
/// token goes into `res`, which revokes it.
pub(crate) async fn registry_login(
    ctx: &Ctx,
    job: &Job,
    repo: &Repository,
    res: &mut JobResources,
) -> Result<Option<(String, Secret)>, JobError> {
    let access = token_access(ctx, job, repo).await;
    let scopes: &[&str] = match access {
        TokenAccess::Write => &TOKEN_SCOPES,
        TokenAccess::Read => &READ_TOKEN_SCOPES,
        TokenAccess::None => {
            ctx.metrics.job_token(access);
            return Ok(None);
        }
    };
    let (username, mut password) = ensure_ci_user(ctx, repo).await?;
    let token_name = forgejo::token_name(job.id);
    let minted = match ctx
        .forgejo
        .create_token(&username, &password, &token_name, scopes)
        .await
    {
        Err(e) if e.status() == Some(401) => {
            password = reset_password(ctx, repo.id, &username).await?;
            ctx.forgejo
                .create_token(&username, &password, &token_name, scopes)
                .await?
        }
        other => other?,
    };
    res.repo_id = repo.id;
    res.token = Some(TokenRef {
        username: username.clone(),
        password,
        id: minted.id,
        name: minted.name.clone(),
    });
    ctx.metrics.job_token(access);
    Ok(Some((username, minted.token)))
}

/// What the job's registry token may do: write, unless Forgejo treats the job's run as untrusted
/// (a pull request from a fork) and the repository is not on `tokens.fork_write_repos`.
async fn token_access(ctx: &Ctx, job: &Job, repo: &Repository) -> TokenAccess {
    let (untrusted, why) = run_is_untrusted(ctx, job, repo).await;
    if !untrusted {
        return TokenAccess::Write;
    }
    if ctx.cfg.tokens.fork_write_allowed(&repo.full_name) {
        tracing::info!(
            "job {}: {why}; {} is on tokens.fork_write_repos: write token",
            job.id,
            repo.full_name
        );
        return TokenAccess::Write;
    }
    let access = match ctx.cfg.tokens.fork_pull_requests {
        ForkAccess::Read => TokenAccess::Read,
        ForkAccess::None => TokenAccess::None,
    };
    tracing::info!("job {}: {why}: registry access {}", job.id, access.as_str());
    access
}

/// Whether the job's run is untrusted, with the reason. The run comes from the job's `run_id`
/// when the server lists it (v16+); otherwise from the repository's waiting and running runs,
/// where any untrusted run (or none at all, or an error) makes the job untrusted: which of them
/// is this job's cannot be told.
async fn run_is_untrusted(ctx: &Ctx, job: &Job, repo: &Repository) -> (bool, String) {
    if job.run_id > 0 {
        return match ctx
            .forgejo
            .action_run(&repo.owner, &repo.name, job.run_id)
            .await
        {
            Ok(Some(run)) if run.is_untrusted() => (
                true,
                format!(
                    "run {} is a pull request from a fork ({})",
                    run.id, run.event
                ),
            ),
            Ok(Some(_)) => (false, String::new()),
            Ok(None) => (
                true,
                format!("run {} not found: treated as a fork", job.run_id),
            ),
            Err(e) => (
                true,
                format!("cannot read run {}: {e}; treated as a fork", job.run_id),
            ),
        };
    }
    match ctx
        .forgejo
        .action_runs(&repo.owner, &repo.name, &["waiting", "running"])
        .await
    {
        Ok(runs) if runs.is_empty() => (
            true,
            "no waiting or running run of the repository: treated as a fork".to_owned(),
        ),
        Ok(runs) => match runs.iter().find(|r| r.is_untrusted()) {
            Some(r) => (
                true,
                format!(
                    "run {} of the repository is a pull request from a fork, and the job's run cannot be told apart",
                    r.id
                ),
            ),
            None => (false, String::new()),
        },
        Err(e) => (
            true,
            format!("cannot list the repository's runs: {e}; treated as a fork"),
        ),
    }
}

fn outcome_of(exit: &Outcome, picked_up: bool, boot_timeout: bool) -> JobOutcome {
    match exit {
        Outcome::GuestPoweredOff => JobOutcome::Completed,
        Outcome::DeadlineExceeded { .. } => JobOutcome::Deadline,
        Outcome::HostStopped { .. } if boot_timeout => JobOutcome::BootFailure,
        Outcome::HostStopped { .. } => JobOutcome::Shutdown,
        Outcome::GuestCrashed { .. }
        | Outcome::QemuExited { .. }
        | Outcome::InternalError { .. }
        | Outcome::DiskLimitExceeded { .. }
            if picked_up =>
        {
            JobOutcome::Crashed
        }
        Outcome::InternalError { .. } => JobOutcome::AccelFailed,
        Outcome::GuestCrashed { .. }
        | Outcome::QemuExited { .. }
        | Outcome::DiskLimitExceeded { .. } => JobOutcome::BootFailure,
    }
}

fn removal_reason(o: JobOutcome) -> RemovalReason {
    match o {
        JobOutcome::Completed | JobOutcome::Crashed => RemovalReason::JobDone,
        JobOutcome::Deadline => RemovalReason::Deadline,
        JobOutcome::BootFailure | JobOutcome::PrepareFailed | JobOutcome::AccelFailed => {
            RemovalReason::BootFailure
        }
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
        job_id,
        owner: String::new(),
        repo: String::new(),
        state: JobState::Preparing.into(),
        address: None,
        started_at: OffsetDateTime::now_utc(),
        accel: None,
        pid: None,
        serial_log: None,
        limits: None,
    });
    ctx.metrics
        .job_dispatched(dispatched.saturating_duration_since(ticket.seen_at));

    let mut res = JobResources::new(ctx.clone(), name.to_string());
    let mut picked_up = false;
    let mut launched = false;
    let mut kvm_failed = false;
    let disk = ticket.disk.take();
    let outcome = match prepare_and_launch(&ctx, &ticket, &name, &mut res, dispatched, disk).await {
        Err(e) => {
            tracing::error!(vm = %name, "job {job_id}: preparing the VM failed: {e}");
            JobOutcome::PrepareFailed
        }
        Ok(handle) => {
            launched = true;
            tracing::info!("VM {name} started for job {job_id}");
            move_to(&mut state, JobState::Booting, name.as_str());
            ctx.board.vm_update(name.as_str(), |v| {
                v.state = JobState::Booting.into();
                v.pid = Some(handle.pid());
                v.accel = Some(handle.accel().accel);
                v.serial_log = Some(handle.serial_log().to_owned());
                let r = handle.resources();
                v.limits = Some(VmLimits {
                    uid: r.uid,
                    cgroup: r.cgroup.clone(),
                    memory_used: None,
                    memory_max: None,
                    disk_used: None,
                    disk_max: r.disk_max,
                    overlay: r.overlay.clone(),
                });
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
                            ctx.board.vm_state(name.as_str(), JobState::Running);
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
                    match &exit.outcome {
                        Outcome::InternalError { accel, detail } => {
                            kvm_failed = *accel == Accel::Kvm;
                            tracing::error!(vm = %name, "job {job_id}: QEMU stopped the guest in run state internal-error under {accel} after {} ms: {detail}", exit.timings.stop_decided_ms);
                        }
                        Outcome::GuestCrashed { reason } => {
                            tracing::warn!(vm = %name, "job {job_id}: the guest crashed: {reason}")
                        }
                        Outcome::DiskLimitExceeded { limit, used } => {
                            tracing::warn!(vm = %name, "job {job_id}: the VM's disk grew to {used} bytes, past disk_max ({limit} bytes); stopped")
                        }
                        Outcome::QemuExited { status, detail } => {
                            tracing::warn!(vm = %name, "job {job_id}: QEMU exited ({status}): {detail}")
                        }
                        other => tracing::debug!(vm = %name, "VM outcome: {other:?}"),
                    }
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
    ctx.board.vm_state(name.as_str(), JobState::Cleaning);
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
    // Not the job's fault: the accelerator that `auto` picked failed. KVM is marked broken now,
    // so the next VM of this job runs under TCG.
    let retry = (outcome == JobOutcome::AccelFailed
        && kvm_failed
        && ctx.cfg.vm.accel == Accel::Auto)
        .then(|| super::queue::Queued {
            job: ticket.job.clone(),
            seen_at: ticket.seen_at,
        });
    Report {
        outcome,
        picked_up,
        retry,
    }
}

async fn prepare_and_launch(
    ctx: &Arc<Ctx>,
    ticket: &Ticket,
    name: &VmName,
    res: &mut JobResources,
    dispatched: Instant,
    disk: Option<vm::DiskReservation>,
) -> Result<vm::VmHandle, JobError> {
    let job = &ticket.job;
    let repo = ctx.forgejo.repository(job.repo_id).await?;
    let (owner, repo_name) = (repo.owner.clone(), repo.name.clone());
    tracing::info!(
        "dispatch job {} for {owner}/{repo_name} (vm={name})",
        job.id
    );
    res.repo_id = repo.id;
    ctx.board.vm_update(name.as_str(), |v| {
        v.owner.clone_from(&owner);
        v.repo.clone_from(&repo_name);
    });

    let registry_login = registry_login(ctx, job, &repo, res).await?;

    let description = format!("{} job {} {owner}/{repo_name}", ctx.runner_marker, job.id);
    let runner = ctx
        .forgejo
        .register_runner(name.as_str(), &description)
        .await?;
    res.runner_id = Some(runner.id);

    let lease = ctx.net().allocate_address()?;
    let address = lease.address();
    let tap = ctx.net().create_tap(name, &lease)?;
    let mac = tap.mac();
    let network_config = ctx.net().network_config(&lease, mac);
    let net_device = vm::NetDevice {
        tap: tap.fd_for_qemu()?,
        mac,
    };
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
        registry_login
            .as_ref()
            .map(|(username, token)| RegistryAuth {
                host: RegistryAuth::host_of(runner_url),
                username,
                token,
            })
            .as_ref(),
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
    spec.disk = disk;
    spec.job = Some(vm::JobMeta {
        job_id: job.id,
        owner: owner.clone(),
        repo: repo_name.clone(),
        address: Some(address),
    });
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
        let internal = Outcome::InternalError {
            accel: Accel::Kvm,
            detail: "KVM internal error. Suberror: 1".into(),
        };
        assert_eq!(outcome_of(&internal, false, false), JobOutcome::AccelFailed);
        // Picked up: the runner had the job; Forgejo will fail it, a retry cannot help.
        assert_eq!(outcome_of(&internal, true, false), JobOutcome::Crashed);
        assert_eq!(
            removal_reason(JobOutcome::AccelFailed),
            RemovalReason::BootFailure
        );
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
