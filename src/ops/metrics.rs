//! The daemon's Prometheus metrics.
//!
//! [`Metrics`] is a cheap-to-clone handle (everything behind `Arc`s); the controller keeps one and
//! calls its typed methods at each step of a job's life, the Forgejo client reports every API call
//! through [`Metrics::observe_forgejo_call`], and [`super::http::MetricsServer`] encodes the registry
//! for scrapes. All names carry the `fkr_qemu_` prefix; durations are in seconds.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `fkr_qemu_jobs_seen_total` | counter | |
//! | `fkr_qemu_jobs_dropped_total` | counter | (no longer waiting when their turn came) |
//! | `fkr_qemu_jobs_dispatched_total` | counter | |
//! | `fkr_qemu_disk_admission_waits_total` | counter | (a dispatch round held back: no disk for another VM's `disk_max`) |
//! | `fkr_qemu_jobs_finished_total` | counter | `outcome` ([`JobOutcome`]) |
//! | `fkr_qemu_jobs_queued` | gauge | |
//! | `fkr_qemu_vms_running` | gauge | |
//! | `fkr_qemu_queue_wait_seconds` | histogram | seen → dispatched |
//! | `fkr_qemu_vm_prepare_seconds` | histogram | dispatched → QMP ready |
//! | `fkr_qemu_vm_boot_seconds` | histogram | QMP ready → the job seen running (at the poll that first shows it) |
//! | `fkr_qemu_job_duration_seconds` | histogram | dispatched → VM gone |
//! | `fkr_qemu_vm_teardown_seconds` | histogram | VM stopped → everything released |
//! | `fkr_qemu_vm_removals_total` | counter | `reason` ([`RemovalReason`]) |
//! | `fkr_qemu_forgejo_requests_total` | counter | `route`, `status` (0 = no HTTP answer) |
//! | `fkr_qemu_forgejo_request_duration_seconds` | histogram | `route` |
//! | `fkr_qemu_sweep_findings_total` | counter | `kind` ([`SweepKind`]) |
//! | `fkr_qemu_ci_user_refusals_total` | counter | (a Forgejo account holds the CI user's name without proof it is ours) |
//! | `fkr_qemu_job_tokens_total` | counter | `access` ([`TokenAccess`]: `write`, `read`, `none`) |
//! | `fkr_qemu_restart_vms_total` | counter | `result` ([`RestartResult`]: VMs a start found running: `adopted`, `swept`) |
//! | `fkr_qemu_vm_info` | gauge | `vm`, `cgroup` (1 per running VM: its scope unit on systemd hosts, else its cgroup directory) |
//! | `fkr_qemu_pool_warm_vms` | gauge | warm VMs ready for a job (said READY, none bound) |
//! | `fkr_qemu_job_starts_total` | counter | `path` ([`StartPath`]: `warm` bound to a warm VM, `cold` booted for the job) |
//! | `fkr_qemu_pool_bind_seconds` | histogram | a warm bind: dispatch → the runner started (the guest's STARTED stamp, on the host's clock) |
//! | `fkr_qemu_pool_warm_age_seconds` | histogram | a warm VM's age (since READY) when a job took it |
//! | `fkr_qemu_pool_discards_total` | counter | `reason` ([`DiscardReason`]) |
//! | `fkr_qemu_forgejo_cleanup_pending` | gauge | revocations, runner deletions and looks for lost creations the background cleanup still has to do |
//! | `fkr_qemu_forgejo_cleanup_retries_total` | counter | failed attempts of the background cleanup (each retried after a backoff) |

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a dispatched job ended, as far as the host can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobOutcome {
    /// The guest powered itself off (the runner finished, whatever the job's own result).
    Completed,
    /// QEMU exited without a guest power-off (crash, guest reset/panic).
    Crashed,
    /// The job deadline hit and the VM was stopped.
    Deadline,
    /// The VM never got as far as running the job (boot deadline, crash before the runner
    /// picked the job up).
    BootFailure,
    /// A host-side step before boot failed (CI user, token, runner registration, overlay, tap, …).
    PrepareFailed,
    /// The daemon stopped the VM because it was shutting down.
    Shutdown,
    /// QEMU's accelerator could not run the guest (run state `internal-error`, e.g. a KVM
    /// emulation failure). Under `accel = "auto"` KVM is then marked broken and the job retried
    /// under TCG.
    AccelFailed,
    /// Another host claimed the job first (its runner registration has the lower id); this host
    /// booted nothing for it.
    ClaimedElsewhere,
    /// The job left Forgejo's list (another runner ran it, or it was cancelled) before this VM's
    /// runner took it: the VM was stopped.
    Gone,
    /// Forgejo showed the job finished (its runner reported) and the VM did not power off within
    /// the grace: its token was revoked at once and the VM stopped.
    Overstayed,
}

