//! The daemon: start-up (Forgejo probe, operator services, sweep, host network), the discovery loop
//! with its FIFO queue, dispatch of at most `max_vms` jobs, and the two-stage shutdown on signals.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::adopt::{self, Found, Keep};
use super::ciuser::CiUserStore;
use super::claim::{self, ClaimBook};
use super::credentials::{Credentials, PasswordKeys};
use super::job::{self, JobEnv, JobSettings, Ticket};
use super::joblist::JobLister;
use super::leftovers::{self, Chore, Leftovers};
use super::pacing::Pacing;
use super::pool::Pool;
use super::ports::LiveVms;
use super::queue::JobQueue;
use super::{sweep, Config, Error};
use crate::forgejo::{self, Job, JobStatus};
use crate::ops::signals::Signals;
use crate::ops::{self, JobOutcome, Metrics, StatusBoard};

/// The environment of this host's jobs: Forgejo through the CI-user credentials, the host
/// network, the VM driver.
type LiveEnv = JobEnv<Credentials, crate::net::HostNetwork, LiveVms>;
type Report = job::Report<crate::vm::VmHandle>;

/// The discovery queue and the jobs in flight.
struct Scheduler {
    env: Arc<LiveEnv>,
    cfg: Arc<Config>,
    queue: JobQueue,
    /// In-flight handles → "picked up" notifier.
    active: HashMap<String, watch::Sender<job::Listed>>,
    tasks: JoinSet<(String, Report)>,
    /// Cancelled on the second signal: every job stops its VM.
    stop_vms: CancellationToken,
    /// The last dispatch round found no disk for another VM (logged once per episode).
    waiting_for_disk: bool,
    /// When the fleet's runners were last listed for `status`.
    fleet_listed: Option<Instant>,
    /// The warm pool (`pool.rs`); its VMs count in `max_vms` with the jobs in flight.
    pool: Pool<crate::vm::VmHandle>,
}

impl Scheduler {
    fn new(env: Arc<LiveEnv>, cfg: Arc<Config>) -> Self {
        Self {
            env,
            queue: JobQueue::default(),
            active: HashMap::new(),
            tasks: JoinSet::new(),
            stop_vms: CancellationToken::new(),
            waiting_for_disk: false,
            fleet_listed: None,
            pool: Pool::new(cfg.pool.clone()),
            cfg,
        }
    }

    // --- warm pool -------------------------------------------------------------------------

    /// VM slots in use: jobs in flight and the pool's VMs.
    fn slots_used(&self) -> usize {
        self.tasks.len() + self.pool.occupied()
    }

