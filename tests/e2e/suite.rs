// The `serve` end-to-end suite, included by tests/serve_e2e.rs (`[pool] size = 0`) and
// tests/serve_e2e_pool.rs (`[pool] size = 1`), which declare `common` and `POOL_SIZE`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::{wait_for, Serve, Settings};
use common::emulator::{FaultKind, JobStatus, LoggedRequest, RunTrigger};
use common::fake_qemu::fake_qemu;
use common::sandbox::assert_sandboxed;
use common::serve::World;
use fkr_qemu::ops::{
    DaemonStatus, JobOutcome, PoolState, SweepKind, TokenAccess, VmInfo, VmState,
};
use fkr_qemu::types::{Accel, JobState, VmName};
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(180);
const LABEL: &str = "external-host";

/// The harness's settings with this suite's pool size: the same tests run with the pool off
/// (`serve_e2e`, as before the pool) and on (`serve_e2e_pool`).
fn settings() -> Settings {
    Settings {
        pool_size: POOL_SIZE,
        ..Settings::default()
    }
}

/// The VMs on the status board that hold a job (a warm VM of the pool holds none).
fn job_vms(s: &DaemonStatus) -> Vec<&VmInfo> {
    s.vms
        .iter()
        .filter(|v| matches!(v.state, VmState::Job(_)))
        .collect()
}

/// The pool's warm (ready) VMs on the status board.
fn warm_vms(s: &DaemonStatus) -> Vec<&VmInfo> {
    s.vms
        .iter()
        .filter(|v| v.state == VmState::Pool(PoolState::Warm))
        .collect()
}

/// With the pool on: waits until it holds `POOL_SIZE` warm VMs, so that the next job is bound to
/// one (the path this suite's pool run is for). Returns their names (none with the pool off).
fn wait_pool_full(serve: &mut Serve) -> BTreeSet<String> {
    if POOL_SIZE == 0 {
        return BTreeSet::new();
    }
    serve.wait_status("the pool to be full", BOOT, |s| {
        let warm = warm_vms(s);
        (warm.len() == POOL_SIZE).then(|| warm.iter().map(|v| v.name.clone()).collect())
    })
}

/// `World::assert_clean` while serve still runs: what the pool keeps warm (on the status board,
/// holding no job) is not a leftover; nothing else may be left.
fn wait_clean_but_warm(w: &World, ci_user: &str) {
    wait_for("cleanup", Duration::from_secs(30), || {
        // Listed before the board is read: a warm VM's entry exists before its resources do.
        let (dirs, taps, qemus) = (w.vm_dirs(), w.taps(), w.qemus());
        let s = w.status()?;
        let names: BTreeSet<&str> = s
            .vms
            .iter()
            .filter(|v| matches!(v.state, VmState::Pool(_)))
            .map(|v| v.name.as_str())
            .collect();
        let pids: BTreeSet<u32> = s
            .vms
            .iter()
            .filter(|v| matches!(v.state, VmState::Pool(_)))
            .filter_map(|v| v.pid)
            .collect();
        (job_vms(&s).is_empty()
            && dirs.iter().all(|d| names.contains(d.as_str()))
            && taps.iter().all(|t| names.contains(t.as_str()))
            && qemus.iter().all(|p| pids.contains(p)))
        .then_some(())
    });
    w.assert_no_job_credentials(ci_user);
}

/// With the pool on, the job ran in a warm VM (bound to it), else in a VM booted for it.
fn assert_start_path(w: &World, jobs: u64) {
    let (warm, cold) = (
        counter(w, "fkr_qemu_job_starts_total{path=\"warm\"}"),
        counter(w, "fkr_qemu_job_starts_total{path=\"cold\"}"),
    );
    if POOL_SIZE == 0 {
        assert_eq!((warm, cold), (0, jobs), "warm and cold starts");
    } else {
        assert!(warm >= 1 && warm + cold == jobs, "{warm} warm and {cold} cold starts");
    }
}

/// Makes every call of one runner RPC (e.g. `FetchSingleTask`) answer 500 from now on.
fn fail_runner_rpc(w: &World, method: &str) {
    w.emu.inject(
        "POST",
        &format!("/api/actions/runner.v1.RunnerService/{method}"),
        FaultKind::Status { status: 500 },
        None,
    );
}

/// Adds a waiting push job for `repo`; returns its id.
fn add_job(w: &World, repo: &str) -> i64 {
    w.emu.add_job(repo, &[LABEL], "build").id
}

/// The job's status in Forgejo.
fn job_status(w: &World, id: i64) -> JobStatus {
    w.emu.job(id).expect("the job exists").status
}

