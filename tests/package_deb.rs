//! The Debian package (packaging/build-deb.sh): installed with its real dependencies into a clean
//! Debian root (mmdebstrap, the host's release), `fkr-qemu --version` runs, `systemd-analyze verify`
//! accepts the installed unit, the example config parses, the manual pages and completions are
//! where man and the shells look, an upgrade keeps the unit enabled, `dpkg --remove` disables it,
//! and `dpkg --purge` leaves nothing behind — not the config directory with the admin token in it,
//! not the link `systemctl enable` made, not deb-systemd-helper's record of it. And lintian passes
//! the package with no error and no warning but those `packaging/lintian-overrides` explains.
//!
//! The package holds the release binary (`common::release`, one build shared with
//! `package_arch.rs`). The install test runs as root (mmdebstrap --mode=root, chroot).
//!
//! Downloads, from the mirror mmdebstrap uses by default (deb.debian.org, with -updates and
//! -security for a stable release): once, a root of Essential + apt + systemd (~190 MB unpacked,
//! kept as a tarball), and once, the package's dependencies (~37 MB: QEMU, OVMF, nftables); each
//! run refreshes the apt index. Both are cached in `FKR_PACKAGE_TEST_CACHE` (default
//! /var/cache/fkr-qemu/package-test), so a re-run downloads only the index. Delete that directory
//! to start from a fresh root.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};

mod common {
    pub mod cmd;
    pub mod release;
}

use common::cmd::{run, stdout};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("FKR_PACKAGE_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/fkr-qemu/package-test"))
}

/// A command run inside `root`: in a mount and PID namespace of its own with a fresh /proc, so no
/// mount outlives the command (removing the root is then safe whatever happened) and no process a
/// maintainer script starts survives it.
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

/// The host's release (bookworm on Debian 12): the binary is linked against its libc.
fn host_suite() -> String {
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .expect("VERSION_CODENAME in /etc/os-release (a Debian host is needed)")
}

/// The cached tarball of a minimal root with apt and systemd (systemd-analyze, systemctl), made by
/// mmdebstrap when missing. The name says how it was made, so a change of recipe makes a new one.
fn base_tarball(cache: &Path, suite: &str) -> PathBuf {
    let tarball = cache.join(format!("{suite}-apt-systemd.tar"));
    if tarball.exists() {
        return tarball;
    }
    // Written under another name and renamed: an interrupted run leaves no half tarball behind
    // (mmdebstrap takes the format from the extension, so the name still ends in .tar).
    let partial = cache.join(format!("{suite}-apt-systemd.partial.tar"));
    run(Command::new("mmdebstrap")
        .args([
            "--mode=root",
            "--variant=apt",
            "--include=systemd",
            "--quiet",
        ])
        .arg(suite)
        .arg(&partial));
    std::fs::rename(&partial, &tarball).unwrap();
    tarball
}

/// The `.deb` files in `dir`.
fn debs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".deb"))
        .collect()
}

