//! The `qemu-system-x86_64` command line. Pure: everything it needs is in [`QemuPlan`]. No secret can
//! reach argv: the seed's content lives in a file, only file paths and the tap's fd number appear here.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::Firmware;
use crate::types::{Accel, MacAddr, VmName};

/// The descriptors QEMU gets instead of paths (numbers as in the child; see `sandbox.rs`). Files QEMU
/// writes come twice, read-write and read-only: QEMU picks from an fdset by access mode, and probes
/// some images read-only first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFds {
    pub code: RawFd,
    pub vars_rw: RawFd,
    pub vars_ro: RawFd,
    pub base: RawFd,
    pub overlay_rw: RawFd,
    pub overlay_ro: RawFd,
    pub seed: RawFd,
}

/// Everything one VM's command line is built from.
#[derive(Debug, Clone)]
pub struct QemuPlan {
    pub name: VmName,
    /// `Kvm` or `Tcg` (already resolved from `Auto`).
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// TCG's translation cache (MiB): bounded, so QEMU's memory is guest RAM plus a known overhead.
    pub tcg_tb_size_mib: u32,
    pub firmware: Firmware,
    /// The per-VM runtime directory: it labels every descriptor (`opaque=<dir>/<role>`), so the
    /// command line names the VM's directory and the sweep can tell this QEMU from any other.
    pub vm_dir: PathBuf,
    pub fds: DiskFds,
    /// A listening Unix socket the daemon bound for QMP.
    pub qmp_fd: RawFd,
    /// A listening Unix socket the daemon bound for the serial console (it connects before QEMU
    /// starts, so QEMU's `wait=on` finds the connection waiting and no byte is lost).
    pub serial_fd: RawFd,
    /// The tap fd and the NIC's MAC.
    pub net: Option<(RawFd, MacAddr)>,
    /// Warm pool: a listening Unix socket the daemon bound for the job agent's port.
    pub agent_fd: Option<RawFd>,
}

/// QEMU option values separate keys with `,`; a literal comma in a path is written `,,`.
pub(super) fn path_opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// q35 with the firmware as block nodes ([`firmware_blockdevs`]), not `-drive if=pflash`: only a
/// node takes `cache.no-flush`. No VMware backdoor port (`vmport`, on by default): device code a
/// guest can reach that no guest of ours uses.
pub(super) const MACHINE: &str = "q35,pflash0=fw-code,pflash1=fw-vars,vmport=off";

/// UEFI from fdsets 1 (code, read-only) and 2 (the per-VM VARS copy, writable). The copy is thrown
/// away with the VM, so it is never flushed: QEMU flushes every writable node when it exits, and an
/// fdatasync queued behind a busy host disk held `quit` past its grace.
pub(super) fn firmware_blockdevs(fw: &Firmware) -> Vec<String> {
    vec![
        "-blockdev".into(),
        "driver=file,node-name=fw-code-file,filename=/dev/fdset/1,read-only=on".into(),
        "-blockdev".into(),
        format!(
            "driver={},node-name=fw-code,file=fw-code-file,read-only=on",
            fw.code_format
        ),
        "-blockdev".into(),
        "driver=file,node-name=fw-vars-file,filename=/dev/fdset/2,cache.no-flush=on".into(),
        "-blockdev".into(),
        format!(
            "driver={},node-name=fw-vars,file=fw-vars-file,cache.no-flush=on",
            fw.vars_format
        ),
    ]
}