impl JobOutcome {
    pub const ALL: [JobOutcome; 10] = [
        JobOutcome::Completed,
        JobOutcome::Crashed,
        JobOutcome::Deadline,
        JobOutcome::BootFailure,
        JobOutcome::PrepareFailed,
        JobOutcome::Shutdown,
        JobOutcome::AccelFailed,
        JobOutcome::ClaimedElsewhere,
        JobOutcome::Gone,
        JobOutcome::Overstayed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Completed => "completed",
            JobOutcome::Crashed => "crashed",
            JobOutcome::Deadline => "deadline",
            JobOutcome::BootFailure => "boot_failure",
            JobOutcome::PrepareFailed => "prepare_failed",
            JobOutcome::Shutdown => "shutdown",
            JobOutcome::AccelFailed => "accel_failed",
            JobOutcome::ClaimedElsewhere => "claimed_elsewhere",
            JobOutcome::Gone => "gone",
            JobOutcome::Overstayed => "overstayed",
        }
    }
}

/// Why a VM was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemovalReason {
    /// Its job is done (the guest powered off or QEMU exited).
    JobDone,
    /// The job deadline hit.
    Deadline,
    /// It failed to boot (or to launch).
    BootFailure,
    /// The daemon was shutting down.
    Shutdown,
    /// The startup sweep found it left over from an earlier run.
    Sweep,
}

impl RemovalReason {
    pub const ALL: [RemovalReason; 5] = [
        RemovalReason::JobDone,
        RemovalReason::Deadline,
        RemovalReason::BootFailure,
        RemovalReason::Shutdown,
        RemovalReason::Sweep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RemovalReason::JobDone => "job_done",
            RemovalReason::Deadline => "deadline",
            RemovalReason::BootFailure => "boot_failure",
            RemovalReason::Shutdown => "shutdown",
            RemovalReason::Sweep => "sweep",
        }
    }
}

/// What the startup sweep found left over (each is then removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SweepKind {
    /// A qemu process of ours, found through a pid file.
    Process,
    /// A per-VM runtime directory.
    VmDir,
    /// An `fr-*` tap device.
    Tap,
    /// An `orch-*` token of a CI user.
    Token,
    /// A runner named with our prefix.
    Runner,
}

impl SweepKind {
    pub const ALL: [SweepKind; 5] = [
        SweepKind::Process,
        SweepKind::VmDir,
        SweepKind::Tap,
        SweepKind::Token,
        SweepKind::Runner,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SweepKind::Process => "process",
            SweepKind::VmDir => "vm_dir",
            SweepKind::Tap => "tap",
            SweepKind::Token => "token",
            SweepKind::Runner => "runner",
        }
    }
}

/// What a daemon start did with a VM it found from before (see `controller/adopt.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartResult {
    /// Taken over and supervised to its end.
    Adopted,
    /// Not adoptable: stopped and cleaned by the sweep.
    Swept,
}

impl RestartResult {
    pub const ALL: [RestartResult; 2] = [RestartResult::Adopted, RestartResult::Swept];

    pub fn as_str(self) -> &'static str {
        match self {
            RestartResult::Adopted => "adopted",
            RestartResult::Swept => "swept",
        }
    }
}

/// What a job's registry token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenAccess {
    /// `write:package`: push and pull.
    Write,
    /// `read:package` only: a pull request from a fork.
    Read,
    /// No token at all (`fork_pull_requests = "none"`).
    None,
}

impl TokenAccess {
    pub const ALL: [TokenAccess; 3] = [TokenAccess::Write, TokenAccess::Read, TokenAccess::None];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenAccess::Write => "write",
            TokenAccess::Read => "read",
            TokenAccess::None => "none",
        }
    }
}

