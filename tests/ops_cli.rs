//! The operator commands (`list`, `status`, `console`, `ci-users`) as the real binary, against a
//! control socket served in-process and against runtime/state dirs the test lays out. (The same
//! commands against a real `serve` with a booted VM are in `ops_serve.rs`.)

mod common {
    pub mod prometheus;
}

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::prometheus;
use fkr_qemu::controller::ciuser::{CiUser, CiUserStore};
use fkr_qemu::ops::{Metrics, MetricsConfig, Services, StatusBoard, VmInfo, VmState};
use fkr_qemu::secret::Secret;
use fkr_qemu::types::JobState;

struct Dirs {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
}

impl Dirs {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        for d in ["run", "state", "state/logs"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(root.join("config.toml"), "").unwrap();
        Dirs { _tmp: tmp, root }
    }

    fn run(&self) -> std::path::PathBuf {
        self.root.join("run")
    }

    /// The directory flags every command takes; an empty config keeps /etc out of it.
    fn args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            self.root.join("config.toml").display().to_string(),
            "--runtime-dir".into(),
            self.run().display().to_string(),
            "--state-dir".into(),
            self.root.join("state").display().to_string(),
        ]
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fkr-qemu"));
        c.args(args).args(self.args()).env("FKR_LOG", "warn");
        c
    }

    fn fkr(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn vm(name: &str, state: VmState) -> VmInfo {
    VmInfo {
        name: name.into(),
        job_id: 31,
        owner: "alice".into(),
        repo: "web".into(),
        state,
        address: Some("10.88.0.7".into()),
        started_at: time::OffsetDateTime::now_utc(),
        accel: Some(fkr_qemu::types::Accel::Tcg),
        pid: Some(4242),
        serial_log: None,
        limits: None,
    }
}

// Multi-threaded: the test blocks on the child process while the runtime serves the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_status_ask_the_daemon() {
    let d = Dirs::new();
    let metrics = Metrics::new();
    let board = StatusBoard::new(Some(metrics.clone()));
    board.set_queued(1);
    board.vm_added(vm("fr-00c0ffee", JobState::Running.into()));
    board.forgejo_error("GET /api/v1/version: connection refused");
    let services = Services::start(&d.run(), &MetricsConfig::default(), &metrics, board.clone())
        .await
        .unwrap();

    // Not ready yet: `status` says so and exits 1.
    let o = d.fkr(&["status"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        stdout(&o).contains("ready:               no"),
        "{}",
        stdout(&o)
    );
    board.set_ready(true);
    let o = d.fkr(&["status"]);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    assert!(text.contains("queued jobs:         1"), "{text}");
    assert!(text.contains("running VMs:         1"), "{text}");
    assert!(text.contains("connection refused"), "{text}");
    let o = d.fkr(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["ready"], true);
    assert_eq!(status["vms"][0]["name"], "fr-00c0ffee");

    let o = d.fkr(&["list"]);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
    let row = text.lines().find(|l| l.starts_with("fr-00c0ffee")).unwrap();
    for field in ["31", "alice/web", "running", "10.88.0.7", "tcg", "4242"] {
        assert!(row.contains(field), "{field} missing from {row}");
    }
    assert!(o.stderr.is_empty(), "no 'daemon down' note: {o:?}");
    let o = d.fkr(&["list", "--json"]);
    let listing: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listing["daemon_running"], true);
    assert_eq!(listing["vms"][0]["state"], "running");
    assert_eq!(listing["vms"][0]["job_id"], 31);

    services.stop().await;
    let o = d.fkr(&["status"]);
    assert_eq!(o.status.code(), Some(6), "no daemon: {o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no fkr-qemu daemon is running"));
}