    /// Replaces stale warm VMs and refills the pool from the slots (and the disk) queued jobs do
    /// not need: a warm VM passes the disk admission a cold job does, and takes its reservation
    /// with it to the job it is bound to.
    fn tend_pool(&mut self) {
        self.pool.maintain(&self.env);
        if self.queue.is_empty() {
            let free = self.cfg.max_vms.saturating_sub(self.slots_used());
            let vm = &self.cfg.vm;
            self.pool
                .refill(&self.env, free, || match crate::vm::reserve_disk(vm) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::debug!("pool: no warm VM for now: {e}");
                        None
                    }
                });
        }
    }

    // -------------------------------------------------------------------------------------------

    /// Every `FLEET_EVERY`, the runners every host holds, for `status` (one request).
    async fn refresh_fleet(&mut self) {
        if self.fleet_listed.is_some_and(|t| t.elapsed() < FLEET_EVERY) {
            return;
        }
        self.fleet_listed = Some(Instant::now());
        match self.env.forge.client.runners().await {
            Ok(runners) => {
                // This host's runners no live job holds are its leftovers, whenever they show.
                let marker = &self.env.settings.runner_marker;
                for r in &runners {
                    if leftovers::is_own_runner(r, marker)
                        && r.status != "active"
                        && !self.env.leftovers.runner_is_live(&r.name)
                    {
                        self.env.leftovers.add(Chore::DeleteRunner {
                            id: r.id,
                            name: r.name.clone(),
                        });
                    }
                }
                let fleet = runners
                    .iter()
                    .filter_map(|r| {
                        let (host, job_id) = claim::parse_description(&r.description)?;
                        Some(ops::FleetRunner {
                            host: host.to_owned(),
                            job_id,
                            name: r.name.clone(),
                            status: r.status.clone(),
                        })
                    })
                    .collect();
                self.env.board.set_fleet(fleet);
            }
            Err(e) => tracing::debug!("listing the fleet's runners failed: {e}"),
        }
    }

    /// The jobs list as Forgejo answered a request sent at or after `since` (shared with the other
    /// job-list callers of this host, within its request rate: [`JobLister`]).
    async fn list_jobs(&self, since: tokio::time::Instant) -> Option<Arc<Vec<Job>>> {
        let labels = [self.cfg.label.as_str()];
        let forge = &self.env.forge;
        match forge
            .job_lists
            .list_since(labels[0], since, || forge.client.jobs(&labels))
            .await
        {
            Ok(jobs) => Some(jobs),
            Err(e) => {
                tracing::warn!("polling Forgejo for jobs failed: {e}");
                self.env.board.forgejo_error(e.to_string());
                None
            }
        }
    }

    fn log_dropped(&self, dropped: &[(i64, String)]) {
        for (id, handle) in dropped {
            tracing::info!("queue: dropping job {id} (handle={handle}): no longer waiting");
            self.env.metrics.job_dropped();
        }
    }

    /// One discovery round: new waiting jobs enter the queue, queued jobs that are no longer
    /// waiting leave it, in-flight jobs Forgejo shows running are marked picked up. Returns whether
    /// a new job was seen.
    async fn poll(&mut self, since: tokio::time::Instant) -> bool {
        let Some(jobs) = self.list_jobs(since).await else {
            return false;
        };
        self.mark_listed(&jobs);
        let observed = self.queue.observe(&jobs, Instant::now());
        for (id, handle) in &observed.new {
            tracing::debug!("queue: job {id} waiting (handle={handle})");
            self.env.metrics.job_seen();
        }
        self.log_dropped(&observed.dropped);
        self.env.board.set_queued(self.queue.len());
        self.refresh_fleet().await;
        !observed.new.is_empty()
    }

    /// Tells in-flight jobs what Forgejo lists of them (`jobs` was requested after every one of
    /// them was dispatched): running (their runner picked them up), or gone (never seen running).
    fn mark_listed(&self, jobs: &[Job]) {
        for (handle, tx) in &self.active {
            let seen = job::Listed::of(jobs, handle);
            tx.send_if_modified(|now| {
                let next = now.after(seen);
                std::mem::replace(now, next) != next
            });
        }
    }

    /// While draining: only learn which in-flight jobs were picked up (so their boot deadline
    /// does not stop a VM that is running its job) or are gone.
    async fn poll_running(&mut self) {
        if self.active.is_empty() {
            return;
        }
        if let Some(jobs) = self.list_jobs(tokio::time::Instant::now()).await {
            self.mark_listed(&jobs);
        }
    }

    /// Starts queued jobs while VM slots are free, each re-checked against a list requested at or
    /// after `since` (the round's own poll when there was one: no second request for it).
    async fn dispatch(&mut self, since: tokio::time::Instant) {
        // A ready warm VM is a slot of its own: a job bound to it takes no new one.
        if self.queue.is_empty()
            || (self.slots_used() >= self.cfg.max_vms && !self.pool.has_ready())
        {
            return;
        }
        let Some(fresh) = self.list_jobs(since).await else {
            return;
        };
        let still_waiting: HashSet<&str> = fresh
            .iter()
            .filter(|j| j.status == JobStatus::Waiting)
            .map(|j| j.handle.as_str())
            .collect();
        let mut dropped = Vec::new();
        loop {
            // A ready warm VM first (its disk was reserved when it booted); else a free slot.
            let warm = self.pool.take(&self.env);
            if warm.is_none() && self.slots_used() >= self.cfg.max_vms {
                break;
            }
            // Disk first: a VM is started only if every running VM and this one can grow to their
            // disk_max. The reservation travels with the job to its VM.
            let disk = match warm
                .is_some()
                .then_some(None)
                .map_or_else(|| crate::vm::reserve_disk(&self.cfg.vm).map(Some), Ok)
            {
                Ok(d) => d,
                Err(e) => {
                    if !self.waiting_for_disk {
                        tracing::warn!("queue: {} job(s) wait: {e}", self.queue.len());
                    }
                    self.waiting_for_disk = true;
                    self.env.metrics.disk_admission_wait();
                    break;
                }
            };
            let Some(q) = self.queue.next_still_waiting(&still_waiting, &mut dropped) else {
                if let Some(w) = warm {
                    self.pool.give_back(&self.env, w);
                }
                break;
            };
            if std::mem::take(&mut self.waiting_for_disk) {
                tracing::info!("queue: disk space for another VM is available again");
            }
            tracing::info!(
                "queue: dispatching job {} (handle={})",
                q.job.id,
                q.job.handle
            );
            let (tx, rx) = watch::channel(job::Listed::Waiting);
            let handle = q.job.handle.clone();
            self.active.insert(handle.clone(), tx);
            let ticket = Ticket {
                job: q.job,
                seen_at: q.seen_at,
                picked_up: rx,
                disk,
                claim_delay: claim_delay(self.tasks.len(), self.cfg.max_vms, warm.is_some()),
                warm,
            };
            let env = self.env.clone();
            let stop = self.stop_vms.child_token();
            self.tasks
                .spawn(async move { (handle, job::run(env, ticket, stop).await) });
        }
        self.log_dropped(&dropped);
        self.env.board.set_queued(self.queue.len());
    }

    /// Supervises a job whose VM was taken over after a restart, like one dispatched here.
    fn adopt(&mut self, f: Found) {
        let net = f.meta.address.and_then(
            |address| match crate::controller::ports::Network::adopt(
                &self.env.net,
                &f.name,
                address,
            ) {
                Ok(hold) => Some(hold),
                Err(e) => {
                    tracing::warn!(vm = %f.name, "cannot take over the tap of VM {}: {e}", f.name);
                    None
                }
            },
        );
        let handle = f.job.handle.clone();
        let (tx, rx) = watch::channel(if f.picked_up {
            job::Listed::Running
        } else {
            job::Listed::Waiting
        });
        self.active.insert(handle.clone(), tx);
        self.queue.in_flight(&handle);
        let adopted = job::Adopted {
            name: f.name,
            owner: f.meta.owner,
            repo: f.meta.repo,
            address: f.meta.address,
            vm: f.vm,
            held: job::Held {
                token: f.token,
                runner: f.meta.runner_id,
                net,
            },
            job: f.job,
            boot_deadline_left: f.boot_deadline_left,
        };
        let env = self.env.clone();
        let stop = self.stop_vms.child_token();
        self.tasks
            .spawn(async move { (handle, job::run_adopted(env, adopted, rx, stop).await) });
    }

    /// Bookkeeping when a job's task ended.
    fn finished(&mut self, joined: Result<(String, Report), tokio::task::JoinError>) {
        match joined {
            Ok((handle, mut report)) => {
                self.active.remove(&handle);
                if let Some(w) = report.unused_warm.take() {
                    self.pool.give_back(&self.env, w);
                }
                if report.outcome == JobOutcome::ClaimedElsewhere {
                    // The other host has the job until its claim goes stale.
                    let until = Instant::now() + self.env.claims.timeout();
                    self.queue.claimed_elsewhere(&handle, until);
                    return;
                }
                if let Some(q) = report.retry {
                    let id = q.job.id;
                    if self.queue.retry_front(q) {
                        tracing::warn!("job {id} (handle={handle}): KVM failed its VM; retrying it once under TCG in a fresh VM");
                        self.env.board.set_queued(self.queue.len());
                        return;
                    }
                }
                // A VM that powered off by itself ran its runner to the end even when no poll saw
                // the job running (short jobs between polls).
                // A gone job is no attempt of ours: Forgejo no longer offers it to anyone.
                let ran = report.picked_up
                    || matches!(
                        report.outcome,
                        JobOutcome::Completed | JobOutcome::Shutdown | JobOutcome::Gone
                    );
                if let Some(n) = self.queue.finished(&handle, ran) {
                    tracing::error!(
                        "job with handle {handle}: {n} VMs ended without its runner picking it up; \
                         giving up on it (restart the daemon to try again)"
                    );
                }
            }
            Err(e) => {
                // A panicking job task: its resources were released by their Drop impls. Forget the
                // handles whose tasks are gone (their ticket, hence the receiver, was dropped) so the
                // job can be retried.
                tracing::error!("a job task failed: {e}");
                self.active.retain(|_, tx| !tx.is_closed());
                let active = &self.active;
                self.queue.retain_in_flight(|h| active.contains_key(h));
            }
        }
    }
}

