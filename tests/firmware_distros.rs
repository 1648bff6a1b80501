//! Hosts that are not Debian: firmware discovery, QEMU's pflash arguments and `serve --check-config`
//! over the QEMU firmware descriptors that Arch's and Fedora's `edk2-ovmf` packages install (verbatim
//! copies in `firmware/fixtures/{arch,fedora}/`, sources in firmware/README.md). The files the
//! descriptors name are laid out, empty, under a temporary root: discovery only checks that they
//! exist, and this Debian host must not lend its own OVMF to the answer.

use std::path::{Path, PathBuf};
use std::process::Command;

use fkr_qemu::types::{Accel, VmName};
use fkr_qemu::vm::{self, DiskFds, Firmware, QemuPlan, VmConfig};
use serde_json::Value;

/// What a distribution's host must end up booting: x86_64, q35, no secure boot or SMM, split flash.
struct Expected {
    /// Directory under `firmware/fixtures/`.
    distro: &'static str,
    code: &'static str,
    vars: &'static str,
    format: &'static str,
    descriptor: &'static str,
}

const ARCH: Expected = Expected {
    distro: "arch",
    code: "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
    vars: "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
    format: "raw",
    descriptor: "60-edk2-ovmf-x86_64-4m.json",
};

const FEDORA: Expected = Expected {
    distro: "fedora",
    code: "/usr/share/edk2/ovmf/OVMF_CODE_4M.qcow2",
    vars: "/usr/share/edk2/ovmf/OVMF_VARS_4M.qcow2",
    format: "qcow2",
    descriptor: "50-edk2-ovmf-4m-qcow2-x64-nosb.json",
};

fn fixtures(distro: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("firmware/fixtures")
        .join(distro)
}

fn descriptor_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no descriptors in {}", dir.display());
    files
}

/// The `filename` fields of a descriptor's mapping (flash executable and template, or memory).
fn named_files(descriptor: &mut Value) -> Vec<&mut Value> {
    let mapping = &mut descriptor["mapping"];
    let mut out = Vec::new();
    if let Some(m) = mapping.as_object_mut() {
        for (key, v) in m.iter_mut() {
            match key.as_str() {
                "executable" | "nvram-template" => out.extend(v.get_mut("filename")),
                "filename" => out.push(v),
                _ => {}
            }
        }
    }
    out
}

fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Creates, empty under `root`, every file the distribution's descriptors name, as its package does.
fn install_files(distro: &str, root: &Path) {
    for file in descriptor_files(&fixtures(distro)) {
        let mut d: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        for name in named_files(&mut d) {
            let path = under(root, Path::new(name.as_str().unwrap()));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
        }
    }
}

fn assert_pair(fw: &Firmware, want: &Expected, root: &Path) {
    assert_eq!(fw.code, under(root, Path::new(want.code)), "{fw:?}");
    assert_eq!(
        fw.vars_template,
        under(root, Path::new(want.vars)),
        "{fw:?}"
    );
    assert_eq!(fw.code_format, want.format, "{fw:?}");
    assert_eq!(fw.vars_format, want.format, "{fw:?}");
    assert!(fw.source.ends_with(want.descriptor), "{fw:?}");
}

#[test]
fn discovery_over_each_distributions_descriptors_finds_its_plain_q35_pair() {
    for want in [&ARCH, &FEDORA] {
        let root = tempfile::tempdir().unwrap();
        install_files(want.distro, root.path());
        let cfg = VmConfig {
            firmware_descriptor_dirs: vec![fixtures(want.distro)],
            ..VmConfig::default()
        };
        let fw = vm::discover_firmware_with(&cfg, |p| under(root.path(), p).is_file()).unwrap();
        // The descriptors' own paths: the root only stands in for the distribution's file system.
        assert_pair(&fw, want, Path::new("/"));

        // Without the package's files nothing is found, not even through the known-path fallbacks
        // (which go through the same check), and the error names each distribution's package.
        let empty = tempfile::tempdir().unwrap();
        let err =
            vm::discover_firmware_with(&cfg, |p| under(empty.path(), p).is_file()).unwrap_err();
        assert!(matches!(err, vm::Error::FirmwareNotFound { .. }), "{err}");
        let msg = err.to_string();
        for install in [
            "apt-get install ovmf",
            "dnf install edk2-ovmf",
            "pacman -S edk2-ovmf",
        ] {
            assert!(msg.contains(install), "{msg}");
        }
    }
}

