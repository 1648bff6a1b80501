//! What a hostile guest or a stalled Forgejo can still cost a host, end to end with the real
//! `fkr-qemu serve` and the fake QEMU (no kernel: its "guest" runs the job through the runner RPC).
//!
//! - A guest that reports its job and then neither powers off nor answers the power button loses
//!   its token at once and its VM after the grace, not at the job deadline.
//! - Forgejo hangs (accepts, never answers; what it was asked is carried out when it wakes up) for
//!   longer than the request timeout, starting at each Forgejo call of a job's life: the job runs
//!   once, late by no more than the hang, one request timeout and one poll (plus its own run), and
//!   nothing of the job is left on Forgejo a minute after it answers again, while serve keeps
//!   running.

mod common {
    pub mod daemon;
    pub mod emulator;
    pub mod fake_qemu;
    pub mod links;
    pub mod netns;
    pub mod netns_exec;
    pub mod prometheus;
    pub mod serve;
    pub mod topology;
    pub mod uplink;
}

use std::time::{Duration, Instant};

use common::daemon::{wait_for, Serve, Settings};
use common::emulator::{FaultKind, JobStatus};
use common::fake_qemu::fake_qemu;
use common::serve::World;
use fkr_qemu::ops::JobOutcome;
use fkr_qemu::types::VmName;
use nix::sys::signal::Signal;

const LABEL: &str = "external-host";
/// serve's grace for a VM whose job is over (`job::GONE_GRACE`).
const GRACE: Duration = Duration::from_secs(30);

fn stop(mut serve: Serve, w: &World) {
    serve.signal(Signal::SIGTERM);
    let st = serve.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    assert!(w.status().is_none(), "the control socket outlived serve");
}

/// Our runners (named like VMs) that Forgejo still has.
fn our_runners(w: &World) -> Vec<String> {
    w.emu
        .runner_names()
        .into_iter()
        .filter(|r| r.starts_with(VmName::PREFIX))
        .collect()
}

#[test]
fn serve_a_guest_that_stays_up_after_its_job_loses_its_token_at_once_and_its_vm_after_the_grace() {
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        qemu: Some(fake_qemu(fake.path(), "runner-linger")),
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let id = w.emu.add_job("mallory/app", &[LABEL], "build").id;
    serve.wait_vm(id, "running", Duration::from_secs(30), |v| {
        v.state == fkr_qemu::ops::VmState::Job(fkr_qemu::types::JobState::Running)
    });
    serve.wait(
        "the job to succeed in Forgejo",
        Duration::from_secs(30),
        || (w.emu.job(id)?.status == JobStatus::Success).then_some(()),
    );
    let done = Instant::now();
    // The token goes at once (a poll and a request), while the guest is still up.
    serve.wait("the token to be revoked", Duration::from_secs(5), || {
        w.job_tokens("mallory-app-ci").is_empty().then_some(())
    });
    assert!(
        !w.qemus().is_empty(),
        "the VM was stopped before its grace ({:?} after the job ended)",
        done.elapsed()
    );
    assert!(
        our_runners(&w).is_empty(),
        "runners left: {:?}",
        our_runners(&w)
    );
    // The VM goes after the grace (plus the power button's and quit's few seconds), not at the job
    // deadline (120 s).
    serve.wait(
        "the VM to be stopped",
        GRACE + Duration::from_secs(15),
        || (w.qemus().is_empty() && w.vm_dirs().is_empty()).then_some(()),
    );
    assert!(
        done.elapsed() >= GRACE - Duration::from_secs(1),
        "stopped after {:?}, before the grace",
        done.elapsed()
    );
    serve.wait("the outcome", Duration::from_secs(10), || {
        (w.finished(JobOutcome::Overstayed) == 1).then_some(())
    });
    stop(serve, &w);
    w.assert_clean("mallory-app-ci");
}

