//! `fkr-qemu boot-test` as a user runs it: the real binary, under TCG, on the test guest.

mod common {
    pub mod fake_qemu;
    pub mod guest;
    pub mod vm_config;
}

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fake_qemu::fake_qemu;
use common::guest::{assert_nothing_left, fake_internal_error_at, test_guest_image};

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fkr-qemu"));
    c.arg("boot-test")
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .args(args)
        .env("FKR_LOG", "warn")
        // boot-test keeps the serial log in a private dir under TMPDIR: watch that it goes too.
        .env("TMPDIR", dir.join("tmp"));
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    c
}

fn boot_test(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("running fkr-qemu")
}

/// `--image <test guest> --json --timeout 240 --memory 256`, then `extra`.
fn guest_args<'a>(image: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--image",
        image.to_str().unwrap(),
        "--json",
        "--timeout",
        "240",
        "--memory",
        "256",
    ];
    a.extend_from_slice(extra);
    a
}

/// Nothing under the test's TMPDIR (boot-test's serial log dir, probe dirs).
fn assert_tmp_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}

const PHASES: [&str; 6] = [
    "spawn",
    "qmp_ready",
    "first_serial",
    "proof",
    "guest_shutdown",
    "teardown",
];

#[test]
fn vm_boot_test_passes_on_the_test_guest_and_reports_every_phase() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_guest_image();
    let started = Instant::now();
    let out = boot_test(dir.path(), &guest_args(&image, &[]));
    let wall = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["accel"] == "tcg" || r["accel"] == "kvm", "{r}");
    assert!(
        !r["accel_reason"].as_str().unwrap_or("").is_empty(),
        "auto says why: {r}"
    );
    // Each phase is a duration; together they fit in the command's wall time.
    let mut sum = 0;
    for phase in PHASES {
        sum += r[format!("{phase}_ms")]
            .as_u64()
            .unwrap_or_else(|| panic!("{phase} missing: {r}"));
    }
    let total = r["total_ms"].as_u64().unwrap();
    assert!(
        sum <= total,
        "phases add up to {sum} ms > total {total} ms: {r}"
    );
    assert!(
        total <= wall.as_millis() as u64,
        "total {total} ms > wall time {wall:?}"
    );
    // Stopping a guest that powered itself off is reaping and removing files: no power-button wait.
    assert!(r["teardown_ms"].as_u64().unwrap() < 5000, "{r}");
    assert!(r["failed_phase"].is_null());
    // Boot phases: the test guest's kernel is `quiet` (no banner), so only userspace is known: from
    // its /init's first words to the proof, within the time from spawn to the proof.
    assert!(
        r["firmware_ms"].is_null() && r["kernel_ms"].is_null(),
        "{r}"
    );
    let userspace = r["userspace_ms"].as_u64().expect("userspace_ms");
    let to_proof: u64 = ["qmp_ready", "first_serial", "proof"]
        .iter()
        .map(|p| r[format!("{p}_ms")].as_u64().unwrap())
        .sum();
    assert!(userspace <= to_proof, "{r}");
    assert_nothing_left(dir.path());
    assert_tmp_empty(dir.path());
}

/// SIGINT and SIGTERM alike, whether they arrive while the VM is being prepared (accelerator probe,
/// overlay) or while it runs: the VM is stopped, every file removed, exit 1 naming the signal.
#[test]
fn vm_boot_test_stops_its_vm_on_sigint_and_sigterm() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let image = test_guest_image();
    for (sig, name) in [(Signal::SIGTERM, "SIGTERM"), (Signal::SIGINT, "SIGINT")] {
        for while_running in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let child = command(dir.path(), &guest_args(&image, &[]))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            if while_running {
                // QEMU is up: its pid file exists in the per-VM dir.
                let until = Instant::now() + Duration::from_secs(120);
                while !std::fs::read_dir(dir.path().join("run/vms"))
                    .map(|d| d.flatten().any(|e| e.path().join("qemu.pid").exists()))
                    .unwrap_or(false)
                {
                    assert!(Instant::now() < until, "the VM never started");
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(500));
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
            kill(Pid::from_raw(child.id() as i32), sig).unwrap();
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{name} (running: {while_running}): {stdout}\n{stderr}"
            );
            let r: serde_json::Value = serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
            assert_eq!(r["ok"], false);
            assert!(
                r["error"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("interrupted by {name}")),
                "{r}"
            );
            assert_nothing_left(dir.path());
            assert_tmp_empty(dir.path());
        }
    }
}

/// A KVM that runs the firmware probe but fails the guest: boot-test reports the internal error
/// with QEMU's words, ends within seconds (not at `--timeout`), and its teardown skips the power
/// button a paused guest cannot hear.
#[test]
fn vm_boot_test_reports_an_accelerator_internal_error_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = fake_qemu(dir.path(), "kvm-internal-error");
    let image = test_guest_image();
    let started = Instant::now();
    let out = boot_test(
        dir.path(),
        &guest_args(
            &image,
            &["--accel", "kvm", "--qemu", qemu.to_str().unwrap()],
        ),
    );
    let wall = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["accel"], "kvm", "{r}");
    assert_eq!(r["failed_phase"], "proof", "{r}");
    assert_eq!(r["outcome"]["kind"], "internal_error", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("internal-error") && error.contains("KVM internal error"),
        "{r}"
    );
    fake_internal_error_at(error);
    assert!(wall < Duration::from_secs(30), "{wall:?}: {r}");
    assert!(r["teardown_ms"].as_u64().unwrap() < 2000, "{r}");
    assert_nothing_left(dir.path());
    assert_tmp_empty(dir.path());
}

/// Exactly one error line from the binary, naming `needle`.
fn assert_one_error(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("fkr-qemu: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    for n in needles {
        assert!(errors[0].contains(n), "`{n}` not in: {}", errors[0]);
    }
}

#[test]
fn boot_test_names_missing_qemu_ovmf_image_and_a_corrupt_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_guest_image();
    let image = image.to_str().unwrap();

    let out = boot_test(
        dir.path(),
        &[
            "--image",
            image,
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
        ],
    );
    assert_one_error(
        &out,
        3,
        &[
            "/nonexistent/qemu-system-x86_64",
            "not found",
            "apt-get install qemu-system-x86",
        ],
    );

    let out = boot_test(
        dir.path(),
        &[
            "--image",
            image,
            "--ovmf-code",
            "/nonexistent/OVMF_CODE.fd",
            "--ovmf-vars",
            "/nonexistent/OVMF_VARS.fd",
        ],
    );
    assert_one_error(
        &out,
        3,
        &["/nonexistent/OVMF_CODE.fd", "apt-get install ovmf"],
    );

    let out = boot_test(dir.path(), &["--image", "/nonexistent/runner-base.qcow2"]);
    assert_one_error(
        &out,
        3,
        &["/nonexistent/runner-base.qcow2", "does not exist"],
    );

    let corrupt = dir.path().join("corrupt.qcow2");
    std::fs::write(&corrupt, b"QFI\xfb garbage that is no qcow2 header").unwrap();
    let out = boot_test(
        dir.path(),
        &["--image", corrupt.to_str().unwrap(), "--json"],
    );
    assert_one_error(
        &out,
        1,
        &[corrupt.to_str().unwrap(), "not a usable qcow2 image"],
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["failed_phase"], "spawn");
    assert_nothing_left(dir.path());
}