#[test]
fn qemu_gets_the_flash_format_the_chosen_descriptor_declares() {
    for want in [&ARCH, &FEDORA] {
        let root = tempfile::tempdir().unwrap();
        install_files(want.distro, root.path());
        let cfg = VmConfig {
            firmware_descriptor_dirs: vec![fixtures(want.distro)],
            ..VmConfig::default()
        };
        let firmware =
            vm::discover_firmware_with(&cfg, |p| under(root.path(), p).is_file()).unwrap();
        let argv = vm::build_argv(&QemuPlan {
            name: VmName::parse("fr-0000abcd").unwrap(),
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mib: 512,
            tcg_tb_size_mib: 64,
            firmware,
            vm_dir: "/run/fkr-qemu/vms/fr-0000abcd".into(),
            fds: DiskFds {
                code: 10,
                vars_rw: 11,
                vars_ro: 12,
                base: 13,
                overlay_rw: 14,
                overlay_ro: 15,
                seed: 16,
            },
            qmp_fd: 17,
            serial_fd: 18,
            net: None,
            agent_fd: None,
        });
        let fmt = want.format;
        for node in [
            format!("driver={fmt},node-name=fw-code,file=fw-code-file,read-only=on"),
            format!("driver={fmt},node-name=fw-vars,file=fw-vars-file,cache.no-flush=on"),
        ] {
            assert!(
                argv.windows(2).any(|w| w[0] == "-blockdev" && w[1] == node),
                "{} needs -blockdev {node}: {argv:?}",
                want.distro
            );
        }
    }
}

/// Copies of the distribution's descriptors whose file names point into `root`: the daemon checks
/// the real file system, where this Debian host has no Arch or Fedora OVMF.
fn rooted_descriptors(distro: &str, root: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in descriptor_files(&fixtures(distro)) {
        let mut d: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        for name in named_files(&mut d) {
            let rooted = under(root, Path::new(name.as_str().unwrap()));
            *name = Value::String(rooted.to_str().unwrap().to_owned());
        }
        std::fs::write(
            dir.join(file.file_name().unwrap()),
            serde_json::to_vec_pretty(&d).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn check_config_reports_each_distributions_pair_before_later_checks_fail() {
    for want in [&ARCH, &FEDORA] {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        install_files(want.distro, &root);
        let descriptors = tmp.path().join("qemu-firmware");
        rooted_descriptors(want.distro, &root, &descriptors);
        // No base image and nothing listening at the Forgejo URL: the firmware line must come
        // out anyway, and the run then fails on the image (missing dependency, exit 3).
        let image = tmp.path().join("no-such-image.qcow2");
        let config = tmp.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "base_image = {image:?}\nstate_dir = {state:?}\nruntime_dir = {run:?}\n\
                 [forgejo]\nurl = \"http://127.0.0.1:9/\"\n\
                 [vm]\nfirmware_descriptor_dirs = [{descriptors:?}]\n\
                 [net]\ndns_servers = [\"192.0.2.53\"]\n",
                image = image.to_str().unwrap(),
                state = tmp.path().join("state").to_str().unwrap(),
                run = tmp.path().join("run").to_str().unwrap(),
                descriptors = descriptors.to_str().unwrap(),
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fkr-qemu"))
            .args(["serve", "--check-config", "--config"])
            .arg(&config)
            .env(
                "FORGEJO_ADMIN_TOKEN",
                "0123456789abcdef0123456789abcdef01234567",
            )
            .env_remove("FORGEJO_URL")
            .env_remove("FORGEJO_ADMIN_TOKEN_FILE")
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let line = format!(
            "# firmware: {code} ({fmt}) + {vars} ({fmt}), from {src}",
            code = under(&root, Path::new(want.code)).display(),
            vars = under(&root, Path::new(want.vars)).display(),
            fmt = want.format,
            src = descriptors.join(want.descriptor).display(),
        );
        assert!(
            stdout.lines().any(|l| l == line),
            "{}: no line {line:?} in:\n{text}",
            want.distro
        );
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(text.contains("no-such-image.qcow2"), "{text}");
    }
}

#[test]
fn missing_tools_name_the_package_of_each_distribution() {
    let errors: Vec<(String, [&str; 3])> = vec![
        (
            vm::Error::QemuNotFound {
                path: "qemu-system-x86_64".into(),
            }
            .to_string(),
            [
                "apt-get install qemu-system-x86",
                "dnf install qemu-system-x86-core",
                "pacman -S qemu-base",
            ],
        ),
        (
            vm::Error::QemuImgNotFound {
                path: "qemu-img".into(),
            }
            .to_string(),
            [
                "apt-get install qemu-utils",
                "dnf install qemu-img",
                "pacman -S qemu-img",
            ],
        ),
        (
            vm::Error::FirmwareFileMissing {
                path: "/nonexistent/OVMF_CODE.fd".into(),
            }
            .to_string(),
            [
                "apt-get install ovmf",
                "dnf install edk2-ovmf",
                "pacman -S edk2-ovmf",
            ],
        ),
        (
            fkr_qemu::net::Error::NftMissing.to_string(),
            [
                "apt-get install nftables",
                "dnf install nftables",
                "pacman -S nftables",
            ],
        ),
    ];
    for (msg, installs) in errors {
        for install in installs {
            assert!(msg.contains(install), "{msg:?} lacks {install:?}");
        }
    }
}