// --- a hung Forgejo ---------------------------------------------------------------------------

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(300);
/// Longer than a request timeout and its retry (2 × 2 s + 0.1 s): the call fails.
const HANG: Duration = Duration::from_secs(6);
/// The job's own run with Forgejo answering (dispatch, claim settle, the fake guest, the polls),
/// generously: measured ~2 s.
const RUN: Duration = Duration::from_secs(8);

/// Forgejo hangs for [`HANG`] from the first `method route` request on; a job is added. The job
/// must run exactly once, within the hang + one request timeout + one poll of its normal run,
/// and nothing of it may be left on Forgejo a minute after the hang.
fn hang_at(method: &str, route: &str, repo: &str, ci_user: &str) {
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        qemu: Some(fake_qemu(fake.path(), "runner")),
        request_timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    w.emu.inject(
        method,
        route,
        FaultKind::Hang {
            hang_ms: HANG.as_millis() as u64,
        },
        Some(1),
    );
    let added = Instant::now();
    let id = w.emu.add_job(repo, &[LABEL], "build").id;
    let bound = HANG + REQUEST_TIMEOUT + POLL + RUN;
    serve.wait(
        "the job to succeed",
        bound + Duration::from_secs(240),
        || (w.emu.job(id)?.status == JobStatus::Success).then_some(()),
    );
    let took = added.elapsed();
    println!("hang of {HANG:?} at {method} {route}: the job succeeded {took:?} after it was added");
    assert!(
        took <= bound,
        "the job took {took:?} with a {HANG:?} hang at {method} {route}; at most {bound:?} expected"
    );
    let tasks: usize = w.emu.runners_ever().iter().map(|r| r.tasks.len()).sum();
    assert_eq!(tasks, 1, "the job ran {tasks} times");
    let hang_over = added + HANG;
    serve.wait(
        "nothing of the job left on Forgejo",
        (hang_over + Duration::from_secs(60)).saturating_duration_since(Instant::now()),
        || (our_runners(&w).is_empty() && w.job_tokens(ci_user).is_empty()).then_some(()),
    );
    serve.wait_status("no cleanup pending", Duration::from_secs(30), |s| {
        (s.forgejo_cleanup_pending == 0).then_some(())
    });
    serve.wait("the job's outcome", Duration::from_secs(30), || {
        (w.finished(JobOutcome::Completed) == 1).then_some(())
    });
    // Any other attempt failed in its preparation (during the hang); none waited for a claim.
    let m = w.metrics();
    let failed = m.get("fkr_qemu_jobs_finished_total{outcome=\"prepare_failed\"}");
    assert_eq!(m.sum("fkr_qemu_jobs_finished_total"), 1.0 + failed);
    // One CI user, made once.
    let users = std::fs::read_to_string(w.state_dir().join("ci-users.json")).unwrap();
    assert_eq!(users.matches(ci_user).count(), 1, "{users}");
    stop(serve, &w);
    w.assert_clean(ci_user);
}

#[test]
fn serve_forgejo_hang_at_runner_registration() {
    hang_at("POST", "/admin/actions/runners", "hang/reg", "hang-reg-ci");
}

#[test]
fn serve_forgejo_hang_at_token_mint() {
    hang_at(
        "POST",
        "/users/{username}/tokens",
        "hang/mint",
        "hang-mint-ci",
    );
}

#[test]
fn serve_forgejo_hang_at_claim_listing() {
    hang_at(
        "GET",
        "/admin/actions/runners",
        "hang/claims",
        "hang-claims-ci",
    );
}

#[test]
fn serve_forgejo_hang_at_token_revocation() {
    hang_at(
        "DELETE",
        "/users/{username}/tokens/{token}",
        "hang/revoke",
        "hang-revoke-ci",
    );
}

#[test]
fn serve_forgejo_hang_at_runner_deletion() {
    hang_at(
        "DELETE",
        "/admin/actions/runners/{runner_id}",
        "hang/delete",
        "hang-delete-ci",
    );
}