/// How a job's runner got its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartPath {
    /// Bound to a warm VM of the pool.
    Warm,
    /// A VM booted for the job (no warm VM was ready, the pool is off, or the bind failed).
    Cold,
}

impl StartPath {
    pub const ALL: [StartPath; 2] = [StartPath::Warm, StartPath::Cold];

    pub fn as_str(self) -> &'static str {
        match self {
            StartPath::Warm => "warm",
            StartPath::Cold => "cold",
        }
    }
}

/// Why a warm VM was stopped without running a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiscardReason {
    /// It did not acknowledge its job (STARTED) within `pool.bind_timeout`.
    NoAck,
    /// It never said READY within `boot_deadline` (or failed to launch).
    NotReady,
    /// Older than `pool.max_age`.
    Aged,
    /// The base image file changed since it booted.
    ImageChanged,
    /// Its QEMU ended or its channel closed while it waited.
    Died,
    /// The daemon is shutting down.
    Shutdown,
}

impl DiscardReason {
    pub const ALL: [DiscardReason; 6] = [
        DiscardReason::NoAck,
        DiscardReason::NotReady,
        DiscardReason::Aged,
        DiscardReason::ImageChanged,
        DiscardReason::Died,
        DiscardReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiscardReason::NoAck => "no_ack",
            DiscardReason::NotReady => "not_ready",
            DiscardReason::Aged => "aged",
            DiscardReason::ImageChanged => "image_changed",
            DiscardReason::Died => "died",
            DiscardReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PathLabels {
    path: StartPath,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DiscardLabels {
    reason: DiscardReason,
}

/// The warm pool's metrics.
struct PoolMetrics {
    warm: Gauge,
    starts: Family<PathLabels, Counter>,
    bind: Histogram,
    age: Histogram,
    discards: Family<DiscardLabels, Counter>,
}

impl PoolMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = PoolMetrics {
            warm: Gauge::default(),
            starts: Family::default(),
            // 10 ms … ~80 s: a bind is sub-second; a fallback to a cold boot is not.
            bind: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            // 1 s … ~4.5 h: up to max_age.
            age: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            discards: Family::default(),
        };
        registry.register("pool_warm_vms", "Warm VMs ready for a job", m.warm.clone());
        registry.register(
            "job_starts",
            "Jobs whose runner started in a warm VM or in a VM booted for them",
            m.starts.clone(),
        );
        registry.register(
            "pool_bind_seconds",
            "Warm binds: dispatch to the runner started in the guest",
            m.bind.clone(),
        );
        registry.register(
            "pool_warm_age_seconds",
            "Age of a warm VM (since READY) when a job took it",
            m.age.clone(),
        );
        registry.register(
            "pool_discards",
            "Warm VMs stopped without running a job, by reason",
            m.discards.clone(),
        );
        for path in StartPath::ALL {
            drop(m.starts.get_or_create(&PathLabels { path }));
        }
        for reason in DiscardReason::ALL {
            drop(m.discards.get_or_create(&DiscardLabels { reason }));
        }
        m
    }
}

macro_rules! label_value_via_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value_via_as_str!(
    JobOutcome,
    RemovalReason,
    SweepKind,
    TokenAccess,
    RestartResult,
    StartPath,
    DiscardReason
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RestartLabels {
    result: RestartResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AccessLabels {
    access: TokenAccess,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: JobOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: RemovalReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VmInfoLabels {
    vm: String,
    cgroup: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: SweepKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteStatusLabels {
    route: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// Builds the per-route latency histograms (a `Family` needs a constructor for non-default metrics).
#[derive(Clone)]
struct ForgejoLatencyBuckets;

impl MetricConstructor<Histogram> for ForgejoLatencyBuckets {
    fn new_metric(&self) -> Histogram {
        // 5 ms … ~41 s
        Histogram::new(exponential_buckets(0.005, 2.0, 14))
    }
}

struct Inner {
    registry: Registry,
    jobs_seen: Counter,
    jobs_dropped: Counter,
    disk_waits: Counter,
    jobs_dispatched: Counter,
    jobs_finished: Family<OutcomeLabels, Counter>,
    jobs_queued: Gauge,
    vms_running: Gauge,
    queue_wait: Histogram,
    prepare: Histogram,
    boot: Histogram,
    job_duration: Histogram,
    teardown: Histogram,
    removals: Family<ReasonLabels, Counter>,
    forgejo_requests: Family<RouteStatusLabels, Counter>,
    forgejo_latency: Family<RouteLabels, Histogram, ForgejoLatencyBuckets>,
    sweep_findings: Family<KindLabels, Counter>,
    ci_user_refusals: Counter,
    job_tokens: Family<AccessLabels, Counter>,
    restart_vms: Family<RestartLabels, Counter>,
    vm_info: Family<VmInfoLabels, Gauge>,
    pool: PoolMetrics,
    cleanup_pending: Gauge,
    cleanup_retries: Counter,
}

/// The daemon's metrics. Clone it freely: clones share the same counters.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fkr_qemu");
        let jobs_seen = Counter::default();
        let jobs_dropped = Counter::default();
        let disk_waits = Counter::default();
        let jobs_dispatched = Counter::default();
        let jobs_finished = Family::<OutcomeLabels, Counter>::default();
        let jobs_queued = Gauge::default();
        let vms_running = Gauge::default();
        // 0.5 s … ~68 min: jobs wait for a free slot behind others.
        let queue_wait = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        // 50 ms … ~100 s: overlay, seed, tap, qemu spawn, QMP handshake.
        let prepare = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        // 1 s … ~17 min: firmware + kernel + cloud-init (TCG is slow).
        let boot = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        // 5 s … ~5.7 h: whole jobs.
        let job_duration = Histogram::new(exponential_buckets(5.0, 2.0, 13));
        // 50 ms … ~100 s: powerdown ladder, token revocation, runner deletion, file removal.
        let teardown = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        let removals = Family::<ReasonLabels, Counter>::default();
        let forgejo_requests = Family::<RouteStatusLabels, Counter>::default();
        let forgejo_latency = Family::new_with_constructor(ForgejoLatencyBuckets);
        let sweep_findings = Family::<KindLabels, Counter>::default();
        let ci_user_refusals = Counter::default();
        let job_tokens = Family::<AccessLabels, Counter>::default();
        let restart_vms = Family::<RestartLabels, Counter>::default();

        registry.register(
            "jobs_seen",
            "Waiting jobs with our label seen for the first time",
            jobs_seen.clone(),
        );
        registry.register(
            "jobs_dropped",
            "Queued jobs dropped because they were no longer waiting when their turn came",
            jobs_dropped.clone(),
        );
        registry.register(
            "disk_admission_waits",
            "Dispatch rounds that kept a job waiting because the disk could not hold another VM's disk_max",
            disk_waits.clone(),
        );
        registry.register(
            "jobs_dispatched",
            "Jobs given a VM",
            jobs_dispatched.clone(),
        );
        registry.register(
            "jobs_finished",
            "Dispatched jobs whose VM is gone, by outcome",
            jobs_finished.clone(),
        );
        registry.register(
            "jobs_queued",
            "Jobs waiting for a free VM slot",
            jobs_queued.clone(),
        );
        registry.register(
            "vms_running",
            "VMs that exist right now",
            vms_running.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from a job being seen to its dispatch",
            queue_wait.clone(),
        );
        registry.register(
            "vm_prepare_seconds",
            "Host-side preparation: dispatch to QMP ready",
            prepare.clone(),
        );
        registry.register(
            "vm_boot_seconds",
            "Guest boot: QMP ready to the poll that first shows the job running",
            boot.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Dispatch to the VM being gone",
            job_duration.clone(),
        );
        registry.register(
            "vm_teardown_seconds",
            "VM stopped to all of its resources released",
            teardown.clone(),
        );
        registry.register("vm_removals", "VMs removed, by reason", removals.clone());
        registry.register(
            "forgejo_requests",
            "Forgejo API calls by route template and HTTP status (0: no answer)",
            forgejo_requests.clone(),
        );
        registry.register(
            "forgejo_request_duration_seconds",
            "Forgejo API call latency by route template",
            forgejo_latency.clone(),
        );
        registry.register(
            "sweep_findings",
            "Leftovers found (and removed) by the startup sweep, by kind",
            sweep_findings.clone(),
        );

        registry.register(
            "ci_user_refusals",
            "Jobs failed because a Forgejo account holds their CI user's name without proof that fkr-qemu created it for that repository",
            ci_user_refusals.clone(),
        );
        registry.register(
            "job_tokens",
            "Registry tokens given to jobs, by access (read: pull requests from forks)",
            job_tokens.clone(),
        );
        registry.register(
            "restart_vms",
            "VMs a daemon start found running from before: taken over (adopted) or stopped and cleaned (swept)",
            restart_vms.clone(),
        );

        let vm_info = Family::<VmInfoLabels, Gauge>::default();
        registry.register(
            "vm_info",
            "Each running VM (1) with where its processes are: its systemd scope, or its cgroup directory",
            vm_info.clone(),
        );
        let pool = PoolMetrics::register(&mut registry);
        let cleanup_pending = Gauge::default();
        registry.register(
            "forgejo_cleanup_pending",
            "Revocations, runner deletions and looks for lost creations the background cleanup still has to do",
            cleanup_pending.clone(),
        );
        let cleanup_retries = Counter::default();
        registry.register(
            "forgejo_cleanup_retries",
            "Failed attempts of the background cleanup (each retried after a backoff)",
            cleanup_retries.clone(),
        );

        // Create every labelled series up front so scrapes show zeros instead of missing series
        // (rate() and alerts behave better on series that exist from the start).
        for outcome in JobOutcome::ALL {
            drop(jobs_finished.get_or_create(&OutcomeLabels { outcome }));
        }
        for reason in RemovalReason::ALL {
            drop(removals.get_or_create(&ReasonLabels { reason }));
        }
        for kind in SweepKind::ALL {
            drop(sweep_findings.get_or_create(&KindLabels { kind }));
        }
        for access in TokenAccess::ALL {
            drop(job_tokens.get_or_create(&AccessLabels { access }));
        }
        for result in RestartResult::ALL {
            drop(restart_vms.get_or_create(&RestartLabels { result }));
        }

        Metrics {
            inner: Arc::new(Inner {
                registry,
                jobs_seen,
                jobs_dropped,
                disk_waits,
                jobs_dispatched,
                jobs_finished,
                jobs_queued,
                vms_running,
                queue_wait,
                prepare,
                boot,
                job_duration,
                teardown,
                removals,
                forgejo_requests,
                forgejo_latency,
                sweep_findings,
                ci_user_refusals,
                job_tokens,
                restart_vms,
                vm_info,
                pool,
                cleanup_pending,
                cleanup_retries,
            }),
        }
    }

    /// The running VMs and where each one's processes are (`vm`, scope or cgroup): the whole set,
    /// replacing the last one.
    pub fn set_vm_cgroups<'a>(&self, vms: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.inner.vm_info.clear();
        for (vm, cgroup) in vms {
            self.inner
                .vm_info
                .get_or_create(&VmInfoLabels {
                    vm: vm.to_owned(),
                    cgroup: cgroup.to_owned(),
                })
                .set(1);
        }
    }

    /// Warm VMs ready now.
    pub fn set_pool_warm(&self, n: usize) {
        self.inner
            .pool
            .warm
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A job's runner started on `path`.
    pub fn job_started(&self, path: StartPath) {
        self.inner
            .pool
            .starts
            .get_or_create(&PathLabels { path })
            .inc();
    }

    /// A warm bind: dispatch → runner started took `latency`; the warm VM was `age` old.
    pub fn pool_bound(&self, latency: Duration, age: Duration) {
        self.inner.pool.bind.observe(latency.as_secs_f64());
        self.inner.pool.age.observe(age.as_secs_f64());
    }

    /// A warm VM was stopped without a job.
    pub fn pool_discarded(&self, reason: DiscardReason) {
        self.inner
            .pool
            .discards
            .get_or_create(&DiscardLabels { reason })
            .inc();
    }

    /// The background cleanup has `n` chores left.
    pub fn set_cleanup_pending(&self, n: usize) {
        self.inner
            .cleanup_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An attempt of the background cleanup failed (it is retried).
    pub fn cleanup_retried(&self) {
        self.inner.cleanup_retries.inc();
    }

    /// A job failed because its CI user's name is held by an account that is not provably ours.
    pub fn ci_user_refused(&self) {
        self.inner.ci_user_refusals.inc();
    }

    /// A daemon start adopted or swept a VM it found running.
    pub fn restart_vm(&self, result: RestartResult) {
        self.inner
            .restart_vms
            .get_or_create(&RestartLabels { result })
            .inc();
    }

    /// A job got a registry token of `access` (or none).
    pub fn job_token(&self, access: TokenAccess) {
        self.inner
            .job_tokens
            .get_or_create(&AccessLabels { access })
            .inc();
    }

    /// A waiting job entered the queue.
    pub fn job_seen(&self) {
        self.inner.jobs_seen.inc();
    }

    /// A queued job was dropped because it was no longer waiting.
    pub fn job_dropped(&self) {
        self.inner.jobs_dropped.inc();
    }

    /// A dispatch round kept a job waiting: no disk for another VM (`vm::reserve_disk`).
    pub fn disk_admission_wait(&self) {
        self.inner.disk_waits.inc();
    }

    /// A job was dispatched to a VM; `queue_wait` is the time since it was seen.
    pub fn job_dispatched(&self, queue_wait: Duration) {
        self.inner.jobs_dispatched.inc();
        self.inner.queue_wait.observe(queue_wait.as_secs_f64());
    }

    /// A dispatched job ended; `duration` runs from dispatch to the VM being gone.
    pub fn job_finished(&self, outcome: JobOutcome, duration: Duration) {
        self.inner
            .jobs_finished
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.inner.job_duration.observe(duration.as_secs_f64());
    }

    /// Host-side preparation (dispatch → QMP ready) took `d`.
    pub fn observe_prepare(&self, d: Duration) {
        self.inner.prepare.observe(d.as_secs_f64());
    }

    /// The guest took `d` from QMP ready to the poll that first showed its job running.
    pub fn observe_boot(&self, d: Duration) {
        self.inner.boot.observe(d.as_secs_f64());
    }

    /// Tearing a VM down (stop → all resources released) took `d`.
    pub fn observe_teardown(&self, d: Duration) {
        self.inner.teardown.observe(d.as_secs_f64());
    }

    /// A VM was removed.
    pub fn vm_removed(&self, reason: RemovalReason) {
        self.inner
            .removals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The number of VMs that exist now. [`super::status::StatusBoard`] keeps it current.
    pub fn set_vms_running(&self, n: usize) {
        self.inner
            .vms_running
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The number of queued jobs now. [`super::status::StatusBoard`] keeps it current.
    pub fn set_jobs_queued(&self, n: usize) {
        self.inner
            .jobs_queued
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The startup sweep found (and removed) `count` leftovers of `kind`. Each leftover VM dir
    /// is also a VM removal with reason `sweep`.
    pub fn sweep_found(&self, kind: SweepKind, count: u64) {
        self.inner
            .sweep_findings
            .get_or_create(&KindLabels { kind })
            .inc_by(count);
        if kind == SweepKind::VmDir {
            self.inner
                .removals
                .get_or_create(&ReasonLabels {
                    reason: RemovalReason::Sweep,
                })
                .inc_by(count);
        }
    }

    /// One Forgejo API call: `route` is the route template (`/api/v1/admin/users/{username}`,
    /// never a path with names filled in, so the label set stays small), `status` the HTTP status
    /// or 0 when no answer came (connect error, timeout).
    pub fn observe_forgejo_call(&self, route: &str, status: u16, latency: Duration) {
        self.inner
            .forgejo_requests
            .get_or_create(&RouteStatusLabels {
                route: route.to_owned(),
                status,
            })
            .inc();
        self.inner
            .forgejo_latency
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(latency.as_secs_f64());
    }

    /// A closure for the Forgejo client's observer hook.
    pub fn forgejo_observer(&self) -> impl Fn(&str, u16, Duration) + Send + Sync + 'static {
        let metrics = self.clone();
        move |route, status, latency| metrics.observe_forgejo_call(route, status, latency)
    }

    /// The registry in the OpenMetrics text format (which Prometheus scrapes natively).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("encoding metrics into a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("series {series} not in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn counters_and_histograms_move() {
        let m = Metrics::new();
        let before = m.encode();
        assert_eq!(sample(&before, "fkr_qemu_jobs_seen_total"), 0.0);
        assert_eq!(
            sample(
                &before,
                "fkr_qemu_jobs_finished_total{outcome=\"deadline\"}"
            ),
            0.0
        );

        m.job_seen();
        m.job_seen();
        m.job_dispatched(Duration::from_millis(700));
        m.job_finished(JobOutcome::Completed, Duration::from_secs(42));
        m.vm_removed(RemovalReason::JobDone);
        m.sweep_found(SweepKind::Token, 3);
        m.sweep_found(SweepKind::VmDir, 2);
        m.set_vms_running(2);
        m.observe_forgejo_call("/api/v1/version", 200, Duration::from_millis(12));
        m.observe_forgejo_call("/api/v1/version", 0, Duration::from_secs(30));

        let t = m.encode();
        assert_eq!(sample(&t, "fkr_qemu_jobs_seen_total"), 2.0);
        assert_eq!(sample(&t, "fkr_qemu_jobs_dispatched_total"), 1.0);
        assert_eq!(
            sample(&t, "fkr_qemu_jobs_finished_total{outcome=\"completed\"}"),
            1.0
        );
        assert_eq!(
            sample(&t, "fkr_qemu_vm_removals_total{reason=\"job_done\"}"),
            1.0
        );
        assert_eq!(
            sample(&t, "fkr_qemu_sweep_findings_total{kind=\"token\"}"),
            3.0
        );
        assert_eq!(sample(&t, "fkr_qemu_vms_running"), 2.0);
        assert_eq!(
            sample(&t, "fkr_qemu_vm_removals_total{reason=\"sweep\"}"),
            2.0
        );
        assert_eq!(sample(&t, "fkr_qemu_queue_wait_seconds_count"), 1.0);
        assert_eq!(sample(&t, "fkr_qemu_queue_wait_seconds_sum"), 0.7);
        assert_eq!(
            sample(
                &t,
                "fkr_qemu_forgejo_requests_total{route=\"/api/v1/version\",status=\"200\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &t,
                "fkr_qemu_forgejo_requests_total{route=\"/api/v1/version\",status=\"0\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &t,
                "fkr_qemu_forgejo_request_duration_seconds_count{route=\"/api/v1/version\"}"
            ),
            2.0
        );
        assert!(t.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn pool_metrics_move() {
        let m = Metrics::new();
        let t = m.encode();
        assert_eq!(sample(&t, "fkr_qemu_job_starts_total{path=\"warm\"}"), 0.0);
        assert_eq!(
            sample(&t, "fkr_qemu_pool_discards_total{reason=\"no_ack\"}"),
            0.0
        );
        m.set_pool_warm(2);
        m.job_started(StartPath::Warm);
        m.job_started(StartPath::Cold);
        m.job_started(StartPath::Warm);
        m.pool_bound(Duration::from_millis(250), Duration::from_secs(30));
        m.pool_discarded(DiscardReason::NoAck);
        let t = m.encode();
        assert_eq!(sample(&t, "fkr_qemu_pool_warm_vms"), 2.0);
        assert_eq!(sample(&t, "fkr_qemu_job_starts_total{path=\"warm\"}"), 2.0);
        assert_eq!(sample(&t, "fkr_qemu_job_starts_total{path=\"cold\"}"), 1.0);
        assert_eq!(sample(&t, "fkr_qemu_pool_bind_seconds_sum"), 0.25);
        assert_eq!(sample(&t, "fkr_qemu_pool_warm_age_seconds_sum"), 30.0);
        assert_eq!(
            sample(&t, "fkr_qemu_pool_discards_total{reason=\"no_ack\"}"),
            1.0
        );
    }

    #[test]
    fn observer_closure_feeds_the_same_registry() {
        let m = Metrics::new();
        let observe = m.forgejo_observer();
        observe("/api/v1/admin/runners", 404, Duration::from_millis(3));
        assert!(m.encode().contains(
            "fkr_qemu_forgejo_requests_total{route=\"/api/v1/admin/runners\",status=\"404\"} 1"
        ));
    }
}
