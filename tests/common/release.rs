//! The release build of `fkr-qemu` that the package tests share (`package_deb.rs`,
//! `package_arch.rs`): packages ship the optimised binary, and CI builds it once.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target directory the tests were built in (`CARGO_TARGET_TMPDIR` is `<target>/tmp`).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .to_path_buf()
}

/// `cargo build --release --locked --bin fkr-qemu` into the tests' target directory; the binary.
///
/// No lock of our own: cargo locks `<target>/release` while it builds, so when both package tests
/// (separate processes under nextest) get here at once, the second waits for the first build and
/// then finds everything fresh. `PKGBUILD`'s build() runs the same command (same target dir, same
/// environment): it too finds the build fresh.
pub fn binary() -> PathBuf {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--locked", "--bin", "fkr-qemu"])
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", env!("CARGO")));
    assert!(status.success(), "cargo build --release failed ({status})");
    let binary = target_dir().join("release/fkr-qemu");
    assert!(binary.is_file(), "{} was not built", binary.display());
    binary
}