/// While a revocation fails, the background cleanup shows in `status` and the metrics, and it
/// finishes the revocation once Forgejo answers again.
#[test]
fn serve_a_failed_revocation_is_retried_in_the_background_and_shown_in_status() {
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        qemu: Some(fake_qemu(fake.path(), "runner")),
        request_timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    // Every revocation fails with a 500 until the fault is cleared.
    w.emu.inject(
        "DELETE",
        "/users/{username}/tokens/{token}",
        FaultKind::Status { status: 500 },
        None,
    );
    let id = w.emu.add_job("retry/app", &[LABEL], "build").id;
    serve.wait("the job to succeed", Duration::from_secs(30), || {
        (w.emu.job(id)?.status == JobStatus::Success).then_some(())
    });
    serve.wait_status(
        "a pending cleanup in status",
        Duration::from_secs(30),
        |s| (s.forgejo_cleanup_pending >= 1).then_some(()),
    );
    assert_eq!(w.metrics().get("fkr_qemu_forgejo_cleanup_pending"), 1.0);
    wait_for("a failed retry", Duration::from_secs(10), || {
        (w.metrics().get("fkr_qemu_forgejo_cleanup_retries_total") >= 2.0).then_some(())
    });
    assert_eq!(
        w.job_tokens("retry-app-ci").len(),
        1,
        "the token is still there"
    );
    w.emu.clear_faults();
    serve.wait("the token to be revoked", Duration::from_secs(35), || {
        w.job_tokens("retry-app-ci").is_empty().then_some(())
    });
    serve.wait_status("no cleanup pending", Duration::from_secs(5), |s| {
        (s.forgejo_cleanup_pending == 0).then_some(())
    });
    stop(serve, &w);
    w.assert_clean("retry-app-ci");
}

// --- a warm VM that acknowledges too late ----------------------------------------------------

/// A warm VM acknowledges its payload just after `bind_timeout` and starts the job's runner
/// anyway, deaf to the power button, while the job boots cold. The cold VM has a runner of its
/// own and the late one's registration is gone, so the late runner cannot take the task: the job
/// runs once, in the cold VM, and succeeds.
#[test]
fn serve_a_warm_vm_that_acknowledges_too_late_cannot_take_the_job_from_its_cold_boot() {
    use fkr_qemu::ops::{PoolState, VmState};
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        pool_size: 1,
        pool_extra: "bind_timeout = \"1s\"",
        qemu: Some(fake_qemu(fake.path(), "runner-late")),
        // The late VM holds its disk reservation until it is stopped: room for both.
        vm_extra: "disk_max_mib = 1024",
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let warm = serve.wait_status("a warm VM", Duration::from_secs(60), |s| {
        s.vms
            .iter()
            .find(|v| v.state == VmState::Pool(PoolState::Warm))
            .map(|v| v.name.clone())
    });
    let id = w.emu.add_job("late/app", &[LABEL], "build").id;
    serve.wait("the job to end in Forgejo", Duration::from_secs(60), || {
        let status = w.emu.job(id)?.status;
        matches!(status, JobStatus::Success | JobStatus::Failure).then_some(status)
    });
    assert_eq!(w.emu.job(id).unwrap().status, JobStatus::Success);
    let with_task: Vec<String> = w
        .emu
        .runners_ever()
        .into_iter()
        .filter(|r| !r.tasks.is_empty())
        .map(|r| r.name)
        .collect();
    assert_eq!(with_task.len(), 1, "{with_task:?}");
    assert_ne!(
        with_task[0], warm,
        "the late warm VM's runner took the task"
    );
    serve.wait("the job's outcome", Duration::from_secs(30), || {
        (w.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(
        w.metrics()
            .get("fkr_qemu_pool_discards_total{reason=\"no_ack\"}"),
        1.0
    );
    stop(serve, &w);
    w.assert_clean("late-app-ci");
}
