//! The project's Debian package (packaging/build-deb.sh) as `vm_systemd_host` installs it: built
//! once per set of inputs, also across test processes: one build at a time under a file lock,
//! reused while nothing it is made from changed. (`package_deb` checks the package itself, with the
//! release binary: `common::release`.)
//!
//! It packages the binary cargo built for this test run (the dev profile): what is under test is the
//! package (layout, metadata, maintainer scripts, unit), and an optimised build would add minutes of
//! CI time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Feeds `path` (a file, or every file under a directory, in name order) into `h`.
fn hash_tree(h: &mut Sha256, path: &Path) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            hash_tree(h, &e);
        }
    } else if let Ok(bytes) = std::fs::read(path) {
        h.update(path.to_string_lossy().as_bytes());
        h.update(bytes.len().to_le_bytes());
        h.update(&bytes);
    }
}

/// What the package is made from: the binary, what build-deb.sh copies in, and the commit its
/// changelog names.
fn inputs_key(binary: &Path) -> String {
    let mut h = Sha256::new();
    hash_tree(&mut h, binary);
    for p in [
        "packaging",
        "contrib/systemd",
        "image-builder/build-runner-base.sh",
        "image-builder/runner-base",
        "image-builder/README.md",
        "README.md",
        "ARCHITECTURE.md",
        "Cargo.toml",
    ] {
        hash_tree(&mut h, &repo().join(p));
    }
    let describe = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    h.update(&describe);
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The path of `fkr-qemu_<version>_<arch>.deb` holding this test run's binary (gzip-compressed: xz
/// takes ~20 s on an unoptimised binary). Built by the first caller, reused by the rest; a build
/// for other inputs replaces it.
pub fn deb() -> PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_fkr-qemu"));
    let shared = repo().join("target/deb-tests");
    std::fs::create_dir_all(&shared).unwrap();
    let _lock = Flock::lock(
        File::create(shared.join("lock")).unwrap(),
        FlockArg::LockExclusive,
    )
    .map_err(|(_, e)| e)
    .unwrap();
    let key = inputs_key(binary);
    let dir = shared.join(&key);
    let done = dir.join("deb-path");
    if let Ok(p) = std::fs::read_to_string(&done) {
        let p = PathBuf::from(p.trim());
        if p.is_file() {
            return p;
        }
    }
    // Older builds are of no use to anyone: one package at a time on disk.
    for e in std::fs::read_dir(&shared).unwrap().flatten() {
        if e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(repo().join("packaging/build-deb.sh"))
        .arg("--binary")
        .arg(binary)
        .arg("--out")
        .arg(&dir)
        .args(["--compression", "gzip"])
        .output()
        .expect("run packaging/build-deb.sh");
    assert!(
        out.status.success(),
        "packaging/build-deb.sh failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(deb.is_file(), "build-deb.sh printed {}", deb.display());
    // Written last: a build interrupted before this is redone by the next caller.
    std::fs::write(&done, deb.to_string_lossy().as_bytes()).unwrap();
    deb
}