/// Makes `dst` hold exactly the `.deb` files of `src` (copies what is new, drops what is gone).
fn sync_debs(src: &Path, dst: &Path) {
    let (have, want) = (debs(dst), debs(src));
    for name in want.difference(&have) {
        let tmp = dst.join(format!("{name}.partial"));
        std::fs::copy(src.join(name), &tmp).unwrap();
        std::fs::rename(&tmp, dst.join(name)).unwrap();
    }
    for name in have.difference(&want) {
        std::fs::remove_file(dst.join(name)).unwrap();
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Runs packaging/build-deb.sh on `binary`; the path of the `.deb` it wrote into `out`.
fn build_deb(binary: &Path, out: &Path) -> PathBuf {
    let built = run(Command::new(repo().join("packaging/build-deb.sh"))
        .arg("--binary")
        .arg(binary)
        .arg("--out")
        .arg(out)
        .args(["--compression", "gzip"]));
    PathBuf::from(stdout(&built))
}

#[test]
fn deb_installs_into_a_clean_root_runs_and_purges_without_leftovers() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test builds a Debian root (mmdebstrap --mode=root) and chroots into it: run it as root"
    );
    let started = Instant::now();
    let step = |what: &str| eprintln!("[{:>5.1} s] {what}", started.elapsed().as_secs_f64());
    let version = env!("CARGO_PKG_VERSION");
    // Before the lock below: other worktrees' runs need not wait for this build.
    step("building the release binary");
    let binary = common::release::binary();

    // Runs of this test (other worktrees' CI on the same machine too) share the cache: one at a time.
    let cache = cache_dir();
    let archives = cache.join("archives");
    std::fs::create_dir_all(&archives).unwrap();
    let _lock = Flock::lock(
        File::create(cache.join("lock")).unwrap(),
        FlockArg::LockExclusive,
    )
    .map_err(|(_, e)| e)
    .unwrap();

    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    step("building the package");
    let deb = build_deb(&binary, work.path());
    let field = |name: &str| stdout(&run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name)));
    assert_eq!(field("Package"), "fkr-qemu");
    assert_eq!(field("Version"), version.replacen('-', "~", 1));
    let depends = field("Depends");
    for dep in ["libc6", "qemu-system-x86", "qemu-utils", "ovmf", "nftables"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }

    step("preparing a clean root");
    let tarball = base_tarball(&cache, &host_suite());
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    run(Command::new("tar")
        .args(["--extract", "--numeric-owner", "--file"])
        .arg(&tarball)
        .arg("--directory")
        .arg(&root));
    // apt inside needs the host's resolvers. Remove first: copying onto a symlink in the root would
    // follow it to its target on the host.
    let resolv = root.join("etc/resolv.conf");
    if resolv.symlink_metadata().is_ok() {
        std::fs::remove_file(&resolv).unwrap();
    }
    std::fs::copy("/etc/resolv.conf", &resolv).unwrap();
    std::fs::copy(&deb, root.join("tmp/fkr-qemu.deb")).unwrap();
    let root_archives = root.join("var/cache/apt/archives");
    sync_debs(&archives, &root_archives);

    step("installing the package and its dependencies with apt");
    run(&mut in_root(&root, &["apt-get", "update", "-q"]));
    run(&mut in_root(
        &root,
        &[
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            // A throw-away root: no fsync per unpacked file (hundreds of dependencies' files took
            // this test past its 15 minutes on a disk with slow flushes).
            "-o",
            "Dpkg::Options::=--force-unsafe-io",
            "/tmp/fkr-qemu.deb",
        ],
    ));
    // Keep what was downloaded for the next run, minus versions the mirror no longer has.
    run(&mut in_root(&root, &["apt-get", "autoclean", "-q"]));
    sync_debs(&root_archives, &archives);

    step("checking the installed package");
    let out = run(&mut in_root(&root, &["fkr-qemu", "--version"]));
    assert_eq!(stdout(&out), format!("fkr-qemu {version}"));

    let unit = "/lib/systemd/system/fkr-qemu.service";
    let out = run(&mut in_root(&root, &["systemd-analyze", "verify", unit]));
    // Unknown keys and unparsable values are only warnings (exit 0): accept none about the unit.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("fkr-qemu.service"),
        "systemd-analyze verify warns about the unit:\n{stderr}"
    );

    // The config directory will hold the admin token: root's alone.
    assert_eq!(mode(&root.join("etc/fkr-qemu")), 0o700);
    assert_eq!(mode(&root.join("etc/fkr-qemu/config.toml")), 0o640);
    let conffiles = run(&mut in_root(
        &root,
        &["dpkg-query", "-W", "-f=${Conffiles}", "fkr-qemu"],
    ));
    assert!(
        stdout(&conffiles).contains("/etc/fkr-qemu/config.toml "),
        "config.toml is no conffile: {}",
        stdout(&conffiles)
    );
    // The example config loads: exit 2 is a configuration error; anything else here is the empty
    // root's fault (no base image, no Forgejo), which --check-config reports with another code.
    let out = in_root(&root, &["fkr-qemu", "serve", "--check-config"])
        .env("FORGEJO_ADMIN_TOKEN", "not-a-real-token")
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(2),
        "the example config does not load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The image builder runs from where the package put it.
    run(&mut in_root(
        &root,
        &[
            "/usr/share/fkr-qemu/image-builder/build-runner-base.sh",
            "--help",
        ],
    ));

    // Manual pages where man looks (one per subcommand too), completions where each shell does.
    for page in ["fkr-qemu", "fkr-qemu-serve", "fkr-qemu-handover"] {
        let path = root.join(format!("usr/share/man/man1/{page}.1.gz"));
        assert!(path.is_file(), "no manual page {}", path.display());
    }
    for script in [
        "usr/share/zsh/vendor-completions/_fkr-qemu",
        "usr/share/fish/vendor_completions.d/fkr-qemu.fish",
    ] {
        assert!(root.join(script).is_file(), "no /{script}");
    }
    // bash completes the subcommands from the installed script (as bash-completion would load it
    // for `fkr-qemu <TAB>`), and not the packaging-only `generate`.
    let out = run(&mut in_root(
        &root,
        &[
            "bash",
            "-c",
            ". /usr/share/bash-completion/completions/fkr-qemu
             f=$(complete -p fkr-qemu | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')
             COMP_WORDS=(fkr-qemu ''); COMP_CWORD=1; COMP_LINE='fkr-qemu '; COMP_POINT=9
             \"$f\" fkr-qemu '' fkr-qemu
             printf '%s\\n' \"${COMPREPLY[@]}\"",
        ],
    ));
    let words = stdout(&out);
    for sub in ["serve", "boot-test", "status", "handover"] {
        assert!(
            words.lines().any(|w| w == sub),
            "bash does not complete {sub}:\n{words}"
        );
    }
    assert!(
        !words.lines().any(|w| w == "generate"),
        "bash completes the hidden generate:\n{words}"
    );

    step("upgrading, removing and purging the package after an admin's set-up");
    // What README.md's "Adding a host" has the admin do, so that the purge has it to clean up.
    std::fs::write(root.join("etc/fkr-qemu/admin-token"), "not-a-real-token\n").unwrap();
    run(&mut in_root(
        &root,
        &["systemctl", "enable", "fkr-qemu.service"],
    ));
    let wants = root.join("etc/systemd/system/multi-user.target.wants/fkr-qemu.service");
    assert!(
        wants.symlink_metadata().is_ok(),
        "systemctl enable made no link"
    );
    // deb-systemd-helper's record of the unit's links (postinst), which the purge must remove.
    let dsh_state =
        root.join("var/lib/systemd/deb-systemd-helper-enabled/fkr-qemu.service.dsh-also");
    assert!(
        dsh_state.is_file(),
        "postinst recorded no deb-systemd-helper state"
    );

    // An upgrade (dpkg runs prerm upgrade, postinst configure <old version>) keeps it enabled.
    run(&mut in_root(
        &root,
        &["dpkg", "--force-unsafe-io", "-i", "/tmp/fkr-qemu.deb"],
    ));
    assert!(
        wants.symlink_metadata().is_ok(),
        "the upgrade disabled the unit"
    );

    let files = stdout(&run(&mut in_root(&root, &["dpkg", "-L", "fkr-qemu"])));
    assert!(files.lines().any(|l| l == "/usr/bin/fkr-qemu"), "{files}");
    // Removing disables the unit (no dangling link) and keeps the configuration.
    let out = run(&mut in_root(&root, &["dpkg", "--remove", "fkr-qemu"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("warning"),
        "dpkg --remove warned:\n{stderr}"
    );
    assert!(
        wants.symlink_metadata().is_err(),
        "dpkg --remove left the unit enabled"
    );
    assert!(root.join("etc/fkr-qemu/config.toml").is_file());
    assert!(root.join("etc/fkr-qemu/admin-token").is_file());

    let out = run(&mut in_root(&root, &["dpkg", "--purge", "fkr-qemu"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("warning"),
        "dpkg --purge warned:\n{stderr}"
    );

    // Left may be only directories other packages own too (/usr/bin, /lib/systemd/system, …).
    let left: Vec<&str> = files
        .lines()
        .filter(|p| *p != "/." && root.join(&p[1..]).symlink_metadata().is_ok())
        .collect();
    for path in &left {
        assert!(
            root.join(&path[1..]).is_dir(),
            "{path} is left after the purge"
        );
    }
    if !left.is_empty() {
        let mut query = in_root(&root, &["dpkg-query", "--search"]);
        run(query.args(&left));
    }
    for gone in ["etc/fkr-qemu", "lib/systemd/system/fkr-qemu.service"] {
        assert!(
            root.join(gone).symlink_metadata().is_err(),
            "/{gone} is left after the purge"
        );
    }
    assert!(
        wants.symlink_metadata().is_err(),
        "the purge left the link systemctl enable made"
    );
    assert!(
        dsh_state.symlink_metadata().is_err(),
        "the purge left deb-systemd-helper's state"
    );
    let status = in_root(
        &root,
        &["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "fkr-qemu"],
    )
    .output()
    .unwrap();
    assert!(
        !stdout(&status).starts_with("ii") && !stdout(&status).starts_with("rc"),
        "dpkg still knows fkr-qemu: {}",
        stdout(&status)
    );
    step("done");
    // `work` (the root among it) is removed on drop; no mount points into it (see `in_root`).
}

#[test]
fn packaging_scripts_pass_shellcheck() {
    let dir = repo().join("packaging");
    let scripts: Vec<PathBuf> = ["build-deb.sh", "postinst", "prerm", "postrm"]
        .iter()
        .map(|s| dir.join(s))
        .collect();
    run(Command::new("shellcheck").args(&scripts));
}

/// The overrides in `packaging/lintian-overrides` (`fkr-qemu: tag [context]` lines), each checked to
/// follow a comment that gives its reason.
fn lintian_overrides() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("packaging/lintian-overrides")).unwrap();
    let mut overrides = Vec::new();
    let mut explained = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            explained = true;
        } else if line.is_empty() {
            explained = false;
        } else {
            assert!(
                explained,
                "lintian override without a comment saying why: {line}"
            );
            overrides.push(line.to_owned());
        }
    }
    overrides
}

#[test]
fn deb_passes_lintian_with_no_error_and_no_warning_but_the_explained_overrides() {
    let overrides = lintian_overrides();
    assert!(!overrides.is_empty());
    let binary = common::release::binary();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let deb = build_deb(&binary, work.path());
    // Exit status 2 on any error or warning that no override hides, a mismatched override included.
    let out = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning",
            "--display-info",
            "--tag-display-limit",
            "0",
        ])
        .arg(&deb)
        .output()
        .expect("lintian (apt-get install lintian)");
    let report = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // E: error, W: warning; an override that hides nothing any more is reported as information
    // (unused-override): it would hide the next real finding of its tag, unexplained.
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| {
            l.starts_with("E: ")
                || l.starts_with("W: ")
                || l.contains("unused-override")
                || l.contains("mismatched-override")
        })
        .collect();
    assert!(
        findings.is_empty() && out.status.success(),
        "lintian ({}) finds:\n{}\n\nfull report:\n{report}{stderr}",
        out.status,
        findings.join("\n")
    );
}
