//! `fkr-qemu serve` end to end: the real binary in a network namespace, the emulator as a process
//! behind NAT, test-guest VMs under TCG running the stand-in runner.

mod common;

use std::time::Duration;

use common::serve::{wait_for, Settings, World};
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(180);

#[test]
fn serve_vm_end_to_end_runs_a_job_and_cleans_up() {
    let w = World::new(Settings::default());
    let mut serve = w.serve(0);
    serve.wait_log("startup sweep...", Duration::from_secs(30));
    let line = serve.wait_log("entering discovery loop", Duration::from_secs(30));
    assert!(
        line.contains("(label=external-host, interval=300ms, max_vms=2)")
            || line.contains("label=external-host"),
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
    if std::env::var_os("FKR_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", serve.log_text());
    }
}
