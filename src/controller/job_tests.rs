//! The job pipeline's decisions against doubles of its three seams: every state, every failure
//! path's release, the boot deadline, the pick-up, the host's stop and the accelerator retry. No
//! root, no QEMU, no Forgejo; each test takes milliseconds.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::controller::credentials::{CiUserRef, CredentialError, Credentials, TokenRef};
use crate::controller::ports::{Attachment, Forge, Network, RunningVm, Started, Vms};
use crate::forgejo::{JobStatus, RegisteredRunner};
use crate::ops::VmState;
use crate::vm::{NetDevice, StopStep, VmExit, VmResources};

/// The steps a test can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Step {
    Repository,
    CiUser,
    Token,
    Runner,
    Network,
    Launch,
    Revoke,
    DeleteRunner,
    Runners,
    StillWaiting,
}

fn api_error(status: u16) -> forgejo::Error {
    forgejo::Error::Api {
        method: "POST",
        route: "/test",
        status,
        message: "refused by the test".into(),
    }
}

/// Forgejo: remembers which tokens and runners exist, fails where told.
#[derive(Default)]
struct FakeForge {
    fail: Mutex<HashSet<Step>>,
    access: Mutex<Option<TokenAccess>>,
    tokens: Mutex<BTreeSet<i64>>,
    /// Runner id → description (this host's registrations and other hosts' claims).
    runners: Mutex<std::collections::BTreeMap<i64, (String, &'static str)>>,
    /// Runner id → the name it was registered under (else `fr-<id>`).
    names: Mutex<std::collections::HashMap<i64, String>>,
    /// Handles Forgejo no longer lists as waiting.
    gone: Mutex<HashSet<String>>,
    /// Every call, in order.
    calls: Mutex<Vec<&'static str>>,
    next: AtomicI64,
}

impl FakeForge {
    fn call(&self, what: &'static str, step: Step) -> bool {
        self.calls.lock().unwrap().push(what);
        self.fail.lock().unwrap().contains(&step)
    }
    fn id(&self) -> i64 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }
    /// Another host's claim on `job_id`, registered now (so its id is the next one).
    fn foreign_claim(&self, host: &str, job_id: i64, status: &'static str) -> i64 {
        let id = self.id();
        self.runners.lock().unwrap().insert(
            id,
            (format!("fkr-qemu@{host} job {job_id} alice/web"), status),
        );
        id
    }
    fn live(&self) -> (usize, usize) {
        (
            self.tokens.lock().unwrap().len(),
            self.runners.lock().unwrap().len(),
        )
    }
    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

impl Forge for FakeForge {
    async fn repository(&self, id: i64) -> Result<Repository, forgejo::Error> {
        if self.call("repository", Step::Repository) {
            return Err(api_error(404));
        }
        Ok(Repository {
            id,
            owner: "alice".into(),
            name: "web".into(),
            full_name: "alice/web".into(),
        })
    }

    async fn token_access(&self, _job: &Job, _repo: &Repository) -> TokenAccess {
        self.access.lock().unwrap().unwrap_or(TokenAccess::Write)
    }

    async fn ci_user(&self, repo: &Repository) -> Result<CiUserRef, CredentialError> {
        if self.call("ci_user", Step::CiUser) {
            return Err(CredentialError::Refused {
                username: "alice-web-ci".into(),
                repository: repo.full_name.clone(),
                repo_id: repo.id,
                why: "the test says so".into(),
            });
        }
        Ok(CiUserRef {
            repo_id: repo.id,
            username: "alice-web-ci".into(),
            password: Secret::new("pw"),
        })
    }

    async fn mint_token(
        &self,
        user: &CiUserRef,
        name: &str,
        _scopes: &'static [&'static str],
    ) -> Result<(TokenRef, Secret), CredentialError> {
        if self.call("mint_token", Step::Token) {
            return Err(api_error(500).into());
        }
        let id = self.id();
        self.tokens.lock().unwrap().insert(id);
        let token = TokenRef {
            user: user.clone(),
            id,
            name: name.to_owned(),
        };
        Ok((token, Secret::new(format!("registry-secret-{id}"))))
    }

    async fn revoke_token(&self, token: &TokenRef) -> Result<bool, CredentialError> {
        if self.call("revoke_token", Step::Revoke) {
            return Err(api_error(500).into());
        }
        Ok(self.tokens.lock().unwrap().remove(&token.id))
    }

    async fn register_runner(
        &self,
        name: &VmName,
        _description: &str,
    ) -> Result<RegisteredRunner, forgejo::Error> {
        if self.call("register_runner", Step::Runner) {
            return Err(api_error(500));
        }
        let id = self.id();
        self.runners
            .lock()
            .unwrap()
            .insert(id, (_description.to_owned(), "offline"));
        self.names.lock().unwrap().insert(id, name.to_string());
        Ok(RegisteredRunner {
            id,
            uuid: format!("uuid-{name}"),
            token: Secret::new("runner-token"),
        })
    }

    async fn delete_runner(&self, id: i64) -> Result<bool, forgejo::Error> {
        if self.call("delete_runner", Step::DeleteRunner) {
            return Err(api_error(500));
        }
        Ok(self.runners.lock().unwrap().remove(&id).is_some())
    }

    async fn still_waiting(&self, job: &Job, label: &str) -> Result<bool, forgejo::Error> {
        assert_eq!(label, "external-host");
        if self.call("still_waiting", Step::StillWaiting) {
            return Err(api_error(503));
        }
        Ok(!self.gone.lock().unwrap().contains(&job.handle))
    }

    async fn runners(&self) -> Result<Vec<forgejo::Runner>, forgejo::Error> {
        if self.call("runners", Step::Runners) {
            return Err(api_error(503));
        }
        Ok(self
            .runners
            .lock()
            .unwrap()
            .iter()
            .map(|(id, (description, status))| forgejo::Runner {
                id: *id,
                uuid: String::new(),
                name: self
                    .names
                    .lock()
                    .unwrap()
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("fr-{id:08x}")),
                description: description.clone(),
                owner_id: 0,
                repo_id: 0,
                version: String::new(),
                labels: Vec::new(),
                ephemeral: true,
                status: (*status).to_owned(),
            })
            .collect())
    }
}

/// Counts live attachments: each hold decrements on drop.
struct Hold(Arc<AtomicUsize>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct FakeNet {
    fail: bool,
    live: Arc<AtomicUsize>,
}

impl Network for FakeNet {
    fn attach(&self, name: &VmName) -> Result<Attachment, crate::net::Error> {
        if self.fail {
            return Err(crate::net::Error::PoolExhausted {
                subnet: "10.88.0.1/30".parse().unwrap(),
            });
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        let mac = crate::types::MacAddr::derived(name.as_str());
        Ok(Attachment {
            address: "10.88.0.2".parse().unwrap(),
            network_config: "version: 2\n".into(),
            device: NetDevice {
                tap: std::fs::File::open("/dev/null").unwrap().into(),
                mac,
            },
            hold: Box::new(Hold(self.live.clone())),
        })
    }

    fn adopt(
        &self,
        _name: &VmName,
        _address: std::net::Ipv4Addr,
    ) -> Result<Box<dyn Send>, crate::net::Error> {
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Hold(self.live.clone())))
    }
}

