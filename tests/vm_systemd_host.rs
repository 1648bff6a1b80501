//! fkr-qemu from its .deb as a systemd service on a Debian 12 host with systemd as PID 1 and the
//! unified cgroup v2 hierarchy — where users run it, and what neither this machine nor CI is. The
//! test boots such a host as a VM under TCG and drives it from outside:
//!
//! - the root is `image-builder/systemd-host.sh`'s cached tarball; a copy gets this run's .deb
//!   (`dpkg -i` in a chroot), a config whose QEMU is the fake in runner mode (its "guest" runs its
//!   job through the runner RPC for N seconds, no kernel), the admin token for `LoadCredential`, and
//!   `image-builder/systemd-host/scenario.sh` as a oneshot unit; `mkfs.ext4 -d` makes the disk and
//!   QEMU boots the root's own kernel and initrd;
//! - the Forgejo emulator runs here on 127.0.0.1; the host reaches it at the user network's `host=`
//!   address. The scenario asks for each job with `WANT_JOB=<tag>` on its report port (the second
//!   serial port) and the test adds it; everything else it reports as `KEY=value` lines there;
//! - the steps: start (Type=notify, LoadCredential), a job run to completion with its QEMU in a
//!   transient `machine-<vm>.scope` of its own (limits set, registered with machined), `kill -9` of
//!   the daemon, `systemctl restart`, two `systemctl reload`s and `systemctl stop`, each mid-job.
//!   Outside, each job ran exactly once and nothing of it is left on Forgejo.
//!
//! Run as root (chroot, mkfs of a root-owned tree). The first run builds the root (mmdebstrap from
//! the Debian mirror, ~1 GB, cached in `FKR_SYSTEMD_HOST_CACHE`, default
//! /var/cache/fkr-qemu/systemd-host); later runs need no network beyond loopback.

mod common {
    pub mod cmd;
    pub mod deb;
    pub mod emulator;
}

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cmd::run;
use common::emulator::{Emulator, JobStatus};

