//! One job, from dispatch to cleanup, as one explicit state machine.
//!
//! ```text
//! queued ─► preparing ─► booting ─► running ─► cleaning ─► done | failed
//! ```
//! A [`JobRun`] owns the job's [`JobState`] and every resource the job holds. Each step is a
//! function with its own error ([`StepError`] names the step): repository, CI user, token, runner,
//! network, seed, launch; then [`JobRun::supervise`] waits for the VM with the boot deadline, the
//! pick-up and the host's stop; then [`release`] gives back token, runner and network. `release`
//! is the one place that releases: [`JobRun::finish`] calls it on every path that returns, and
//! `Drop` spawns it when the job's task is cancelled or panics before that. The VM process and
//! its files belong to the driver's handle, whose own `Drop` stops the VM and removes them.
//!
//! Every state change goes through [`JobRun::enter`], which checks the transition and shows the
//! state on the status board and in the log, so the three always agree.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::claim::{self, ClaimBook, Decision};
use super::credentials::{CredentialError, TokenRef};
use super::leftovers::{self, Chore, Leftovers};
use super::pool::{self, WarmVm};
use super::ports::{Forge, Network, RunningVm, Started, Vms};
use super::queue::Queued;
use super::userdata::{self, JobPlan, RegistryAuth, RunnerParams};
use crate::forgejo::{self, Job, Repository, READ_TOKEN_SCOPES, TOKEN_SCOPES};
use crate::ops::{
    DiscardReason, JobOutcome, Metrics, RemovalReason, StartPath, StatusBoard, TokenAccess, VmInfo,
};
use crate::secret::Secret;
use crate::types::{Accel, JobState, VmName};
use crate::vm::{self, Outcome, Seed, VmSpec};

/// What every job of a host shares: the three seams, the operator views, and the settings.
pub(crate) struct JobEnv<F, N, V> {
    pub forge: F,
    pub net: N,
    pub vms: V,
    pub board: StatusBoard,
    pub metrics: Metrics,
    pub settings: JobSettings,
    /// Other hosts' claims as this host first saw them.
    pub claims: ClaimBook,
    /// Cancelled when the daemon hands its VMs over to its successor (`fkr-qemu handover`): every
    /// job lets go of its VM and of what it holds, all left running for the next daemon.
    pub handover: CancellationToken,
    /// The names live jobs hold, and what failed releases left (retried in the background).
    pub leftovers: Leftovers,
}

/// The configuration one job reads.
#[derive(Debug, Clone)]
pub(crate) struct JobSettings {
    /// The label this host serves; the runner declares `<label>:host`.
    pub label: String,
    /// Forgejo's URL as the guest reaches it.
    pub runner_url: Url,
    pub base_image: std::path::PathBuf,
    /// From launch: how long the runner may take to pick the job up.
    pub boot_deadline: Duration,
    /// From launch: the whole VM's time budget.
    pub job_deadline: Duration,
    /// The accelerator policy: only under `auto` is a job whose KVM failed retried under TCG.
    pub accel: Accel,
    /// `fkr-qemu@<host_id>`: starts every runner description, so the sweep deletes only this
    /// host's runners.
    pub runner_marker: String,
    /// How long a winning claim waits before its second look (`claim::SETTLE`).
    pub claim_settle: Duration,
    /// Warm pool: how long a warm VM may take to acknowledge its payload (`pool.bind_timeout`).
    pub bind_timeout: Duration,
    /// How long a VM whose job is gone may take to power off by itself ([`GONE_GRACE`]).
    pub gone_grace: Duration,
}

impl JobSettings {
    /// This host's id, from its runner marker `fkr-qemu@<host_id>`.
    pub fn host_id(&self) -> &str {
        self.runner_marker
            .strip_prefix(claim::MARKER_PREFIX)
            .unwrap_or(&self.runner_marker)
    }
}

/// What discovery last saw of an in-flight job in Forgejo's job list (scheduler → job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listed {
    /// Waiting for a runner (or not listed again since dispatch).
    Waiting,
    /// Running: its runner picked it up.
    Running,
    /// No longer listed, never seen running: another runner ran it, or it was cancelled.
    Gone,
    /// No longer listed after it was seen running: its runner reported, or it was cancelled.
    /// The job is over; only its VM may still be there.
    Finished,
}

impl Listed {
    /// What the job is in `jobs` (a list requested after its dispatch).
    pub(crate) fn of(jobs: &[Job], handle: &str) -> Listed {
        match jobs.iter().find(|j| j.handle == handle) {
            Some(j) if j.status == forgejo::JobStatus::Running => Listed::Running,
            Some(_) => Listed::Waiting,
            None => Listed::Gone,
        }
    }

    /// The state after a new listing saw `seen`: a running job that leaves the list is finished
    /// (for good), and only a job never seen running can be gone.
    pub(crate) fn after(self, seen: Listed) -> Listed {
        match (self, seen) {
            (Listed::Finished, _) | (Listed::Running, Listed::Gone) => Listed::Finished,
            (Listed::Running, _) | (_, Listed::Running) => Listed::Running,
            (Listed::Gone, _) | (_, Listed::Gone) => Listed::Gone,
            _ => Listed::Waiting,
        }
    }
}

/// How long a VM whose job Forgejo no longer lists (and whose runner never took it) may power off
/// by itself before it is stopped: its runner may have run the job between two listings and be
/// on its way out.
pub(crate) const GONE_GRACE: Duration = Duration::from_secs(30);