/// The test's side of one fake VM.
struct VmCtl {
    name: VmName,
    job_id: i64,
    stop: CancellationToken,
    state: watch::Sender<vm::VmState>,
    exit: Option<oneshot::Sender<Outcome>>,
    user_data: String,
}

impl VmCtl {
    /// The fake VM ends with `outcome` (its `wait` returns).
    fn end(&mut self, outcome: Outcome) {
        self.exit
            .take()
            .expect("the VM is still running")
            .send(outcome)
            .expect("the job waits for its VM");
    }
}

#[derive(Default)]
struct FakeVms {
    fail: bool,
    /// Held by a test to keep `launch` from returning (the job stays in `preparing`).
    gate: tokio::sync::Mutex<()>,
    launched: Mutex<Vec<VmCtl>>,
}

impl FakeVms {
    /// The next VM's controls, once launched.
    async fn next(&self) -> VmCtl {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(ctl) = self.launched.lock().unwrap().pop() {
                return ctl;
            }
            assert!(Instant::now() < deadline, "no VM was launched");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

struct FakeVm {
    name: VmName,
    stop: CancellationToken,
    detach: CancellationToken,
    state: watch::Receiver<vm::VmState>,
    exit: oneshot::Receiver<Outcome>,
}

impl Vms for FakeVms {
    type Vm = FakeVm;

    async fn launch(&self, spec: VmSpec) -> Result<FakeVm, vm::Error> {
        let _gate = self.gate.lock().await;
        if self.fail {
            return Err(vm::Error::QemuNotFound {
                path: "qemu-system-x86_64".into(),
            });
        }
        let stop = CancellationToken::new();
        let (state_tx, state_rx) = watch::channel(vm::VmState::Starting);
        let (exit_tx, exit_rx) = oneshot::channel();
        self.launched.lock().unwrap().push(VmCtl {
            name: spec.name.clone(),
            job_id: spec.job.as_ref().map_or(0, |j| j.job_id),
            stop: stop.clone(),
            state: state_tx,
            exit: Some(exit_tx),
            user_data: spec.seed.user_data.clone(),
        });
        Ok(FakeVm {
            name: spec.name,
            stop,
            detach: CancellationToken::new(),
            state: state_rx,
            exit: exit_rx,
        })
    }
}

impl RunningVm for FakeVm {
    fn started(&self) -> Started {
        Started {
            pid: 4242,
            accel: Accel::Tcg,
            serial_log: "/tmp/serial.log".into(),
            resources: VmResources {
                uid: None,
                cgroup: None,
                scope: None,
                overlay: "/tmp/overlay.qcow2".into(),
                disk_max: 1 << 30,
            },
        }
    }

    fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    fn detach_token(&self) -> CancellationToken {
        self.detach.clone()
    }

    fn record_job(&self, _job: vm::JobMeta) -> Result<(), vm::Error> {
        Ok(())
    }

    fn watch_state(&self) -> watch::Receiver<vm::VmState> {
        self.state.clone()
    }

    /// Ends with what the test sends, or — like the driver — `HostStopped` when stopped. A
    /// dropped sender is a panicking supervisor.
    async fn wait(self) -> Result<VmExit, vm::Error> {
        let outcome = tokio::select! {
            o = self.exit => o.expect("the test dropped the VM's controls: a supervisor panic"),
            () = self.stop.cancelled() => Outcome::HostStopped { stopped_by: StopStep::Powerdown },
            () = self.detach.cancelled() => Outcome::HandedOver,
        };
        Ok(VmExit {
            name: self.name,
            outcome,
            state: vm::VmState::Stopped,
            accel: Accel::Tcg,
            qemu_version: None,
            timings: Default::default(),
            teardown_error: None,
        })
    }

    /// The doubles have no agent: a warm VM of theirs never says READY.
    fn agent_socket(&self) -> std::path::PathBuf {
        "/nonexistent/agent.sock".into()
    }
}

type Env = JobEnv<FakeForge, FakeNet, FakeVms>;

fn env_with(
    forge: FakeForge,
    net: FakeNet,
    vms: FakeVms,
    accel: Accel,
    boot: Duration,
) -> Arc<Env> {
    env_claims(forge, net, vms, accel, boot, Duration::from_secs(600))
}

fn env_claims(
    forge: FakeForge,
    net: FakeNet,
    vms: FakeVms,
    accel: Accel,
    boot: Duration,
    claim_timeout: Duration,
) -> Arc<Env> {
    let metrics = Metrics::new();
    Arc::new(JobEnv {
        forge,
        net,
        vms,
        board: StatusBoard::new(Some(metrics.clone())),
        metrics,
        claims: ClaimBook::new(claim_timeout),
        handover: CancellationToken::new(),
        leftovers: Default::default(),
        settings: JobSettings {
            label: "external-host".into(),
            runner_url: "http://10.88.0.1:3000/".parse().unwrap(),
            base_image: "/var/lib/fkr-qemu/base.qcow2".into(),
            boot_deadline: boot,
            job_deadline: Duration::from_secs(3600),
            accel,
            runner_marker: "fkr-qemu@test".into(),
            claim_settle: Duration::from_millis(5),
            bind_timeout: Duration::from_secs(1),
            gone_grace: Duration::from_millis(300),
        },
    })
}

fn env() -> Arc<Env> {
    env_with(
        FakeForge::default(),
        FakeNet::default(),
        FakeVms::default(),
        Accel::Auto,
        Duration::from_secs(60),
    )
}

fn job(id: i64) -> Job {
    Job {
        id,
        handle: format!("handle-{id}"),
        attempt: 1,
        repo_id: 7,
        owner_id: 1,
        name: "build".into(),
        runs_on: vec!["external-host".into()],
        needs: Vec::new(),
        task_id: 0,
        status: JobStatus::Waiting,
        run_id: 0,
    }
}

/// Starts a job; returns its task, the pick-up switch and the host's stop.
fn start(
    env: &Arc<Env>,
    job: Job,
) -> (
    tokio::task::JoinHandle<Report<FakeVm>>,
    watch::Sender<Listed>,
    CancellationToken,
) {
    start_warm(env, job, None)
}

/// Starts a job, bound to `warm` when given.
fn start_warm(
    env: &Arc<Env>,
    job: Job,
    warm: Option<super::pool::WarmVm<FakeVm>>,
) -> (
    tokio::task::JoinHandle<Report<FakeVm>>,
    watch::Sender<Listed>,
    CancellationToken,
) {
    let (tx, rx) = watch::channel(Listed::Waiting);
    let stop = CancellationToken::new();
    let ticket = Ticket {
        job,
        seen_at: Instant::now(),
        picked_up: rx,
        disk: None,
        claim_delay: Duration::ZERO,
        warm,
    };
    let task = tokio::spawn(run(env.clone(), ticket, stop.clone()));
    (task, tx, stop)
}

/// The board's state of the only VM, once it is `want`.
async fn board_shows(env: &Env, want: &str) -> VmInfo {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let vms = env.board.snapshot().vms;
        if let Some(v) = vms.iter().find(|v| v.state.as_str() == want) {
            return v.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the board never showed {want}: {vms:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits for the release a dropped job spawns, then checks that nothing is held.
async fn released_in_the_background(env: &Env) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.forge.live() != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "release never ran: {:?}",
            env.forge.calls()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_released(env);
}

/// Nothing is held any more: no token, no runner, no network, nothing on the board.
fn assert_released(env: &Env) {
    assert_eq!(
        env.forge.live(),
        (0, 0),
        "token or runner left: {:?}",
        env.forge.calls()
    );
    assert_eq!(env.net.live.load(Ordering::SeqCst), 0, "network left");
    assert!(env.board.snapshot().vms.is_empty(), "still on the board");
}

/// The `user:token` pairs of the registry auth files in a user-data document.
fn registry_logins(user_data: &str) -> Vec<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut pairs = Vec::new();
    for c in user_data
        .lines()
        .filter_map(|l| l.strip_prefix("  content: "))
    {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&b64.decode(c).unwrap()) else {
            continue;
        };
        for auth in json["auths"]
            .as_object()
            .into_iter()
            .flat_map(|a| a.values())
        {
            let pair = b64.decode(auth["auth"].as_str().unwrap()).unwrap();
            pairs.push(String::from_utf8(pair).unwrap());
        }
    }
    pairs
}

fn metric(env: &Env, name: &str) -> String {
    env.metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_job_walks_every_state_and_releases_everything() {
    let env = env();
    let gate = env.vms.gate.lock().await;
    let (task, picked_up, _stop) = start(&env, job(1));
    // Preparing until launch (held by the gate); the address appears once the network step ran.
    let mut v = board_shows(&env, "preparing").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while v.address.is_none() {
        assert!(Instant::now() < deadline, "no address on the board: {v:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
        v = board_shows(&env, "preparing").await;
    }
    assert_eq!(
        (v.job_id, v.owner.as_str(), v.repo.as_str()),
        (1, "alice", "web")
    );
    assert_eq!(v.address.as_deref(), Some("10.88.0.2"));
    drop(gate);

    let mut vm = env.vms.next().await;
    assert!(vm.user_data.contains("handle-1"), "{}", vm.user_data);
    let logins = registry_logins(&vm.user_data);
    assert!(!logins.is_empty(), "the registry login reaches the seed");
    assert!(
        logins
            .iter()
            .all(|l| l.starts_with("alice-web-ci:registry-secret-")),
        "{logins:?}"
    );
    let v = board_shows(&env, "booting").await;
    assert_eq!((v.pid, v.accel), (Some(4242), Some(Accel::Tcg)));
    assert_eq!(v.name, vm.name.as_str());
    assert_eq!(
        metric(&env, "fkr_qemu_vm_prepare_seconds_count"),
        "fkr_qemu_vm_prepare_seconds_count 0",
        "nothing is prepared before QMP answers"
    );

    // QMP answers: the prepare metric is taken there, not at spawn.
    vm.state.send_replace(vm::VmState::Running);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !metric(&env, "fkr_qemu_vm_prepare_seconds_count").ends_with(" 1") {
        assert!(Instant::now() < deadline, "prepare never observed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    picked_up.send_replace(Listed::Running);
    board_shows(&env, "running").await;
    vm.end(Outcome::GuestPoweredOff);

    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::Completed);
    assert!(report.picked_up && report.retry.is_none());
    assert_released(&env);
    assert!(!vm.stop.is_cancelled(), "a finished VM is never stopped");
    assert!(metric(&env, "fkr_qemu_vm_boot_seconds_count").ends_with(" 1"));
    assert_eq!(
        env.forge.calls(),
        [
            "repository",
            "register_runner",
            "runners",
            "ci_user",
            "mint_token",
            "runners",
            "still_waiting",
            "revoke_token",
            "delete_runner"
        ]
    );
}

#[tokio::test]
async fn every_failing_step_releases_exactly_what_it_took() {
    // (failing step, the Forgejo calls made, a VM launched). The CI user and token are made
    // while the claim settles, between its two looks.
    let claimed = |login: &[&'static str], more: &[&'static str]| -> Vec<&'static str> {
        [
            &["repository", "register_runner", "runners"][..],
            login,
            &["runners", "still_waiting"],
            more,
        ]
        .concat()
    };
    let login = ["ci_user", "mint_token"];
    let cases: [(Step, Vec<&str>); 8] = [
        (Step::Repository, vec!["repository"]),
        (Step::Runner, vec!["repository", "register_runner"]),
        (
            Step::Runners,
            vec!["repository", "register_runner", "runners", "delete_runner"],
        ),
        (
            Step::StillWaiting,
            claimed(&login, &["revoke_token", "delete_runner"]),
        ),
        (Step::CiUser, claimed(&["ci_user"], &["delete_runner"])),
        (Step::Token, claimed(&login, &["delete_runner"])),
        (
            Step::Network,
            claimed(&login, &["revoke_token", "delete_runner"]),
        ),
        (
            Step::Launch,
            claimed(&login, &["revoke_token", "delete_runner"]),
        ),
    ];
    for (step, calls) in cases {
        let forge = FakeForge::default();
        if !matches!(step, Step::Network | Step::Launch) {
            forge.fail.lock().unwrap().insert(step);
        }
        let net = FakeNet {
            fail: step == Step::Network,
            ..Default::default()
        };
        let vms = FakeVms {
            fail: step == Step::Launch,
            ..Default::default()
        };
        let env = env_with(forge, net, vms, Accel::Auto, Duration::from_secs(60));
        let (task, _tx, _stop) = start(&env, job(2));
        let report = task.await.unwrap();
        assert_eq!(report.outcome, JobOutcome::PrepareFailed, "{step:?}");
        assert_released(&env);
        assert_eq!(env.forge.calls(), calls, "{step:?}");
        assert!(env.vms.launched.lock().unwrap().is_empty(), "{step:?}");
        assert!(
            metric(
                &env,
                "fkr_qemu_jobs_finished_total{outcome=\"prepare_failed\"}"
            )
            .ends_with(" 1"),
            "{step:?}: {}",
            env.metrics.encode()
        );
    }
}

#[tokio::test]
async fn a_seed_that_cannot_be_written_releases_token_runner_and_network() {
    let env = env();
    let mut bad = job(3);
    bad.handle = "h\nruncmd: [evil]".into();
    let (task, _tx, _stop) = start(&env, bad);
    assert_eq!(task.await.unwrap().outcome, JobOutcome::PrepareFailed);
    assert_released(&env);
    assert!(env.vms.launched.lock().unwrap().is_empty());
}

#[tokio::test]
async fn no_token_policy_needs_no_ci_user() {
    let env = env();
    *env.forge.access.lock().unwrap() = Some(TokenAccess::None);
    let (task, tx, _stop) = start(&env, job(4));
    let mut vm = env.vms.next().await;
    assert_eq!(registry_logins(&vm.user_data), Vec::<String>::new());
    tx.send_replace(Listed::Running);
    vm.end(Outcome::GuestPoweredOff);
    assert_eq!(task.await.unwrap().outcome, JobOutcome::Completed);
    assert_released(&env);
    assert_eq!(
        env.forge.calls(),
        [
            "repository",
            "register_runner",
            "runners",
            "runners",
            "still_waiting",
            "delete_runner"
        ]
    );
}

#[tokio::test]
async fn a_failing_release_step_does_not_keep_the_others_from_running() {
    let env = env();
    env.forge.fail.lock().unwrap().insert(Step::Revoke);
    let (task, tx, _stop) = start(&env, job(5));
    let mut vm = env.vms.next().await;
    tx.send_replace(Listed::Running);
    vm.end(Outcome::GuestPoweredOff);
    assert_eq!(task.await.unwrap().outcome, JobOutcome::Completed);
    // The token is left for the sweep; the runner and the network are released all the same.
    assert_eq!(env.forge.live(), (1, 0));
    assert_eq!(env.net.live.load(Ordering::SeqCst), 0);
    assert!(env.board.snapshot().vms.is_empty());
}

#[tokio::test]
async fn the_boot_deadline_stops_a_vm_whose_runner_never_picks_the_job_up() {
    let env = env_with(
        FakeForge::default(),
        FakeNet::default(),
        FakeVms::default(),
        Accel::Auto,
        Duration::from_millis(50),
    );
    let started = Instant::now();
    let (task, _tx, _stop) = start(&env, job(6));
    let vm = env.vms.next().await;
    let report = task.await.unwrap();
    assert!(vm.stop.is_cancelled());
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(report.outcome, JobOutcome::BootFailure);
    assert!(!report.picked_up);
    assert_released(&env);
}

#[tokio::test]
async fn a_picked_up_job_outlives_the_boot_deadline() {
    let env = env_with(
        FakeForge::default(),
        FakeNet::default(),
        FakeVms::default(),
        Accel::Auto,
        Duration::from_millis(50),
    );
    let (task, tx, _stop) = start(&env, job(7));
    let mut vm = env.vms.next().await;
    tx.send_replace(Listed::Running);
    board_shows(&env, "running").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !vm.stop.is_cancelled(),
        "the boot deadline stopped a running job"
    );
    vm.end(Outcome::GuestPoweredOff);
    assert_eq!(task.await.unwrap().outcome, JobOutcome::Completed);
    assert_released(&env);
}

#[tokio::test]
async fn the_hosts_stop_stops_the_vm_and_is_a_shutdown() {
    let env = env();
    let (task, tx, stop) = start(&env, job(8));
    let vm = env.vms.next().await;
    tx.send_replace(Listed::Running);
    board_shows(&env, "running").await;
    stop.cancel();
    let report = task.await.unwrap();
    assert!(vm.stop.is_cancelled());
    assert_eq!(report.outcome, JobOutcome::Shutdown);
    assert!(report.retry.is_none());
    assert_released(&env);
}

#[tokio::test]
async fn kvm_failing_a_guest_is_retried_once_and_only_under_auto() {
    // (policy, accelerator that failed, picked up first, retry expected, outcome)
    let cases = [
        (
            Accel::Auto,
            Accel::Kvm,
            false,
            true,
            JobOutcome::AccelFailed,
        ),
        (
            Accel::Kvm,
            Accel::Kvm,
            false,
            false,
            JobOutcome::AccelFailed,
        ),
        (
            Accel::Auto,
            Accel::Tcg,
            false,
            false,
            JobOutcome::AccelFailed,
        ),
        (Accel::Auto, Accel::Kvm, true, false, JobOutcome::Crashed),
    ];
    for (policy, failed, picked, retry, outcome) in cases {
        let env = env_with(
            FakeForge::default(),
            FakeNet::default(),
            FakeVms::default(),
            policy,
            Duration::from_secs(60),
        );
        let (task, tx, _stop) = start(&env, job(9));
        let mut vm = env.vms.next().await;
        if picked {
            tx.send_replace(Listed::Running);
            board_shows(&env, "running").await;
        }
        let internal = Outcome::InternalError {
            accel: failed,
            detail: "KVM internal error. Suberror: 1".into(),
        };
        vm.end(internal);
        let report = task.await.unwrap();
        assert_eq!(report.outcome, outcome, "{policy} {failed} {picked}");
        assert_eq!(report.retry.is_some(), retry, "{policy} {failed} {picked}");
        if let Some(q) = report.retry {
            assert_eq!(q.job.id, 9);
        }
        assert_released(&env);
    }
}

#[tokio::test]
async fn a_cancelled_job_task_still_releases_everything() {
    let env = env();
    let (task, _tx, _stop) = start(&env, job(10));
    let _vm = env.vms.next().await;
    board_shows(&env, "booting").await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    released_in_the_background(&env).await;
}

#[tokio::test]
async fn a_panic_while_supervising_still_releases_everything() {
    let env = env();
    let (task, _tx, _stop) = start(&env, job(11));
    let mut vm = env.vms.next().await;
    // The fake VM's `wait` panics when its controls go away (a supervisor bug).
    drop(vm.exit.take());
    assert!(task.await.unwrap_err().is_panic());
    released_in_the_background(&env).await;
}

#[tokio::test]
async fn a_lower_live_claim_of_another_host_means_this_host_boots_nothing() {
    let env = env();
    let theirs = env.forge.foreign_claim("other", 12, "offline");
    let (task, _tx, _stop) = start(&env, job(12));
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::ClaimedElsewhere);
    // No CI user, no token, no VM; our claim is gone, theirs stays.
    assert_eq!(
        env.forge.calls(),
        ["repository", "register_runner", "runners", "delete_runner"]
    );
    assert!(env.vms.launched.lock().unwrap().is_empty());
    assert_eq!(env.net.live.load(Ordering::SeqCst), 0);
    assert!(env.board.snapshot().vms.is_empty());
    let left: Vec<i64> = env.forge.runners.lock().unwrap().keys().copied().collect();
    assert_eq!(left, [theirs]);
}

#[tokio::test]
async fn a_job_that_no_longer_waits_when_the_claim_is_won_boots_nothing() {
    // Another host's claim was lower, but its runner ran the job and Forgejo deleted it before
    // this host listed the claims: nothing lower is listed, and the job is no longer waiting.
    let env = env();
    env.forge.gone.lock().unwrap().insert(job(16).handle);
    let (task, _tx, _stop) = start(&env, job(16));
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::ClaimedElsewhere);
    // The token made while the claim settled is revoked.
    assert_eq!(
        env.forge.calls(),
        [
            "repository",
            "register_runner",
            "runners",
            "ci_user",
            "mint_token",
            "runners",
            "still_waiting",
            "revoke_token",
            "delete_runner"
        ]
    );
    assert!(env.vms.launched.lock().unwrap().is_empty());
    assert_eq!(env.net.live.load(Ordering::SeqCst), 0);
    assert!(env.board.snapshot().vms.is_empty());
    assert_released(&env);
}

#[tokio::test]
async fn a_higher_claim_or_a_claim_on_another_job_does_not_stop_this_host() {
    let env = env();
    env.forge.foreign_claim("other", 99, "offline");
    let (task, tx, _stop) = start(&env, job(13));
    // The other host registers after us: a higher id.
    let mut vm = env.vms.next().await;
    tx.send_replace(Listed::Running);
    vm.end(Outcome::GuestPoweredOff);
    assert_eq!(task.await.unwrap().outcome, JobOutcome::Completed);
}

#[tokio::test]
async fn a_dead_hosts_stale_claim_is_deleted_and_the_job_taken_over() {
    // A claim timeout of zero: every offline claim of another host is stale at once.
    let env = env_claims(
        FakeForge::default(),
        FakeNet::default(),
        FakeVms::default(),
        Accel::Auto,
        Duration::from_secs(60),
        Duration::ZERO,
    );
    let dead = env.forge.foreign_claim("dead", 14, "offline");
    let (task, tx, _stop) = start(&env, job(14));
    let mut vm = env.vms.next().await;
    assert!(!env.forge.runners.lock().unwrap().contains_key(&dead));
    tx.send_replace(Listed::Running);
    vm.end(Outcome::GuestPoweredOff);
    assert_eq!(task.await.unwrap().outcome, JobOutcome::Completed);
    assert_released(&env);
}

#[tokio::test]
async fn an_online_claim_is_never_stale() {
    let env = env_claims(
        FakeForge::default(),
        FakeNet::default(),
        FakeVms::default(),
        Accel::Auto,
        Duration::from_secs(60),
        Duration::ZERO,
    );
    let booted = env.forge.foreign_claim("slow", 15, "idle");
    let (task, _tx, _stop) = start(&env, job(15));
    assert_eq!(task.await.unwrap().outcome, JobOutcome::ClaimedElsewhere);
    assert!(env.forge.runners.lock().unwrap().contains_key(&booted));
}

type EmulatorHost = Arc<JobEnv<Credentials, FakeNet, FakeVms>>;

/// Hosts `host-a` and `host-b` against the emulator: real `Credentials` sharing a password key,
/// each with its state dir from `dirs`; doubles for network and VMs.
fn emulator_hosts(
    emu: &super::super::prepare_tests::emulator::Emulator,
    dirs: &[tempfile::TempDir; 2],
    claim_settle: Duration,
) -> Vec<EmulatorHost> {
    use super::super::credentials::PasswordKeys;
    use super::super::prepare_tests::host_credentials;
    ["host-a", "host-b"]
        .iter()
        .zip(dirs)
        .map(|(id, dir)| {
            let metrics = Metrics::new();
            let keys = PasswordKeys::new(vec![Secret::new("shared")]);
            Arc::new(JobEnv {
                forge: host_credentials(emu, dir.path(), "", id, keys),
                net: FakeNet::default(),
                vms: FakeVms::default(),
                board: StatusBoard::new(Some(metrics.clone())),
                metrics,
                claims: ClaimBook::new(Duration::from_secs(600)),
                handover: CancellationToken::new(),
                leftovers: Default::default(),
                settings: JobSettings {
                    label: "external-host".into(),
                    runner_url: "http://10.88.0.1:3000/".parse().unwrap(),
                    base_image: "/base.qcow2".into(),
                    boot_deadline: Duration::from_secs(60),
                    job_deadline: Duration::from_secs(3600),
                    accel: Accel::Tcg,
                    runner_marker: format!("fkr-qemu@{id}"),
                    claim_settle,
                    bind_timeout: Duration::from_secs(1),
                    gone_grace: GONE_GRACE,
                },
            })
        })
        .collect()
}

/// Two hosts against one Forgejo (the emulator, over HTTP): each host's real `Credentials` and claim
/// code, doubles for network and VMs. Bursts of jobs, both hosts starting every job at small random
/// offsets, many rounds: every job gets exactly one VM, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_racing_on_bursts_boot_each_job_exactly_once() {
    use super::super::prepare_tests::{emulator::Emulator, job_of};
    use rand::Rng;
    let emu = Emulator::start_default().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let hosts = emulator_hosts(&emu, &dirs, Duration::from_millis(5));
    for round in 0..40 {
        let jobs: Vec<Job> = (0..3)
            .map(|_| job_of(&emu.add_job("acme/web", &["external-host"], "build"), false))
            .collect();
        let mut tasks = Vec::new();
        for env in &hosts {
            for j in &jobs {
                let (env, j) = (env.clone(), j.clone());
                let delay = Duration::from_millis(rand::thread_rng().gen_range(0..15));
                let (_tx, rx) = watch::channel(Listed::Waiting);
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let ticket = Ticket {
                        job: j,
                        seen_at: Instant::now(),
                        picked_up: rx,
                        disk: None,
                        claim_delay: Duration::ZERO,
                        warm: None,
                    };
                    run(env, ticket, CancellationToken::new()).await
                }));
            }
        }
        // Every task either lost its claim (finished) or has a VM up.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let finished = tasks.iter().filter(|t| t.is_finished()).count();
            let launched: usize = hosts
                .iter()
                .map(|h| h.vms.launched.lock().unwrap().len())
                .sum();
            if finished + launched == tasks.len() {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: stuck");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut booted: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for (i, h) in hosts.iter().enumerate() {
            for mut vm in h.vms.launched.lock().unwrap().drain(..) {
                booted.entry(vm.job_id).or_default().push(i);
                vm.end(Outcome::GuestPoweredOff);
            }
        }
        for j in &jobs {
            assert_eq!(
                booted.get(&j.id).map(Vec::len),
                Some(1),
                "round {round}: job {} booted by hosts {:?}",
                j.id,
                booted.get(&j.id)
            );
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap().outcome);
        }
        let lost = outcomes
            .iter()
            .filter(|o| **o == JobOutcome::ClaimedElsewhere)
            .count();
        assert_eq!(lost, jobs.len(), "round {round}: {outcomes:?}");
        // Every claim is gone again: the losers deleted theirs, the winners released theirs.
        assert!(
            emu.runner_names().is_empty(),
            "round {round}: {:?}",
            emu.runner_names()
        );
    }
}

