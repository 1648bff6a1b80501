//! A restart never kills a job (ARCHITECTURE.md, "Restarts: taking VMs over"): `serve` is killed
//! with SIGKILL while its VM's runner is mid-job, started again, and takes the VM over — the job
//! finishes in the VM it started in, Forgejo never sees a second runner or task for it, and
//! afterwards token, runner, tap, files and QEMU are gone. A VM dir whose recorded pid now
//! belongs to another process is swept, and that process is neither adopted nor killed. The VMs'
//! QEMU is the fake whose "guest" runs its job through the runner RPC (no kernel boots); its QMP
//! and serial sockets accept a new client after the old one left, as QEMU's do.

mod common {
    pub mod daemon;
    pub mod emulator;
    pub mod fake_qemu;
    pub mod fleet;
    pub mod links;
    pub mod netns;
    pub mod netns_exec;
    pub mod prometheus;
    pub mod uplink;
}

use std::time::Duration;

use common::daemon::{wait_for, Serve, Settings};
use common::emulator::{FaultKind, JobStatus};
use common::fake_qemu::fake_qemu;
use common::fleet::{Fleet, Host};
use fkr_qemu::ops::JobOutcome;
use nix::sys::signal::Signal;

const LABEL: &str = "external-host";
const WAIT: Duration = Duration::from_secs(60);

fn restarts(h: &common::fleet::Host, result: &str) -> u64 {
    h.metrics().get(&format!(
        "fkr_qemu_restart_vms_total{{result=\"{result}\"}}"
    )) as u64
}

/// One host whose QEMU is the fake with `behaviour` (`runner-<N>s`: a job of N seconds).
fn fake_host(behaviour: &str) -> (tempfile::TempDir, Fleet) {
    let fake = tempfile::tempdir().unwrap();
    let f = Fleet::new(vec![Settings {
        qemu: Some(fake_qemu(fake.path(), behaviour)),
        poll_interval: "200ms",
        boot_deadline: "30s",
        job_deadline: "120s",
        vm_extra: "disk_max_mib = 4096",
        ..Settings::default()
    }]);
    (fake, f)
}

/// Waits until `login`'s tokens of this host, every runner, the VM dirs and the QEMUs are gone,
/// then checks that no tap is left either.
fn assert_nothing_left(f: &Fleet, h: &Host, login: &str, timeout: Duration) {
    wait_for("nothing left", timeout, || {
        let live_runners = f
            .emu
            .runners_ever()
            .into_iter()
            .filter(|r| r.deleted_because.is_none())
            .count();
        // The tap goes last (a finished job's token and runner go first, at once): wait for it too.
        (h.tokens(&f.emu, login).is_empty()
            && live_runners == 0
            && h.qemus().is_empty()
            && common::daemon::vm_dirs_in(&h.runtime_dir()).is_empty()
            && h.taps().is_empty())
        .then_some(())
    });
    h.assert_clean();
}

/// SIGTERM, and a clean exit.
fn stop(mut serve: Serve) {
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(60)).success());
}

#[test]
fn serve_adopt_sigkill_mid_job_the_job_finishes_in_its_vm() {
    // The "job" takes 12 s once its runner has the task: the daemon dies in the middle of it.
    let (_fake, f) = fake_host("runner-12s");
    let h = &f.hosts[0];
    let mut serve = h.serve(0);
    serve.wait_ready();
    let job = f.emu.add_job("alice/web", &[LABEL], "build").id;
    let vm = serve.wait_vm(job, "QEMU running", WAIT, |v| v.pid.is_some());
    serve.wait("the runner to take the task", WAIT, || {
        (f.emu.job(job).unwrap().status == JobStatus::Running).then_some(())
    });
    let login = "alice-web-ci";
    let tokens = h.tokens(&f.emu, login);
    assert_eq!(tokens.len(), 1, "{tokens:?}");

    serve.signal(Signal::SIGKILL);
    serve.wait_exit(Duration::from_secs(10));
    let qemu = vm.pid.expect("the VM's pid");
    assert!(h.qemus().contains(&qemu), "the VM outlives its daemon");

    let mut serve = h.serve(1);
    serve.wait_ready();
    assert_eq!((restarts(h, "adopted"), restarts(h, "swept")), (1, 0));
    let log = serve.log_text();
    let said = format!(
        "restart: VM {} (job {job} of alice/web): adopted; its runner is running the job",
        vm.name
    );
    assert!(log.contains(&said), "{said:?} not logged; log:\n{log}");
    // Nothing of the job's was swept: its token and runner are the ones it had.
    assert_eq!(h.tokens(&f.emu, login), tokens);
    assert!(f.emu.runner_names().contains(&vm.name));
    let seen = serve.wait_vm(job, "the adopted VM on the board", WAIT, |v| {
        v.pid.is_some()
    });
    assert_eq!((seen.name.as_str(), seen.pid), (vm.name.as_str(), vm.pid));
    let board = h.status().expect("the daemon answers");
    assert_eq!(board.vms.len(), 1, "{board:#?}");

    serve.wait("the job to finish", WAIT, || {
        (h.finished(JobOutcome::Completed) == 1).then_some(())
    });
    let done = f.emu.job(job).unwrap();
    assert_eq!(done.status, JobStatus::Success);
    // One runner ever for the job, and it ran it: no second VM, no second task.
    let claims = f.claims_on(job);
    assert_eq!(claims.len(), 1, "{claims:#?}");
    assert!(claims[0].host == h.id && claims[0].booted(), "{claims:#?}");
    assert_eq!(done.runner_id, Some(claims[0].runner.id));
    assert_eq!(claims[0].runner.tasks.len(), 1, "{claims:#?}");
    assert_nothing_left(&f, h, login, WAIT);
    assert!(f.emu.deleted_runner_names().contains(&vm.name));
    stop(serve);
}