/// The arguments after the program name. QEMU opens no file by path: every disk, the firmware and
/// the VARS copy come as descriptors in fdsets; the serial console and QMP are sockets the daemon
/// bound. Both are sockets (not pipes) so that a restarted daemon can connect to them again and
/// take a running VM over.
pub fn build_argv(plan: &QemuPlan) -> Vec<String> {
    let (accel, cpu) = match plan.accel {
        Accel::Kvm => ("kvm".to_owned(), "host"),
        // `Auto` never reaches here resolved; treat it like TCG, the one that always works.
        Accel::Tcg | Accel::Auto => (format!("tcg,tb-size={}", plan.tcg_tb_size_mib), "max"),
    };
    let fw = &plan.firmware;
    let f = &plan.fds;
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("{},debug-threads=on", plan.name),
        "-machine".into(),
        MACHINE.into(),
        "-accel".into(),
        accel,
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
    ];
    let dir = path_opt(&plan.vm_dir);
    for (set, fd, role) in [
        (1, f.code, "firmware-code"),
        (2, f.vars_rw, "vars"),
        (2, f.vars_ro, "vars"),
        (3, f.base, "base-image"),
        (4, f.overlay_rw, "overlay"),
        (4, f.overlay_ro, "overlay"),
        (5, f.seed, "seed"),
    ] {
        a.push("-add-fd".into());
        a.push(format!("fd={fd},set={set},opaque={dir}/{role}"));
    }
    a.extend(firmware_blockdevs(fw));
    a.extend([
        // The base image read-only, given to the overlay as its backing node (the overlay's
        // header names the base by path, which QEMU could not open).
        "-blockdev".into(),
        "driver=file,node-name=base-file,filename=/dev/fdset/3,read-only=on".into(),
        "-blockdev".into(),
        "driver=qcow2,node-name=base,file=base-file,read-only=on".into(),
        // The overlay: throw-away, so no flushes. `disk0-file` is what grows on the host; its write
        // threshold enforces disk_max.
        "-blockdev".into(),
        "driver=file,node-name=disk0-file,filename=/dev/fdset/4,cache.no-flush=on".into(),
        "-blockdev".into(),
        "driver=qcow2,node-name=disk0,file=disk0-file,backing=base,discard=unmap,cache.no-flush=on"
            .into(),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,bootindex=1".into(),
        "-blockdev".into(),
        "driver=file,node-name=seed0-file,filename=/dev/fdset/5,read-only=on".into(),
        "-blockdev".into(),
        "driver=raw,node-name=seed0,file=seed0-file,read-only=on".into(),
        "-device".into(),
        "virtio-blk-pci,drive=seed0".into(),
        // The serial console on a socket: the daemon writes the log, capped. When no daemon is
        // connected (between a crash and the next start) QEMU drops the bytes instead of blocking.
        "-chardev".into(),
        format!("socket,id=serial0,fd={},server=on,wait=on", plan.serial_fd),
        "-serial".into(),
        "chardev:serial0".into(),
        "-chardev".into(),
        format!("socket,id=qmp0,fd={},server=on,wait=off", plan.qmp_fd),
        "-mon".into(),
        "chardev=qmp0,mode=control".into(),
    ]);
    if let Some((fd, mac)) = &plan.net {
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,fd={fd}"));
        a.push("-device".into());
        // `romfile=`: no iPXE option ROM, we never netboot (saves ~0.3 s of firmware time).
        a.push(format!("virtio-net-pci,netdev=net0,mac={mac},romfile="));
    }
    if let Some(fd) = plan.agent_fd {
        // The warm pool's job agent: one virtio-serial port the guest sees as
        // /dev/virtio-ports/<AGENT_PORT> (root-only), its host end the daemon's socket.
        a.extend([
            "-device".into(),
            "virtio-serial-pci,id=agentbus0".into(),
            "-chardev".into(),
            format!("socket,id=agent0,fd={fd},server=on,wait=off"),
            "-device".into(),
            format!(
                "virtserialport,bus=agentbus0.0,chardev=agent0,name={}",
                super::agent::PORT_NAME
            ),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(accel: Accel, net: Option<(RawFd, MacAddr)>) -> QemuPlan {
        QemuPlan {
            name: VmName::parse("fr-0123abcd").unwrap(),
            accel,
            vcpus: 2,
            memory_mib: 1024,
            tcg_tb_size_mib: 64,
            firmware: Firmware {
                code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                code_format: "raw".into(),
                vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
                vars_format: "raw".into(),
                source: "test".into(),
            },
            vm_dir: "/run/odd,dir/vms/fr-0123abcd".into(),
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
            net,
            agent_fd: None,
        }
    }

    fn has_pair(a: &[String], flag: &str, value: &str) -> bool {
        a.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn tcg_argv_has_everything_the_driver_relies_on() {
        let a = build_argv(&plan(Accel::Tcg, None));
        assert!(has_pair(
            &a,
            "-machine",
            "q35,pflash0=fw-code,pflash1=fw-vars,vmport=off"
        ));
        assert!(has_pair(&a, "-accel", "tcg,tb-size=64"));
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
            "-add-fd",
            "fd=14,set=4,opaque=/run/odd,,dir/vms/fr-0123abcd/overlay"
        ));
        assert!(has_pair(
            &a,
            "-blockdev",
            "driver=raw,node-name=fw-code,file=fw-code-file,read-only=on"
        ));
        // The VARS copy is writable but never flushed (QEMU's exit must not wait for the disk).
        assert!(has_pair(
            &a,
            "-blockdev",
            "driver=file,node-name=fw-vars-file,filename=/dev/fdset/2,cache.no-flush=on"
        ));
        assert!(!a.iter().any(|x| x == "-drive"));
        assert!(has_pair(
            &a,
            "-blockdev",
            "driver=qcow2,node-name=disk0,file=disk0-file,backing=base,discard=unmap,cache.no-flush=on"
        ));
        assert!(has_pair(
            &a,
            "-chardev",
            "socket,id=serial0,fd=18,server=on,wait=on"
        ));
        assert!(has_pair(
            &a,
            "-chardev",
            "socket,id=qmp0,fd=17,server=on,wait=off"
        ));
        assert!(has_pair(&a, "-mon", "chardev=qmp0,mode=control"));
        assert!(!a.iter().any(|x| x.contains("netdev")));
        // No file by path: QEMU's uid could not open one.
        assert!(
            !a.iter()
                .any(|x| x.contains("file=/") && !x.contains("file=/dev/fdset/")),
            "{a:?}"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_net_passes_the_fd_without_rom() {
        let a = build_argv(&plan(
            Accel::Kvm,
            Some((7, "52:54:00:12:34:56".parse().unwrap())),
        ));
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
    fn the_agent_port_is_there_only_when_asked_for() {
        let a = build_argv(&plan(Accel::Tcg, None));
        assert!(!a.iter().any(|x| x.contains("virtserialport")));
        let mut p = plan(Accel::Tcg, None);
        p.agent_fd = Some(18);
        let a = build_argv(&p);
        assert!(has_pair(
            &a,
            "-chardev",
            "socket,id=agent0,fd=18,server=on,wait=off"
        ));
        assert!(has_pair(
            &a,
            "-device",
            "virtserialport,bus=agentbus0.0,chardev=agent0,name=org.fkr-qemu.agent.0"
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

    /// The shipped unit opens no device to QEMU that its command line does not use: an escaped
    /// QEMU could open `/dev/vhost-net` by path (and drive the host kernel's vhost worker) while
    /// our tap has no `vhost=on`.
    #[test]
    fn the_unit_allows_vhost_net_only_when_the_argv_uses_vhost() {
        let unit = include_str!("../../contrib/systemd/fkr-qemu.service");
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let uses_vhost = [Accel::Kvm, Accel::Tcg]
            .into_iter()
            .flat_map(|accel| build_argv(&plan(accel, Some((7, mac)))))
            .any(|a| a.contains("vhost=on"));
        let allowed = unit
            .lines()
            .filter_map(|l| l.trim().strip_prefix("DeviceAllow="))
            .any(|d| d.starts_with("/dev/vhost-net"));
        assert_eq!(
            allowed, uses_vhost,
            "DeviceAllow=/dev/vhost-net vs the argv"
        );
        assert!(!allowed);
    }
}