/// The claim's cost, with the real settle (issue 14's benchmark: it prints the figures and asserts
/// only that exactly one of two racing hosts wins, never anything about speed):
///
/// ```sh
/// FKR_BENCH_SAMPLES=20 cargo test --release --lib claim_cost -- --nocapture
/// ```
/// Against the emulator over HTTP: from a registered runner to the claim decided (two listings,
/// the settle, the "still waiting" check), one host alone vs two hosts racing for each job, and
/// the Forgejo requests one claim costs. CI runs it with 3 samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_cost() {
    use super::super::prepare_tests::{emulator::Emulator, job_of};
    let emu = Emulator::start_default().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let hosts = emulator_hosts(&emu, &dirs, claim::SETTLE);
    /// Registers `env`'s claim on `job` and decides it; the time from registration to decision.
    async fn one(env: EmulatorHost, job: Job) -> (Duration, bool) {
        let mut run = JobRun::new(env.clone(), job, Instant::now(), None);
        let repo = env.forge.repository(run.job.repo_id).await.unwrap();
        let runner = run.register_runner(&repo).await.unwrap();
        let t = Instant::now();
        let claimed = claim_job(&env, &run.job, &run.name, runner.id, true, async {}).await;
        let lost = !matches!(claimed.unwrap(), Claimed::Ours(()));
        let took = t.elapsed();
        let held = std::mem::take(&mut run.held);
        release(&env.forge, &env.leftovers, &run.name, held).await;
        (took, !lost)
    }
    let stats = |mut v: Vec<Duration>| {
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "median {:.1} ms, p10 {:.1} ms, p90 {:.1} ms, n {}",
            ms(v[v.len() / 2]),
            ms(v[v.len() / 10]),
            ms(v[v.len() * 9 / 10]),
            v.len()
        )
    };
    let n: u32 = std::env::var("FKR_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut alone = Vec::new();
    emu.clear_requests();
    for _ in 0..n {
        let j = job_of(&emu.add_job("acme/web", &["external-host"], "build"), false);
        alone.push(one(hosts[0].clone(), j).await.0);
    }
    let per_claim = emu.requests().len() as f64 / f64::from(n);
    let mut racing = Vec::new();
    for _ in 0..n {
        let j = job_of(&emu.add_job("acme/web", &["external-host"], "build"), false);
        let (a, b) = tokio::join!(one(hosts[0].clone(), j.clone()), one(hosts[1].clone(), j));
        assert!(a.1 ^ b.1, "exactly one host wins");
        racing.push(a.0);
        racing.push(b.0);
    }
    eprintln!("claim decided, one host:        {}", stats(alone));
    eprintln!("claim decided, two hosts racing: {}", stats(racing));
    eprintln!(
        "Forgejo requests per job (repository, register, 2 listings, still-waiting check, delete): {per_claim:.1}"
    );
}

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