/// A job taken from the queue, and how the scheduler tells it what Forgejo lists of it.
pub(crate) struct Ticket<Vm> {
    pub job: Job,
    pub seen_at: Instant,
    pub picked_up: watch::Receiver<Listed>,
    /// The disk space admitted for the job's VM.
    pub disk: Option<vm::DiskReservation>,
    /// How long to wait before claiming the job: longer the busier this host is, so that with
    /// equal hosts the one with more free slots claims first (plus jitter, so none starves).
    pub claim_delay: Duration,
    /// Warm pool: the ready warm VM the job runs in (its name becomes the runner's).
    pub warm: Option<WarmVm<Vm>>,
}

/// What the scheduler learns when a job's task ends.
pub(crate) struct Report<Vm> {
    pub outcome: JobOutcome,
    /// The runner picked the job up (Forgejo showed it running).
    pub picked_up: bool,
    /// The host's accelerator failed the guest under `accel = "auto"`: KVM is now marked broken,
    /// and the job should get a fresh VM (under TCG) if it is still waiting.
    pub retry: Option<Queued>,
    /// Warm pool: the warm VM the job took but did not use (claim lost, a step before the bind
    /// failed): it goes back to the pool.
    pub unused_warm: Option<WarmVm<Vm>>,
}

impl<Vm> std::fmt::Debug for Report<Vm> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report")
            .field("outcome", &self.outcome)
            .field("picked_up", &self.picked_up)
            .field("retry", &self.retry)
            .field("unused_warm", &self.unused_warm.as_ref().map(|w| &w.name))
            .finish()
    }
}

/// A step of the pipeline that failed, and why. The cause is printed once, in the message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error("reading repository {repo_id}: {error}")]
    Repository { repo_id: i64, error: forgejo::Error },
    #[error("ensuring the CI user: {0}")]
    CiUser(CredentialError),
    #[error("minting the registry token: {0}")]
    Token(CredentialError),
    #[error("registering the runner: {0}")]
    Runner(forgejo::Error),
    #[error("reading the claims on the job: {0}")]
    Claim(forgejo::Error),
    #[error("attaching the VM to the host network: {0}")]
    Network(crate::net::Error),
    #[error("writing the seed: {0}")]
    Seed(userdata::Error),
    #[error("launching the VM: {0}")]
    Launch(vm::Error),
}

/// What a job holds outside its VM, released by [`release`].
#[derive(Default)]
pub(crate) struct Held {
    pub token: Option<TokenRef>,
    pub runner: Option<i64>,
    /// Tap and address lease (dropping them releases them).
    pub net: Option<Box<dyn Send>>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.token.is_none() && self.runner.is_none() && self.net.is_none()
    }
}

/// Releases everything in `held`, each step regardless of the others; returns how many failed
/// (each is logged and left to the background cleanup, [`Leftovers`]). The one release path.
pub(crate) async fn release<F: Forge>(
    forge: &F,
    own: &Leftovers,
    vm: &VmName,
    mut held: Held,
) -> usize {
    // Network first and synchronously: nothing below may keep a tap alive.
    drop(held.net.take());
    let mut failed = 0;
    if let Some(t) = held.token.take() {
        match forge.revoke_token(&t).await {
            Ok(_) => tracing::debug!(vm = %vm, "revoked token {}", t.name),
            Err(e) => {
                tracing::warn!(vm = %vm, "cannot revoke token {} of {}: {e}", t.name, t.user.username);
                own.add(Chore::RevokeToken(t));
                failed += 1;
            }
        }
    }
    if let Some(id) = held.runner.take() {
        match forge.delete_runner(id).await {
            Ok(true) => tracing::debug!(vm = %vm, "deleted runner {id}"),
            Ok(false) => tracing::debug!(vm = %vm, "runner {id} was already gone"),
            Err(e) => {
                tracing::warn!(vm = %vm, "cannot delete runner {id}: {e}");
                own.add(Chore::DeleteRunner {
                    id,
                    name: vm.to_string(),
                });
                failed += 1;
            }
        }
    }
    failed
}

/// The job's registry login: its CI user and a fresh `orch-<job>-<host_id>-…` token whose scopes
/// follow the token policy; `None` when the policy gives no token (then no CI user is needed
/// either). The token's name is held live in `own` before it is minted, and the token goes into
/// `held` at once, so every later failure revokes it; a mint whose answer may have been lost
/// leaves a look for it to the background cleanup.
pub(crate) async fn registry_login<F: Forge>(
    forge: &F,
    metrics: &Metrics,
    own: &Leftovers,
    host_id: &str,
    job: &Job,
    repo: &Repository,
    held: &mut Held,
) -> Result<Option<(String, Secret)>, StepError> {
    let access = forge.token_access(job, repo).await;
    let scopes: &'static [&'static str] = match access {
        TokenAccess::Write => &TOKEN_SCOPES,
        TokenAccess::Read => &READ_TOKEN_SCOPES,
        TokenAccess::None => {
            metrics.job_token(access);
            return Ok(None);
        }
    };
    let user = forge.ci_user(repo).await.map_err(StepError::CiUser)?;
    crate::failpoint::crash_point("after-ci-user");
    let name = forgejo::host_token_name(host_id, job.id);
    own.hold_token(&name);
    let (token, secret) = match forge.mint_token(&user, &name, scopes).await {
        Ok(minted) => minted,
        Err(e) => {
            if matches!(&e, CredentialError::Forgejo(f) if f.is_transient()) {
                own.add(Chore::FindTokens(user));
            }
            own.let_go(None, Some(&name));
            return Err(StepError::Token(e));
        }
    };
    let username = token.user.username.clone();
    held.token = Some(token);
    crate::failpoint::crash_point("after-token");
    metrics.job_token(access);
    Ok(Some((username, secret)))
}

