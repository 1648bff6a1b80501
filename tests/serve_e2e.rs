//! `fkr-qemu serve` end to end: the real binary in a network namespace, the emulator as a process
//! behind NAT, test-guest VMs under TCG running the stand-in runner.

mod common;

use std::time::{Duration, Instant};

use common::guest::{assert_sandboxed, fake_qemu_kvm_internal_error};
use common::serve::{wait_for, Settings, World};
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(180);

/// Makes every call of one runner RPC (e.g. `FetchSingleTask`) answer 500 from now on.
fn fail_runner_rpc(w: &World, method: &str) {
    w.emu.fault(
        "POST",
        &format!("/api/actions/runner.v1.RunnerService/{method}"),
        serde_json::json!({"kind": "status", "status": 500}),
    );
}

#[test]
fn serve_vm_end_to_end_runs_a_job_and_cleans_up() {
    let w = World::new(Settings::default());
    let mut serve = w.serve(0);
    serve.wait_log("startup sweep...", Duration::from_secs(30));
    let line = serve.wait_log("entering discovery loop", Duration::from_secs(30));
    assert!(
        line.ends_with("entering discovery loop (label=external-host, interval=0.3s, max_vms=2)"),
        "{line}"
    );

    let (id, handle) = w.emu.add_job("alice/web", "external-host");
    serve.wait_log(
        &format!("queue: dispatching job {id} (handle={handle})"),
        Duration::from_secs(30),
    );
    let dispatch = serve.wait_log(
        &format!("dispatch job {id} for alice/web (vm=fr-"),
        Duration::from_secs(30),
    );
    let vm = dispatch
        .split("vm=")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_owned();
    serve.wait_log(
        "creating CI user alice-web-ci for alice/web",
        Duration::from_secs(30),
    );
    serve.wait_log(
        &format!("VM {vm} started for job {id}"),
        Duration::from_secs(60),
    );
    serve.wait_log(&format!("VM {vm} finished (job {id})"), BOOT);
    assert_eq!(
        w.emu.job_status(id),
        "success",
        "log:\n{}",
        serve.log_text()
    );
    // The job's resources are released right after the VM ends.
    wait_for("cleanup", Duration::from_secs(30), || {
        (w.vm_dirs().is_empty() && w.taps().is_empty() && w.qemus().is_empty()).then_some(())
    });
    w.assert_clean("alice-web-ci");
    // The CI user exists once, with its password in the 0600 state file.
    assert_eq!(
        w.emu
            .users()
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
    assert!(!log.contains(&w.emu.admin_token), "admin token in the log");

    serve.signal(Signal::SIGTERM);
    let st = serve.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    assert!(!w.runtime_dir().join("control.sock").exists());

    // The state file is lost: the next job of the repository takes its CI user back (Forgejo answers
    // 422 to the creation; the user is ours, so its password is reset) instead of failing.
    std::fs::remove_file(w.state_dir().join("ci-users.json")).unwrap();
    let mut serve = w.serve(1);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id2, _) = w.emu.add_job("alice/web", "external-host");
    serve.wait_log(
        "CI user alice-web-ci exists already; resetting its password",
        Duration::from_secs(60),
    );
    serve.wait_log(&format!("job {id2}: done (completed)"), BOOT);
    assert_eq!(w.emu.job_status(id2), "success");
    assert_eq!(
        w.emu
            .users()
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
    let w = World::new(Settings::default());
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));

    // A push job, then a pull request from a fork of the same repository.
    let (push, _) = w.emu.add_job("alice/web", "external-host");
    serve.wait_log(&format!("job {push}: done (completed)"), BOOT);
    let (pr, _) = w
        .emu
        .add_fork_pull_request_job("alice/web", "external-host");
    serve.wait_log(&format!("job {pr}: run "), Duration::from_secs(60));
    serve.wait_log(&format!("job {pr}: done (completed)"), BOOT);
    assert_eq!(
        w.emu.job_status(pr),
        "success",
        "log:\n{}",
        serve.log_text()
    );
    let line = serve.wait_log(&format!("job {pr}: run "), Duration::from_secs(1));
    assert!(line.ends_with("registry access read"), "{line}");
    assert_eq!(
        w.emu.token_scopes_requested("alice-web-ci"),
        vec![
            vec!["write:package".to_string(), "read:package".to_string()],
            vec!["read:package".to_string()]
        ],
        "the push job writes, the fork's pull request only reads"
    );

    // Someone registered the next repository's CI user name, with the derived address.
    w.emu.register_user(
        "bob-api-ci",
        "bob-api-ci@fkr-qemu.invalid",
        "squatter-pw-123",
    );
    let (squatted, _) = w.emu.add_job("bob/api", "external-host");
    let line = serve.wait_log(
        &format!("job {squatted}: preparing the VM failed: ensuring the CI user: CI user bob-api-ci for bob/api"),
        Duration::from_secs(60),
    );
    assert!(line.contains("never takes over"), "{line}");
    assert!(w.emu.token_scopes_requested("bob-api-ci").is_empty());
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(60)).success());
    w.assert_clean("alice-web-ci");
}