#[test]
fn the_board_shows_the_job_state_by_name() {
    for s in [
        JobState::Preparing,
        JobState::Booting,
        JobState::Running,
        JobState::Cleaning,
    ] {
        assert_eq!(VmState::from(s).as_str(), s.as_str());
        assert_eq!(
            serde_json::to_value(VmState::from(s)).unwrap(),
            serde_json::json!(s.as_str())
        );
    }
}

/// A job whose VM a previous daemon launched, as `adopt.rs` hands it over: its token (41) and
/// runner (42) exist in Forgejo, its tap is taken over. Returns its task and its VM's controls.
async fn adopt_one(
    env: &Arc<Env>,
    picked_up: bool,
    boot_left: Duration,
) -> (tokio::task::JoinHandle<Report<FakeVm>>, VmCtl) {
    env.forge.tokens.lock().unwrap().insert(41);
    env.forge
        .runners
        .lock()
        .unwrap()
        .insert(42, ("fkr-qemu@test job 9 alice/web".into(), "active"));
    let name = VmName::generate();
    let seed = Seed {
        instance_id: name.to_string(),
        hostname: name.to_string(),
        user_data: String::new(),
        network_config: None,
    };
    let spec = VmSpec::new(name.clone(), "/base.qcow2", seed, Duration::from_secs(3600));
    let vm = env.vms.launch(spec).await.unwrap();
    let ctl = env.vms.next().await;
    let net = env.net.adopt(&name, "10.88.0.2".parse().unwrap()).unwrap();
    let held = Held {
        token: Some(TokenRef {
            user: CiUserRef {
                repo_id: 7,
                username: "alice-web-ci".into(),
                password: Secret::new("stored"),
            },
            id: 41,
            name: "orch-9-test-00ff".into(),
        }),
        runner: Some(42),
        net: Some(net),
    };
    let adopted = Adopted {
        name,
        job: job(9),
        owner: "alice".into(),
        repo: "web".into(),
        address: Some("10.88.0.2".parse().unwrap()),
        vm,
        held,
        boot_deadline_left: boot_left,
    };
    let (tx, rx) = watch::channel(if picked_up {
        Listed::Running
    } else {
        Listed::Waiting
    });
    let env = env.clone();
    let task = tokio::spawn(async move {
        // The scheduler's side of the pick-up switch lives as long as the job.
        let _scheduler = tx;
        run_adopted(env, adopted, rx, CancellationToken::new()).await
    });
    (task, ctl)
}