/// One look at the claims on `job`: who wins among them now, and the claims themselves.
async fn look_at_claims<F: Forge, N: Network, V: Vms>(
    env: &JobEnv<F, N, V>,
    job: &Job,
    mine: i64,
) -> Result<(Decision, Vec<claim::Claim>), StepError> {
    let asked = Instant::now();
    let mut runners = env.forge.runners().await.map_err(StepError::Claim)?;
    drop_own_leftovers(env, &mut runners, mine).await;
    let claims = claim::claims_on(&runners, job.id);
    let now = Instant::now();
    env.claims.forget_unlisted(&runners, asked);
    env.claims.saw(&claims, now);
    let decision = claim::decide(mine, &claims, |c| env.claims.is_stale(c, now));
    Ok((decision, claims))
}

/// Deletes (and removes from `runners`) this host's runners that no live job holds: a claim of an
/// earlier attempt whose registration answer was lost, or whose deletion failed. They are this
/// host's leftovers, never another host's claim to wait for.
async fn drop_own_leftovers<F: Forge, N: Network, V: Vms>(
    env: &JobEnv<F, N, V>,
    runners: &mut Vec<forgejo::Runner>,
    mine: i64,
) {
    let marker = &env.settings.runner_marker;
    let (leftover, keep): (Vec<_>, Vec<_>) = std::mem::take(runners).into_iter().partition(|r| {
        r.id != mine
            && leftovers::is_own_runner(r, marker)
            && r.status != "active"
            && !env.leftovers.runner_is_live(&r.name)
    });
    *runners = keep;
    for r in leftover {
        tracing::info!(
            "runner {} ({}) is this host's and no job holds it: deleting it",
            r.name,
            r.id
        );
        match env.forge.delete_runner(r.id).await {
            Ok(_) => env.claims.forget(r.id),
            Err(e) => {
                tracing::warn!("cannot delete runner {} ({}): {e}", r.name, r.id);
                env.leftovers.add(Chore::DeleteRunner {
                    id: r.id,
                    name: r.name,
                });
            }
        }
    }
}

/// Decides whether this host runs the job (see `claim.rs`): ours when our claim `mine` is the
/// lowest live one, after a second look, and Forgejo still shows the job waiting; else who won, or
/// that the job is gone. Stale claims of dead hosts below ours are deleted.
///
/// `meanwhile` runs while the claim settles between the two looks (the job's CI user and token:
/// off the critical path); it is not run when the first look already shows the claim lost.
///
/// `confirm`: ask Forgejo whether the job still waits after the second look. A warm bind skips
/// it (ARCHITECTURE.md, "One VM per job"): that question is a job-list request, which the host's
/// budget of one per second delays to a second after the list that found the job — most of a warm
/// bind's latency — while all it can save is a VM for a job already gone, never a second run.
async fn claim_job<F: Forge, N: Network, V: Vms, T>(
    env: &JobEnv<F, N, V>,
    job: &Job,
    name: &VmName,
    mine: i64,
    confirm: bool,
    meanwhile: impl std::future::Future<Output = T>,
) -> Result<Claimed<T>, StepError> {
    if let (Decision::Lost { host, runner_id }, _) = look_at_claims(env, job, mine).await? {
        return Ok(Claimed::Lost { host, runner_id });
    }
    let ((), done) = tokio::join!(tokio::time::sleep(env.settings.claim_settle), meanwhile);
    let stale = match look_at_claims(env, job, mine).await? {
        (Decision::Lost { host, runner_id }, _) => return Ok(Claimed::Lost { host, runner_id }),
        (Decision::Won { stale }, claims) => stale
            .into_iter()
            .map(|id| {
                let host = claims
                    .iter()
                    .find(|c| c.runner_id == id)
                    .map(|c| c.host.clone());
                (id, host)
            })
            .collect::<Vec<_>>(),
    };
    // No lower live claim is listed — yet a lower claim may have been deleted already because its
    // runner took the job and finished it (Forgejo deletes an ephemeral runner once its task is
    // done). The job is no longer waiting then: asked after the listing, Forgejo says so.
    if confirm {
        let waiting = env
            .forge
            .still_waiting(job, &env.settings.label)
            .await
            .map_err(StepError::Claim)?;
        if !waiting {
            return Ok(Claimed::Gone);
        }
    }
    for (id, host) in stale {
        tracing::warn!(
            vm = %name,
            "job {}: taking it over from host {}: its claim (runner {id}) stayed offline for {}s",
            job.id,
            host.as_deref().unwrap_or("?"),
            env.claims.timeout().as_secs()
        );
        match env.forge.delete_runner(id).await {
            Ok(_) => env.claims.forget(id),
            Err(e) => tracing::warn!(vm = %name, "cannot delete the stale claim {id}: {e}"),
        }
    }
    Ok(Claimed::Ours(done))
}

/// How this host's claim on a job ended.
enum Claimed<T = ()> {
    /// Ours is the lowest live claim and the job still waits: this host runs it (with what ran
    /// while the claim settled).
    Ours(T),
    /// Another host's claim is lower and live.
    Lost { host: String, runner_id: i64 },
    /// The job no longer waits (another host's runner ran it, or it was cancelled).
    Gone,
}

/// How supervision ended.
struct Supervised {
    outcome: JobOutcome,
    picked_up: bool,
    /// The VM stopped in `internal-error` under KVM.
    kvm_failed: bool,
    /// The VM was handed over, running, to the next daemon.
    handed_over: bool,
}

