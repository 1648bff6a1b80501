//! Choosing KVM or TCG. `/dev/kvm` existing proves nothing, and neither does a tiny real-mode BIOS
//! that runs: on some hosts QEMU aborts setting an MSR, on others the real-mode code runs yet OVMF
//! dies at once with "KVM internal error" (QEMU then sits paused in run state `internal-error`). So
//! `auto` runs what real guests run: the configured UEFI firmware under `-accel kvm -cpu host`, and
//! takes KVM only if the firmware gets as far as printing on the serial console (which OVMF does from
//! its 64-bit DXE phase) while QEMU still reports `running`. Decided within [`KVM_PROBE_TIMEOUT`].
//!
//! A KVM that passes the probe but fails a real guest later (run state `internal-error`) is marked
//! broken with [`mark_kvm_broken`]; from then on `auto` picks TCG for that QEMU binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use std::os::fd::AsRawFd;

use super::argv::{firmware_blockdevs, path_opt, MACHINE};
use super::qmp::QmpClient;
use super::sandbox::{ChildSetup, Identity};
use super::{Error, Firmware};
use crate::types::Accel;

/// The resolved accelerator and why it was chosen (for the log and `boot-test`'s report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// `Kvm` or `Tcg`.
    pub accel: Accel,
    pub reason: String,
}

/// How long the KVM probe may take. OVMF under a working KVM reaches its first serial output in
/// about a second; a broken one stops within milliseconds.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// 128 MiB is too little for OVMF (it faults and hangs); 256 MiB boots it.
const PROBE_MEMORY: &str = "256M";
/// Run states in which a vCPU will never run guest code again without help.
pub const DEAD_RUN_STATES: [&str; 3] = ["internal-error", "guest-panicked", "shutdown"];

fn spawn_error(qemu: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::QemuNotFound { path: qemu.into() }
    } else {
        Error::io(format!("running {}", qemu.display()), e)
    }
}

/// QEMU's error lines from its stderr, joined for one log line: those that say what failed
/// ("KVM internal error. Suberror: 1", "emulation failure", "failed to set MSR …"), not the register
/// dump that follows them; if none says so, the last `n` lines.
pub(super) fn error_lines(stderr: &str, n: usize) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let telling: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error") || l.contains("fail") || l.contains("kvm")
        })
        .take(n)
        .collect();
    if telling.is_empty() {
        lines[lines.len().saturating_sub(n)..].join(" | ")
    } else {
        telling.join(" | ")
    }
}

fn with_stderr(msg: String, stderr: &Mutex<Vec<u8>>) -> String {
    let b = stderr.lock().unwrap_or_else(|e| e.into_inner());
    match error_lines(&String::from_utf8_lossy(&b), 2) {
        s if s.is_empty() => msg,
        s => format!("{msg}: {s}"),
    }
}