/// How often `status`'s view of the other hosts is refreshed.
const FLEET_EVERY: Duration = Duration::from_secs(30);

/// How long a job waits before this host claims it. With a warm VM for it: at most 25 ms of
/// jitter, so hosts that can start the job at once win its claim (and the wait stays off a warm
/// bind's critical path). Else 50 ms, up to 400 ms more the fuller this host is, and up to 100 ms
/// of jitter, so that hosts with free slots win claims and equal hosts share.
fn claim_delay(in_flight: usize, max_vms: usize, warm: bool) -> Duration {
    use rand::Rng;
    if warm {
        return Duration::from_millis(rand::thread_rng().gen_range(0..25));
    }
    let load = in_flight as f64 / max_vms.max(1) as f64;
    Duration::from_millis(50 + (load * 400.0) as u64 + rand::thread_rng().gen_range(0..100))
}

/// Waits until Forgejo answers the probe (it may be down while this host boots). Unrecoverable
/// answers (too old, token refused) end the daemon.
async fn wait_for_forgejo(
    client: &forgejo::Client,
    board: &StatusBoard,
    signals: &mut Signals,
) -> Result<bool, crate::Error> {
    let mut delay = Duration::from_secs(1);
    loop {
        match client.probe().await {
            Ok(_) => return Ok(true),
            Err(e @ forgejo::Error::UnsupportedVersion { .. }) => return Err(e.into()),
            Err(e) if matches!(e.status(), Some(401 | 403)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(
                    "Forgejo is not answering yet: {e}; retrying in {}s",
                    delay.as_secs()
                );
                board.forgejo_error(e.to_string());
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            sig = signals.recv() => {
                tracing::info!("received {sig} while waiting for Forgejo: exiting");
                return Ok(false);
            }
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

fn create_dir(path: &std::path::Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| Error::io("cannot create", path, e))
}

/// `fkr-qemu@<host_id>`: starts the description of every runner this host registers.
fn runner_marker(host_id: &str) -> String {
    format!("fkr-qemu@{host_id}")
}

/// How the discovery loop ended.
enum Stop {
    /// SIGINT/SIGTERM: drain.
    Signal(&'static str),
    /// SIGUSR2 (`fkr-qemu handover`): re-execute, leaving every VM running.
    Handover,
    /// SIGTERM from `systemctl restart`: exit, leaving every VM running in its scope for the
    /// daemon systemd starts next.
    Restart,
}

/// What the process does once its VMs are let go.
enum Leave<'a> {
    /// Re-execute this binary (a handover).
    Exec(&'a std::path::Path),
    /// Exit (systemd starts the next daemon).
    Exit,
}

/// Whether this SIGTERM is `systemctl restart` stopping the unit: then the VMs, which live in
/// scopes of their own, stay for the next daemon instead of being drained.
async fn is_systemd_restart(host: &crate::vm::confine::Host) -> bool {
    let Some(systemd) = host.systemd() else {
        return false;
    };
    matches!(
        systemd.own_job_type().await.as_deref(),
        Some("restart" | "try-restart" | "reload-or-restart" | "try-reload-or-restart")
    )
}

/// How long a handover waits for jobs that are still preparing to reach their VM.
const HANDOVER_WAIT: Duration = Duration::from_secs(60);

/// Hands every VM over to a new daemon: the jobs let go of their VMs and of what they hold
/// (nothing is stopped, revoked, deleted or removed), the operator services close, and the
/// process re-executes its binary — after a package upgrade, the new version — which takes the
/// VMs over at start like after any restart (`adopt.rs`). Same pid, same systemd unit and cgroup:
/// nothing outside notices. Returns only if the exec failed.
async fn hand_over(
    mut sched: Scheduler,
    env: Arc<LiveEnv>,
    services: ops::Services,
    board: &StatusBoard,
    leave: Leave<'_>,
) -> Result<(), crate::Error> {
    board.set_ready(false);
    sched.queue.clear();
    let n = sched.tasks.len();
    match leave {
        Leave::Exec(exe) => tracing::info!(
            "received SIGUSR2: handing {n} VM(s) over to a new daemon ({})",
            exe.display()
        ),
        Leave::Exit => tracing::info!(
            "received SIGTERM from `systemctl restart`: leaving {n} VM(s) running in their \
             scopes for the next daemon"
        ),
    }
    ops::systemd::status(&format!("handing {n} VM(s) over"));
    env.handover.cancel();
    // Warm VMs hold no job: they stop (the next daemon boots its own pool).
    sched.pool.shutdown(&env);
    let wait = tokio::time::sleep(HANDOVER_WAIT);
    tokio::pin!(wait);
    loop {
        if sched.tasks.is_empty() && sched.pool.is_empty() {
            break;
        }
        tokio::select! {
            Some(j) = sched.tasks.join_next() => sched.finished(j),
            event = sched.pool.next_event() => sched.pool.on_event(&env, event),
            () = &mut wait => {
                tracing::warn!(
                    "{} job(s) did not let go of their VM within {}s; they end with this process",
                    sched.tasks.len(),
                    HANDOVER_WAIT.as_secs()
                );
                break;
            }
        }
    }
    services.stop().await;
    drop(sched);
    // The taps, the leases and the firewall table stay as they are: the next daemon replaces the
    // table atomically with these VMs in it. Nothing of the environment may run its Drop.
    std::mem::forget(env);
    let exe = match leave {
        Leave::Exec(exe) => exe,
        Leave::Exit => {
            tracing::info!("exiting; systemd starts the next daemon");
            return Ok(());
        }
    };
    let args: Vec<std::ffi::CString> = std::env::args_os()
        .filter_map(|a| {
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str())).ok()
        })
        .collect();
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(exe.as_os_str()))
        .map_err(|_| {
            Error::io(
                "cannot re-execute",
                exe,
                std::io::ErrorKind::InvalidInput.into(),
            )
        })?;
    tracing::info!("re-executing {}", exe.display());
    let err = match nix::unistd::execv(&path, &args) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    Err(Error::io("cannot re-execute", exe, std::io::Error::from(err)).into())
}

/// Runs the daemon until a signal ends it.
pub async fn run(cfg: Config) -> Result<(), crate::Error> {
    // SIGUSR2 (a handover) must never kill the daemon, whenever it comes.
    let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
        .map_err(|e| Error::io("cannot install a signal handler for", "SIGUSR2", e))?;
    // The binary to re-execute on a handover: the path it was started from (after an upgrade,
    // the new version is there; /proc/self/exe would name the old, deleted file).
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("cannot find its own binary", "/proc/self/exe", e))?;
    let mut signals = Signals::new()
        .map_err(|e| Error::io("cannot install a signal handler for", "SIGINT/SIGTERM", e))?;
    for w in cfg.plain_http_warnings() {
        tracing::warn!("{w}");
    }
    create_dir(&cfg.state_dir, 0o700)?;
    create_dir(&cfg.runtime_dir, 0o755)?;
    create_dir(&cfg.vm.log_dir, 0o700)?;
    create_dir(&cfg.vm.disk_dir, 0o700)?;
    // Before anything touches Forgejo: a host that cannot run a VM must not take jobs.
    let host = crate::vm::confine::host(&cfg.vm).await?;
    for note in super::check::host_ready(&cfg).await? {
        tracing::info!("{note}");
    }
    let metrics = Metrics::new();
    let board = StatusBoard::new(Some(metrics.clone()));
    let client = forgejo::Client::new(cfg.forgejo.clone(), cfg.admin_token.clone())?
        .with_observer(Arc::new(metrics.forgejo_observer()));
    let users = CiUserStore::open(cfg.ci_users_path())?;
    let services =
        ops::Services::start(&cfg.runtime_dir, &cfg.metrics, &metrics, board.clone()).await?;

    if !wait_for_forgejo(&client, &board, &mut signals).await? {
        services.stop().await;
        return Ok(());
    }
    let keys = match &cfg.ci_password_key_file {
        Some(path) => PasswordKeys::read(path)?,
        None => PasswordKeys::default(),
    };
    let creds = Credentials {
        client,
        users: tokio::sync::Mutex::new(users),
        policy: cfg.tokens.clone(),
        metrics: metrics.clone(),
        host_id: cfg.host_id.clone(),
        keys,
        job_lists: JobLister::new(cfg.poll_interval_min),
    };
    if creds.keys.is_empty() && !creds.client.uses_admin_token_routes() {
        tracing::info!(
            "CI-user passwords are this host's own (no forgejo.ci_password_key_file, and the \
             server has no admin token routes): fine for one host; several hosts serving this \
             Forgejo need a shared key file (README.md, \"Several hosts\")"
        );
    }
    let older = creds.users_on_older_keys().await;
    if older > 0 {
        tracing::warn!(
            "{older} CI user(s) in {} have a password the first key of forgejo.ci_password_key_file does not derive; each moves to it at its next job once its old key is dropped from the key file",
            cfg.ci_users_path().display()
        );
    }
    let runner_marker = runner_marker(&cfg.host_id);
    // The network part of the sweep removes our nftables table: sweep first, then set up.
    // Versions before host ids marked runners with the full hostname: sweep those too.
    let legacy_marker = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| format!("fkr-qemu@{h}"));
    let markers: Vec<String> = std::iter::once(runner_marker.clone())
        .chain(legacy_marker.filter(|m| *m != runner_marker))
        .collect();
    // VMs a previous daemon left running with their jobs are taken over, not swept.
    let found = adopt::take_over(&cfg, &creds, &metrics).await;
    let keep = Keep::of(&found);
    sweep::startup_sweep(&cfg, &creds, &markers, &metrics, &keep).await;
    // The table is replaced with the taken-over VMs' elements in the same transaction.
    let net = crate::net::HostNetwork::setup(&cfg.net, &keep.taps)?;
    let cfg = Arc::new(cfg);
    let env = Arc::new(JobEnv {
        forge: creds,
        net,
        vms: LiveVms(cfg.vm.clone()),
        board: board.clone(),
        metrics: metrics.clone(),
        // A live host's claim comes online or is deleted within its preparation and its boot
        // deadline; two minutes cover the preparation (Forgejo calls with retries, disks, tap).
        claims: ClaimBook::new(cfg.boot_deadline + Duration::from_secs(120)),
        settings: JobSettings {
            label: cfg.label.clone(),
            runner_url: cfg.runner_url().clone(),
            base_image: cfg.base_image.clone(),
            boot_deadline: cfg.boot_deadline,
            job_deadline: cfg.job_deadline,
            accel: cfg.vm.accel,
            runner_marker,
            claim_settle: claim::SETTLE,
            bind_timeout: cfg.pool.bind_timeout,
            gone_grace: job::GONE_GRACE,
        },
        handover: CancellationToken::new(),
        leftovers: Leftovers::default(),
    });
    // Failed revocations and deletions, and lost creations, are retried while the daemon runs.
    let reaper = {
        let env = env.clone();
        tokio::spawn(async move {
            leftovers::reap(
                &env.forge,
                &env.leftovers,
                &env.settings.runner_marker,
                &env.metrics,
                &env.board,
            )
            .await;
        })
    };

    board.set_ready(true);
    ops::systemd::ready("ready: 0 running, 0 queued");
    tracing::info!(
        "entering discovery loop (label={}, interval={}s, interval_min={}s, max_vms={})",
        cfg.label,
        cfg.poll_interval.as_secs_f64(),
        cfg.poll_interval_min.as_secs_f64(),
        cfg.max_vms
    );
    if cfg.pool.size > 0 {
        tracing::info!(
            "warm pool: {} VM(s), replaced after {}s",
            cfg.pool.size,
            cfg.pool.max_age.as_secs()
        );
    }

    let mut sched = Scheduler::new(env.clone(), cfg.clone());
    for f in found {
        sched.adopt(f);
    }
    // Fast (poll_interval_min) while jobs wait or came recently, backing off to poll_interval.
    let mut pacing = Pacing::new(cfg.poll_interval_min, cfg.poll_interval, Instant::now());
    let mut next_poll = tokio::time::Instant::now();
    // A job ended since the last poll: its workflow's next job may be about to wait.
    let mut ended = false;
    let first_signal = loop {
        tokio::select! {
            sig = signals.recv() => break Stop::Signal(sig),
            _ = usr2.recv() => break Stop::Handover,
            Some(joined) = sched.tasks.join_next() => {
                sched.finished(joined);
                ended = true;
                let step = sched.dispatch(tokio::time::Instant::now());
                tokio::select! {
                    () = step => {}
                    sig = signals.recv() => break Stop::Signal(sig),
                }
                sched.tend_pool();
            }
            event = sched.pool.next_event() => {
                sched.pool.on_event(&env, event);
                let step = sched.dispatch(tokio::time::Instant::now());
                tokio::select! {
                    () = step => {}
                    sig = signals.recv() => break Stop::Signal(sig),
                }
                sched.tend_pool();
            }
            () = tokio::time::sleep_until(next_poll) => {
                let round = tokio::time::Instant::now();
                let step = async {
                    let seen = sched.poll(round).await;
                    sched.dispatch(round).await;
                    seen
                };
                let seen = tokio::select! {
                    seen = step => seen,
                    sig = signals.recv() => break Stop::Signal(sig),
                };
                let active = seen || !sched.queue.is_empty() || std::mem::take(&mut ended);
                let pause = pacing.next(Instant::now(), active);
                next_poll = round + pacing.jittered(pause, rand::random::<f64>());
                sched.tend_pool();
                let (running, queued) = (sched.tasks.len(), sched.queue.len());
                ops::systemd::status(&format!("ready: {running} running, {queued} queued"));
            }
        }
    };
    let mut interval = tokio::time::interval(cfg.poll_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let first_signal = match first_signal {
        Stop::Signal("SIGTERM") if is_systemd_restart(host).await => Stop::Restart,
        other => other,
    };
    let first_signal = match first_signal {
        Stop::Signal(sig) => sig,
        Stop::Handover => return hand_over(sched, env, services, &board, Leave::Exec(&exe)).await,
        Stop::Restart => return hand_over(sched, env, services, &board, Leave::Exit).await,
    };
    // First signal: no new jobs; wait for the ones in flight.
    board.set_draining();
    board.set_ready(false);
    sched.queue.clear();
    board.set_queued(0);
    // Warm VMs hold no job: they stop at once.
    sched.pool.shutdown(&env);
    let n = sched.tasks.len();
    tracing::info!("received {first_signal}: stopping discovery; waiting for {n} in-flight VM(s) (signal again to stop them)");
    ops::systemd::stopping(&format!("draining {n} VM(s)"));
    let mut stopping = false;
    loop {
        if sched.tasks.is_empty() && sched.pool.is_empty() {
            break;
        }
        tokio::select! {
            Some(j) = sched.tasks.join_next() => sched.finished(j),
            event = sched.pool.next_event() => sched.pool.on_event(&env, event),
            sig = signals.recv(), if !stopping => {
                stopping = true;
                tracing::info!("received {sig} again: stopping {} VM(s)", sched.tasks.len());
                sched.stop_vms.cancel();
            }
            _ = interval.tick(), if !stopping => {
                let step = sched.poll_running();
                tokio::select! {
                    () = step => {}
                    sig = signals.recv() => {
                        stopping = true;
                        tracing::info!("received {sig} again: stopping {} VM(s)", sched.tasks.len());
                        sched.stop_vms.cancel();
                    }
                }
            }
        }
    }
    reaper.abort();
    let _ = reaper.await;
    let left = env.leftovers.pending();
    if left > 0 {
        tracing::warn!("exiting with {left} cleanup step(s) on Forgejo not done; the next start's sweep does them");
    }
    tracing::info!("all VMs are gone; exiting");
    services.stop().await;
    drop(sched);
    if let Some(env) = Arc::into_inner(env) {
        if let Err(e) = env.net.teardown() {
            tracing::warn!("network teardown: {e}");
        }
    }
    Ok(())
}