#[tokio::test]
async fn an_adopted_job_runs_to_its_end_and_releases_what_it_held() {
    let env = env();
    let (task, mut vm) = adopt_one(&env, true, Duration::ZERO).await;
    // Its runner had the job before the restart: running at once, no boot deadline.
    let v = board_shows(&env, "running").await;
    assert_eq!((v.owner.as_str(), v.repo.as_str()), ("alice", "web"));
    assert_eq!(v.address.as_deref(), Some("10.88.0.2"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!vm.stop.is_cancelled());
    vm.end(Outcome::GuestPoweredOff);
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::Completed);
    assert!(report.picked_up);
    assert_released(&env);
    assert_eq!(env.forge.calls(), ["revoke_token", "delete_runner"]);
    // Neither prepared nor booted here: not timed.
    assert!(metric(&env, "fkr_qemu_vm_boot_seconds_count").ends_with(" 0"));
    assert!(metric(&env, "fkr_qemu_vm_prepare_seconds_count").ends_with(" 0"));
}

#[tokio::test]
async fn an_adopted_job_not_picked_up_gets_only_what_is_left_of_its_boot_deadline() {
    let env = env();
    let (task, vm) = adopt_one(&env, false, Duration::from_millis(100)).await;
    let started = Instant::now();
    let report = task.await.unwrap();
    assert!(vm.stop.is_cancelled(), "the VM was stopped");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(report.outcome, JobOutcome::BootFailure);
    assert_released(&env);
}

