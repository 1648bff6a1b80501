//! `fkr-qemu boot-test` as a user runs it: the real binary, under TCG, on the test guest.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::guest::{assert_nothing_left, test_guest_image};

fn boot_test(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fkr-qemu"))
        .arg("boot-test")
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .args(args)
        .env("FKR_LOG", "warn")
        .output()
        .expect("running fkr-qemu")
}

#[test]
fn vm_boot_test_passes_on_the_test_guest_and_reports_every_phase() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_guest_image();
    let out = boot_test(
        dir.path(),
        &[
            "--image",
            image.to_str().unwrap(),
            "--json",
            "--timeout",
            "240",
            "--memory",
            "256",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["accel"] == "tcg" || r["accel"] == "kvm", "{r}");
    let mut last = 0;
    for phase in [
        "spawn",
        "qmp_ready",
        "first_serial",
        "proof",
        "guest_shutdown",
        "teardown",
    ] {
        let ms = r[format!("{phase}_ms")]
            .as_u64()
            .unwrap_or_else(|| panic!("{phase} missing: {r}"));
        assert!(
            ms >= last,
            "{phase} at {ms} ms before the previous phase ({last} ms): {r}"
        );
        last = ms;
    }
    assert!(r["failed_phase"].is_null());
    assert_nothing_left(dir.path());
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