/// Boots `firmware` under `accel` with no disk and says whether it ran far enough: its first byte on
/// the serial console while QEMU's run state is still `running`. `Ok(Err(reason))` when it did not.
/// It runs as `identity` when given (the VMs' own): KVM must work for the uid VMs run as.
pub async fn probe_accel(
    qemu: &Path,
    firmware: &Firmware,
    accel: Accel,
    timeout: Duration,
    identity: Option<&Identity>,
) -> Result<Result<(), String>, Error> {
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        _ => ("tcg", "max"),
    };
    let dir = tempfile::Builder::new()
        .prefix("fkr-qemu-probe-")
        .tempdir()
        .map_err(|e| Error::io("creating the accelerator probe's directory", e))?;
    let vars = dir.path().join("vars.fd");
    std::fs::copy(&firmware.vars_template, &vars)
        .map_err(|e| Error::io(format!("copying {}", firmware.vars_template.display()), e))?;
    let open = |p: &Path, write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .map_err(|e| Error::io(format!("opening {}", p.display()), e))
    };
    // Like a VM's QEMU, the probe opens nothing by path (its uid could not): descriptors only.
    let code = open(&firmware.code, false)?;
    let vars_rw = open(&vars, true)?;
    let vars_ro = open(&vars, false)?;
    let qmp_socket = dir.path().join("qmp.sock");
    let qmp_listener = std::os::unix::net::UnixListener::bind(&qmp_socket)
        .map_err(|e| Error::io(format!("binding {}", qmp_socket.display()), e))?;
    let label = path_opt(dir.path());
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine",
        MACHINE,
        "-accel",
        accel_name,
        "-cpu",
        cpu,
        "-m",
        PROBE_MEMORY,
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-add-fd")
    .arg(format!(
        "fd={},set=1,opaque={label}/firmware-code",
        code.as_raw_fd()
    ))
    .arg("-add-fd")
    .arg(format!(
        "fd={},set=2,opaque={label}/vars",
        vars_rw.as_raw_fd()
    ))
    .arg("-add-fd")
    .arg(format!(
        "fd={},set=2,opaque={label}/vars",
        vars_ro.as_raw_fd()
    ))
    .args(firmware_blockdevs(firmware))
    .args([
        "-chardev",
        "stdio,id=serial0,signal=off",
        "-serial",
        "chardev:serial0",
        "-chardev",
    ])
    .arg(format!(
        "socket,id=qmp0,fd={},server=on,wait=off",
        qmp_listener.as_raw_fd()
    ))
    .args(["-mon", "chardev=qmp0,mode=control"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // A paused QEMU (internal error) never exits by itself: dropping the child kills it.
    .kill_on_drop(true);
    let setup = ChildSetup {
        cgroup_procs: Vec::new(),
        keep_fds: vec![
            code.as_raw_fd(),
            vars_rw.as_raw_fd(),
            vars_ro.as_raw_fd(),
            qmp_listener.as_raw_fd(),
        ],
        identity: identity.cloned(),
        ..Default::default()
    };
    let host = super::confine::decided().unwrap_or(&super::confine::Host::Unconfined);
    // 256M of guest RAM, QEMU itself and TCG's default translation cache.
    let mut child = host
        .spawn_probe(cmd, setup, 1 << 30)
        .await
        .map_err(|e| match e {
            super::confine::SpawnError::Io(e) => spawn_error(qemu, e),
            super::confine::SpawnError::Confine(e) => e,
        })?;
    drop((code, vars_rw, vars_ro, qmp_listener));
    // Dropped first on every path, including the caller dropping this future (a signal during the
    // probe): the probe QEMU is gone, not merely signalled, before its directory is removed.
    let _reaper = ProbeReaper {
        pid: child.id(),
        dir: dir.path().to_owned(),
    };
    let stderr = keep_stderr(&mut child);
    let printed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(mut out) = child.stdout.take() {
        let printed = printed.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = out.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                printed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut qmp: Option<QmpClient> = None;
    let verdict = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Err(with_stderr(
                format!("the {accel_name} probe VM exited ({status})"),
                &stderr,
            ));
        }
        if qmp.is_none() {
            // Each try is short so the loop keeps watching the process meanwhile.
            if let Ok((c, _events)) =
                QmpClient::connect(&qmp_socket, Duration::from_millis(200)).await
            {
                qmp = Some(c);
            }
        }
        let status = match &qmp {
            Some(c) => c.query_status().await.ok(),
            None => None,
        };
        if let Some(s) = status.as_deref().filter(|s| DEAD_RUN_STATES.contains(s)) {
            break Err(with_stderr(
                format!("the firmware stopped under {accel_name} in run state {s}"),
                &stderr,
            ));
        }
        if printed.load(std::sync::atomic::Ordering::Relaxed)
            && status.as_deref() == Some("running")
        {
            break Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(with_stderr(
                format!(
                    "the firmware printed nothing under {accel_name} within {}s",
                    timeout.as_secs()
                ),
                &stderr,
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(verdict)
}

/// Collects the last 8 KiB of a child's stderr in the background (QEMU's error lines, for the log
/// and for reasons).
pub(super) fn keep_stderr(child: &mut tokio::process::Child) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    if let Some(mut err) = child.stderr.take() {
        let buf = buf.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 1024];
            while let Ok(n) = err.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                b.extend_from_slice(&chunk[..n]);
                let excess = b.len().saturating_sub(8192);
                b.drain(..excess);
            }
        });
    }
    buf
}