#[tokio::test]
async fn a_handover_lets_go_of_the_vm_and_of_everything_the_job_holds() {
    let env = env();
    let (task, picked_up, _stop) = start(&env, job(5));
    let vm = env.vms.next().await;
    board_shows(&env, "booting").await;
    picked_up.send_replace(Listed::Running);
    board_shows(&env, "running").await;
    env.handover.cancel();
    let report = task.await.unwrap();
    assert!(report.picked_up && report.retry.is_none());
    assert!(!vm.stop.is_cancelled(), "a handed-over VM is never stopped");
    // Nothing released: token, runner and network are the next daemon's.
    assert_eq!(env.forge.live(), (1, 1));
    assert_eq!(env.net.live.load(Ordering::SeqCst), 1);
    let calls = env.forge.calls();
    assert!(
        !calls.contains(&"revoke_token") && !calls.contains(&"delete_runner"),
        "{calls:?}"
    );
    assert!(env.board.snapshot().vms.is_empty());
}

// --- warm pool: binding a job to a warm VM ---------------------------------------------------

/// A ready warm VM of the doubles, its controls, and the guest's end of its agent channel.
async fn warm_vm(env: &Arc<Env>) -> (super::pool::WarmVm<FakeVm>, VmCtl, tokio::net::UnixStream) {
    let name = VmName::generate();
    let seed = vm::Seed {
        instance_id: name.to_string(),
        hostname: name.to_string(),
        user_data: super::super::userdata::WARM_USER_DATA.to_owned(),
        network_config: None,
    };
    let spec = VmSpec::new(name.clone(), "/base.qcow2", seed, Duration::from_secs(600));
    let vm = env.vms.launch(spec).await.unwrap();
    let ctl = env.vms.launched.lock().unwrap().pop().unwrap();
    let (host, guest) = tokio::net::UnixStream::pair().unwrap();
    let warm = super::pool::WarmVm::ready(
        name,
        vm,
        crate::vm::agent::AgentConn::from_stream(host),
        Box::new(()),
        "10.88.0.9".parse().unwrap(),
        0,
        None,
    );
    (warm, ctl, guest)
}

