//! The operator commands and the metrics endpoint against a real `fkr-qemu serve` running a job in
//! a test-guest VM (TCG): `list` shows the VM, `console --follow` streams what the guest prints
//! while it runs, `console` shows the kept log afterwards, `ci-users` shows no secret, `status`
//! reports readiness, and the metrics endpoint serves valid OpenMetrics text whose counters move.

mod common {
    pub mod daemon;
    pub mod emulator;
    pub mod links;
    pub mod netns;
    pub mod netns_exec;
    pub mod prometheus;
    pub mod serve;
    pub mod topology;
    pub mod uplink;
}

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::daemon::{wait_for, Settings};
use common::emulator::JobStatus;
use common::serve::World;
use fkr_qemu::ops::{JobOutcome, VmInfo};
use fkr_qemu::types::Accel;
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(240);

fn fkr(config: &Path, args: &[&str]) -> Output {
    command(config, args).output().unwrap()
}

fn command(config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fkr-qemu"));
    c.args(args)
        .arg("--config")
        .arg(config)
        .env("FKR_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Kills a child process even when the test fails first.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn ops_vm_commands_and_metrics_against_serve() {
    let w = World::new(Settings::default());
    let cfg = w.config.clone();

    let mut serve = w.serve(0);
    let ready = serve.wait_ready();
    assert!(ready.vms.is_empty() && ready.queued == 0, "{ready:#?}");
    // The status is our daemon's (nsenter execs serve: same pid).
    assert_eq!(w.status().expect("serve answers").pid as i32, serve.pid());
    let o = fkr(&cfg, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("ready:               yes"),
        "{}",
        text(&o)
    );
    let before = w.metrics();
    assert_eq!(before.get("fkr_qemu_jobs_seen_total"), 0.0);
    assert_eq!(before.get("fkr_qemu_vms_running"), 0.0);

    let id = w.emu.add_job("alice/web", &["external-host"], "build").id;
    // Follow the console from the moment QEMU runs: what the job prints comes later.
    let vm: VmInfo = serve.wait_vm(id, "its serial log", Duration::from_secs(180), |v| {
        v.serial_log.is_some()
    });
    let name = vm.name.clone();
    let log_path = w
        .state_dir()
        .join("logs")
        .join(format!("{name}.serial.log"));
    assert_eq!(vm.serial_log.as_ref(), Some(&log_path), "{vm:#?}");
    let printed_before = std::fs::read(&log_path).unwrap_or_default();
    let mut follow = Reap(Some(
        command(&cfg, &["console", "--follow", &name])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    // Read as it streams: a full pipe would stall the follower.
    let mut stdout = follow.0.as_mut().unwrap().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut streamed = Vec::new();
        stdout.read_to_end(&mut streamed).map(|_| streamed)
    });

    // `list` shows the VM while it runs, from the daemon.
    let vm = wait_for("list to show the VM", Duration::from_secs(120), || {
        let o = fkr(&cfg, &["list", "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["daemon_running"], true);
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|vm| vm["name"] == name.as_str() && vm["pid"].is_u64())
            .cloned()
    });
    assert_eq!(vm["job_id"], id);
    assert_eq!(
        (vm["owner"].as_str(), vm["repo"].as_str()),
        (Some("alice"), Some("web"))
    );
    assert_eq!(vm["accel"], Accel::Tcg.as_str());
    let o = fkr(&cfg, &["list"]);
    let table = text(&o);
    let row = table
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("alice/web") && row.contains(&id.to_string()),
        "{row}"
    );
    assert!(table.lines().all(|l| l.chars().count() <= 100), "{table}");
    let during = w.metrics();
    assert_eq!(during.get("fkr_qemu_vms_running"), 1.0);

    serve.wait_status("the VM to be gone", BOOT, |s| {
        (!s.vms.iter().any(|v| v.name == name)).then_some(())
    });
    assert_eq!(
        w.emu.job(id).unwrap().status,
        JobStatus::Success,
        "log:\n{}",
        serve.log_text()
    );

    // `console --follow` ends by itself once the VM is gone, having streamed the guest's output.
    let status = wait_for(
        "console --follow to end with the VM",
        Duration::from_secs(60),
        || follow.0.as_mut().unwrap().try_wait().unwrap(),
    );
    assert!(status.success(), "{status}");
    let streamed = reader.join().unwrap().unwrap();
    let streamed = String::from_utf8_lossy(&streamed).into_owned();
    for marker in ["fkr-runner: got task", "fkr-guest: poweroff"] {
        assert!(!String::from_utf8_lossy(&printed_before).contains(marker));
        assert!(
            streamed.contains(marker),
            "{marker:?} not streamed:\n{streamed}"
        );
    }
    // The ended VM's log is kept: `console --raw` prints it whole, the same bytes; plain
    // `console` shows the firmware's escape sequences as text.
    let o = fkr(&cfg, &["console", "--raw", &name]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(o.stdout, std::fs::read(&log_path).unwrap());
    let o = fkr(&cfg, &["console", &name]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !o.stdout
            .iter()
            .any(|b| *b == 0x1b || (*b < 0x20 && !b"\n\t\r".contains(b))),
        "a control character reached the terminal"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("fkr-guest: poweroff"));

    // The counters moved by exactly this one job.
    serve.wait("the job's metrics", Duration::from_secs(30), || {
        (w.finished(JobOutcome::Completed) == 1).then_some(())
    });
    let after = w.metrics();
    assert_eq!(after.get("fkr_qemu_jobs_seen_total"), 1.0);
    assert_eq!(after.get("fkr_qemu_jobs_dispatched_total"), 1.0);
    assert_eq!(
        after.get("fkr_qemu_vm_removals_total{reason=\"job_done\"}"),
        1.0
    );
    assert_eq!(after.get("fkr_qemu_vms_running"), 0.0);
    for histogram in [
        "fkr_qemu_queue_wait_seconds",
        "fkr_qemu_vm_prepare_seconds",
        "fkr_qemu_job_duration_seconds",
        "fkr_qemu_vm_teardown_seconds",
    ] {
        assert_eq!(after.get(&format!("{histogram}_count")), 1.0, "{histogram}");
    }
    assert!(
        after.sum("fkr_qemu_forgejo_requests_total")
            > before.sum("fkr_qemu_forgejo_requests_total"),
        "Forgejo calls were not counted"
    );

    // ci-users: the user and repository, and none of the secrets we know of.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.state_dir().join("ci-users.json")).unwrap())
            .unwrap();
    let mut secrets = vec![w.emu.admin_token().to_owned()];
    collect_passwords(&state, &mut secrets);
    assert!(
        secrets.len() >= 2,
        "no CI-user password in the state file: {state}"
    );
    for args in [&["ci-users"][..], &["ci-users", "--json"][..]] {
        let o = fkr(&cfg, args);
        assert!(o.status.success(), "{}", text(&o));
        let out = text(&o);
        assert!(
            out.contains("alice-web-ci") && out.contains("alice/web"),
            "{out}"
        );
        for secret in &secrets {
            assert!(!out.contains(secret.as_str()), "{args:?} printed a secret");
        }
    }

    serve.signal(Signal::SIGTERM);
    let st = serve.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    w.assert_clean("alice-web-ci");
    // No daemon now: `list` says so and finds nothing; `status` fails.
    let o = fkr(&cfg, &["list"]);
    assert!(
        o.status.success() && text(&o).contains("no fkr-qemu daemon answers"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("(no VMs)"), "{}", text(&o));
    assert_eq!(fkr(&cfg, &["status"]).status.code(), Some(6));
}

/// Every string under a `password` key anywhere in `v`.
fn collect_passwords(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == "password" => out.push(s.clone()),
                    _ => collect_passwords(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_passwords(v, out)),
        _ => {}
    }
}