/// One job in flight: its state, its resources, and the environment it runs in.
pub(crate) struct JobRun<F: Forge, N: Network, V: Vms> {
    env: Arc<JobEnv<F, N, V>>,
    name: VmName,
    job: Job,
    seen_at: Instant,
    dispatched: Instant,
    state: JobState,
    held: Held,
    launched: bool,
    /// Taken over from a previous daemon: its preparation and boot were not timed here.
    adopted: bool,
    /// Warm pool: the warm VM taken for this job, until its payload is delivered.
    warm: Option<WarmVm<V::Vm>>,
    /// A warm VM that did not acknowledge its payload, stopping; awaited in `finish`.
    discarding: Option<tokio::task::JoinHandle<()>>,
    /// Dispatch on the host's wall clock (ms), for the bind latency against the guest's stamp.
    dispatched_unix_ms: i64,
    /// The runner name this job holds live in `env.leftovers` (let go after the release).
    live_runner: Option<String>,
}

impl<F: Forge, N: Network, V: Vms> JobRun<F, N, V> {
    fn new(
        env: Arc<JobEnv<F, N, V>>,
        job: Job,
        seen_at: Instant,
        warm: Option<WarmVm<V::Vm>>,
    ) -> Self {
        Self {
            env,
            // A warm VM's name becomes the runner's (and the job's VM's).
            name: warm
                .as_ref()
                .map_or_else(VmName::generate, |w| w.name.clone()),
            job,
            seen_at,
            dispatched: Instant::now(),
            state: JobState::Queued,
            held: Held::default(),
            launched: false,
            adopted: false,
            warm,
            discarding: None,
            dispatched_unix_ms: crate::vm::agent::unix_ms_now(),
            live_runner: None,
        }
    }

    /// Forgejo no longer lists the job (`picked_up`: after it was seen running): the job is over,
    /// whoever ran it. Its token and runner are released at once — a guest that does not power
    /// off must not keep them — and the returned grace is the VM's to power off by itself before
    /// it is stopped.
    async fn job_over(&mut self, picked_up: bool) -> std::pin::Pin<Box<tokio::time::Sleep>> {
        let grace = self.env.settings.gone_grace;
        if picked_up {
            tracing::info!(
                vm = %self.name,
                "job {}: Forgejo shows it finished; revoking its token, stopping VM {} unless it powers off within {}s",
                self.job.id,
                self.name,
                grace.as_secs()
            );
        } else {
            tracing::info!(
                vm = %self.name,
                "job {}: Forgejo no longer lists it (another runner ran it, or it was cancelled) and its runner never took it; stopping VM {} unless it powers off within {}s",
                self.job.id,
                self.name,
                grace.as_secs()
            );
        }
        let early = Held {
            token: self.held.token.take(),
            runner: self.held.runner.take(),
            net: None,
        };
        release(&self.env.forge, &self.env.leftovers, &self.name, early).await;
        Box::pin(tokio::time::sleep(grace))
    }

    /// Moves to `to`: the transition is checked, and the status board and the log show it.
    fn enter(&mut self, to: JobState) {
        let vm = self.name.as_str();
        if let Err(e) = self.state.transition(to) {
            // A bug, not an operational error: say so loudly, keep going with cleanup.
            tracing::error!(vm, "{e}");
            return;
        }
        tracing::debug!(vm, "job {}: {to}", self.job.id);
        match to {
            JobState::Preparing => {
                self.env
                    .board
                    .vm_added(VmInfo::new(vm, self.job.id, "", "", to.into()))
            }
            JobState::Done | JobState::Failed => self.env.board.vm_removed(vm),
            _ => {
                self.env.board.vm_state(vm, to);
            }
        }
    }

    /// Repository, runner (the claim), CI user and token, network, seed, launch. `Ok(None)`:
    /// another host claimed the job first.
    async fn prepare_and_launch(
        &mut self,
        disk: Option<vm::DiskReservation>,
        claim_delay: Duration,
    ) -> Result<Option<V::Vm>, StepError> {
        let env = self.env.clone();
        let repo = env
            .forge
            .repository(self.job.repo_id)
            .await
            .map_err(|error| StepError::Repository {
                repo_id: self.job.repo_id,
                error,
            })?;
        tracing::info!(
            "dispatch job {} for {}/{} (vm={})",
            self.job.id,
            repo.owner,
            repo.name,
            self.name
        );
        env.board.vm_update(self.name.as_str(), |v| {
            v.owner.clone_from(&repo.owner);
            v.repo.clone_from(&repo.name);
        });
        tokio::time::sleep(claim_delay).await;
        let mut runner = self.register_runner(&repo).await?;
        crate::failpoint::crash_point("after-runner");
        // The CI user and its token are made while the claim settles (`claim::SETTLE`): they are
        // off the critical path of a warm bind. A lost claim's token is revoked like any other.
        let login = registry_login(
            &env.forge,
            &env.metrics,
            &env.leftovers,
            env.settings.host_id(),
            &self.job,
            &repo,
            &mut self.held,
        );
        let confirm = self.warm.is_none();
        let claimed = claim_job(&env, &self.job, &self.name, runner.id, confirm, login).await?;
        let registry = match claimed {
            Claimed::Ours(registry) => registry?,
            Claimed::Lost { host, runner_id } => {
                tracing::info!(
                    vm = %self.name,
                    "job {}: claimed by host {host} first (runner {runner_id}); leaving it to that host",
                    self.job.id
                );
                return Ok(None);
            }
            Claimed::Gone => {
                tracing::info!(
                    vm = %self.name,
                    "job {}: no longer waiting (a runner took it, or it was cancelled); leaving it",
                    self.job.id
                );
                return Ok(None);
            }
        };
        if let Some(warm) = self.warm.take() {
            match self.bind(warm, &repo, &runner, registry.as_ref()).await? {
                Some(vm) => return Ok(Some(vm)),
                None => {
                    // The warm VM's registration is gone: the cold VM gets a runner of its own.
                    self.rename_for_cold_boot(&repo);
                    runner = self.register_runner(&repo).await?;
                }
            }
        }
        env.metrics.job_started(StartPath::Cold);
        let attachment = env.net.attach(&self.name).map_err(StepError::Network)?;
        let address = attachment.address;
        self.held.net = Some(attachment.hold);
        crate::failpoint::crash_point("after-network");
        env.board.vm_update(self.name.as_str(), |v| {
            v.address = Some(address.to_string())
        });
        let seed = self.seed(&runner, registry.as_ref(), attachment.network_config)?;
        let mut spec = VmSpec::new(
            self.name.clone(),
            env.settings.base_image.clone(),
            seed,
            env.settings.job_deadline,
        );
        spec.net = Some(attachment.device);
        spec.disk = disk;
        spec.job = Some(self.job_meta(&repo, runner.id, address));
        env.vms
            .launch(spec)
            .await
            .map(Some)
            .map_err(StepError::Launch)
    }