/// The VM of `job_id` once QEMU runs for it (state `booting` or later, with a pid).
fn wait_launched(serve: &mut Serve, job_id: i64, timeout: Duration) -> fkr_qemu::ops::VmInfo {
    serve.wait_vm(job_id, "QEMU running", timeout, |v| {
        v.pid.is_some() && matches!(v.state, VmState::Job(JobState::Booting | JobState::Running))
    })
}

/// Waits until `n` dispatched jobs have ended with `outcome`.
fn wait_finished(serve: &mut Serve, w: &World, outcome: JobOutcome, n: u64, timeout: Duration) {
    serve.wait(
        &format!("{n} job(s) to end {}", outcome.as_str()),
        timeout,
        || (w.finished(outcome) >= n).then_some(()),
    );
    assert_eq!(w.finished(outcome), n, "more jobs ended {outcome:?}");
}

/// A counter of serve's metrics, by series.
fn counter(w: &World, series: &str) -> u64 {
    w.metrics().get(series) as u64
}

/// The requests that created the Forgejo user `login` (answered or refused).
fn user_creations(w: &World, login: &str) -> Vec<LoggedRequest> {
    w.emu
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "POST"
                && r.route == "/admin/users"
                && r.request_body.as_ref().and_then(|b| b["username"].as_str()) == Some(login)
        })
        .collect()
}

/// Waits until serve's log has a line containing `needle` (for what serve says, not for what it
/// does); returns that line.
fn wait_log(serve: &mut Serve, needle: &str, timeout: Duration) -> String {
    let log = serve.log.clone();
    serve.wait(&format!("a log line with {needle:?}"), timeout, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(needle))
            .map(str::to_owned)
    })
}

/// Whether `log` has a line whose message is `message` (tracing's fields may follow it).
fn logged_at(log: &str, message: &str) -> Option<usize> {
    let with_fields = format!("{message} ");
    log.lines().position(|l| {
        l.split_once(": ")
            .is_some_and(|(_, m)| m == message || m.starts_with(&with_fields))
    })
}

/// Every cgroup directory named `vm` under this process's cgroups (serve's VMs go below the
/// cgroup serve runs in, which is the test's own).
fn vm_cgroup_dirs(vm: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut found = Vec::new();
    for line in own.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
        let mount = if ctrls.is_empty() {
            PathBuf::from("/sys/fs/cgroup")
        } else if let Some(c) = ["memory", "pids", "cpu"]
            .iter()
            .find(|c| ctrls.split(',').any(|x| x == **c))
        {
            Path::new("/sys/fs/cgroup").join(c)
        } else {
            continue;
        };
        let base = mount.join(path.trim_start_matches('/'));
        for candidate in [
            base.join("fkr-qemu").join(vm),
            base.join("vms").join(vm),
            mount.join("fkr-qemu/vms").join(vm),
        ] {
            if candidate.exists() {
                found.push(candidate);
            }
        }
    }
    found
}