/// The status of every job, from one emulator snapshot.
fn statuses(w: &World, ids: &[i64]) -> Vec<String> {
    let s = w.emu.state();
    ids.iter()
        .map(|id| {
            s["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["id"].as_i64() == Some(*id))
                .map(|j| j["status"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn serve_vm_four_jobs_run_two_at_a_time_with_one_ci_user() {
    let w = World::new(Settings {
        max_vms: 2,
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let ids: Vec<i64> = (0..4)
        .map(|_| w.emu.add_job("alice/web", "external-host").0)
        .collect();
    let start = std::time::Instant::now();
    let (mut max_qemus, mut max_dirs) = (0, 0);
    loop {
        max_qemus = max_qemus.max(w.qemus().len());
        max_dirs = max_dirs.max(w.vm_dirs().len());
        if statuses(&w, &ids).iter().all(|s| s == "success") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(400),
            "jobs not done: {:?}; log:\n{}",
            statuses(&w, &ids),
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        max_qemus <= 2 && max_dirs <= 2,
        "more than max_vms at once: {max_qemus} qemus, {max_dirs} dirs"
    );
    assert_eq!(max_qemus, 2, "two jobs should have run side by side");
    // Two jobs of one repository were dispatched at once, yet the CI user was created once.
    assert_eq!(
        serve.count("creating CI user alice-web-ci for alice/web"),
        1,
        "{}",
        serve.log_text()
    );
    assert_eq!(
        w.emu
            .users()
            .iter()
            .filter(|u| *u == "alice-web-ci")
            .count(),
        1
    );
    // The emulator marks a job done before its VM has powered off: wait for the four VMs' ends.
    wait_for("four VMs to finish", BOOT, || {
        (serve.count("finished (job") == 4).then_some(())
    });
    // The queue dedupes by handle: each job was dispatched exactly once, though every poll saw it.
    for id in &ids {
        let line = format!("queue: dispatching job {id} ");
        assert_eq!(serve.count(&line), 1, "{}", serve.log_text());
    }
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("alice-web-ci");
}

#[test]
fn serve_vm_sigterm_waits_for_the_job_in_flight() {
    let w = World::new(Settings::default());
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id, _) = w.emu.add_job("bob/api", "external-host");
    serve.wait_log(&format!("started for job {id}"), Duration::from_secs(60));
    serve.signal(Signal::SIGTERM);
    serve.wait_log("waiting for 1 in-flight VM(s)", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        serve.is_running() || w.emu.job_status(id) == "success",
        "serve exited before its job finished"
    );
    let st = serve.wait_exit(BOOT);
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    assert_eq!(
        w.emu.job_status(id),
        "success",
        "log:\n{}",
        serve.log_text()
    );
    assert!(serve.log_text().contains(&format!("finished (job {id})")));
    w.assert_clean("bob-api-ci");
}

#[test]
fn serve_vm_sigkill_then_restart_sweeps_every_leftover() {
    let w = World::new(Settings::default());
    // The runner in the VM never gets its task: the VM stays up until we kill serve.
    fail_runner_rpc(&w, "FetchSingleTask");
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id, _) = w.emu.add_job("carol/lib", "external-host");
    let started = serve.wait_log(&format!("started for job {id}"), Duration::from_secs(60));
    let vm = started
        .split("VM ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    wait_for("qemu", Duration::from_secs(30), || {
        (!w.qemus().is_empty()).then_some(())
    });
    let tokens = w.emu.tokens("carol-lib-ci");
    assert!(tokens.iter().any(|t| t.starts_with("orch-")), "{tokens:?}");
    assert!(w.emu.runners().contains(&vm));
    serve.signal(Signal::SIGKILL);
    serve.wait_exit(Duration::from_secs(10));

    let mut again = w.serve(1);
    let done = again.wait_log("startup sweep done", Duration::from_secs(60));
    let log = again.log_text();
    assert!(
        log.contains(&format!("sweep: removed the files of leftover VM {vm}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("sweep: deleted leftover runner {vm}")),
        "{log}"
    );
    assert!(log.contains("sweep: revoked token orch-"), "{log}");
    assert!(!done.contains(" 0 token"), "{done}");
    let old: Vec<&String> = tokens.iter().filter(|t| t.starts_with("orch-")).collect();
    let now = w.emu.tokens("carol-lib-ci");
    assert!(
        old.iter().all(|t| !now.contains(t)),
        "old tokens {old:?} still there: {now:?}"
    );
    assert!(!w.emu.runners().contains(&vm));
    assert!(!w.vm_dirs().contains(&vm));
    assert!(!w.taps().contains(&vm));
    // The job is still waiting: once Forgejo hands it out again, the new daemon runs it.
    w.emu.clear_faults();
    again.wait_log(&format!("finished (job {id})"), BOOT);
    assert_eq!(w.emu.job_status(id), "success");
    again.signal(Signal::SIGTERM);
    assert!(again.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("carol-lib-ci");
}

#[test]
fn serve_vm_survives_forgejo_errors_and_timeouts_and_catches_up() {
    let w = World::new(Settings {
        request_timeout_ms: 1000,
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let jobs = "/admin/actions/runners/jobs";
    w.emu.fault(
        "GET",
        jobs,
        serde_json::json!({"kind": "status", "status": 500}),
    );
    let (id, _) = w.emu.add_job("dave/app", "external-host");
    serve.wait_log("polling Forgejo for jobs failed", Duration::from_secs(30));
    w.emu.clear_faults();
    w.emu.fault(
        "GET",
        jobs,
        serde_json::json!({"kind": "delay", "delay_ms": 3000}),
    );
    serve.wait_log("did not answer GET", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert!(serve.is_running(), "serve died: {}", serve.log_text());
    assert_eq!(w.emu.job_status(id), "waiting");
    w.emu.clear_faults();
    serve.wait_log(&format!("job {id}: done (completed)"), BOOT);
    assert_eq!(
        w.emu.job_status(id),
        "success",
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
        ..Settings::default()
    });
    // The runner picks the job up but can never report it finished.
    fail_runner_rpc(&w, "UpdateTask");
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id, _) = w.emu.add_job("erin/svc", "external-host");
    serve.wait_log(&format!("started for job {id}"), Duration::from_secs(60));
    wait_for("the job to be picked up", BOOT, || {
        (w.emu.job_status(id) == "running").then_some(())
    });
    let end = serve.wait_log(&format!("job {id}: failed (deadline)"), BOOT);
    if std::env::var_os("FKR_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", serve.log_text());
    }
    assert!(end.contains("cleanup complete"), "{end}");
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("erin-svc-ci");
}

#[test]
fn serve_vm_second_signal_stops_the_vms_and_cleans_up() {
    let w = World::new(Settings::default());
    // The VM's runner never gets its task: only the second signal ends the VM.
    fail_runner_rpc(&w, "FetchSingleTask");
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id, _) = w.emu.add_job("frank/tool", "external-host");
    serve.wait_log(&format!("started for job {id}"), Duration::from_secs(60));
    serve.signal(Signal::SIGINT);
    serve.wait_log("waiting for 1 in-flight VM(s)", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    assert!(serve.is_running());
    serve.signal(Signal::SIGINT);
    serve.wait_log("again: stopping 1 VM(s)", Duration::from_secs(10));
    let st = serve.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    let log = serve.log_text();
    assert!(
        log.contains(&format!("job {id}: failed (shutdown), cleanup complete")),
        "{log}"
    );
    assert_eq!(w.emu.job_status(id), "waiting");
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
        qemu: Some(fake_qemu_kvm_internal_error(fake.path())),
        // Long enough that waiting it out would fail the timing below.
        boot_deadline: "300s",
        job_deadline: "400s",
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id, handle) = w.emu.add_job("alice/kvm", "external-host");
    let started = Instant::now();
    serve.wait_log(
        "accelerator chosen accel=kvm reason=the firmware ran under KVM",
        Duration::from_secs(60),
    );
    serve.wait_log(
        &format!("job {id}: QEMU stopped the guest in run state internal-error under kvm"),
        Duration::from_secs(60),
    );
    serve.wait_log(
        &format!("job {id}: failed (accel_failed)"),
        Duration::from_secs(30),
    );
    serve.wait_log(
        &format!("job {id} (handle={handle}): KVM failed its VM; retrying it once under TCG"),
        Duration::from_secs(30),
    );
    serve.wait_log("accelerator chosen accel=tcg", Duration::from_secs(30));
    serve.wait_log(&format!("job {id}: done (completed)"), BOOT);
    assert!(
        started.elapsed() < Duration::from_secs(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        w.emu.job_status(id),
        "success",
        "log:\n{}",
        serve.log_text()
    );
    assert_eq!(
        serve.count(&format!("queue: dispatching job {id} ")),
        2,
        "one VM under KVM, one under TCG; log:\n{}",
        serve.log_text()
    );

    let (id2, _) = w.emu.add_job("alice/kvm", "external-host");
    serve.wait_log(&format!("job {id2}: done (completed)"), BOOT);
    assert_eq!(w.emu.job_status(id2), "success");
    assert_eq!(
        serve.count("internal-error under kvm"),
        1,
        "KVM stays marked broken"
    );
    assert_eq!(serve.count(&format!("queue: dispatching job {id2} ")), 1);

    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    w.assert_clean("alice-kvm-ci");
}

/// While serve runs a job, its QEMU is confined: a VM uid, no capability, no environment (so no
/// admin token), its own cgroup with limits, files only root can open; `status` shows the uid, the
/// cgroup and memory and disk use against their limits.
#[test]
fn serve_vm_qemu_is_sandboxed_and_status_shows_its_limits() {
    let w = World::new(Settings::default());
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id, _) = w.emu.add_job("alice/box", "external-host");
    let vm = wait_for("a running VM in status", BOOT, || {
        let s = w.status()?;
        let vm = s["vms"].as_array()?.first()?.clone();
        (vm["pid"].is_u64() && vm["limits"].is_object()).then_some(vm)
    });
    let pid = vm["pid"].as_u64().unwrap() as u32;
    let name = vm["name"].as_str().unwrap();
    let run_dir = w.runtime_dir().join("vms").join(name);
    let disk_dir = w.state_dir().join("disks").join(name);
    assert_sandboxed(pid, &run_dir, &disk_dir);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(&w.emu.admin_token));
    let l = &vm["limits"];
    assert!(l["uid"].as_u64().unwrap() >= 1_960_000_000, "{vm}");
    // Refreshed at each status: the overlay's allocated bytes, the cgroup's memory.
    assert_eq!(l["memory_max"].as_u64(), Some((256 + 320) << 20), "{vm}");
    assert!(l["memory_used"].as_u64().unwrap() > 0, "{vm}");
    assert_eq!(l["disk_max"].as_u64(), Some((21 * 1024) << 20), "{vm}");
    assert!(l["disk_used"].is_u64(), "{vm}");
    assert!(l["cgroup"].as_str().unwrap().ends_with(name), "{vm}");
    serve.wait_log(&format!("job {id}: done (completed)"), BOOT);
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
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (a, _) = w.emu.add_job("alice/disk", "external-host");
    let (b, _) = w.emu.add_job("alice/disk", "external-host");
    serve.wait_log(
        "wait: not enough disk space for another VM",
        Duration::from_secs(60),
    );
    serve.wait_log(&format!("job {a}: done (completed)"), BOOT);
    serve.wait_log(&format!("job {b}: done (completed)"), BOOT);
    let log = serve.log_text();
    // Never two VMs at once: the second was dispatched after the first finished.
    let first_done = log.find(&format!("job {a}: done")).unwrap();
    let second_dispatched = log.find(&format!("queue: dispatching job {b} ")).unwrap();
    assert!(second_dispatched > first_done, "log:\n{log}");
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
        qemu: Some(common::guest::fake_qemu_that_allocates_forever(fake.path())),
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_log("entering discovery loop", Duration::from_secs(30));
    let (id, handle) = w.emu.add_job("alice/hog", "external-host");
    serve.wait_log(
        &format!("job with handle {handle}: 3 VMs ended without its runner picking it up"),
        Duration::from_secs(120),
    );
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
    assert!(serve.is_running());
    let status = w.status().expect("serve still answers");
    assert_eq!(status["ready"], true, "{status}");
    wait_for("cleanup", Duration::from_secs(30), || {
        (w.vm_dirs().is_empty() && w.taps().is_empty() && w.qemus().is_empty()).then_some(())
    });
    // No cgroup of these VMs is left behind.
    let vms: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            l.split(&format!("dispatch job {id} for alice/hog (vm="))
                .nth(1)
        })
        .map(|v| v.trim_end_matches(')'))
        .collect();
    assert_eq!(vms.len(), 3, "log:\n{log}");
    for vm in vms {
        assert_eq!(
            common::guest::vm_cgroup_dirs(vm),
            Vec::<std::path::PathBuf>::new()
        );
    }
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
}