    /// Everything a restarted daemon needs to take the job over (see `adopt.rs`), for `vm.json`.
    fn job_meta(&self, repo: &Repository, runner_id: i64, address: Ipv4Addr) -> vm::JobMeta {
        vm::JobMeta {
            job_id: self.job.id,
            owner: repo.owner.clone(),
            repo: repo.name.clone(),
            address: Some(address),
            handle: self.job.handle.clone(),
            repo_id: self.job.repo_id,
            runner_id: Some(runner_id),
            token: self.held.token.as_ref().map(|t| vm::TokenMeta {
                username: t.user.username.clone(),
                user_repo_id: t.user.repo_id,
                id: t.id,
                name: t.name.clone(),
            }),
            boot_deadline_at: Some(OffsetDateTime::now_utc() + self.env.settings.boot_deadline),
        }
    }

    /// Warm pool: delivers the job's payload to `warm` and waits for its STARTED. `Ok(None)`: it
    /// did not acknowledge within `bind_timeout`; it is being stopped, and the job boots cold.
    async fn bind(
        &mut self,
        mut warm: WarmVm<V::Vm>,
        repo: &Repository,
        runner: &forgejo::RegisteredRunner,
        registry: Option<&(String, Secret)>,
    ) -> Result<Option<V::Vm>, StepError> {
        let env = self.env.clone();
        let plan = match self.plan(runner, registry) {
            Ok(plan) => plan,
            Err(e) => {
                // Nothing reached the VM: it waits for the next job (`Report::unused_warm`).
                self.warm = Some(warm);
                return Err(e);
            }
        };
        // Recorded before the payload leaves: from here on a restart takes the VM over with its job.
        if let Err(e) = warm
            .vm
            .record_job(self.job_meta(repo, runner.id, warm.address))
        {
            tracing::warn!(vm = %self.name, "cannot record job {} in the warm VM's vm.json ({e}): a restart would sweep it", self.job.id);
        }
        let delivered = warm
            .agent
            .deliver(&plan.agent_payload(), env.settings.bind_timeout)
            .await;
        warm.bind_over();
        match delivered {
            Ok(guest_ms) => {
                let started_ms = guest_ms.saturating_add(warm.clock_offset_ms);
                let latency = Duration::from_millis(
                    u64::try_from(started_ms - self.dispatched_unix_ms).unwrap_or(0),
                );
                let age = warm.ready_at.elapsed();
                env.metrics.job_started(StartPath::Warm);
                env.metrics.pool_bound(latency, age);
                tracing::info!(
                    vm = %self.name,
                    "job {}: bound to warm VM {} (ready {}s); its runner started {} ms after dispatch",
                    self.job.id,
                    self.name,
                    age.as_secs(),
                    latency.as_millis()
                );
                let WarmVm {
                    vm, hold, address, ..
                } = warm;
                self.held.net = Some(hold);
                env.board.vm_update(self.name.as_str(), |v| {
                    v.address = Some(address.to_string())
                });
                Ok(Some(vm))
            }
            Err(e) => {
                tracing::warn!(
                    vm = %self.name,
                    "job {}: warm VM {} did not take the job ({e}); stopping it, booting a VM for the job",
                    self.job.id,
                    self.name
                );
                // The payload may have reached the guest, and its runner may still start: its
                // registration goes first, so that it cannot fetch the job's task; then the VM is
                // stopped, never given back.
                if let Some(id) = self.held.runner.take() {
                    match env.forge.delete_runner(id).await {
                        Ok(_) => {
                            tracing::debug!(vm = %self.name, "deleted runner {id} of the silent warm VM")
                        }
                        Err(e) => {
                            tracing::warn!(vm = %self.name, "cannot delete runner {id} of the silent warm VM: {e}");
                            env.leftovers.add(Chore::DeleteRunner {
                                id,
                                name: self.name.to_string(),
                            });
                        }
                    }
                }
                env.leftovers
                    .let_go(self.live_runner.take().as_deref(), None);
                warm.vm.stop_token().cancel();
                self.discarding = Some(tokio::spawn(pool::discard(
                    &env,
                    warm,
                    DiscardReason::NoAck,
                )));
                Ok(None)
            }
        }
    }

