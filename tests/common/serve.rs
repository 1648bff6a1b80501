//! Harness for `serve` tests: the emulator as a process in an `upstream` namespace, `fkr-qemu serve`
//! (the real binary) as a child process in a `host` namespace routed to it, a config in a temp dir,
//! and helpers to drive the emulator and inspect what `serve` left behind. Everything dies with the
//! namespaces on Drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::netns::Topology;

/// The test guest image (`image-builder/test-guest.sh`, run by `.ci/setup`).
pub fn test_guest() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-guest/test-guest.qcow2");
    assert!(
        p.is_file(),
        "{} is missing: run image-builder/test-guest.sh (or .ci/setup)",
        p.display()
    );
    p
}

/// The binary under test: `FKR_SERVE_BIN` (e.g. a release build, for benchmarks) or this build's.
pub fn serve_bin() -> String {
    std::env::var("FKR_SERVE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_fkr-qemu").to_owned())
}

fn emulator_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_fkr-qemu"));
    let p = bin.parent().unwrap().join("examples/forgejo-emulator");
    assert!(
        p.is_file(),
        "{} is missing: cargo build --examples",
        p.display()
    );
    p
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The emulator process.
pub struct Emulator {
    child: Child,
    pub url: String,
    pub admin_token: String,
    ns: String,
}