#[test]
fn serve_vm_end_to_end_runs_a_job_and_cleans_up() {
    let w = World::new(settings());
    let mut serve = w.serve(0);
    let ready = serve.wait_ready();
    assert!(
        job_vms(&ready).is_empty() && ready.queued == 0 && !ready.draining,
        "{ready:#?}"
    );
    assert!(POOL_SIZE != 0 || ready.vms.is_empty(), "{ready:#?}");
    let warm = wait_pool_full(&mut serve);

    let job = w.emu.add_job("alice/web", &[LABEL], "build");
    let id = job.id;
    // The job's VM: named at dispatch, then QEMU runs, then it is gone once the job is over.
    let vm = serve.wait_vm(id, "dispatched", Duration::from_secs(30), |_| true);
    let name = vm.name.clone();
    assert!(VmName::is_valid(&name), "{vm:#?}");
    // With the pool on, the job's VM is the warm VM it was bound to.
    assert!(POOL_SIZE == 0 || warm.contains(&name), "{vm:#?} not of {warm:?}");
    let vm = wait_launched(&mut serve, id, Duration::from_secs(60));
    assert_eq!(vm.name, name);
    assert_eq!((vm.owner.as_str(), vm.repo.as_str()), ("alice", "web"));
    assert_eq!(vm.accel, Some(Accel::Tcg));
    serve.wait_status("the job's VM to be gone", BOOT, |s| {
        (!s.vms.iter().any(|v| v.job_id == id)).then_some(())
    });
    wait_finished(
        &mut serve,
        &w,
        JobOutcome::Completed,
        1,
        Duration::from_secs(30),
    );
    assert_eq!(job_status(&w, id), JobStatus::Success);
    assert_start_path(&w, 1);
    // The job's resources were released before its VM left the status board.
    wait_clean_but_warm(&w, "alice-web-ci");
    // The CI user was created once (no retry), exists once, with its password in the 0600 state file.
    let created = user_creations(&w, "alice-web-ci");
    assert_eq!(
        created.iter().map(|r| r.status).collect::<Vec<_>>(),
        [201],
        "{created:#?}"
    );
    assert_eq!(
        w.emu
            .user_logins()
            .iter()
            .filter(|u| *u == "alice-web-ci")
            .count(),
        1
    );
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(w.state_dir().join("ci-users.json")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No secret in the log.
    let log = serve.log_text();
    assert!(!log.contains(w.emu.admin_token()), "admin token in the log");

    // THE LOG-WORDING CONTRACT. These are the log lines kept from the original tool, word for word
    // (README.md, "A job reads:"): operators grep for them. Every other test reads what serve does
    // from its status and metrics; this is the one place that pins how serve words its log. Change
    // a line here only together with README.md, as a breaking change for operators.
    let contract = [
        "startup sweep...".to_owned(),
        "startup sweep done: 0 process, 0 vm_dir, 0 tap, 0 token, 0 runner".to_owned(),
        "entering discovery loop (label=external-host, interval=0.3s, interval_min=0.3s, max_vms=2)".to_owned(),
        format!("queue: dispatching job {id} (handle={})", job.handle),
        format!("dispatch job {id} for alice/web (vm={name})"),
        "creating CI user alice-web-ci for alice/web".to_owned(),
        format!("VM {name} started for job {id}"),
        format!("VM {name} finished (job {id})"),
        format!("job {id}: done (completed), cleanup complete"),
    ];
    let mut after = 0;
    for message in &contract {
        let at = logged_at(&log, message)
            .unwrap_or_else(|| panic!("no log line {message:?}; log:\n{log}"));
        assert!(
            at >= after,
            "{message:?} logged out of order (line {at}); log:\n{log}"
        );
        after = at;
    }

    serve.signal(Signal::SIGTERM);
    let st = serve.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    assert!(!w.runtime_dir().join("control.sock").exists());

    // The state file is lost: the next job of the repository takes its CI user back (Forgejo answers
    // 422 to the creation; the user is ours, so its password is reset) instead of failing.
    std::fs::remove_file(w.state_dir().join("ci-users.json")).unwrap();
    let mut serve = w.serve(1);
    serve.wait_ready();
    let id2 = add_job(&w, "alice/web");
    wait_finished(&mut serve, &w, JobOutcome::Completed, 1, BOOT);
    assert_eq!(job_status(&w, id2), JobStatus::Success);
    let created = user_creations(&w, "alice-web-ci");
    assert_eq!(
        created.iter().map(|r| r.status).collect::<Vec<_>>(),
        [201, 422],
        "{created:#?}"
    );
    let resets: Vec<LoggedRequest> = w
        .emu
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "PATCH"
                && r.path == "/api/v1/admin/users/alice-web-ci"
                && r.status == 200
                && r.request_body
                    .as_ref()
                    .is_some_and(|b| b["password"].is_string())
        })
        .collect();
    assert_eq!(resets.len(), 1, "one password reset: {resets:#?}");
    assert_eq!(
        w.emu
            .user_logins()
            .iter()
            .filter(|u| *u == "alice-web-ci")
            .count(),
        1
    );
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("alice-web-ci");
    if std::env::var_os("FKR_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", serve.log_text());
    }
}