const LABEL: &str = "external-host";
const REPO: &str = "alice/web";
/// The CI user of [`REPO`].
const CI_LOGIN: &str = "alice-web-ci";
/// The fake QEMU's behaviour: each job takes this long once its runner has it, long enough for the
/// mid-job steps under TCG (a crash waits out the unit's RestartSec=15s: measured, the restarted
/// daemon answers ~20 s after the kill, ~30 s after the job started).
const FAKE: &str = "runner-50s";
/// The user network: `HOST` reaches this machine's loopback.
const NET: &str = "198.51.100.0/24";
const HOST: &str = "198.51.100.2";
/// From boot to the end of the scenario: ~7 min on a loaded 2-core machine (boot ~50 s, five jobs
/// of ~1 min). The whole test must stay well inside nextest's 15 min.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(11 * 60);
/// The steps, in the scenario's order, each one job.
const STEPS: [&str; 5] = ["run", "crash", "restart", "reload", "stop"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command in `root`, in mount and PID namespaces of its own (as tests/package_deb.rs does): no
/// mount and no process outlives it.
fn in_root(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork"])
        .arg(format!("--mount-proc={}", root.join("proc").display()))
        .arg("chroot")
        .arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn copy(from: &Path, to: &Path, mode: u32) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The one file in `dir` whose name starts with `prefix` (the root's kernel and initrd).
fn only_file(dir: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
                && !p.is_symlink()
        })
        .collect();
    assert_eq!(found.len(), 1, "{prefix}* in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

/// The daemon's config inside the host: Forgejo at the user network's host address, the fake QEMU,
/// a disk budget that fits the host's disk, no admin_token_file (the token comes from systemd's
/// credential only), no warm pool.
fn config(emu_port: u16) -> String {
    format!(
        r#"label = "{LABEL}"
poll_interval = "1s"
max_vms = 2
base_image = "/var/lib/fkr-qemu/images/runner-base.qcow2"
boot_deadline = "5m"
job_deadline = "20m"

[forgejo]
url = "http://{HOST}:{emu_port}/"

[vm]
qemu = "/usr/local/lib/fkr-sdhost/{FAKE}/qemu-system-x86_64"
accel = "tcg"
vcpus = 1
memory_mib = 256
disk_max_mib = 1024
powerdown_grace_secs = 5
quit_grace_secs = 5

# No warm VMs: each step's VM is the one its job boots (a warm VM would be listed between jobs).
[pool]
size = 0
"#
    )
}

/// Builds the host's disk in `work`: a copy of the cached root with the .deb, the config, the admin
/// token, the fake QEMU and the scenario. Returns (disk, kernel, initrd).
fn build_host(
    work: &Path,
    emu: &Emulator,
    emu_port: u16,
    step: &dyn Fn(&str),
) -> (PathBuf, PathBuf, PathBuf) {
    step("the cached root (image-builder/systemd-host.sh)");
    let out =
        run(Command::new(repo().join("image-builder/systemd-host.sh")).stderr(Stdio::inherit()));
    let tarball = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    step("the .deb (tests/common/deb.rs)");
    let deb = common::deb::deb();

    step("copying the root and installing the .deb");
    let root = work.join("root");
    std::fs::create_dir(&root).unwrap();
    run(Command::new("tar")
        .args(["--extract", "--numeric-owner", "--file"])
        .arg(&tarball)
        .arg("--directory")
        .arg(&root));
    copy(&deb, &root.join("tmp/fkr-qemu.deb"), 0o644);
    run(&mut in_root(
        &root,
        &["dpkg", "--force-unsafe-io", "-i", "/tmp/fkr-qemu.deb"],
    ));
    std::fs::remove_file(root.join("tmp/fkr-qemu.deb")).unwrap();

    write(
        &root.join("etc/fkr-qemu/config.toml"),
        &config(emu_port),
        0o640,
    );
    // Where the unit's LoadCredential= reads it; root's alone, as README's "Adding a host" says.
    write(
        &root.join("etc/fkr-qemu/admin-token"),
        emu.admin_token(),
        0o600,
    );
    let fake = Path::new(env!("CARGO_BIN_EXE_fkr-qemu"))
        .parent()
        .unwrap()
        .join("examples/fake-qemu-kvm-internal-error");
    assert!(
        fake.is_file(),
        "{} is missing: cargo build --examples",
        fake.display()
    );
    // A copy, not a symlink: the host has no path to this machine's target/. Same glibc (bookworm).
    copy(
        &fake,
        &root.join(format!(
            "usr/local/lib/fkr-sdhost/{FAKE}/qemu-system-x86_64"
        )),
        0o755,
    );
    // The fake "guest" is QEMU's own process, which the sandbox puts in a network namespace with
    // only loopback; its way to Forgejo is a unix socket beside its argv0
    // (`tests/common/uplink.rs`). In the host, systemd's socket proxy is that socket.
    write(
        &root.join("etc/systemd/system/fkr-sdhost-uplink.socket"),
        &format!(
            "[Socket]\nListenStream=/usr/local/lib/fkr-sdhost/{FAKE}/uplink.sock\nSocketMode=0666\n\
             [Install]\nWantedBy=sockets.target\n"
        ),
        0o644,
    );
    write(
        &root.join("etc/systemd/system/fkr-sdhost-uplink.service"),
        &format!("[Service]\nExecStart=/lib/systemd/systemd-socket-proxyd {HOST}:{emu_port}\n"),
        0o644,
    );
    let sockets = root.join("etc/systemd/system/sockets.target.wants");
    std::fs::create_dir_all(&sockets).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/fkr-sdhost-uplink.socket",
        sockets.join("fkr-sdhost-uplink.socket"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("var/lib/fkr-qemu/images")).unwrap();
    // The fake boots nothing from it, but the daemon makes each VM's overlay on top of it.
    run(&mut in_root(
        &root,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "/var/lib/fkr-qemu/images/runner-base.qcow2",
            "512M",
        ],
    ));
    let ib = repo().join("image-builder/systemd-host");
    copy(
        &ib.join("scenario.sh"),
        &root.join("usr/local/sbin/fkr-sdhost-scenario"),
        0o755,
    );
    copy(
        &ib.join("fkr-sdhost-scenario.service"),
        &root.join("etc/systemd/system/fkr-sdhost-scenario.service"),
        0o644,
    );
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/fkr-sdhost-scenario.service",
        wants.join("fkr-sdhost-scenario.service"),
    )
    .unwrap();

    let boot = work.join("boot");
    std::fs::create_dir(&boot).unwrap();
    let kernel = boot.join("vmlinuz");
    let initrd = boot.join("initrd.img");
    std::fs::copy(only_file(&root.join("boot"), "vmlinuz-"), &kernel).unwrap();
    std::fs::copy(only_file(&root.join("boot"), "initrd.img-"), &initrd).unwrap();

    step("mkfs.ext4 -d");
    let disk = work.join("host.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "sdhost", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&disk)
        .arg("4G"));
    // The tree is in the image now: free its gigabyte at once.
    std::fs::remove_dir_all(&root).unwrap();
    (disk, kernel, initrd)
}

/// The host VM's QEMU; killed when dropped (the scenario powers it off normally).
struct HostVm(Child);

impl Drop for HostVm {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn boot(work: &Path, disk: &Path, kernel: &Path, initrd: &Path) -> HostVm {
    let arg = |p: &Path| p.to_str().unwrap().to_owned();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "3072"])
        .arg("-kernel")
        .arg(arg(kernel))
        .arg("-initrd")
        .arg(arg(initrd))
        .args([
            "-append",
            "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            arg(disk)
        ))
        .arg("-netdev")
        .arg(format!("user,id=n0,net={NET},host={HOST},dns=198.51.100.3"))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        // Entropy at once: the daemon's random tokens would otherwise wait on an emulated boot.
        .args(["-device", "virtio-rng-pci"])
        .arg("-serial")
        .arg(format!("file:{}", arg(&work.join("console.log"))))
        .arg("-serial")
        .arg(format!("file:{}", arg(&work.join("report.log"))))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("qemu.stderr")).unwrap());
    // SAFETY: between fork and exec only prctl, which is async-signal-safe, runs in the child.
    // It ends the host VM when this test process dies without unwinding (nextest's timeout kill),
    // which `HostVm`'s Drop cannot.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().expect("start qemu-system-x86_64");
    HostVm(child)
}