impl Emulator {
    /// `curl` inside the host namespace (the only place that reaches the emulator besides the VMs).
    fn curl(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "curl",
                "-sS",
                "--fail-with-body",
                "--max-time",
                "20",
            ])
            .args(args)
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "curl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let text = self.curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
            &format!("{}_emulator/{path}", self.url),
        ]);
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Adds a waiting job; returns (id, handle).
    pub fn add_job(&self, repo: &str, label: &str) -> (i64, String) {
        let v = self.post(
            "jobs",
            &serde_json::json!({"repo": repo, "labels": [label]}),
        );
        (
            v["id"].as_i64().unwrap(),
            v["handle"].as_str().unwrap().to_owned(),
        )
    }

    /// Adds a waiting job whose run is a `pull_request` from a fork; returns (id, handle).
    pub fn add_fork_pull_request_job(&self, repo: &str, label: &str) -> (i64, String) {
        let run = serde_json::json!({"event": "pull_request", "trigger_event": "pull_request",
            "is_fork_pull_request": true});
        let v = self.post(
            "jobs",
            &serde_json::json!({"repo": repo, "labels": [label], "run": run}),
        );
        (
            v["id"].as_i64().unwrap(),
            v["handle"].as_str().unwrap().to_owned(),
        )
    }

    /// A user who signed up by themselves (not through the admin API), with `email`.
    pub fn register_user(&self, login: &str, email: &str, password: &str) {
        let v = self.post(
            "users",
            &serde_json::json!({"login": login, "password": password, "email": email}),
        );
        assert!(v["id"].as_i64().is_some(), "{v}");
    }

    /// The scopes requested by each token creation for `login`, in order (from the request log:
    /// tokens are revoked when their job ends).
    pub fn token_scopes_requested(&self, login: &str) -> Vec<Vec<String>> {
        let path = format!("/api/v1/users/{login}/tokens");
        self.state()["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["method"] == "POST" && r["path"] == path.as_str() && r["status"] == 201)
            .map(|r| {
                r["request_body"]["scopes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect()
            })
            .collect()
    }

    /// Makes `method route` fail (`kind` = `{"kind": "status", "status": 500}` etc.) until cleared.
    pub fn fault(&self, method: &str, route: &str, kind: Value) {
        let mut body = serde_json::json!({"method": method, "route": route});
        body.as_object_mut()
            .unwrap()
            .extend(kind.as_object().unwrap().clone());
        self.post("faults", &body);
    }

    pub fn clear_faults(&self) {
        self.curl(&["-X", "DELETE", &format!("{}_emulator/faults", self.url)]);
    }

    pub fn state(&self) -> Value {
        serde_json::from_str(&self.curl(&[&format!("{}_emulator/state", self.url)])).unwrap()
    }

    pub fn job_status(&self, id: i64) -> String {
        let s = self.state();
        s["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"].as_i64() == Some(id))
            .map(|j| j["status"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }

    /// Token names of `login`.
    pub fn tokens(&self, login: &str) -> Vec<String> {
        self.state()["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["user"].as_str() == Some(login))
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Names of the runners that exist.
    pub fn runners(&self) -> Vec<String> {
        self.state()["runners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn users(&self) -> Vec<String> {
        self.state()["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["login"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Knobs of the generated config.
#[derive(Clone)]
pub struct Settings {
    pub max_vms: usize,
    pub poll_interval: &'static str,
    pub boot_deadline: &'static str,
    pub job_deadline: &'static str,
    pub request_timeout_ms: u64,
    /// `[vm] accel`.
    pub accel: &'static str,
    /// `[vm] qemu`, when not the one on `PATH`.
    pub qemu: Option<PathBuf>,
    /// More `[vm]` lines.
    pub vm_extra: &'static str,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_vms: 2,
            poll_interval: "300ms",
            boot_deadline: "90s",
            job_deadline: "120s",
            request_timeout_ms: 5000,
            accel: "tcg",
            qemu: None,
            vm_extra: "",
        }
    }
}

/// Topology + emulator + config: everything a `serve` run needs.
pub struct World {
    pub emu: Emulator,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl World {
    pub const EMU_ADDR: &'static str = "203.0.113.1";

    pub fn new(settings: Settings) -> World {
        let topo = Topology::new();
        let mut child = topo
            .upstream
            .command(emulator_bin().to_str().unwrap())
            .args(["--listen", &format!("{}:0", Self::EMU_ADDR)])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the emulator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("emulator said {line:?}: {e}"));
        let emu = Emulator {
            child,
            url: v["url"].as_str().unwrap().trim_end_matches('/').to_owned() + "/",
            admin_token: v["admin_token"].as_str().unwrap().to_owned(),
            ns: topo.host.name().to_owned(),
        };
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let s = settings;
        std::fs::write(
            &config,
            format!(
                r#"label = "external-host"
poll_interval = "{poll}"
max_vms = {max_vms}
base_image = "{image}"
boot_deadline = "{boot}"
job_deadline = "{job}"
state_dir = "{dir}/state"
runtime_dir = "{dir}/run"

[forgejo]
url = "{url}"
request_timeout_ms = {timeout}
connect_timeout_ms = 2000
retries = 1
retry_backoff_ms = 100

[vm]
accel = "{accel}"{qemu}
{vm_extra}
vcpus = 1
memory_mib = 256
powerdown_grace_secs = 3
quit_grace_secs = 3
keep_serial_log = true

[net]
dns_servers = ["{emu_addr}"]
"#,
                max_vms = s.max_vms,
                poll = s.poll_interval,
                image = test_guest().display(),
                boot = s.boot_deadline,
                job = s.job_deadline,
                dir = dir.path().display(),
                url = emu.url,
                timeout = s.request_timeout_ms,
                emu_addr = Self::EMU_ADDR,
                accel = s.accel,
                vm_extra = s.vm_extra,
                qemu = s
                    .qemu
                    .as_ref()
                    .map(|q| format!("\nqemu = \"{}\"", q.display()))
                    .unwrap_or_default(),
            ),
        )
        .unwrap();
        World {
            emu,
            topo,
            dir,
            config,
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts `fkr-qemu serve` in the host namespace; its log goes to `<dir>/serve-<n>.log`.
    pub fn serve(&self, n: u32) -> Serve {
        let log = self.dir.path().join(format!("serve-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .topo
            .host
            .command(&serve_bin())
            .args(["serve", "--config", self.config.to_str().unwrap()])
            .env("FORGEJO_ADMIN_TOKEN", &self.emu.admin_token)
            .env("FKR_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start fkr-qemu serve");
        Serve {
            child: Some(child),
            log,
        }
    }

    /// VM directories under the runtime dir.
    pub fn vm_dirs(&self) -> Vec<String> {
        match std::fs::read_dir(self.runtime_dir().join("vms")) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `fkr-qemu status --json` against this world's daemon (the control socket needs no netns).
    pub fn status(&self) -> Option<Value> {
        let out = std::process::Command::new(serve_bin())
            .args(["status", "--json", "--runtime-dir"])
            .arg(self.runtime_dir())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `fr-*` interfaces in the host namespace.
    pub fn taps(&self) -> Vec<String> {
        self.topo
            .host
            .links()
            .into_iter()
            .filter(|l| l.starts_with("fr-"))
            .collect()
    }

    /// Pids of QEMUs started for this world (their command line names our runtime dir).
    pub fn qemus(&self) -> Vec<u32> {
        let needle = self.runtime_dir().display().to_string();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            let is_qemu = cmd.starts_with("qemu-system") || cmd.contains("/qemu-system");
            if is_qemu && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Asserts that no VM, file, tap, token or runner of ours is left.
    pub fn assert_clean(&self, ci_user: &str) {
        assert!(
            self.vm_dirs().is_empty(),
            "per-VM dirs left: {:?}",
            self.vm_dirs()
        );
        assert!(self.taps().is_empty(), "taps left: {:?}", self.taps());
        assert!(self.qemus().is_empty(), "qemu left: {:?}", self.qemus());
        let tokens = self.emu.tokens(ci_user);
        assert!(
            !tokens.iter().any(|t| t.starts_with("orch-")),
            "tokens left: {tokens:?}"
        );
        let runners = self.emu.runners();
        assert!(
            !runners.iter().any(|r| r.starts_with("fr-")),
            "runners left: {runners:?}"
        );
    }
}

/// A running `fkr-qemu serve`.
pub struct Serve {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Serve {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle`; returns that line.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return l.to_owned();
            }
            if start.elapsed() > timeout {
                panic!("no log line with {needle:?} after {timeout:?}; log:\n{text}");
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("serve exited ({st}) before logging {needle:?}; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > timeout {
                panic!(
                    "serve still running after {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // nextest shows this with the failure: the daemon's side of the story.
            eprintln!(
                "--- serve log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}
