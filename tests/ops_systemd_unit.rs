//! The shipped systemd unit passes `systemd-analyze verify` without a single warning, and keeps the
//! properties the daemon relies on (see the comments in the unit).

use std::process::Command;

const UNIT: &str = include_str!("../contrib/systemd/fkr-qemu.service");
const INSTALLED_BINARY: &str = "/usr/bin/fkr-qemu";

/// Every value of `key=` lines, in order (later lines override earlier ones for most keys).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .collect()
}

fn value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    values(unit, key).last().copied()
}

fn systemd_analyze(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("running systemd-analyze (install the systemd package)")
}

/// A systemd time span in microseconds, as systemd itself parses it.
fn timespan_usec(span: &str) -> u64 {
    let out = systemd_analyze(&["timespan".as_ref(), span.as_ref()]);
    assert!(
        out.status.success(),
        "systemd-analyze timespan {span}: {out:?}"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("μs:"))
        .unwrap_or_else(|| panic!("no μs line in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    // verify checks that ExecStart's binary exists: point a copy of the unit at the one cargo built.
    let binary = env!("CARGO_BIN_EXE_fkr-qemu");
    assert!(UNIT.contains(&format!("ExecStart={INSTALLED_BINARY} ")));
    let dir = tempfile::tempdir().unwrap();
    let unit_path = dir.path().join("fkr-qemu.service");
    std::fs::write(&unit_path, UNIT.replace(INSTALLED_BINARY, binary)).unwrap();

    let out = systemd_analyze(&["verify".as_ref(), unit_path.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}");
    // Unknown keys and unparsable values are only warnings (exit 0): accept none about our unit.
    let about_us: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("fkr-qemu.service"))
        .collect();
    assert!(about_us.is_empty(), "warnings about the unit:\n{stderr}");
}

#[test]
fn unit_keeps_vms_safe_and_uses_credentials() {
    assert_eq!(value(UNIT, "Type"), Some("notify"));
    // SIGTERM only to `serve`, which drains; QEMU children are not signalled by systemd.
    assert_eq!(value(UNIT, "KillMode"), Some("mixed"));
    // Long enough for the default job deadline (3 h) plus teardown.
    let stop = timespan_usec(value(UNIT, "TimeoutStopSec").unwrap());
    assert!(
        stop > 3 * 3600 * 1_000_000,
        "TimeoutStopSec too short: {stop} µs"
    );
    // The admin token comes as a credential named as `serve` expects, never via Environment=.
    assert_eq!(
        value(UNIT, "LoadCredential")
            .and_then(|v| v.split_once(':'))
            .map(|(name, _)| name),
        Some("forgejo-admin-token")
    );
    assert!(values(UNIT, "Environment")
        .iter()
        .all(|e| !e.contains("TOKEN")));
    assert_eq!(value(UNIT, "StateDirectory"), Some("fkr-qemu"));
    assert_eq!(value(UNIT, "RuntimeDirectory"), Some("fkr-qemu"));
    // Hardening that would break the VMs is absent; the devices QEMU needs are allowed.
    for absent in [
        "PrivateDevices",
        "MemoryDenyWriteExecute",
        "ProtectKernelTunables",
        "PrivateNetwork",
    ] {
        assert_eq!(
            value(UNIT, absent),
            None,
            "{absent}= breaks VMs or networking"
        );
    }
    let devices = values(UNIT, "DeviceAllow");
    for dev in ["/dev/kvm", "/dev/net/tun"] {
        assert!(
            devices.iter().any(|d| d.starts_with(dev)),
            "{dev} not allowed"
        );
    }
    let families = value(UNIT, "RestrictAddressFamilies").unwrap();
    assert!(families.contains("AF_NETLINK") && families.contains("AF_UNIX"));
    let caps = value(UNIT, "CapabilityBoundingSet").unwrap();
    for cap in ["CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"] {
        assert!(caps.contains(cap), "{cap} missing: {caps}");
    }
    assert!(!caps.contains("CAP_SYS_ADMIN"), "{caps}");
    // QEMUs run in scopes of their own, not in the service's cgroup: nothing is delegated, and a
    // restart neither kills them nor removes the records the next daemon takes them over by.
    assert_eq!(value(UNIT, "Delegate"), None);
    assert_eq!(value(UNIT, "RuntimeDirectoryPreserve"), Some("yes"));
    // The daemon writes memory.oom.group and cgroup.kill in the VMs' scopes.
    assert_eq!(value(UNIT, "ProtectControlGroups"), None);
}