/// The guest's agent: reads the payload up to END; answers STARTED when `ack`. Returns the lines
/// (none when the host closed the channel without sending any).
fn guest_agent(guest: tokio::net::UnixStream, ack: bool) -> tokio::task::JoinHandle<Vec<String>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    tokio::spawn(async move {
        let (r, mut w) = guest.into_split();
        let mut lines = BufReader::new(r).lines();
        let mut got = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            let end = l == "END";
            got.push(l);
            if end {
                if ack {
                    w.write_all(b"STARTED 1\n").await.unwrap();
                } else {
                    // Silent: keep the channel open until the host gives up on it.
                    let _ = lines.next_line().await;
                }
                break;
            }
        }
        got
    })
}

#[tokio::test]
async fn a_job_bound_to_a_warm_vm_gets_its_payload_there_and_boots_nothing() {
    let env = env();
    let (warm, mut ctl, guest) = warm_vm(&env).await;
    let warm_name = warm.name.clone();
    let agent = guest_agent(guest, true);
    let (task, picked_up, _stop) = start_warm(&env, job(21), Some(warm));
    let payload = agent.await.unwrap();
    // The runner token file, the registry logins, the command; nothing was launched for the job.
    assert!(payload.last().is_some_and(|l| l == "END"), "{payload:?}");
    assert!(
        payload
            .iter()
            .any(|l| l.starts_with(&format!("FILE {} 0600 ", userdata::RUNNER_TOKEN_PATH))),
        "{payload:?}"
    );
    assert!(payload.iter().any(|l| l.starts_with("RUN ")), "{payload:?}");
    assert!(
        env.vms.launched.lock().unwrap().is_empty(),
        "a cold VM was launched"
    );
    let shown = board_shows(&env, "booting").await;
    assert_eq!(
        shown.name,
        warm_name.as_str(),
        "the job's VM is the warm VM"
    );
    picked_up.send_replace(Listed::Running);
    board_shows(&env, "running").await;
    ctl.end(Outcome::GuestPoweredOff);
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::Completed);
    assert!(report.unused_warm.is_none());
    assert!(
        !ctl.stop.is_cancelled(),
        "a VM that ran its job is never stopped"
    );
    assert_released(&env);
    assert!(metric(&env, "fkr_qemu_job_starts_total{path=\"warm\"}").ends_with(" 1"));
    assert!(metric(&env, "fkr_qemu_job_starts_total{path=\"cold\"}").ends_with(" 0"));
    assert!(metric(&env, "fkr_qemu_pool_bind_seconds_count").ends_with(" 1"));
    // The claim was decided by its two looks alone: no "still waiting?" job list on a warm bind.
    let calls = env.forge.calls();
    assert_eq!(
        calls.iter().filter(|c| **c == "runners").count(),
        2,
        "{calls:?}"
    );
    assert!(!calls.contains(&"still_waiting"), "{calls:?}");
}

#[tokio::test]
async fn a_warm_vm_that_does_not_acknowledge_is_stopped_and_the_job_boots_cold() {
    let env = env();
    let (warm, ctl, guest) = warm_vm(&env).await;
    let warm_name = warm.name.clone();
    let agent = guest_agent(guest, false);
    let (task, picked_up, _stop) = start_warm(&env, job(22), Some(warm));
    // bind_timeout (1 s here) later: the warm VM is stopped, never given back, and a fresh VM
    // under another name boots for the job with the job's seed.
    let mut cold = env.vms.next().await;
    assert!(
        ctl.stop.is_cancelled(),
        "the silent warm VM was not stopped"
    );
    assert_ne!(cold.name, warm_name);
    assert_eq!(cold.job_id, 22);
    assert!(cold.user_data.contains(userdata::RUNNER_TOKEN_PATH));
    // A runner of its own: the silent VM's registration is deleted, so a late runner there
    // cannot fetch the job's task.
    assert!(
        cold.user_data.contains(&format!("uuid-{}", cold.name)),
        "{}",
        cold.user_data
    );
    assert!(!cold.user_data.contains(&format!("uuid-{warm_name}")));
    assert_eq!(
        env.forge.live().1,
        1,
        "the warm VM's runner is still registered"
    );
    assert!(agent.await.unwrap().last().is_some_and(|l| l == "END"));
    picked_up.send_replace(Listed::Running);
    cold.end(Outcome::GuestPoweredOff);
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::Completed);
    assert!(
        report.unused_warm.is_none(),
        "a warm VM that may hold a payload came back"
    );
    assert_released(&env);
    assert!(metric(&env, "fkr_qemu_job_starts_total{path=\"cold\"}").ends_with(" 1"));
    assert!(metric(&env, "fkr_qemu_job_starts_total{path=\"warm\"}").ends_with(" 0"));
    assert!(metric(&env, "fkr_qemu_pool_discards_total{reason=\"no_ack\"}").ends_with(" 1"));
}