    /// After a failed bind the job boots cold under a fresh VM name (the discarded warm VM still
    /// holds its own), with a runner registered under that name.
    fn rename_for_cold_boot(&mut self, repo: &Repository) {
        let old = std::mem::replace(&mut self.name, VmName::generate());
        self.env.board.vm_removed(old.as_str());
        self.env.board.vm_added(VmInfo::new(
            self.name.as_str(),
            self.job.id,
            &repo.owner,
            &repo.name,
            self.state.into(),
        ));
    }

    async fn register_runner(
        &mut self,
        repo: &Repository,
    ) -> Result<forgejo::RegisteredRunner, StepError> {
        let description = format!(
            "{} job {} {}/{}",
            self.env.settings.runner_marker, self.job.id, repo.owner, repo.name
        );
        // Held live before the request: its answer may be lost while Forgejo registers it.
        self.env.leftovers.hold_runner(self.name.as_str());
        self.live_runner = Some(self.name.to_string());
        let runner = match self
            .env
            .forge
            .register_runner(&self.name, &description)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if e.is_transient() {
                    self.env.leftovers.add(Chore::FindRunners);
                }
                return Err(StepError::Runner(e));
            }
        };
        self.held.runner = Some(runner.id);
        Ok(runner)
    }

    /// The job's files and commands for its runner (a cold seed or a warm VM's payload).
    fn plan(
        &self,
        runner: &forgejo::RegisteredRunner,
        registry: Option<&(String, Secret)>,
    ) -> Result<JobPlan, StepError> {
        let s = &self.env.settings;
        JobPlan::new(
            &RunnerParams {
                forgejo_url: &s.runner_url,
                runner_uuid: &runner.uuid,
                runner_token: &runner.token,
                label: &s.label,
                handle: &self.job.handle,
            },
            registry
                .map(|(username, token)| RegistryAuth {
                    host: RegistryAuth::host_of(&s.runner_url),
                    username,
                    token,
                })
                .as_ref(),
        )
        .map_err(StepError::Seed)
    }

    fn seed(
        &self,
        runner: &forgejo::RegisteredRunner,
        registry: Option<&(String, Secret)>,
        network_config: String,
    ) -> Result<Seed, StepError> {
        let user_data = self.plan(runner, registry)?.user_data();
        Ok(Seed {
            instance_id: self.name.to_string(),
            hostname: self.name.to_string(),
            user_data,
            network_config: Some(network_config),
        })
    }

    /// Waits for the VM to end: stops it when the runner does not pick the job up within the boot
    /// deadline, or when the host stops; records the prepare and boot metrics where they happen.
    async fn supervise(
        &mut self,
        handle: V::Vm,
        picked_up_rx: &mut watch::Receiver<Listed>,
        stop: &CancellationToken,
        boot_deadline: Duration,
    ) -> Supervised {
        let env = self.env.clone();
        let (name, job_id) = (self.name.clone(), self.job.id);
        let started: Started = handle.started();
        if !self.adopted {
            tracing::info!("VM {name} started for job {job_id}");
        }
        self.enter(JobState::Booting);
        env.board.vm_update(name.as_str(), |v| started.show(v));
        let vm_stop = handle.stop_token();
        let vm_detach = handle.detach_token();
        let mut handing_over = false;
        let mut vm_state = handle.watch_state();
        let wait = handle.wait();
        tokio::pin!(wait);
        let boot_deadline = tokio::time::sleep(boot_deadline);
        tokio::pin!(boot_deadline);
        // A VM taken over was neither prepared nor booted here: nothing to time.
        let mut qmp_ready: Option<Instant> = self.adopted.then(Instant::now);
        let (mut picked_up, mut boot_timeout, mut host_stop) = (false, false, false);
        // Forgejo no longer lists the job: a grace for the VM to power off by itself, then stop.
        let mut gone_grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut gone_stop = false;
        // Forgejo no longer lists the job: it is over.
        let mut over = false;
        let listed = *picked_up_rx.borrow_and_update();
        match listed {
            // Known from the start (a job taken over while its runner works).
            Listed::Running | Listed::Finished => {
                picked_up = true;
                self.enter(JobState::Running);
            }
            Listed::Gone | Listed::Waiting => {}
        }
        if matches!(listed, Listed::Gone | Listed::Finished) {
            over = true;
            gone_grace = Some(self.job_over(picked_up).await);
        }
        let exit = loop {
            tokio::select! {
                exit = &mut wait => break exit,
                changed = vm_state.changed(), if qmp_ready.is_none() => {
                    if changed.is_err() {
                        // The supervisor is gone; `wait` says how it ended.
                        qmp_ready = Some(Instant::now());
                    } else if *vm_state.borrow() == vm::VmState::Running {
                        let now = Instant::now();
                        qmp_ready = Some(now);
                        env.metrics.observe_prepare(now.duration_since(self.dispatched));
                    }
                }
                changed = picked_up_rx.changed(), if !over => {
                    let listed = changed.map(|()| *picked_up_rx.borrow());
                    if matches!(listed, Ok(Listed::Running | Listed::Finished)) && !picked_up {
                        picked_up = true;
                        self.enter(JobState::Running);
                        if let Some(ready) = qmp_ready.filter(|_| !self.adopted) {
                            env.metrics.observe_boot(ready.elapsed());
                        }
                        tracing::info!(vm = %name, "job {job_id} picked up by its runner");
                    }
                    match listed {
                        Ok(Listed::Gone | Listed::Finished) => {
                            over = true;
                            gone_grace = Some(self.job_over(picked_up).await);
                        }
                        Ok(_) => {}
                        // The scheduler is gone (daemon exiting): nothing more to learn.
                        Err(_) => {
                            picked_up = true;
                            over = true;
                        }
                    }
                }
                () = async { gone_grace.as_mut().expect("guarded").await }, if gone_grace.is_some() && !gone_stop => {
                    tracing::info!(vm = %name, "job {job_id}: stopping VM {name}: its job is over and it did not power off");
                    gone_stop = true;
                    vm_stop.cancel();
                }
                () = &mut boot_deadline, if !picked_up && !boot_timeout => {
                    tracing::warn!(vm = %name, "job {job_id}: the runner did not pick the job up within {}s; stopping the VM", env.settings.boot_deadline.as_secs());
                    boot_timeout = true;
                    vm_stop.cancel();
                }
                () = env.handover.cancelled(), if !handing_over => {
                    handing_over = true;
                    vm_detach.cancel();
                }
                () = stop.cancelled(), if !host_stop => {
                    tracing::info!(vm = %name, "stopping VM {name} (job {job_id}): the daemon is shutting down");
                    host_stop = true;
                    vm_stop.cancel();
                }
            }
        };
        if exit
            .as_ref()
            .is_ok_and(|e| e.outcome == Outcome::HandedOver)
        {
            return Supervised {
                outcome: JobOutcome::Shutdown,
                picked_up,
                kvm_failed: false,
                handed_over: true,
            };
        }
        let mut kvm_failed = false;
        let outcome = match exit {
            Ok(exit) => {
                if let Some(e) = &exit.teardown_error {
                    tracing::warn!(vm = %name, "VM teardown: {e}");
                }
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
                if gone_stop && matches!(exit.outcome, Outcome::HostStopped { .. }) {
                    if picked_up {
                        JobOutcome::Overstayed
                    } else {
                        JobOutcome::Gone
                    }
                } else {
                    outcome_of(&exit.outcome, picked_up, boot_timeout)
                }
            }
            Err(e) => {
                tracing::error!(vm = %name, "job {job_id}: the VM failed: {e}");
                if picked_up {
                    JobOutcome::Crashed
                } else {
                    JobOutcome::BootFailure
                }
            }
        };
        Supervised {
            outcome,
            picked_up,
            kvm_failed,
            handed_over: false,
        }
    }

    /// The VM was handed over: its token, runner, tap and lease are the next daemon's now.
    /// Nothing is released, and the tap's guard is never dropped (its `Drop` would remove it).
    fn hand_over(&mut self, s: Supervised) -> Report<V::Vm> {
        let held = std::mem::take(&mut self.held);
        std::mem::forget(held.net);
        tracing::info!(
            vm = %self.name,
            "job {}: VM {} handed over, running, with its token and runner",
            self.job.id,
            self.name
        );
        self.env.board.vm_removed(self.name.as_str());
        Report {
            outcome: s.outcome,
            picked_up: s.picked_up,
            retry: None,
            unused_warm: self.warm.take(),
        }
    }

    /// Cleaning: releases what the job holds, records the outcome, and ends in `done` or `failed`.
    async fn finish(&mut self, s: Supervised) -> Report<V::Vm> {
        let env = self.env.clone();
        let (name, job_id, outcome) = (self.name.clone(), self.job.id, s.outcome);
        self.enter(JobState::Cleaning);
        let ended = Instant::now();
        let token_name = self.held.token.as_ref().map(|t| t.name.clone());
        let failed = release(
            &env.forge,
            &env.leftovers,
            &name,
            std::mem::take(&mut self.held),
        )
        .await;
        env.leftovers
            .let_go(self.live_runner.take().as_deref(), token_name.as_deref());
        if let Some(d) = self.discarding.take() {
            // The warm VM that did not acknowledge: gone before the job counts as done.
            if let Err(e) = d.await {
                tracing::error!(vm = %name, "stopping the discarded warm VM failed: {e}");
            }
        }
        env.metrics.observe_teardown(ended.elapsed());
        env.metrics.job_finished(outcome, self.dispatched.elapsed());
        if self.launched {
            env.metrics.vm_removed(removal_reason(outcome));
        }
        self.enter(
            if matches!(
                outcome,
                JobOutcome::Completed
                    | JobOutcome::ClaimedElsewhere
                    | JobOutcome::Gone
                    | JobOutcome::Overstayed
            ) {
                JobState::Done
            } else {
                JobState::Failed
            },
        );
        if self.launched {
            tracing::info!("VM {name} finished (job {job_id})");
        }
        tracing::info!(
            vm = %name,
            "job {job_id}: {} ({}), cleanup {}",
            self.state,
            outcome.as_str(),
            if failed == 0 { "complete".to_owned() } else { format!("left {failed} step(s) to the background cleanup") }
        );
        // Not the job's fault: the accelerator that `auto` picked failed. KVM is marked broken
        // now, so the next VM of this job runs under TCG.
        let retry = (outcome == JobOutcome::AccelFailed
            && s.kvm_failed
            && env.settings.accel == Accel::Auto)
            .then(|| Queued {
                job: self.job.clone(),
                seen_at: self.seen_at,
            });
        Report {
            outcome,
            picked_up: s.picked_up,
            retry,
            unused_warm: self.warm.take(),
        }
    }
}

