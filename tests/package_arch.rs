//! The Arch Linux package (packaging/arch/PKGBUILD), built from this tree with Debian's `makepkg`
//! (pacman's build tool, packaged by Debian): the package holds exactly the binary, the unit under
//! /usr/lib/systemd/system, the config (root's alone, in `backup=`), the image builder, the manual
//! pages, the completions, the docs and the licence, all root's; its `.PKGINFO` has the
//! dependencies and the backup entry; the packaged binary runs.
//!
//! No network: `makepkg --nodeps` (the dependencies are Arch packages, pacman would fetch them) and
//! cargo offline (`CARGO_NET_OFFLINE`) against the registry cache the test build filled. build()
//! runs the same `cargo build --release` as `common::release`, in the same target directory, and
//! finds it fresh: CI compiles the release binary once for both package tests, which this checks.
//!
//! makepkg refuses to run as root. As root (CI), the test runs it in a user namespace that maps
//! root to uid 1000: makepkg's check passes, and what it reads and writes (the tree, target/,
//! cargo's home) is still root's. That is no privilege drop, only what makepkg's check needs.

mod common {
    pub mod cmd;
    pub mod release;
}

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cmd::{run, stdout};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `makepkg`, as a user it accepts (see the module comment).
fn makepkg() -> Command {
    if nix::unistd::Uid::effective().is_root() {
        let mut cmd = Command::new("unshare");
        cmd.args(["--user", "--map-user=1000", "--map-group=1000", "makepkg"]);
        cmd
    } else {
        Command::new("makepkg")
    }
}