#[test]
fn list_without_a_daemon_reads_the_runtime_dir() {
    let d = Dirs::new();
    let vm_dir = d.run().join("vms/fr-0000beef");
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::fs::write(
        vm_dir.join("vm.json"),
        r#"{"name":"fr-0000beef","job_id":9,"owner":"bob","repo":"api","accel":"kvm",
            "created_at":"2026-01-01T00:00:00Z","pid":1,"serial_log":"/nowhere.log",
            "disk_dir":"/nowhere","disk_max":1}"#,
    )
    .unwrap();
    std::fs::write(vm_dir.join("qemu.pid"), "1\n").unwrap();
    let o = d.fkr(&["list"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no fkr-qemu daemon answers"));
    let row = stdout(&o)
        .lines()
        .find(|l| l.starts_with("fr-0000beef"))
        .map(str::to_owned)
        .unwrap();
    assert!(row.contains("bob/api") && row.contains("stale"), "{row}");
    let listing: serde_json::Value =
        serde_json::from_slice(&d.fkr(&["list", "--json"]).stdout).unwrap();
    assert_eq!(listing["daemon_running"], false);
    assert_eq!(listing["vms"][0]["state"], "stale");
}

#[test]
fn console_prints_the_log_and_follows_until_the_vm_ends() {
    let d = Dirs::new();
    let name = "fr-0000f00d";
    let log = d.root.join("state/logs").join(format!("{name}.serial.log"));
    // Firmware output: ANSI escapes and a non-UTF-8 byte pass through untouched.
    let boot = b"\x1b[2J\x1b[01;01HBdsDxe: starting Boot0001\xff\r\nLinux version 6.1\n";
    std::fs::write(&log, boot).unwrap();

    let o = d.fkr(&["console", "--raw", name]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(o.stdout, boot, "--raw shows an ended VM's kept log as is");
    // By default the guest's control characters never reach the terminal.
    let o = d.fkr(&["console", name]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        "\\x1b[2J\\x1b[01;01HBdsDxe: starting Boot0001\\xff\r\nLinux version 6.1\n"
    );

    // A live VM: its dir exists, qemu not spawned yet (no pid file) counts as alive.
    let vm_dir = d.run().join("vms").join(name);
    std::fs::create_dir_all(&vm_dir).unwrap();
    let mut child = d
        .command(&["console", "--follow", "--raw", name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(b"fkr-test: printed after follow began\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    f.write_all(b"reboot: Power down\n").unwrap();
    std::fs::remove_dir(&vm_dir).unwrap();

    let started = Instant::now();
    let out = loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break child.wait_with_output().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "console --follow did not end with the VM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut expected = boot.to_vec();
    expected.extend_from_slice(b"fkr-test: printed after follow began\nreboot: Power down\n");
    assert_eq!(out.stdout, expected);

    // Unknown VMs and bad names are usage errors.
    let o = d.fkr(&["console", "fr-11111111"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = d.fkr(&["console", "../../etc/passwd"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

#[test]
fn ci_users_never_shows_passwords() {
    let d = Dirs::new();
    let path = d.root.join("state/ci-users.json");
    let passwords = ["pw-Zq8rT2vLm9", "pw-Kc3xN7wPa1"];
    let mut store = CiUserStore::open(&path).unwrap();
    for (i, (owner, repo)) in [("alice", "web"), ("bob", "api")].into_iter().enumerate() {
        store
            .put(CiUser {
                username: format!("{owner}-{repo}-ci"),
                repository: format!("{owner}/{repo}"),
                repo_id: i as i64 + 1,
                password: Secret::new(passwords[i]),
                created_at: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            })
            .unwrap();
    }
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains(passwords[0]));

    for args in [&["ci-users"][..], &["ci-users", "--json"][..]] {
        let o = d.fkr(args);
        assert!(o.status.success(), "{o:?}");
        let all = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
        assert!(
            all.contains("alice-web-ci") && all.contains("bob/api"),
            "{all}"
        );
        for secret in passwords {
            assert!(!all.contains(secret), "{args:?} printed a password:\n{all}");
        }
        assert!(!all.contains("password"), "{all}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&d.fkr(&["ci-users", "--json"]).stdout).unwrap();
    assert_eq!(json["users"][0]["username"], "alice-web-ci");
    assert_eq!(json["users"][0]["created_at"], "2023-11-14T22:13:20Z");
    assert!(Path::new(&path).exists());
}

#[tokio::test]
async fn metrics_endpoint_serves_valid_openmetrics() {
    let d = Dirs::new();
    let metrics = Metrics::new();
    let board = StatusBoard::new(Some(metrics.clone()));
    let config = MetricsConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        allow_all_interfaces: false,
    };
    let services = Services::start(&d.run(), &config, &metrics, board.clone())
        .await
        .unwrap();
    let url = format!("http://{}/metrics", services.metrics_addr().unwrap());
    let scrape = || async {
        let r = reqwest::get(&url).await.unwrap();
        assert!(r.status().is_success());
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        prometheus::parse(&r.text().await.unwrap(), true).unwrap()
    };

    let before = scrape().await;
    assert_eq!(before.types["fkr_qemu_jobs_seen"], "counter");
    assert_eq!(before.types["fkr_qemu_vms_running"], "gauge");
    assert_eq!(before.types["fkr_qemu_queue_wait_seconds"], "histogram");
    assert_eq!(
        before.get("fkr_qemu_jobs_finished_total{outcome=\"completed\"}"),
        0.0
    );

    metrics.job_seen();
    metrics.job_dispatched(Duration::from_secs(2));
    board.vm_added(vm("fr-0000aaaa", JobState::Preparing.into()));
    metrics.observe_prepare(Duration::from_millis(800));
    metrics.observe_forgejo_call("/repos/{owner}/{repo}", 200, Duration::from_millis(9));
    let during = scrape().await;
    assert_eq!(during.get("fkr_qemu_vms_running"), 1.0);
    board.vm_removed("fr-0000aaaa");
    metrics.job_finished(
        fkr_qemu::ops::JobOutcome::Completed,
        Duration::from_secs(40),
    );
    metrics.vm_removed(fkr_qemu::ops::RemovalReason::JobDone);

    let after = scrape().await;
    assert_eq!(after.get("fkr_qemu_jobs_seen_total"), 1.0);
    assert_eq!(after.get("fkr_qemu_jobs_dispatched_total"), 1.0);
    assert_eq!(
        after.get("fkr_qemu_jobs_finished_total{outcome=\"completed\"}"),
        1.0
    );
    // ... and under no other outcome.
    assert_eq!(after.sum("fkr_qemu_jobs_finished_total"), 1.0);
    assert_eq!(
        after.get("fkr_qemu_vm_removals_total{reason=\"job_done\"}"),
        1.0
    );
    assert_eq!(after.get("fkr_qemu_vms_running"), 0.0);
    assert_eq!(after.get("fkr_qemu_queue_wait_seconds_count"), 1.0);
    assert_eq!(
        after.get("fkr_qemu_queue_wait_seconds_bucket{le=\"2.0\"}"),
        1.0
    );
    assert_eq!(
        after.get("fkr_qemu_queue_wait_seconds_bucket{le=\"1.0\"}"),
        0.0
    );
    assert_eq!(
        after
            .get("fkr_qemu_forgejo_requests_total{route=\"/repos/{owner}/{repo}\",status=\"200\"}"),
        1.0
    );
    services.stop().await;
}

#[test]
fn the_test_parser_rejects_malformed_text() {
    let good = "# HELP a x\n# TYPE a counter\na_total{k=\"v\"} 1\n# EOF\n";
    assert_eq!(
        prometheus::parse(good, true)
            .unwrap()
            .get("a_total{k=\"v\"}"),
        1.0
    );
    for bad in [
        "a_total 1\n# EOF\n",
        "# TYPE a counter\na_total{k=v} 1\n# EOF\n",
        "# TYPE a counter\na_total 1\n",
        "# TYPE a counter\na_total one\n# EOF\n",
        "# TYPE a counter\na_total 1\n# EOF\nb 2\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n# EOF\n",
    ] {
        assert!(prometheus::parse(bad, true).is_err(), "accepted: {bad}");
    }
}