/// Kills the probe QEMU and waits until it is gone (its command line names the probe's directory).
struct ProbeReaper {
    pid: Option<u32>,
    dir: PathBuf,
}

impl Drop for ProbeReaper {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            super::sweep::kill_and_wait(pid, &self.dir, Duration::from_secs(5));
        }
    }
}

/// What is known about KVM per QEMU binary for this process: the probe's verdict, or a later
/// failure of a real guest. The answer does not change while the daemon runs, and every launch
/// would otherwise pay for a probe VM.
fn kvm_cache() -> &'static Mutex<HashMap<PathBuf, Result<(), String>>> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<PathBuf, Result<(), String>>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Records that KVM failed a real guest with this QEMU binary (run state `internal-error`): `auto`
/// picks TCG from now on, and a forced `kvm` is refused with `reason`.
pub fn mark_kvm_broken(qemu: &Path, reason: &str) {
    tracing::warn!(qemu = %qemu.display(), reason, "KVM marked broken for this QEMU: using TCG from now on");
    kvm_cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            qemu.into(),
            Err(format!("KVM failed a guest earlier: {reason}")),
        );
}

async fn kvm_works(
    qemu: &Path,
    firmware: &Firmware,
    identity: Option<&Identity>,
) -> Result<Result<(), String>, Error> {
    let cached = kvm_cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(qemu)
        .cloned();
    if let Some(r) = cached {
        return Ok(r);
    }
    // No shortcut on a missing /dev/kvm: QEMU says so itself ("Could not access KVM kernel
    // module"), and a stand-in QEMU in tests needs no /dev/kvm at all.
    let r = probe_accel(qemu, firmware, Accel::Kvm, KVM_PROBE_TIMEOUT, identity).await?;
    // A probe that ran concurrently may have finished first; a recorded failure wins.
    Ok(kvm_cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(qemu.into())
        .or_insert(r)
        .clone())
}