/// A VM dir whose record names a job and a pid that now belongs to another process (same pid, not
/// that QEMU): that process is never adopted and never killed; the dir is swept.
#[test]
fn serve_adopt_a_recycled_pid_is_never_adopted_or_killed() {
    let (_fake, f) = fake_host("runner");
    let h = &f.hosts[0];
    let mut bystander = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let pid = bystander.id();
    let start = fkr_qemu::vm::start_time(pid).expect("the bystander runs");
    let name = "fr-0badf00d";
    let dir = h.runtime_dir().join("vms").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let meta = serde_json::json!({
        "name": name,
        "created_at": now.format(&time::format_description::well_known::Rfc3339).unwrap(),
        "pid": pid,
        // The start time it has, but not the command line QEMU had: a recycled pid either way.
        "pid_start": start,
        "argv": ["/usr/bin/qemu-system-x86_64", "-name", name],
        "deadline_at": (now + time::Duration::hours(1))
            .format(&time::format_description::well_known::Rfc3339).unwrap(),
        "accel": "tcg",
        "serial_log": h.dir.join("fr-0badf00d.serial.log"),
        "disk_dir": h.dir.join("disks").join(name),
        "disk_max": 1u64 << 30,
        "uid": null,
        "cgroup": null,
        "job_id": 1,
        "owner": "alice",
        "repo": "web",
        "address": "10.88.0.2",
        "handle": "h",
        "repo_id": 1,
        "runner_id": 1,
    });
    std::fs::write(dir.join("vm.json"), meta.to_string()).unwrap();
    std::fs::write(dir.join("qemu.pid"), format!("{pid}\n")).unwrap();

    let mut serve = h.serve(0);
    serve.wait_ready();
    assert_eq!((restarts(h, "adopted"), restarts(h, "swept")), (0, 1));
    assert_eq!(h.metrics().sum("fkr_qemu_restart_vms_total"), 1.0);
    let log = serve.log_text();
    assert!(
        log.contains(&format!(
            "restart: VM {name}: swept: pid {pid} is now another process"
        )),
        "no sweep line for {name}; log:\n{log}"
    );
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the process that got the pid was killed"
    );
    assert!(!dir.exists(), "the VM dir was not swept");
    stop(serve);
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// The upgrade path: `fkr-qemu handover` while a job's runner is mid-job. The daemon re-executes
/// itself (same pid) within seconds and takes the VM over; the job finishes in its VM; afterwards
/// nothing is left.
#[test]
fn serve_adopt_handover_during_a_job_takes_seconds_and_loses_nothing() {
    let (_fake, f) = fake_host("runner-10s");
    let h = &f.hosts[0];
    let mut serve = h.serve(0);
    let before = serve.wait_ready();
    let job = f.emu.add_job("bob/api", &[LABEL], "build").id;
    let vm = serve.wait_vm(job, "QEMU running", WAIT, |v| v.pid.is_some());
    serve.wait("the runner to take the task", WAIT, || {
        (f.emu.job(job).unwrap().status == JobStatus::Running).then_some(())
    });
    let tokens = h.tokens(&f.emu, "bob-api-ci");

    let started = std::time::Instant::now();
    let out = std::process::Command::new(common::daemon::serve_bin())
        .args(["handover", "--config"])
        .arg(&h.config)
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "handover failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(10), "the handover took {took:?}");
    eprintln!("handover with one VM mid-job took {took:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 VM(s) running"), "{said}");
    let after = h.status().expect("the new daemon answers");
    assert_eq!(after.pid, before.pid, "re-executed in place");
    assert!(after.started_at > before.started_at);
    assert_eq!(restarts(h, "adopted"), 1);
    assert_eq!(
        h.tokens(&f.emu, "bob-api-ci"),
        tokens,
        "nothing was revoked"
    );
    let log = serve.log_text();
    assert!(
        log.contains(&format!("job {job}: VM {} handed over, running", vm.name)),
        "log:\n{log}"
    );

    serve.wait("the job to finish", WAIT, || {
        (h.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(f.emu.job(job).unwrap().status, JobStatus::Success);
    let claims = f.claims_on(job);
    assert_eq!(claims.len(), 1, "one runner ever: {claims:#?}");
    assert_nothing_left(&f, h, "bob-api-ci", WAIT);
    stop(serve);
}

/// The same with a real guest (the test guest under TCG, real QEMU): its QMP and serial sockets
/// take the new daemon as their client. The runner has its task and cannot report yet (Forgejo
/// fails its `UpdateLog`, so it retries) when the daemon is killed; after the restart Forgejo
/// recovers, the runner reports, the guest powers off, and the new daemon cleans up.
#[test]
fn serve_adopt_vm_real_guest_survives_a_sigkill_of_its_daemon() {
    let f = Fleet::new(vec![Settings {
        vm_extra: "disk_max_mib = 4096",
        ..Settings::default()
    }]);
    let h = &f.hosts[0];
    let report = "/api/actions/runner.v1.RunnerService/UpdateLog";
    f.emu
        .inject("POST", report, FaultKind::Status { status: 500 }, None);
    let mut serve = h.serve(0);
    serve.wait_ready();
    let job = f.emu.add_job("carol/lib", &[LABEL], "build").id;
    let boot = Duration::from_secs(240);
    let vm = serve.wait_vm(job, "QEMU running", boot, |v| v.pid.is_some());
    serve.wait("the runner to take the task", boot, || {
        (f.emu.job(job).unwrap().status == JobStatus::Running).then_some(())
    });
    serve.signal(Signal::SIGKILL);
    serve.wait_exit(Duration::from_secs(10));
    // Kept after the VM ends (the test config's keep_serial_log).
    let serial = h
        .dir
        .join("state/logs")
        .join(format!("{}.serial.log", vm.name));
    assert!(
        h.qemus().contains(&vm.pid.unwrap()),
        "the VM died with its daemon; serial:\n{}\nlog:\n{}",
        std::fs::read_to_string(&serial).unwrap_or_default(),
        serve.log_text()
    );

    let mut serve = h.serve(1);
    serve.wait_ready();
    assert_eq!(restarts(h, "adopted"), 1, "log:\n{}", serve.log_text());
    f.emu.clear_faults();
    serve.wait("the job to finish", boot, || {
        (h.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(f.emu.job(job).unwrap().status, JobStatus::Success);
    assert_eq!(f.claims_on(job).len(), 1);
    // The serial log goes on after the restart: the guest's last words are in it.
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(
        text.contains("the daemon restarted and took this VM over"),
        "{text}"
    );
    assert!(text.contains("fkr-guest: poweroff"), "{text}");
    assert_nothing_left(&f, h, "carol-lib-ci", boot);
    stop(serve);
}

/// The daemon dies (SIGKILL) at each step of a dispatch, then starts again. Each case ends with
/// the job done exactly once — its VM taken over, or everything of the crashed attempt swept and
/// the job run again — and nothing left: no token, runner, tap, VM dir or QEMU.
#[test]
fn serve_adopt_a_crash_at_each_dispatch_step_leaks_nothing_and_runs_the_job_once() {
    let (_fake, f) = fake_host("runner-2s");
    let h = &f.hosts[0];
    // (crash point, the next start takes the VM over)
    let points = [
        ("after-runner", false),
        ("after-ci-user", false),
        ("after-token", false),
        ("after-network", false),
        ("after-disks", false),
        ("after-spawn", true),
        ("before-qmp", true),
    ];
    for (round, (point, adopted)) in points.into_iter().enumerate() {
        let n = 2 * round as u32;
        let repo = format!("dora/app{round}");
        let login = format!("dora-app{round}-ci");
        let job = f.emu.add_job(&repo, &[LABEL], "build").id;
        let mut crashing = h.serve_env(n, &[("FKR_QEMU_CRASH_AT", point)]);
        let st = crashing.wait_exit(WAIT);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(9),
            "{point}: the daemon did not crash there; log:\n{}",
            crashing.log_text()
        );
        let mut serve = h.serve(n + 1);
        serve.wait_ready();
        assert_eq!(
            restarts(h, "adopted"),
            u64::from(adopted),
            "{point}; log:\n{}",
            serve.log_text()
        );
        serve.wait(&format!("{point}: the job to be done"), WAIT, || {
            (f.emu.job(job).unwrap().status == JobStatus::Success).then_some(())
        });
        // Run once: one runner got a task, ever.
        let ran: Vec<_> = f
            .claims_on(job)
            .into_iter()
            .filter(|c| !c.runner.tasks.is_empty())
            .collect();
        assert_eq!(ran.len(), 1, "{point}: {ran:#?}");
        assert_nothing_left(&f, h, &login, WAIT);
        stop(serve);
    }
}