impl<F: Forge, N: Network, V: Vms> Drop for JobRun<F, N, V> {
    fn drop(&mut self) {
        if self.held.is_empty() {
            if let Some(r) = self.live_runner.take() {
                self.env.leftovers.let_go(Some(&r), None);
            }
            return;
        }
        // Only reached when the job's task was cancelled or panicked before `finish`.
        let held = std::mem::take(&mut self.held);
        let (env, name) = (self.env.clone(), self.name.clone());
        if !self.state.is_terminal() {
            env.board.vm_removed(name.as_str());
        }
        // The network goes at once, here; Forgejo's side needs a runtime.
        let Held { token, runner, net } = held;
        drop(net);
        let held = Held {
            token,
            runner,
            net: None,
        };
        let live_runner = self.live_runner.take();
        let token_name = held.token.as_ref().map(|t| t.name.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    release(&env.forge, &env.leftovers, &name, held).await;
                    env.leftovers
                        .let_go(live_runner.as_deref(), token_name.as_deref());
                });
            }
            Err(_) => {
                tracing::warn!(vm = %name, "no runtime left to revoke the token and delete the runner; the startup sweep will")
            }
        }
    }
}

/// Runs one job to the end. Never fails: every failure becomes the outcome and a log line.
pub(crate) async fn run<F: Forge, N: Network, V: Vms>(
    env: Arc<JobEnv<F, N, V>>,
    mut ticket: Ticket<V::Vm>,
    stop: CancellationToken,
) -> Report<V::Vm> {
    let mut job = JobRun::new(
        env.clone(),
        ticket.job.clone(),
        ticket.seen_at,
        ticket.warm.take(),
    );
    job.enter(JobState::Preparing);
    env.metrics
        .job_dispatched(job.dispatched.saturating_duration_since(ticket.seen_at));
    let supervised = match job
        .prepare_and_launch(ticket.disk.take(), ticket.claim_delay)
        .await
    {
        Ok(None) => Supervised {
            outcome: JobOutcome::ClaimedElsewhere,
            picked_up: false,
            kvm_failed: false,
            handed_over: false,
        },
        Err(e) => {
            tracing::error!(vm = %job.name, "job {}: preparing the VM failed: {e}", job.job.id);
            Supervised {
                outcome: JobOutcome::PrepareFailed,
                picked_up: false,
                kvm_failed: false,
                handed_over: false,
            }
        }
        Ok(Some(handle)) => {
            job.launched = true;
            let boot_deadline = env.settings.boot_deadline;
            job.supervise(handle, &mut ticket.picked_up, &stop, boot_deadline)
                .await
        }
    };
    if supervised.handed_over {
        return job.hand_over(supervised);
    }
    job.finish(supervised).await
}