/// Resolves `auto` (KVM if the firmware ran under it, else TCG, logged with the reason) and checks a
/// forced `kvm`.
pub async fn resolve_accel(
    qemu: &Path,
    firmware: &Firmware,
    wanted: Accel,
    identity: Option<&Identity>,
) -> Result<AccelChoice, Error> {
    match wanted {
        Accel::Tcg => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "configured".into(),
        }),
        Accel::Kvm => match kvm_works(qemu, firmware, identity).await? {
            Ok(()) => Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: "configured; the firmware ran under KVM".into(),
            }),
            Err(reason) => Err(Error::KvmUnavailable { reason }),
        },
        Accel::Auto => {
            let choice = match kvm_works(qemu, firmware, identity).await? {
                Ok(()) => AccelChoice {
                    accel: Accel::Kvm,
                    reason: "the firmware ran under KVM".into(),
                },
                Err(reason) => AccelChoice {
                    accel: Accel::Tcg,
                    reason,
                },
            };
            tracing::info!(accel = %choice.accel, reason = %choice.reason, "accelerator chosen");
            Ok(choice)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{discover_firmware, VmConfig};

    fn firmware() -> Firmware {
        // OVMF is a CI dependency (.ci/setup).
        discover_firmware(&VmConfig::default()).expect("OVMF installed")
    }

    #[tokio::test]
    async fn tcg_probe_runs_the_firmware() {
        // TCG always runs OVMF where QEMU is installed; under emulation on a loaded 2-core host its
        // first serial output takes several seconds, hence the long timeout here.
        let r = probe_accel(
            Path::new("qemu-system-x86_64"),
            &firmware(),
            Accel::Tcg,
            Duration::from_secs(120),
            None,
        )
        .await
        .unwrap();
        assert_eq!(r, Ok(()));
    }

    #[tokio::test]
    async fn auto_agrees_with_a_forced_kvm_and_says_why() {
        // Holds on any host: where KVM runs OVMF both pick it; elsewhere (like these CI machines,
        // where /dev/kvm opens but OVMF dies or QEMU aborts) auto falls back to TCG with the reason
        // and a forced kvm is refused with the same reason.
        let qemu = Path::new("qemu-system-x86_64");
        let fw = firmware();
        let auto = resolve_accel(qemu, &fw, Accel::Auto, None).await.unwrap();
        match resolve_accel(qemu, &fw, Accel::Kvm, None).await {
            Ok(c) => assert_eq!((c.accel, auto.accel), (Accel::Kvm, Accel::Kvm)),
            Err(Error::KvmUnavailable { reason }) => {
                assert_eq!(auto.accel, Accel::Tcg);
                assert_eq!(auto.reason, reason);
                assert!(!reason.is_empty());
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn the_kvm_probe_decides_within_its_timeout() {
        let started = std::time::Instant::now();
        let _ = probe_accel(
            Path::new("qemu-system-x86_64"),
            &firmware(),
            Accel::Kvm,
            KVM_PROBE_TIMEOUT,
            None,
        )
        .await
        .unwrap();
        // The timeout plus killing and reaping the probe QEMU.
        assert!(
            started.elapsed() < KVM_PROBE_TIMEOUT + Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_guest_failure_marks_kvm_broken_for_that_qemu_only() {
        let fw = firmware();
        let qemu = Path::new("/opt/fkr-test/broken-kvm/qemu-system-x86_64");
        // Pretend the probe said yes, then a real guest hit an internal error.
        kvm_cache().lock().unwrap().insert(qemu.into(), Ok(()));
        assert_eq!(
            resolve_accel(qemu, &fw, Accel::Auto, None)
                .await
                .unwrap()
                .accel,
            Accel::Kvm
        );
        mark_kvm_broken(qemu, "run state internal-error");
        let auto = resolve_accel(qemu, &fw, Accel::Auto, None).await.unwrap();
        assert_eq!(auto.accel, Accel::Tcg);
        assert!(auto.reason.contains("internal-error"), "{}", auto.reason);
        assert!(matches!(
            resolve_accel(qemu, &fw, Accel::Kvm, None).await,
            Err(Error::KvmUnavailable { .. })
        ));
        let other = Path::new("/opt/fkr-test/other/qemu-system-x86_64");
        kvm_cache().lock().unwrap().insert(other.into(), Ok(()));
        assert_eq!(
            resolve_accel(other, &fw, Accel::Auto, None)
                .await
                .unwrap()
                .accel,
            Accel::Kvm
        );
    }

    #[test]
    fn error_lines_skip_the_register_dump() {
        let kvm = "KVM internal error. Suberror: 1\nextra data[0]: 0x0000000000000001\n\
                   emulation failure\nRAX=0000000000000000 RBX=0000000000000000\nES =0000 00000000\n";
        assert_eq!(
            error_lines(kvm, 3),
            "KVM internal error. Suberror: 1 | emulation failure"
        );
        let msr = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0\nqemu-system-x86_64: \
                   ../target/i386/kvm/kvm.c:3021: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n";
        assert!(error_lines(msr, 1).contains("failed to set MSR 0x10a"));
        assert_eq!(error_lines("a\nb\nc\n", 2), "b | c");
        assert_eq!(error_lines("", 2), "");
    }

    #[tokio::test]
    async fn missing_qemu_is_named() {
        let err = probe_accel(
            Path::new("/nonexistent/qemu-system-x86_64"),
            &firmware(),
            Accel::Tcg,
            KVM_PROBE_TIMEOUT,
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::QemuNotFound { .. }));
        assert!(err.to_string().contains("apt-get install qemu-system-x86"));
    }
}