#[tokio::test]
async fn a_warm_vm_whose_job_is_claimed_elsewhere_gets_nothing_and_goes_back() {
    let env = env();
    let theirs = env.forge.foreign_claim("other", 23, "offline");
    let (warm, ctl, guest) = warm_vm(&env).await;
    let warm_name = warm.name.clone();
    let agent = guest_agent(guest, true);
    let (task, _tx, _stop) = start_warm(&env, job(23), Some(warm));
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::ClaimedElsewhere);
    let back = report
        .unused_warm
        .expect("the warm VM goes back to the pool");
    assert_eq!(back.name, warm_name);
    assert!(!ctl.stop.is_cancelled());
    drop(back);
    assert!(
        agent.await.unwrap().is_empty(),
        "a payload reached a VM whose job was lost"
    );
    assert!(env.vms.launched.lock().unwrap().is_empty());
    let left: Vec<i64> = env.forge.runners.lock().unwrap().keys().copied().collect();
    assert_eq!(left, [theirs], "our claim is gone, theirs stays");
}

#[tokio::test]
async fn a_job_whose_payload_cannot_be_made_leaves_its_warm_vm_untouched() {
    let env = env();
    let (warm, ctl, guest) = warm_vm(&env).await;
    let agent = guest_agent(guest, true);
    let mut bad = job(24);
    bad.handle = "h\nruncmd: [evil]".into();
    let (task, _tx, _stop) = start_warm(&env, bad, Some(warm));
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::PrepareFailed);
    let back = report
        .unused_warm
        .expect("the untouched warm VM goes back to the pool");
    assert!(!ctl.stop.is_cancelled());
    drop(back);
    assert!(
        agent.await.unwrap().is_empty(),
        "something reached the guest"
    );
    assert_eq!(env.forge.live(), (0, 0), "token or runner left");
}

// --- a job Forgejo no longer lists -----------------------------------------------------------

#[test]
fn listed_running_then_unlisted_is_finished_and_only_a_job_never_seen_running_is_gone() {
    use Listed::*;
    let (mut waiting, mut running) = (job(1), job(2));
    waiting.status = JobStatus::Waiting;
    running.status = JobStatus::Running;
    let jobs = [waiting, running];
    assert_eq!(Listed::of(&jobs, "handle-1"), Waiting);
    assert_eq!(Listed::of(&jobs, "handle-2"), Running);
    assert_eq!(Listed::of(&jobs, "handle-3"), Gone);
    assert_eq!(Listed::of(&[], "handle-1"), Gone);
    for (now, seen, next) in [
        (Waiting, Waiting, Waiting),
        (Waiting, Running, Running),
        (Waiting, Gone, Gone),
        // A running job that leaves the list is finished, for good.
        (Running, Gone, Finished),
        (Finished, Running, Finished),
        (Finished, Gone, Finished),
        (Finished, Waiting, Finished),
        (Running, Waiting, Running),
        (Gone, Waiting, Gone),
        (Gone, Running, Running),
    ] {
        assert_eq!(now.after(seen), next, "{now:?} then {seen:?}");
    }
}

#[tokio::test]
async fn a_vm_whose_job_is_gone_is_stopped_after_the_grace() {
    let env = env();
    let (task, listed, _stop) = start(&env, job(31));
    let vm = env.vms.next().await;
    // Cancelled (or run by another runner) before this VM's runner took it.
    listed.send_replace(Listed::Gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!vm.stop.is_cancelled(), "stopped before its grace");
    let report = task.await.unwrap();
    assert!(vm.stop.is_cancelled());
    assert_eq!(report.outcome, JobOutcome::Gone);
    assert!(!report.picked_up);
    assert_released(&env);
    assert!(metric(&env, "fkr_qemu_jobs_finished_total{outcome=\"gone\"}").ends_with(" 1"));
}

#[tokio::test]
async fn a_vm_whose_job_is_gone_and_that_powers_off_by_itself_completed() {
    let env = env();
    let (task, listed, _stop) = start(&env, job(32));
    let mut vm = env.vms.next().await;
    // Its runner ran the job between two listings: gone from the list, never seen running.
    listed.send_replace(Listed::Gone);
    vm.end(Outcome::GuestPoweredOff);
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::Completed);
    assert!(!vm.stop.is_cancelled(), "a VM that powered off was stopped");
    assert_released(&env);
}

#[tokio::test]
async fn a_vm_that_stays_up_after_its_job_finished_loses_its_token_at_once_and_is_stopped() {
    let env = env();
    let (task, listed, _stop) = start(&env, job(33));
    let vm = env.vms.next().await;
    listed.send_replace(Listed::Running);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(env.forge.live(), (1, 1), "a running job keeps its token");
    // Its runner reported: Forgejo no longer lists the job. The guest ignores power-off.
    listed.send_replace(Listed::Finished);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        env.forge.live(),
        (0, 0),
        "token and runner released before the grace ends"
    );
    assert!(!vm.stop.is_cancelled(), "stopped before its grace");
    let report = task.await.unwrap();
    assert!(vm.stop.is_cancelled(), "the VM outlived its job");
    assert_eq!(report.outcome, JobOutcome::Overstayed);
    assert!(report.picked_up);
    assert_released(&env);
}

#[tokio::test]
async fn a_claim_of_this_host_that_no_job_holds_is_deleted_and_does_not_stop_the_job() {
    // An earlier attempt's registration whose answer was lost: Forgejo has the runner, no job of
    // this host holds it. It is this host's leftover, not another host's claim to wait for.
    let env = env();
    let leftover = env.forge.foreign_claim("test", 17, "offline");
    let (task, listed, _stop) = start(&env, job(17));
    let mut vm = env.vms.next().await;
    assert!(
        !env.forge.runners.lock().unwrap().contains_key(&leftover),
        "the leftover claim is still there"
    );
    listed.send_replace(Listed::Running);
    vm.end(Outcome::GuestPoweredOff);
    let report = task.await.unwrap();
    assert_eq!(report.outcome, JobOutcome::Completed);
    assert_released(&env);
}

#[tokio::test]
async fn failed_releases_are_left_to_the_background_cleanup() {
    let env = env();
    env.forge
        .fail
        .lock()
        .unwrap()
        .extend([Step::Revoke, Step::DeleteRunner]);
    let (task, listed, _stop) = start(&env, job(18));
    let mut vm = env.vms.next().await;
    listed.send_replace(Listed::Running);
    vm.end(Outcome::GuestPoweredOff);
    task.await.unwrap();
    assert_eq!(env.leftovers.pending(), 2, "a revocation and a deletion");
}
