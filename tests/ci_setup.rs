//! `.ci/setup` trusts only its final check: apt may remove an installed package while installing
//! another (a backported qemu-utils and Debian's qemu-system-x86 Break each other), so after the one
//! apt call every command the project runs must be on `PATH`, or setup fails naming it and its
//! package. This runs that check (`--check`) with a `PATH` from which one tool has vanished.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

/// A bin dir holding every program of the real `PATH` except `missing`.
fn path_without(dir: &Path, missing: &[&str]) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = std::env::var_os("PATH").unwrap();
    for d in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if missing.iter().any(|m| name == **m) || bin.join(&name).exists() {
                continue;
            }
            let _ = symlink(e.path(), bin.join(&name));
        }
    }
    bin.to_string_lossy().into_owned()
}

fn check(path: &str) -> (Option<i32>, String) {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/setup"))
        .arg("--check")
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn setup_check_passes_here_and_names_a_vanished_tool_with_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::env::var("PATH").unwrap();
    let (code, out) = check(&full);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("every tool present"), "{out}");

    let (code, out) = check(&path_without(dir.path(), &["qemu-img", "nft"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("qemu-img:qemu-utils"), "{out}");
    assert!(out.contains("nft:nftables"), "{out}");
    assert!(!out.contains("every tool present"), "{out}");
}
