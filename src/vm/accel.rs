//! Choosing KVM or TCG. `/dev/kvm` existing proves nothing (on some hosts it opens and answers
//! `KVM_GET_API_VERSION`, yet QEMU aborts setting an MSR or the guest dies with a KVM internal error), so
//! `auto` really runs a VM: QEMU with `-accel kvm -cpu host` on a 64 KiB BIOS whose reset vector writes
//! to an `isa-debug-exit` port. Only if QEMU exits with that code did a vCPU execute guest code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::process::Command;

use super::{Accel, Error};

/// The resolved accelerator and why it was chosen (for the log and `boot-test`'s report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// `Kvm` or `Tcg`.
    pub accel: Accel,
    pub reason: String,
}

/// `isa-debug-exit` turns a written byte `v` into exit status `(v << 1) | 1`.
const PROBE_VALUE: u8 = 0x2a;
const PROBE_EXIT: i32 = ((PROBE_VALUE as i32) << 1) | 1;
const PROBE_PORT: u8 = 0xf4;
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A 64 KiB BIOS image: at the reset vector (F000:FFF0) `mov al, 0x2a; out 0xf4, al; hlt; jmp $-1`.
fn probe_bios() -> Vec<u8> {
    let mut bios = vec![0u8; 64 * 1024];
    let code = [0xB0, PROBE_VALUE, 0xE6, PROBE_PORT, 0xF4, 0xEB, 0xFD];
    bios[0xFFF0..0xFFF0 + code.len()].copy_from_slice(&code);
    bios
}

/// Runs the probe VM under `accel` and says whether guest code ran, with the reason if not.
pub async fn probe_accel(qemu: &Path, accel: Accel) -> Result<Result<(), String>, Error> {
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        _ => ("tcg", "max"),
    };
    let dir = tempfile::Builder::new()
        .prefix("fkr-qemu-probe-")
        .tempdir()
        .map_err(|e| Error::io("creating the accelerator probe's directory", e))?;
    let bios = dir.path().join("probe.bin");
    std::fs::write(&bios, probe_bios()).map_err(|e| Error::io("writing the probe BIOS", e))?;
    let child = Command::new(qemu)
        .args([
            "-machine", "q35", "-accel", accel_name, "-cpu", cpu, "-m", "16M",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "none", "-monitor", "none", "-bios"])
        .arg(&bios)
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={PROBE_PORT:#x},iosize=0x04"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::QemuNotFound { path: qemu.into() }
            } else {
                Error::io(format!("running {}", qemu.display()), e)
            }
        })?;
    let out = match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        // kill_on_drop ends the probe QEMU (a KVM internal error leaves it paused, not exited).
        Err(_) => {
            return Ok(Err(format!(
                "the {accel_name} probe VM did not finish within {}s",
                PROBE_TIMEOUT.as_secs()
            )))
        }
        Ok(r) => r.map_err(|e| Error::io("waiting for the probe VM", e))?,
    };
    if out.status.code() == Some(PROBE_EXIT) {
        return Ok(Ok(()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Ok(Err(format!(
        "the {accel_name} probe VM did not run guest code ({}){}",
        out.status,
        if first.is_empty() {
            String::new()
        } else {
            format!(": {first}")
        }
    )))
}

/// Whether KVM runs guests with this QEMU: probed once per QEMU binary per process (the answer does
/// not change while the daemon runs, and every launch would otherwise pay for a probe VM).
async fn kvm_works(qemu: &Path) -> Result<Result<(), String>, Error> {
    static CACHE: Mutex<Option<HashMap<PathBuf, Result<(), String>>>> = Mutex::new(None);
    let cached = CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(qemu).cloned());
    if let Some(r) = cached {
        return Ok(r);
    }
    let r = if Path::new("/dev/kvm").exists() {
        probe_accel(qemu, Accel::Kvm).await?
    } else {
        Err("/dev/kvm does not exist".into())
    };
    CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(qemu.into(), r.clone());
    Ok(r)
}

/// Resolves `auto` (KVM if the probe VM ran, else TCG, logged with the reason) and checks a forced
/// `kvm`.
pub async fn resolve_accel(qemu: &Path, wanted: Accel) -> Result<AccelChoice, Error> {
    match wanted {
        Accel::Tcg => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "configured".into(),
        }),
        Accel::Kvm => match kvm_works(qemu).await? {
            Ok(()) => Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: "configured; a KVM probe VM ran".into(),
            }),
            Err(reason) => Err(Error::KvmUnavailable { reason }),
        },
        Accel::Auto => {
            let choice = match kvm_works(qemu).await? {
                Ok(()) => AccelChoice {
                    accel: Accel::Kvm,
                    reason: "a KVM probe VM ran".into(),
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

    #[tokio::test]
    async fn tcg_probe_runs_guest_code() {
        // QEMU is a CI dependency (.ci/setup); TCG always works where QEMU is installed.
        let r = probe_accel(Path::new("qemu-system-x86_64"), Accel::Tcg)
            .await
            .unwrap();
        assert_eq!(r, Ok(()));
    }

    #[tokio::test]
    async fn auto_agrees_with_a_forced_kvm_and_says_why() {
        // Holds on any host: where KVM runs guests both pick it; elsewhere (like this CI machine,
        // where /dev/kvm exists but guests cannot run) auto falls back to TCG with the reason and a
        // forced kvm is refused with the same reason.
        let qemu = Path::new("qemu-system-x86_64");
        let auto = resolve_accel(qemu, Accel::Auto).await.unwrap();
        match resolve_accel(qemu, Accel::Kvm).await {
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
    async fn missing_qemu_is_named() {
        let err = probe_accel(Path::new("/nonexistent/qemu-system-x86_64"), Accel::Tcg)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::QemuNotFound { .. }));
        assert!(err.to_string().contains("apt-get install qemu-system-x86"));
    }
}
