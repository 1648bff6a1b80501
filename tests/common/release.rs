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

/// makepkg exports a SOURCE_DATE_EPOCH (the time it starts, unless one is set), and ring's build
/// script (through `cc`) reruns when it changes: every release build the tests run uses this one.
pub const SOURCE_DATE_EPOCH: &str = "1767225600"; // 2026-01-01T00:00:00Z

/// Gives `cmd` the environment of the shared release build. Cargo compares the variables build
/// scripts watch (`rerun-if-env-changed`) with its own environment, and one that differs rebuilds
/// ring and everything above it; so the build behind `binary()` and the one in makepkg's build()
/// must see the same. Removed: what cargo sets for the test process to describe this crate
/// (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, …: ring's build script watches some), which is no
/// configuration of the build.
pub fn build_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let describes_crate = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            );
        if describes_crate {
            cmd.env_remove(&*key);
        }
    }
    cmd.env("CARGO_TARGET_DIR", target_dir())
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
}

/// `cargo build --release --locked --bin fkr-qemu` into the tests' target directory; the binary.
///
/// No lock of our own: cargo locks `<target>/release` while it builds, so when both package tests
/// (separate processes under nextest) get here at once, the second waits for the first build and
/// then finds everything fresh. PKGBUILD's build() runs the same build (same target directory,
/// same environment, see `build_env`): it finds it fresh too.
pub fn binary() -> PathBuf {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--locked", "--bin", "fkr-qemu"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = build_env(&mut cmd)
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", env!("CARGO")));
    assert!(status.success(), "cargo build --release failed ({status})");
    let binary = target_dir().join("release/fkr-qemu");
    assert!(binary.is_file(), "{} was not built", binary.display());
    binary
}