#[test]
fn serve_vm_fork_pull_request_gets_pull_only_credentials_and_squatters_fail_the_job() {
    let w = World::new(settings());
    let mut serve = w.serve(0);
    serve.wait_ready();
    let access = |a: TokenAccess| {
        counter(
            &w,
            &format!("fkr_qemu_job_tokens_total{{access=\"{}\"}}", a.as_str()),
        )
    };

    // A push job, then a pull request from a fork of the same repository.
    let push = add_job(&w, "alice/web");
    wait_finished(&mut serve, &w, JobOutcome::Completed, 1, BOOT);
    assert_eq!(job_status(&w, push), JobStatus::Success);
    let pr = w
        .emu
        .add_job_in_run(
            "alice/web",
            &[LABEL],
            "build",
            RunTrigger::fork_pull_request(),
        )
        .id;
    wait_finished(&mut serve, &w, JobOutcome::Completed, 2, BOOT);
    assert_eq!(job_status(&w, pr), JobStatus::Success);
    assert_eq!(
        (access(TokenAccess::Write), access(TokenAccess::Read)),
        (1, 1)
    );
    assert_eq!(
        w.emu.token_scopes_requested("alice-web-ci"),
        vec![
            vec!["write:package".to_string(), "read:package".to_string()],
            vec!["read:package".to_string()]
        ],
        "the push job writes, the fork's pull request only reads"
    );
    // The operator is told why that job's credentials are read-only.
    let log = serve.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("job {pr}: run ")))
        .unwrap_or_else(|| panic!("no reason given for job {pr}'s access; log:\n{log}"));
    assert!(line.ends_with("registry access read"), "{line}");

    // Someone registered the next repository's CI user name, with the derived address, and the
    // other, injective name the daemon falls back to (`<stem>-<repo id>_ci`): only both block it.
    let repo_id = w.emu.add_repo("bob", "api");
    w.emu.register_user(
        "bob-api-ci",
        "bob-api-ci@fkr-qemu.invalid",
        "squatter-pw-123",
    );
    let fallback = format!("bob-api-{repo_id}_ci");
    w.emu
        .register_user(&fallback, "mallory@example.org", "squatter-pw-456");
    let squatted = add_job(&w, "bob/api");
    // Each attempt is refused; the daemon gives up on the job after its attempts.
    wait_finished(
        &mut serve,
        &w,
        JobOutcome::PrepareFailed,
        3,
        Duration::from_secs(60),
    );
    assert_eq!(counter(&w, "fkr_qemu_ci_user_refusals_total"), 3);
    assert_eq!(job_status(&w, squatted), JobStatus::Waiting);
    // The operator is told which account is in the way, and that it is never taken over.
    let log = serve.log_text();
    let line = log
        .lines()
        .find(|l| {
            l.contains(&format!(
                "job {squatted}: preparing the VM failed: ensuring the CI user: CI user bob-api-ci for bob/api"
            ))
        })
        .unwrap_or_else(|| panic!("no error for job {squatted}; log:\n{log}"));
    assert!(line.contains("never takes over"), "{line}");
    assert!(
        line.contains(&format!("the other name {fallback} cannot be used either")),
        "{line}"
    );
    assert!(w.emu.token_scopes_requested("bob-api-ci").is_empty());
    assert!(w.emu.token_scopes_requested(&fallback).is_empty());
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(60)).success());
    w.assert_clean("alice-web-ci");
}