/// `.PKGINFO`'s `key = value` lines; a key may repeat (depend, backup, …).
fn pkginfo(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut info: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((key, value)) = line.split_once(" = ") {
            info.entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
    info
}

fn gunzip(path: &Path) -> String {
    let mut text = String::new();
    let out = run(Command::new("gzip").arg("-dc").arg(path));
    out.stdout.as_slice().read_to_string(&mut text).unwrap();
    text
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn arch_package_builds_with_makepkg_and_holds_unit_config_docs_and_metadata() {
    let version = env!("CARGO_PKG_VERSION");
    let binary = common::release::binary();
    let built = std::fs::metadata(&binary).unwrap().modified().unwrap();

    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pkgdest = work.path().join("pkg");
    std::fs::create_dir(&pkgdest).unwrap();
    // BUILDDIR and PKGDEST keep makepkg's src/, pkg/ and the package out of the tree.
    let mut cmd = makepkg();
    cmd.args(["--nodeps", "--noconfirm", "--nocolor"])
        .current_dir(repo().join("packaging/arch"))
        .env("BUILDDIR", work.path().join("build"))
        .env("PKGDEST", &pkgdest)
        .env("SRCDEST", work.path().join("sources"))
        .env("CARGO_NET_OFFLINE", "true");
    run(common::release::build_env(&mut cmd));
    assert_eq!(
        std::fs::metadata(&binary).unwrap().modified().unwrap(),
        built,
        "makepkg's cargo build compiled the release binary again: its environment or command \
         differs from common::release's, and CI pays for a second release build"
    );
    assert!(
        !repo().join("packaging/arch/src").exists() && !repo().join("packaging/arch/pkg").exists(),
        "makepkg wrote into the tree"
    );

    let packages: Vec<PathBuf> = std::fs::read_dir(&pkgdest)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(packages.len(), 1, "{packages:?}");
    let package = &packages[0];
    let name = package.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("fkr-qemu-{version}-1-x86_64.pkg.tar")),
        "{name}"
    );

    // Every entry root's (makepkg packs under fakeroot).
    let listing = stdout(&run(Command::new("bsdtar")
        .args(["-tv", "--numeric-owner", "-f"])
        .arg(package)));
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            (fields[2], fields[3]),
            ("0", "0"),
            "not root's in the package: {line}"
        );
    }

    let tree = work.path().join("extracted");
    std::fs::create_dir(&tree).unwrap();
    run(Command::new("bsdtar")
        .args(["-x", "-p", "-f"])
        .arg(package)
        .arg("-C")
        .arg(&tree));

    // The files, exactly: nothing missing, nothing extra (no /lib, no admin token, no lintian
    // overrides, nothing from the Debian package).
    let man = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    run(Command::new(&binary)
        .args(["generate", "man"])
        .arg(man.path()));
    let mut want: BTreeSet<String> = [
        ".PKGINFO",
        ".BUILDINFO",
        ".MTREE",
        ".INSTALL",
        "usr/bin/fkr-qemu",
        "usr/lib/systemd/system/fkr-qemu.service",
        "etc/fkr-qemu/config.toml",
        "usr/share/fkr-qemu/image-builder/build-runner-base.sh",
        "usr/share/fkr-qemu/image-builder/README.md",
        "usr/share/bash-completion/completions/fkr-qemu",
        "usr/share/zsh/site-functions/_fkr-qemu",
        "usr/share/fish/vendor_completions.d/fkr-qemu.fish",
        "usr/share/doc/fkr-qemu/README.md.gz",
        "usr/share/doc/fkr-qemu/ARCHITECTURE.md.gz",
        "usr/share/licenses/fkr-qemu/LICENSE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for entry in std::fs::read_dir(repo().join("image-builder/runner-base")).unwrap() {
        let name = entry.unwrap().file_name();
        want.insert(format!(
            "usr/share/fkr-qemu/image-builder/runner-base/{}",
            name.to_string_lossy()
        ));
    }
    for entry in std::fs::read_dir(man.path()).unwrap() {
        let name = entry.unwrap().file_name();
        want.insert(format!("usr/share/man/man1/{}.gz", name.to_string_lossy()));
    }
    assert!(want.contains("usr/share/man/man1/fkr-qemu-serve.1.gz"));
    let have: BTreeSet<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            // bsdtar -tv: mode, links, uid, gid, size, month, day, time/year, path
            l.split_whitespace().skip(8).collect::<Vec<_>>().join(" ")
        })
        .collect();
    let missing: Vec<_> = want.difference(&have).collect();
    let extra: Vec<_> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing from the package: {missing:?}\nin the package but not wanted: {extra:?}"
    );

    // Modes: the config is root's alone (the admin token goes next to it).
    for (path, want_mode) in [
        ("usr/bin/fkr-qemu", 0o755),
        ("usr/lib/systemd/system/fkr-qemu.service", 0o644),
        ("etc/fkr-qemu", 0o700),
        ("etc/fkr-qemu/config.toml", 0o640),
        (
            "usr/share/fkr-qemu/image-builder/build-runner-base.sh",
            0o755,
        ),
        (
            "usr/share/fkr-qemu/image-builder/runner-base/customize.sh",
            0o755,
        ),
        (
            "usr/share/fkr-qemu/image-builder/runner-base/cloud-init.cfg",
            0o644,
        ),
        ("usr/share/man/man1/fkr-qemu.1.gz", 0o644),
        ("usr/share/licenses/fkr-qemu/LICENSE", 0o644),
    ] {
        assert_eq!(
            mode(&tree.join(path)),
            want_mode,
            "{path}: mode {:o}",
            mode(&tree.join(path))
        );
    }
    // The installed files are the tree's.
    for (installed, source) in [
        (
            "usr/lib/systemd/system/fkr-qemu.service",
            "contrib/systemd/fkr-qemu.service",
        ),
        ("etc/fkr-qemu/config.toml", "packaging/config.toml"),
        ("usr/share/licenses/fkr-qemu/LICENSE", "LICENSE"),
        (".INSTALL", "packaging/arch/fkr-qemu.install"),
    ] {
        assert_eq!(
            std::fs::read(tree.join(installed)).unwrap(),
            std::fs::read(repo().join(source)).unwrap(),
            "{installed} is not {source}"
        );
    }
    // The unit's Documentation= link resolves in the package.
    let unit = std::fs::read_to_string(repo().join("contrib/systemd/fkr-qemu.service")).unwrap();
    for doc in unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
        .filter_map(|d| d.strip_prefix("file:/"))
    {
        assert!(
            tree.join(doc).is_file(),
            "the unit's Documentation=file:/{doc} is not in the package"
        );
    }
    assert_eq!(
        gunzip(&tree.join("usr/share/doc/fkr-qemu/README.md.gz")),
        std::fs::read_to_string(repo().join("README.md")).unwrap()
    );

    // The manual pages and completions describe the CLI, without the packaging-only `generate`.
    let top = gunzip(&tree.join("usr/share/man/man1/fkr-qemu.1.gz"));
    assert!(top.contains("fkr\\-qemu\\-serve(1)"), "{top}");
    assert!(!top.contains("generate"), "{top}");
    let serve = gunzip(&tree.join("usr/share/man/man1/fkr-qemu-serve.1.gz"));
    assert!(serve.contains("\\-\\-check\\-config"), "{serve}");
    for script in [
        "usr/share/bash-completion/completions/fkr-qemu",
        "usr/share/zsh/site-functions/_fkr-qemu",
        "usr/share/fish/vendor_completions.d/fkr-qemu.fish",
    ] {
        let text = std::fs::read_to_string(tree.join(script)).unwrap();
        assert!(text.contains("handover"), "{script}:\n{text}");
        assert!(!text.contains("generate"), "{script} offers generate");
    }

    // The packaged binary is the version packaged, and stripped (makepkg's `strip` option).
    let packaged = tree.join("usr/bin/fkr-qemu");
    assert_eq!(
        stdout(&run(Command::new(&packaged).arg("--version"))),
        format!("fkr-qemu {version}")
    );
    assert!(
        std::fs::metadata(&packaged).unwrap().size() < std::fs::metadata(&binary).unwrap().size(),
        "the packaged binary is not stripped"
    );

    let info = pkginfo(&std::fs::read_to_string(tree.join(".PKGINFO")).unwrap());
    let one = |key: &str| -> &str {
        match info.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!(".PKGINFO {key}: {other:?}"),
        }
    };
    assert_eq!(one("pkgname"), "fkr-qemu");
    assert_eq!(one("pkgver"), format!("{version}-1"));
    assert_eq!(one("arch"), "x86_64");
    assert_eq!(one("license"), "MIT");
    // Only the config: pacman must replace every other file on upgrade.
    assert_eq!(
        info.get("backup"),
        Some(&vec!["etc/fkr-qemu/config.toml".to_owned()])
    );
    let depends: BTreeSet<&str> = info["depend"].iter().map(String::as_str).collect();
    let want_depends: BTreeSet<&str> = [
        "gcc-libs",
        "glibc",
        "qemu-system-x86",
        "qemu-img",
        "edk2-ovmf",
        "nftables",
    ]
    .into_iter()
    .collect();
    assert_eq!(depends, want_depends);
    assert_eq!(info["makedepend"], vec!["cargo".to_owned()]);
    assert!(
        info["optdepend"]
            .iter()
            .any(|d| d.starts_with("mmdebstrap: ")),
        "{:?}",
        info["optdepend"]
    );
}

#[test]
fn arch_packaging_scripts_pass_shellcheck() {
    let dir = repo().join("packaging/arch");
    run(Command::new("shellcheck")
        .arg(dir.join("PKGBUILD"))
        .arg(dir.join("fkr-qemu.install")));
}
