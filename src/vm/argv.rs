//! The `qemu-system-x86_64` command line. Pure: everything it needs is in [`QemuPlan`]. No secret can
//! reach argv: the seed's content lives in a file, only file paths and the tap's fd number appear here.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::{Accel, Firmware, VmName};

/// Everything one VM's command line is built from.
#[derive(Debug, Clone)]
pub struct QemuPlan {
    pub name: VmName,
    /// `Kvm` or `Tcg` (already resolved from `Auto`).
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub firmware: Firmware,
    /// This VM's writable copy of the VARS template.
    pub vars: PathBuf,
    pub overlay: PathBuf,
    pub seed: PathBuf,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    /// The tap fd (as numbered in the child) and the NIC's MAC.
    pub net: Option<(RawFd, String)>,
}

/// QEMU option values separate keys with `,`; a literal comma in a path is written `,,`.
pub(super) fn path_opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The arguments after the program name.
pub fn build_argv(plan: &QemuPlan) -> Vec<String> {
    let (accel, cpu) = match plan.accel {
        Accel::Kvm => ("kvm", "host"),
        // `Auto` never reaches here resolved; treat it like TCG, the one that always works.
        Accel::Tcg | Accel::Auto => ("tcg", "max"),
    };
    let fw = &plan.firmware;
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("{},debug-threads=on", plan.name),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        plan.vcpus.to_string(),
        "-m".into(),
        format!("{}M", plan.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        // No spawning helpers, no privilege changes, no obsolete syscalls, no scheduler games.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        // UEFI: the shared code file read-only, the per-VM VARS copy writable.
        "-drive".into(),
        format!(
            "if=pflash,unit=0,format={},readonly=on,file={}",
            fw.code_format,
            path_opt(&fw.code)
        ),
        "-drive".into(),
        format!(
            "if=pflash,unit=1,format={},file={}",
            fw.vars_format,
            path_opt(&plan.vars)
        ),
        // The overlay (its backing base is opened read-only by QEMU); throw-away, so no flushes.
        "-drive".into(),
        format!(
            "if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap,file={}",
            path_opt(&plan.overlay)
        ),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,bootindex=1".into(),
        "-drive".into(),
        format!(
            "if=none,id=seed0,format=raw,readonly=on,file={}",
            path_opt(&plan.seed)
        ),
        "-device".into(),
        "virtio-blk-pci,drive=seed0".into(),
        "-chardev".into(),
        format!("file,id=serial0,path={}", path_opt(&plan.serial_log)),
        "-serial".into(),
        "chardev:serial0".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            path_opt(&plan.qmp_socket)
        ),
        "-mon".into(),
        "chardev=qmp0,mode=control".into(),
    ];
    if let Some((fd, mac)) = &plan.net {
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,fd={fd}"));
        a.push("-device".into());
        // `romfile=`: no iPXE option ROM, we never netboot (saves ~0.3 s of firmware time).
        a.push(format!("virtio-net-pci,netdev=net0,mac={mac},romfile="));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(accel: Accel, net: Option<(RawFd, String)>) -> QemuPlan {
        let dir = Path::new("/run/fkr-qemu/vms/fr-0123abcd");
        QemuPlan {
            name: VmName::parse("fr-0123abcd").unwrap(),
            accel,
            vcpus: 2,
            memory_mib: 1024,
            firmware: Firmware {
                code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                code_format: "raw".into(),
                vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
                vars_format: "raw".into(),
                source: "test".into(),
            },
            vars: dir.join("vars.fd"),
            overlay: dir.join("overlay.qcow2"),
            seed: dir.join("seed.img"),
            serial_log: "/var/log/odd,dir/fr-0123abcd.serial.log".into(),
            qmp_socket: dir.join("qmp.sock"),
            net,
        }
    }

    fn has_pair(a: &[String], flag: &str, value: &str) -> bool {
        a.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn tcg_argv_has_everything_the_driver_relies_on() {
        let a = build_argv(&plan(Accel::Tcg, None));
        assert!(has_pair(&a, "-machine", "q35"));
        assert!(has_pair(&a, "-accel", "tcg"));
        assert!(has_pair(&a, "-cpu", "max"));
        assert!(has_pair(&a, "-m", "1024M"));
        assert!(has_pair(&a, "-smp", "2"));
        for flag in ["-nodefaults", "-no-reboot", "-no-user-config"] {
            assert!(a.iter().any(|x| x == flag), "{flag}");
        }
        assert!(has_pair(&a, "-display", "none"));
        assert!(has_pair(
            &a,
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(has_pair(
            &a,
            "-drive",
            "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        ));
        assert!(has_pair(
            &a,
            "-drive",
            "if=pflash,unit=1,format=raw,file=/run/fkr-qemu/vms/fr-0123abcd/vars.fd"
        ));
        assert!(a
            .iter()
            .any(|x| x.contains("id=seed0,format=raw,readonly=on")));
        assert!(a
            .iter()
            .any(|x| x.starts_with("if=none,id=disk0,format=qcow2")));
        assert!(has_pair(
            &a,
            "-chardev",
            "file,id=serial0,path=/var/log/odd,,dir/fr-0123abcd.serial.log"
        ));
        assert!(has_pair(&a, "-mon", "chardev=qmp0,mode=control"));
        assert!(!a.iter().any(|x| x.contains("netdev")));
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_net_passes_the_fd_without_rom() {
        let a = build_argv(&plan(Accel::Kvm, Some((7, "52:54:00:12:34:56".into()))));
        assert!(has_pair(&a, "-accel", "kvm"));
        assert!(has_pair(&a, "-cpu", "host"));
        assert!(has_pair(&a, "-netdev", "tap,id=net0,fd=7"));
        assert!(has_pair(
            &a,
            "-device",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile="
        ));
    }

    #[test]
    fn argv_never_carries_seed_content() {
        // The plan has no field a secret could travel in; check the rendered argv regardless.
        let a = build_argv(&plan(Accel::Tcg, None)).join(" ");
        for needle in ["user-data", "token", "#cloud-config", "password"] {
            assert!(!a.contains(needle), "{needle} in argv");
        }
    }
}