#[test]
fn serve_vm_four_jobs_run_two_at_a_time_with_one_ci_user() {
    let w = World::new(Settings {
        max_vms: 2,
        ..settings()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let ids: Vec<i64> = (0..4).map(|_| add_job(&w, "alice/web")).collect();
    let statuses = || -> Vec<JobStatus> { ids.iter().map(|id| job_status(&w, *id)).collect() };
    let start = Instant::now();
    let (mut max_qemus, mut max_dirs, mut max_vms) = (0, 0, 0);
    loop {
        max_qemus = max_qemus.max(w.qemus().len());
        max_dirs = max_dirs.max(w.vm_dirs().len());
        if let Some(s) = w.status() {
            assert_eq!(s.running, s.vms.len(), "{s:#?}");
            max_vms = max_vms.max(s.vms.len());
        }
        if statuses().iter().all(|s| *s == JobStatus::Success) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(400),
            "jobs not done: {:?}; log:\n{}",
            statuses(),
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        max_qemus <= 2 && max_dirs <= 2 && max_vms <= 2,
        "more than max_vms at once: {max_qemus} qemus, {max_dirs} dirs, {max_vms} VMs in status"
    );
    assert_eq!(max_qemus, 2, "two jobs should have run side by side");
    // Two jobs of one repository were dispatched at once, yet the CI user was created once.
    let created = user_creations(&w, "alice-web-ci");
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!(
        w.emu
            .user_logins()
            .iter()
            .filter(|u| *u == "alice-web-ci")
            .count(),
        1
    );
    // Forgejo marks a job done before its VM has powered off: wait for the four VMs' ends.
    wait_finished(&mut serve, &w, JobOutcome::Completed, 4, BOOT);
    // The queue dedupes by handle: four jobs, four dispatches, though every poll saw each job.
    assert_eq!(counter(&w, "fkr_qemu_jobs_dispatched_total"), 4);
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("alice-web-ci");
}

#[test]
fn serve_vm_sigterm_waits_for_the_job_in_flight() {
    let w = World::new(settings());
    let mut serve = w.serve(0);
    serve.wait_ready();
    if POOL_SIZE != 0 {
        // A job in a warm VM is over in seconds: one 60 s delay on its log upload (which the
        // runner stand-in gives up on after 30 s and retries) keeps it in flight meanwhile.
        w.emu.inject(
            "POST",
            "/api/actions/runner.v1.RunnerService/UpdateLog",
            FaultKind::Delay { delay_ms: 60_000 },
            Some(1),
        );
    }
    wait_pool_full(&mut serve);
    let id = add_job(&w, "bob/api");
    wait_launched(&mut serve, id, Duration::from_secs(60));
    // With the pool on: one job in flight and one warm VM (refilled after the bind).
    wait_pool_full(&mut serve);
    assert_ne!(job_status(&w, id), JobStatus::Success, "the job ended too soon");
    serve.signal(Signal::SIGTERM);
    let draining = serve.wait_status("serve to drain", Duration::from_secs(10), |s| {
        s.draining.then(|| s.clone())
    });
    assert!(!draining.ready, "{draining:#?}");
    let jobs = job_vms(&draining);
    assert_eq!(jobs.len(), 1, "{draining:#?}");
    assert_eq!(jobs[0].job_id, id);
    // The warm VM holds no job: it is stopped at once, while the job goes on.
    serve.wait_status("warm VMs to stop", Duration::from_secs(20), |s| {
        (s.vms.len() == job_vms(s).len()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        w.status().is_some() || job_status(&w, id) == JobStatus::Success,
        "serve exited before its job finished"
    );
    let st = serve.wait_exit(BOOT);
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    assert_eq!(
        job_status(&w, id),
        JobStatus::Success,
        "log:\n{}",
        serve.log_text()
    );
    w.assert_clean("bob-api-ci");
}

/// serve is killed (SIGKILL) while its VM boots and its runner cannot get the task yet; the next
/// start takes the VM over (ARCHITECTURE.md, "Restarts") instead of sweeping it: nothing of the job
/// is swept, and once Forgejo hands the task out, the job runs in that very VM and everything is
/// released afterwards.
#[test]
fn serve_vm_sigkill_then_restart_takes_the_booting_vm_over() {
    let w = World::new(settings());
    // The runner in the VM does not get its task until the restart is done.
    fail_runner_rpc(&w, "FetchSingleTask");
    let mut serve = w.serve(0);
    serve.wait_ready();
    wait_pool_full(&mut serve);
    let id = add_job(&w, "carol/lib");
    let launched = wait_launched(&mut serve, id, Duration::from_secs(60));
    let (vm, pid) = (launched.name, launched.pid.expect("its QEMU runs"));
    // With the pool on, the job was bound to a warm VM, and another one is warm when serve dies:
    // that one holds no job and is swept; the job's is taken over.
    let warm = wait_pool_full(&mut serve);
    let qemus = w.qemus();
    assert!(qemus.contains(&pid), "{qemus:?}");
    let tokens = w.job_tokens("carol-lib-ci");
    assert!(!tokens.is_empty(), "no job token");
    assert!(w.emu.runner_names().contains(&vm));
    serve.signal(Signal::SIGKILL);
    serve.wait_exit(Duration::from_secs(10));

    let mut again = w.serve(1);
    again.wait_ready();
    let found = |kind: SweepKind| {
        counter(
            &w,
            &format!(
                "fkr_qemu_sweep_findings_total{{kind=\"{}\"}}",
                kind.as_str()
            ),
        )
    };
    assert_eq!(
        counter(&w, "fkr_qemu_restart_vms_total{result=\"adopted\"}"),
        1,
        "log:\n{}",
        again.log_text()
    );
    // The warm VM's dir is swept (its QEMU and tap go with it, so they may not count again).
    for kind in SweepKind::ALL {
        let warm = warm.len() as u64;
        match kind {
            SweepKind::VmDir => assert_eq!(found(kind), warm, "vm_dir swept"),
            SweepKind::Process | SweepKind::Tap => {
                assert!(found(kind) <= warm, "{} swept", kind.as_str())
            }
            _ => assert_eq!(found(kind), 0, "{} swept", kind.as_str()),
        }
    }
    assert!(w.qemus().contains(&pid), "the job's QEMU runs on");
    if POOL_SIZE == 0 {
        assert_eq!(w.qemus(), qemus, "the same QEMU runs on");
    }
    assert_eq!(w.job_tokens("carol-lib-ci"), tokens);
    assert!(w.emu.runner_names().contains(&vm));
    assert!(w.vm_dirs().contains(&vm) && w.taps().contains(&vm));
    // Forgejo hands the task out now: the adopted VM's runner runs the job.
    w.emu.clear_faults();
    wait_finished(&mut again, &w, JobOutcome::Completed, 1, BOOT);
    assert_eq!(job_status(&w, id), JobStatus::Success);
    assert!(w.emu.deleted_runner_names().contains(&vm));
    again.signal(Signal::SIGTERM);
    assert!(again.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("carol-lib-ci");
}

#[test]
fn serve_vm_survives_forgejo_errors_and_timeouts_and_catches_up() {
    let w = World::new(Settings {
        request_timeout_ms: 1000,
        ..settings()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let jobs = "/admin/actions/runners/jobs";
    w.emu
        .inject("GET", jobs, FaultKind::Status { status: 500 }, None);
    let id = add_job(&w, "dave/app");
    let failed = serve.wait_status("a failed poll", Duration::from_secs(30), |s| {
        s.last_forgejo_error.clone()
    });
    assert!(
        failed
            .message
            .contains(&format!("GET {jobs} with HTTP 500")),
        "{failed:?}"
    );
    w.emu.clear_faults();
    w.emu
        .inject("GET", jobs, FaultKind::Delay { delay_ms: 3000 }, None);
    let timeout = serve.wait_status("a poll timing out", Duration::from_secs(30), |s| {
        s.last_forgejo_error
            .clone()
            .filter(|e| e.message.contains("did not answer GET"))
    });
    assert!(timeout.at > failed.at, "{timeout:?}");
    assert!(timeout.message.contains(jobs), "{timeout:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(w.status().is_some(), "serve died: {}", serve.log_text());
    assert!(w.status().expect("serve answers").ready);
    assert_eq!(job_status(&w, id), JobStatus::Waiting);
    w.emu.clear_faults();
    wait_finished(&mut serve, &w, JobOutcome::Completed, 1, BOOT);
    assert_eq!(
        job_status(&w, id),
        JobStatus::Success,
        "log:\n{}",
        serve.log_text()
    );
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("dave-app-ci");
}

#[test]
fn serve_vm_job_deadline_stops_a_job_that_never_finishes() {
    let w = World::new(Settings {
        boot_deadline: "60s",
        job_deadline: "60s",
        ..settings()
    });
    // The runner picks the job up but can never report it finished.
    fail_runner_rpc(&w, "UpdateTask");
    let mut serve = w.serve(0);
    serve.wait_ready();
    let id = add_job(&w, "erin/svc");
    wait_launched(&mut serve, id, Duration::from_secs(60));
    wait_for("the job to be picked up", BOOT, || {
        (job_status(&w, id) == JobStatus::Running).then_some(())
    });
    // The daemon sees it picked up, then stops it at the deadline.
    serve.wait_vm(id, "running", Duration::from_secs(30), |v| {
        v.state == VmState::Job(JobState::Running)
    });
    wait_finished(&mut serve, &w, JobOutcome::Deadline, 1, BOOT);
    assert_eq!(
        counter(&w, "fkr_qemu_vm_removals_total{reason=\"deadline\"}"),
        1
    );
    assert_eq!(w.finished(JobOutcome::Completed), 0);
    if std::env::var_os("FKR_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", serve.log_text());
    }
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("erin-svc-ci");
}

#[test]
fn serve_vm_second_signal_stops_the_vms_and_cleans_up() {
    let w = World::new(settings());
    // The VM's runner never gets its task: only the second signal ends the VM.
    fail_runner_rpc(&w, "FetchSingleTask");
    let mut serve = w.serve(0);
    serve.wait_ready();
    let id = add_job(&w, "frank/tool");
    wait_launched(&mut serve, id, Duration::from_secs(60));
    serve.signal(Signal::SIGINT);
    serve.wait_status("serve to drain", Duration::from_secs(10), |s| {
        (s.draining && s.running == 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(w.status().is_some(), "serve stopped answering");
    assert_eq!(w.status().expect("serve answers while draining").running, 1);
    serve.signal(Signal::SIGINT);
    let st = serve.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    // The daemon is gone, so its last words are the only record of how the job ended: stopped for
    // the shutdown, everything released.
    let log = serve.log_text();
    assert!(
        logged_at(
            &log,
            &format!("job {id}: failed (shutdown), cleanup complete")
        )
        .is_some(),
        "{log}"
    );
    assert_eq!(job_status(&w, id), JobStatus::Waiting);
    w.assert_clean("frank-tool-ci");
}

/// A host whose KVM passes the firmware probe but fails the guest (run state `internal-error`):
/// the job's first VM ends at once, KVM is marked broken, the same job gets one fresh VM under TCG
/// and completes; later jobs go straight to TCG. No job waits out its boot deadline.
#[test]
fn serve_vm_kvm_internal_error_retries_the_job_once_under_tcg() {
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        accel: "auto",
        qemu: Some(fake_qemu(fake.path(), "kvm-internal-error")),
        // Long enough that waiting it out would fail the timing below.
        boot_deadline: "300s",
        job_deadline: "400s",
        ..settings()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let job = w.emu.add_job("alice/kvm", &[LABEL], "build");
    let id = job.id;
    let started = Instant::now();
    wait_finished(
        &mut serve,
        &w,
        JobOutcome::AccelFailed,
        1,
        Duration::from_secs(90),
    );
    // The same job, again, in a fresh VM under TCG.
    let retry = serve.wait_vm(id, "a VM under TCG", Duration::from_secs(60), |v| {
        v.accel == Some(Accel::Tcg)
    });
    assert!(VmName::is_valid(&retry.name));
    wait_finished(&mut serve, &w, JobOutcome::Completed, 1, BOOT);
    assert!(
        started.elapsed() < Duration::from_secs(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        job_status(&w, id),
        JobStatus::Success,
        "log:\n{}",
        serve.log_text()
    );
    assert_eq!(
        counter(&w, "fkr_qemu_jobs_dispatched_total"),
        2,
        "one VM under KVM, one under TCG"
    );
    // What the operator is told: why KVM was chosen, how it failed, and that the job is retried.
    let log = serve.log_text();
    for said in [
        "accelerator chosen accel=kvm reason=the firmware ran under KVM".to_owned(),
        format!("job {id}: QEMU stopped the guest in run state internal-error under kvm"),
        format!(
            "job {id} (handle={}): KVM failed its VM; retrying it once under TCG",
            job.handle
        ),
    ] {
        assert!(log.contains(&said), "{said:?} not logged; log:\n{log}");
    }

    let id2 = add_job(&w, "alice/kvm");
    let vm2 = serve.wait_vm(id2, "launched", Duration::from_secs(60), |v| {
        v.accel.is_some()
    });
    assert_eq!(vm2.accel, Some(Accel::Tcg), "KVM stays marked broken");
    wait_finished(&mut serve, &w, JobOutcome::Completed, 2, BOOT);
    assert_eq!(job_status(&w, id2), JobStatus::Success);
    assert_eq!(
        w.finished(JobOutcome::AccelFailed),
        1,
        "KVM stays marked broken"
    );
    assert_eq!(counter(&w, "fkr_qemu_jobs_dispatched_total"), 3);

    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("alice-kvm-ci");
}

/// While serve runs a job, its QEMU is confined: a VM uid, no capability, no environment (so no
/// admin token), its own cgroup with limits, files only root can open; `status` shows the uid, the
/// cgroup and memory and disk use against their limits.
#[test]
fn serve_vm_qemu_is_sandboxed_and_status_shows_its_limits() {
    let w = World::new(settings());
    let mut serve = w.serve(0);
    serve.wait_ready();
    let id = add_job(&w, "alice/box");
    let vm = serve.wait_vm(id, "QEMU running with limits", BOOT, |v| {
        v.pid.is_some() && v.limits.is_some()
    });
    let pid = vm.pid.unwrap();
    let name = vm.name.as_str();
    let run_dir = w.runtime_dir().join("vms").join(name);
    let disk_dir = w.state_dir().join("disks").join(name);
    assert_sandboxed(pid, &run_dir, &disk_dir);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(w.emu.admin_token()));
    let l = vm.limits.as_ref().unwrap();
    assert!(l.uid.unwrap() >= 1_960_000_000, "{vm:#?}");
    // Refreshed at each status: the overlay's allocated bytes, the cgroup's memory.
    assert_eq!(l.memory_max, Some((256 + 320) << 20), "{vm:#?}");
    assert!(l.memory_used.unwrap() > 0, "{vm:#?}");
    assert_eq!(l.disk_max, (21 * 1024) << 20, "{vm:#?}");
    assert!(l.disk_used.is_some(), "{vm:#?}");
    assert!(l.cgroup.as_ref().unwrap().ends_with(name), "{vm:#?}");
    wait_finished(&mut serve, &w, JobOutcome::Completed, 1, BOOT);
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    assert!(!disk_dir.exists());
}

/// With room for one VM's disk_max only, the second job waits for disk instead of starting a VM
/// that could fill the disk; it runs once the first VM is gone.
#[test]
fn serve_vm_a_job_waits_for_disk_space() {
    let w = World::new(Settings {
        vm_extra: "disk_max_mib = 64\ndisk_budget_mib = 100",
        ..settings()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let a = add_job(&w, "alice/disk");
    let b = add_job(&w, "alice/disk");
    // One VM runs, the other job waits in the queue for disk.
    serve.wait_status("one VM and one job waiting", Duration::from_secs(60), |s| {
        (s.vms.len() == 1 && s.queued == 1).then_some(())
    });
    serve.wait("a wait for disk", Duration::from_secs(30), || {
        (counter(&w, "fkr_qemu_disk_admission_waits_total") >= 1).then_some(())
    });
    // Never two VMs at once: each job's VM comes and goes before the next one's.
    let mut order: Vec<i64> = Vec::new();
    let start = Instant::now();
    while w.finished(JobOutcome::Completed) < 2 {
        // Warm VMs pass the same disk admission: never two VMs' disks of any kind. (The status
        // board may still list a job in `cleaning` whose VM and disk are gone.)
        let disks: Vec<_> = std::fs::read_dir(w.state_dir().join("disks"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| n.to_string_lossy().starts_with("fr-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(disks.len() <= 1, "two VMs' disks at once: {disks:?}");
        if let Some(s) = w.status() {
            for v in job_vms(&s) {
                if order.last() != Some(&v.job_id) {
                    order.push(v.job_id);
                }
            }
        }
        assert!(w.qemus().len() <= 1, "two QEMUs at once");
        assert!(
            start.elapsed() < 2 * BOOT,
            "jobs not done: {order:?}; log:\n{}",
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(order.len(), 2, "{order:?}");
    assert_eq!(
        order.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([a, b])
    );
    assert_eq!(job_status(&w, a), JobStatus::Success);
    assert_eq!(job_status(&w, b), JobStatus::Success);
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
}

/// A QEMU that allocates past its cgroup's `memory.max` is killed inside its cgroup: serve keeps
/// running and answering, reports each VM's end, cleans up every VM (dirs, cgroups, taps) and gives
/// up on the job after its attempts.
#[test]
fn serve_vm_a_qemu_over_its_memory_limit_dies_alone() {
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        qemu: Some(fake_qemu(fake.path(), "oom")),
        ..settings()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let job = w.emu.add_job("alice/hog", &[LABEL], "build");
    let id = job.id;
    // Every VM of the job, by name, from the status board, until three have ended.
    let mut vms = BTreeSet::new();
    serve.wait(
        "three VMs of the job to end",
        Duration::from_secs(120),
        || {
            if let Some(s) = w.status() {
                vms.extend(
                    s.vms
                        .iter()
                        .filter(|v| v.job_id == id)
                        .map(|v| v.name.clone()),
                );
            }
            (w.metrics().sum("fkr_qemu_jobs_finished_total") >= 3.0).then_some(())
        },
    );
    // The job is given up on, and the operator is told so.
    wait_log(
        &mut serve,
        &format!(
            "job with handle {}: 3 VMs ended without its runner picking it up",
            job.handle
        ),
        Duration::from_secs(30),
    );
    assert_eq!(w.metrics().sum("fkr_qemu_jobs_finished_total"), 3.0);
    assert_eq!(counter(&w, "fkr_qemu_jobs_dispatched_total"), 3);
    let log = serve.log_text();
    // Each of the three VMs: killed by the kernel for its cgroup's memory limit, and said so.
    assert_eq!(
        log.matches(&format!(
            "job {id}: QEMU exited (signal: 9 (SIGKILL)): out of memory: the VM's cgroup hit its memory limit"
        ))
        .count(),
        3,
        "log:\n{log}"
    );
    assert!(w.status().is_some(), "serve stopped answering");
    let status = w.status().expect("serve still answers");
    assert!(status.ready, "{status:#?}");
    wait_for("cleanup", Duration::from_secs(30), || {
        (w.vm_dirs().is_empty() && w.taps().is_empty() && w.qemus().is_empty()).then_some(())
    });
    // Three VMs, each with its runner; no cgroup of theirs is left behind.
    assert_eq!(vms.len(), 3, "{vms:?}");
    let deleted: BTreeSet<String> = w
        .emu
        .deleted_runner_names()
        .into_iter()
        .filter(|r| VmName::is_valid(r))
        .collect();
    assert_eq!(deleted, vms);
    for vm in &vms {
        assert_eq!(vm_cgroup_dirs(vm), Vec::<PathBuf>::new());
    }
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
}