/// A job whose VM a previous daemon started, as `adopt.rs` found it: the VM (taken over by the
/// driver) and what the job holds (token, runner, tap and lease), ready to be supervised.
pub(crate) struct Adopted<Vm> {
    pub name: VmName,
    pub job: Job,
    pub owner: String,
    pub repo: String,
    pub address: Option<Ipv4Addr>,
    pub vm: Vm,
    pub held: Held,
    /// What is left of the boot deadline (counted from the original launch).
    pub boot_deadline_left: Duration,
}

/// Runs a job taken over after a restart to its end, exactly as [`run`] does from the moment its
/// VM was launched: supervision (boot deadline, pick-up, host stop) and the one release path.
pub(crate) async fn run_adopted<F: Forge, N: Network, V: Vms>(
    env: Arc<JobEnv<F, N, V>>,
    a: Adopted<V::Vm>,
    mut picked_up: watch::Receiver<Listed>,
    stop: CancellationToken,
) -> Report<V::Vm> {
    let mut job = JobRun::new(env.clone(), a.job, Instant::now(), None);
    job.name = a.name;
    job.held = a.held;
    // Its runner (named after the VM) and token are a live job's, not leftovers.
    env.leftovers.hold_runner(job.name.as_str());
    job.live_runner = Some(job.name.to_string());
    if let Some(t) = &job.held.token {
        env.leftovers.hold_token(&t.name);
    }
    job.launched = true;
    job.adopted = true;
    job.enter(JobState::Preparing);
    env.board.vm_update(job.name.as_str(), |v| {
        v.owner = a.owner;
        v.repo = a.repo;
        v.address = a.address.map(|a| a.to_string());
    });
    let supervised = job
        .supervise(a.vm, &mut picked_up, &stop, a.boot_deadline_left)
        .await;
    if supervised.handed_over {
        return job.hand_over(supervised);
    }
    job.finish(supervised).await
}

fn outcome_of(exit: &Outcome, picked_up: bool, boot_timeout: bool) -> JobOutcome {
    match exit {
        Outcome::GuestPoweredOff => JobOutcome::Completed,
        Outcome::DeadlineExceeded { .. } => JobOutcome::Deadline,
        Outcome::HostStopped { .. } if boot_timeout => JobOutcome::BootFailure,
        Outcome::HostStopped { .. } | Outcome::HandedOver => JobOutcome::Shutdown,
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
        JobOutcome::Completed | JobOutcome::Crashed | JobOutcome::Gone | JobOutcome::Overstayed => {
            RemovalReason::JobDone
        }
        JobOutcome::Deadline => RemovalReason::Deadline,
        JobOutcome::BootFailure
        | JobOutcome::PrepareFailed
        | JobOutcome::AccelFailed
        | JobOutcome::ClaimedElsewhere => RemovalReason::BootFailure,
        JobOutcome::Shutdown => RemovalReason::Shutdown,
    }
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