/// What the scenario reported and the jobs the test added for it; the checks made on them, each
/// failure recorded, so one run shows every step that failed (not only the first).
struct Report {
    values: BTreeMap<String, String>,
    jobs: BTreeMap<String, i64>,
    console: PathBuf,
    failures: RefCell<Vec<String>>,
}

impl Report {
    /// The value of `key`; "" (and a failure) when the scenario did not report it.
    fn get(&self, key: &str) -> &str {
        match self.values.get(key) {
            Some(v) => v,
            None => {
                self.check(false, format!("{key}: not reported"));
                ""
            }
        }
    }

    fn check(&self, ok: bool, failure: String) {
        if !ok {
            self.failures.borrow_mut().push(failure);
        }
    }

    /// `key` must be `want`.
    fn expect(&self, key: &str, want: &str, why: &str) {
        let got = self.get(key);
        self.check(got == want, format!("{key}={got:?}, want {want:?}: {why}"));
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read(&self.console).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    /// Fails the test with every failed check, what was reported and the host's console.
    fn finish(&self) {
        let failures = self.failures.borrow();
        assert!(
            failures.is_empty(),
            "{} checks failed:\n  {}\nreported: {:#?}\njobs: {:?}\n--- host console (tail) ---\n{}",
            failures.len(),
            failures.join("\n  "),
            self.values,
            self.jobs,
            self.console_tail()
        );
    }
}

/// Follows the report port until END (or QEMU exits, or the timeout): adds a job for each
/// WANT_JOB=<tag>.
fn follow(vm: &mut HostVm, work: &Path, emu: &Emulator, step: &dyn Fn(&str)) -> Report {
    let started = Instant::now();
    let mut report = Report {
        values: BTreeMap::new(),
        jobs: BTreeMap::new(),
        console: work.join("console.log"),
        failures: RefCell::new(Vec::new()),
    };
    let mut seen = 0;
    loop {
        let text = std::fs::read(work.join("report.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        // Whole lines only: the last one may still be being written.
        let lines: Vec<&str> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .collect();
        for line in &lines[seen..] {
            let line = line.trim_end_matches(['\r', '\n']);
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            step(&format!("host: {k}={v}"));
            if k == "WANT_JOB" {
                let job = emu.add_job(REPO, &[LABEL], &format!("job-{v}"));
                report.jobs.insert(v.to_owned(), job.id);
            }
            report.values.insert(k.to_owned(), v.to_owned());
        }
        seen = lines.len();
        if report.values.contains_key("END") {
            // It powers off next; give it a moment so the disk is clean (nothing reads it later).
            let _ = wait_exit(vm, Duration::from_secs(60));
            return report;
        }
        if let Some(st) = vm.0.try_wait().unwrap() {
            panic!(
                "the host VM exited ({st}) before the scenario ended; reported {:#?}\n--- qemu stderr ---\n{}\n--- console (tail) ---\n{}",
                report.values,
                std::fs::read_to_string(work.join("qemu.stderr")).unwrap_or_default(),
                report.console_tail()
            );
        }
        assert!(
            started.elapsed() < SCENARIO_TIMEOUT,
            "the scenario did not end within {SCENARIO_TIMEOUT:?}; reported {:#?}\n--- console (tail) ---\n{}",
            report.values,
            report.console_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn wait_exit(vm: &mut HostVm, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if vm.0.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The job of `tag` succeeded, run by exactly one runner in one task, and that runner is deleted.
fn check_ran_once(emu: &Emulator, r: &Report, tag: &str) {
    let Some(&id) = r.jobs.get(tag) else {
        return r.check(false, format!("step {tag}: no job was asked for"));
    };
    let job = emu.job(id).unwrap();
    let runners: Vec<_> = emu
        .runners_ever()
        .into_iter()
        .filter(|run| job.task_id != 0 && run.tasks.contains(&job.task_id))
        .collect();
    let once = job.status == JobStatus::Success
        && job.attempt == 1
        && runners.len() == 1
        && runners[0].tasks.len() == 1
        && runners[0].deleted_because.is_some();
    r.check(
        once,
        format!(
            "step {tag}: job {id} must succeed once, in one task of one runner that is deleted \
             afterwards: status {:?}, attempt {}, task {}, runners {runners:?}",
            job.status, job.attempt, job.task_id
        ),
    );
}

/// The QEMU of step `tag` ran in `machine-<vm>.scope` under machine.slice with limits, registered
/// with machined as a VM, not under fkr-qemu.service.
fn check_in_own_scope(r: &Report, tag: &str) {
    let vm = r.get(&format!("{tag}.VM")).to_owned();
    r.check(vm.starts_with("fr-"), format!("{tag}.VM={vm:?}: a VM name"));
    let scope = format!("machine-{vm}.scope");
    let k = |s: &str| format!("{tag}.{s}");
    r.expect(
        &k("SCOPE_ACTIVE"),
        "active",
        &format!("{scope} must exist while its job runs"),
    );
    r.expect(
        &k("SCOPE_SLICE"),
        "machine.slice",
        "VM scopes live under machine.slice",
    );
    r.expect(
        &k("QEMU_CGROUP"),
        &format!("/machine.slice/{scope}"),
        "the QEMU must run in its VM's scope, not under fkr-qemu.service",
    );
    r.expect(
        &k("SCOPE_HAS_QEMU"),
        "1",
        "the scope's cgroup.procs must list the QEMU",
    );
    for limit in ["SCOPE_MEMORYMAX", "SCOPE_TASKSMAX"] {
        let v = r.get(&k(limit));
        r.check(
            v.parse::<u64>().is_ok_and(|n| n > 0),
            format!("{tag}.{limit}={v:?}: the scope must carry a limit"),
        );
    }
    r.expect(&k("SCOPE_MEMORYSWAPMAX"), "0", "a VM may not swap");
    let quota = r.get(&k("SCOPE_CPUQUOTA"));
    r.check(
        quota != "infinity" && !quota.is_empty(),
        format!("{tag}.SCOPE_CPUQUOTA={quota:?}: the scope must carry a CPU quota"),
    );
    r.expect(
        &k("MACHINE_CLASS"),
        "vm",
        "machinectl list must show the VM",
    );
}

#[test]
fn vm_systemd_host_scopes_survive_crash_restart_reload_and_stop_drains() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test builds a Debian root in a chroot and its disk with mkfs.ext4 -d: run it as root"
    );
    let started = Instant::now();
    let step = |what: &str| {
        eprintln!("[{:>6.1} s] {what}", started.elapsed().as_secs_f64());
        let _ = std::io::stderr().flush();
    };
    let emu = Emulator::spawn(
        &Path::new(env!("CARGO_BIN_EXE_fkr-qemu"))
            .parent()
            .unwrap()
            .join("examples/forgejo-emulator"),
        "127.0.0.1:0",
        &[],
    );
    let emu_port: u16 = emu
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the emulator's port");

    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (disk, kernel, initrd) = build_host(work.path(), &emu, emu_port, &step);
    step("booting the host under TCG");
    let mut vm = boot(work.path(), &disk, &kernel, &initrd);
    let r = follow(&mut vm, work.path(), &emu, &step);
    drop(vm);
    step("the scenario ended; checking");

    // The host is what users have: systemd with cgroup v2 and machined.
    r.expect(
        "CGROUP_FS",
        "cgroup2fs",
        "the host must boot the unified hierarchy",
    );
    r.expect("MACHINED", "loaded", "systemd-container must be installed");
    r.expect("END", "0", "the scenario must run to its end");

    // Start: Type=notify means `systemctl start` returned once the daemon was ready; the token came
    // from LoadCredential alone (the config names no token file) and shows nowhere.
    r.expect("START.RC", "0", "systemctl start fkr-qemu");
    r.expect("START.TYPE", "notify", "the unit is Type=notify");
    r.expect("START.ACTIVE", "active", "the unit runs");
    r.expect(
        "START.READY",
        "true",
        "start returns only once the daemon said READY=1",
    );
    r.expect(
        "START.CREDENTIALS_DIRECTORY",
        "1",
        "LoadCredential gives the daemon its directory",
    );
    r.expect(
        "START.TOKEN_IN_ENV",
        "0",
        "the admin token is not in the environment",
    );
    r.expect(
        "START.TOKEN_IN_SHOW",
        "0",
        "the admin token is not in systemctl show",
    );

    // A job runs to completion once; the stop drains its job (it completes, not cancelled).
    r.expect("run.FINISHED", "1", "the undisturbed job's VM goes away");
    check_ran_once(&emu, &r, "run");
    r.expect("stop.RC", "0", "systemctl stop drains and exits 0");
    r.expect("stop.ACTIVE", "inactive", "the unit is stopped");
    check_ran_once(&emu, &r, "stop");
    for left in ["TAPS_LEFT", "NFT_TABLES_LEFT", "VM_DIRS_LEFT", "QEMU_AFTER"] {
        r.expect(&format!("stop.{left}"), "0", "nothing is left after a stop");
    }
    r.expect("reload.RC1", "0", "systemctl reload");
    r.expect("reload.RC2", "0", "a second systemctl reload");
    r.expect("reload.SAME_PID", "1", "a handover re-executes in place");
    // The daemon stays where it started: after running VMs, and started again (after a crash, by a
    // restart).
    let daemon_at_start = r.get("START.DAEMON_CGROUP").to_owned();
    for key in [
        "crash.DAEMON_CGROUP",
        "restart.DAEMON_CGROUP",
        "run.DAEMON_CGROUP_END",
        "crash.DAEMON_CGROUP_END",
        "restart.DAEMON_CGROUP_END",
        "reload.DAEMON_CGROUP_END",
    ] {
        r.expect(
            key,
            &daemon_at_start,
            "neither a VM nor a restart may nest the daemon deeper than where it started",
        );
    }
    let daemon_before = r.get("reload.DAEMON_CGROUP_BEFORE").to_owned();
    r.expect(
        "reload.DAEMON_CGROUP_AFTER",
        &daemon_before,
        "two handovers must not nest the daemon deeper",
    );

    // Every VM in a transient scope of its own, from start to the end of the job.
    check_in_own_scope(&r, "run");
    check_in_own_scope(&r, "crash");
    for tag in STEPS {
        r.expect(
            &format!("{tag}.QEMU_AFTER"),
            "0",
            "the QEMU is gone after its job",
        );
    }
    r.expect("run.SCOPE_AFTER", "inactive", "the scope goes with its VM");

    // kill -9: systemd restarts the daemon, the scope and its QEMU stay, the new daemon adopts it.
    r.expect(
        "crash.RESTARTED",
        "1",
        "Restart=on-failure brings the daemon back",
    );
    r.expect(
        "crash.QEMU_ALIVE",
        "1",
        "a daemon's crash must not kill its VMs",
    );
    r.expect(
        "crash.SCOPE_AFTER_RESTART",
        "active",
        "the VM's scope outlives the daemon",
    );
    r.expect(
        "crash.QEMU_CGROUP_AFTER_RESTART",
        r.get("crash.QEMU_CGROUP"),
        "the QEMU stays in its scope",
    );
    r.expect(
        "crash.ADOPTED",
        "1",
        "the restarted daemon takes the VM over",
    );
    r.expect("crash.FINISHED", "1", "the adopted job finishes");

    // systemctl restart: the same.
    r.expect("restart.RC", "0", "systemctl restart");
    r.expect("restart.NEW_PID", "1", "a restart is a new daemon");
    r.expect(
        "restart.QEMU_ALIVE",
        "1",
        "a restart must not wait for or kill the VMs",
    );
    r.expect(
        "restart.SCOPE_AFTER_RESTART",
        "active",
        "the VM's scope outlives the restart",
    );
    r.expect(
        "restart.ADOPTED",
        "1",
        "the restarted daemon takes the VM over",
    );
    r.expect("restart.FINISHED", "1", "the adopted job finishes");

    // Reloads: the VM stays where it was.
    r.expect("reload.QEMU_ALIVE", "1", "a handover keeps the VMs");
    r.expect("reload.LISTED", "1", "the new daemon lists the VM");
    r.expect(
        "reload.QEMU_CGROUP_AFTER",
        r.get("reload.QEMU_CGROUP_BEFORE"),
        "a handover does not move the VM",
    );
    let reload_vm = r.get("reload.VM");
    r.expect(
        "reload.QEMU_CGROUP_BEFORE",
        &format!("/machine.slice/machine-{reload_vm}.scope"),
        "the VM runs in its scope",
    );
    r.expect(
        "reload.SCOPE_AFTER_RELOAD",
        "active",
        "the scope stays through handovers",
    );
    r.expect(
        "reload.SCOPE_AFTER",
        "inactive",
        "the scope goes with its VM",
    );

    // Stop: no scope, no machine left.
    r.expect(
        "stop.SCOPES_LEFT",
        "0",
        "no machine-fr-*.scope after a stop",
    );
    r.expect(
        "stop.MACHINES_LEFT",
        "0",
        "no machine registered after a stop",
    );

    // Each job ran once, and nothing of any is left on Forgejo: tokens revoked, runners deleted.
    for tag in STEPS {
        check_ran_once(&emu, &r, tag);
    }
    // Tokens were minted for the jobs (so "none left" below means something) ...
    let minted = emu.token_scopes_requested(CI_LOGIN).len();
    r.check(
        minted >= STEPS.len(),
        format!("{minted} tokens minted for {CI_LOGIN}, want one per job at least"),
    );
    // ... and every one is revoked: only the admin's own is left.
    let tokens: Vec<String> = emu.objects()["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter(|t| t["user"] != "forgejo-admin")
        .map(|t| format!("{}: {}", t["user"], t["name"]))
        .collect();
    r.check(
        tokens.is_empty(),
        format!("tokens left on Forgejo: {tokens:?}"),
    );
    let runners = emu.runner_names();
    r.check(
        runners.is_empty(),
        format!("runners left on Forgejo: {runners:?}"),
    );
    r.finish();
    step("done");
}
