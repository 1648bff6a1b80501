//! One `fkr-qemu serve` as the tests run it: its config file, the real binary as a child process in
//! a network namespace, and what can be seen of it from outside — its control socket (typed
//! status), its metrics endpoint, its VM directories and QEMUs. `serve.rs` (one host) and
//! `fleet.rs` (several hosts serving one emulator) build their worlds from these.
//!
//! What the daemon is doing is read from its control socket (typed: [`DaemonStatus`], [`VmInfo`])
//! and from its metrics endpoint (counts), never from its log: the log's wording is pinned by one
//! test only (`serve_e2e::serve_vm_end_to_end_runs_a_job_and_cleans_up`).

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use fkr_qemu::ops::{DaemonStatus, VmInfo};

use super::netns::NetNs;
use super::prometheus::{self, Exposition};

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

/// The `forgejo-emulator` example binary.
pub fn emulator_bin() -> PathBuf {
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
    /// `host_id`, when not the default (the hostname).
    pub host_id: Option<String>,
    /// `[forgejo] ci_password_key_file`.
    pub ci_password_key_file: Option<PathBuf>,
    /// `[pool] size`: 0 (the pool off, as before the pool existed) unless a test wants warm VMs
    /// (tests/serve_e2e_pool.rs runs the end-to-end suite with 1).
    pub pool_size: usize,
    /// More `[pool]` lines.
    pub pool_extra: &'static str,
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
            host_id: None,
            ci_password_key_file: None,
            pool_size: 0,
            pool_extra: "",
        }
    }
}

/// Where serve's metrics endpoint listens, inside its namespace.
pub const METRICS: &str = "127.0.0.1:9464";

/// Writes the config of a serve whose files live under `dir` (`state`, `run`), talking to the
/// emulator at `emu_url` and giving its VMs `dns` as resolver.
pub fn write_config(path: &Path, dir: &Path, s: &Settings, emu_url: &str, dns: &str) {
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    std::fs::write(
        path,
        format!(
            r#"label = "external-host"
poll_interval = "{poll}"
max_vms = {max_vms}
base_image = "{image}"
boot_deadline = "{boot}"
job_deadline = "{job}"
state_dir = "{dir}/state"
runtime_dir = "{dir}/run"{host_id}

[forgejo]
url = "{url}/"
request_timeout_ms = {timeout}
connect_timeout_ms = 2000
retries = 1
retry_backoff_ms = 100{key_file}

[vm]
accel = "{accel}"{qemu}
{vm_extra}
vcpus = 1
memory_mib = 256
powerdown_grace_secs = 3
quit_grace_secs = 3
keep_serial_log = true

[net]
dns_servers = ["{dns}"]

[metrics]
listen = "{metrics}"

[pool]
size = {pool_size}
{pool_extra}
"#,
            pool_size = s.pool_size,
            pool_extra = s.pool_extra,
            max_vms = s.max_vms,
            poll = s.poll_interval,
            image = test_guest().display(),
            boot = s.boot_deadline,
            job = s.job_deadline,
            dir = dir.display(),
            host_id = s
                .host_id
                .as_ref()
                .map(|h| format!("\nhost_id = \"{h}\""))
                .unwrap_or_default(),
            url = emu_url,
            timeout = s.request_timeout_ms,
            key_file = s
                .ci_password_key_file
                .as_deref()
                .map(|p| format!("\nci_password_key_file = {}", quoted(p)))
                .unwrap_or_default(),
            metrics = METRICS,
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
}

/// Starts `fkr-qemu serve --config config` in `ns` with the admin token and `env` (e.g.
/// `FKR_QEMU_CRASH_AT`) in its environment; its log goes to `log`, its control socket is under
/// `runtime_dir`.
pub fn start_serve(
    ns: &NetNs,
    config: &Path,
    log: PathBuf,
    runtime_dir: PathBuf,
    admin_token: &str,
    env: &[(&str, &str)],
) -> Serve {
    let file = std::fs::File::create(&log).unwrap();
    let child = ns
        .command(&serve_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("FORGEJO_ADMIN_TOKEN", admin_token)
        // FKR_TEST_LOG: a more detailed log for one run (e.g. `fkr_qemu=debug`).
        .env(
            "FKR_LOG",
            std::env::var("FKR_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(env.iter().copied())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("start fkr-qemu serve");
    Serve {
        child: Some(child),
        log,
        runtime_dir,
    }
}

/// The metrics of the serve running in `ns` (its `/metrics` endpoint, scraped from inside), checked
/// to be valid OpenMetrics text.
pub fn metrics_in(ns: &NetNs) -> Exposition {
    let body = ns.exec(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "20",
            &format!("http://{METRICS}/metrics"),
        ],
    );
    prometheus::parse(&body, true).unwrap_or_else(|e| panic!("invalid metrics: {e}\n{body}"))
}

/// VM directories under `runtime_dir`.
pub fn vm_dirs_in(runtime_dir: &Path) -> Vec<String> {
    match std::fs::read_dir(runtime_dir.join("vms")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Pids of the QEMUs whose command line names `runtime_dir`.
pub fn qemus_in(runtime_dir: &Path) -> Vec<u32> {
    let needle = runtime_dir.display().to_string();
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

/// The answer to `status` on the control socket under `runtime_dir`, through the crate's own
/// client; `None` while no daemon answers there (not yet, or no longer: a daemon that is exiting
/// closes the socket).
pub fn status_of(runtime_dir: &Path) -> Option<DaemonStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = fkr_qemu::ops::Client::connect(runtime_dir).await.ok()?;
        client.status().await.ok()
    })
}

/// A running `fkr-qemu serve`.
pub struct Serve {
    child: Option<Child>,
    pub log: PathBuf,
    runtime_dir: PathBuf,
}

impl Serve {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `f` every 100 ms until it returns `Some`; fails when `timeout` passes or serve exits
    /// first (showing its log).
    pub fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "serve exited ({st}) while waiting for {what}; log:\n{}",
                    self.log_text()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; status: {:#?}; log:\n{}",
                    status_of(&self.runtime_dir),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the daemon's status satisfies `f`; returns what `f` returned.
    pub fn wait_status<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&DaemonStatus) -> Option<T>,
    ) -> T {
        let runtime_dir = self.runtime_dir.clone();
        self.wait(what, timeout, || {
            status_of(&runtime_dir).as_ref().and_then(&mut f)
        })
    }

    /// Waits until the daemon is ready (startup sweep done, discovery running).
    pub fn wait_ready(&mut self) -> DaemonStatus {
        self.wait_status("serve to be ready", Duration::from_secs(60), |s| {
            s.ready.then(|| s.clone())
        })
    }

    /// Waits until the VM of job `job_id` satisfies `f`; returns it.
    pub fn wait_vm(
        &mut self,
        job_id: i64,
        what: &str,
        timeout: Duration,
        f: impl Fn(&VmInfo) -> bool,
    ) -> VmInfo {
        self.wait_status(&format!("the VM of job {job_id}: {what}"), timeout, |s| {
            s.vms.iter().find(|v| v.job_id == job_id && f(v)).cloned()
        })
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
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
        let Some(mut c) = self.child.take() else {
            return;
        };
        if std::thread::panicking() {
            // nextest shows this with the failure: the daemon's side of the story.
            eprintln!(
                "--- serve log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}
