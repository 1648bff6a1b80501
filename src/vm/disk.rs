//! The base image (checked, never written) and the per-VM qcow2 overlay.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::Error;

/// Checks that `base` is a readable qcow2 image and returns its absolute path.
///
/// `qemu-img info` opens the image read-only (with a shared lock, so running VMs do not disturb it, but
/// an image-builder still writing it does); a damaged header shows up here instead of as a VM that never
/// boots.
pub async fn check_base_image(qemu_img: &Path, base: &Path) -> Result<PathBuf, Error> {
    let abs = match std::fs::canonicalize(base) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::BaseImageMissing { path: base.into() })
        }
        Err(e) => {
            return Err(Error::io(
                format!("reading base image {}", base.display()),
                e,
            ))
        }
    };
    std::fs::File::open(&abs).map_err(|e| {
        Error::io(
            format!("opening base image {} for reading", abs.display()),
            e,
        )
    })?;
    let out = Command::new(qemu_img)
        .args(["info", "--output=json"])
        .arg(&abs)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| spawn_error(qemu_img, e))?;
    let invalid = |reason: String| Error::BaseImageInvalid {
        path: abs.clone(),
        reason,
    };
    if !out.status.success() {
        return Err(invalid(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| invalid(format!("unreadable `qemu-img info` output: {e}")))?;
    match info.get("format").and_then(|f| f.as_str()) {
        Some("qcow2") => {}
        Some(other) => {
            return Err(invalid(format!(
                "format is {other}, not qcow2 (damaged header?)"
            )))
        }
        None => return Err(invalid("qemu-img reports no format".into())),
    }
    if info
        .pointer("/format-specific/data/corrupt")
        .and_then(|c| c.as_bool())
        == Some(true)
    {
        return Err(invalid("qcow2 image is marked corrupt".into()));
    }
    Ok(abs)
}

/// Creates `overlay` as a qcow2 over the absolute `base` (`-b BASE -F qcow2`). QEMU opens backing files
/// read-only, so the base is never written. (A relative `-b` would resolve against the overlay's folder.)
pub async fn create_overlay(qemu_img: &Path, base: &Path, overlay: &Path) -> Result<(), Error> {
    if !base.is_absolute() {
        return Err(Error::RelativeBaseImage {
            path: base.to_owned(),
        });
    }
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| spawn_error(qemu_img, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Tool {
            command: format!("qemu-img create {}", overlay.display()),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn spawn_error(qemu_img: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::QemuImgNotFound {
            path: qemu_img.into(),
        }
    } else {
        Error::io(format!("running {}", qemu_img.display()), e)
    }
}

/// Bytes a file really occupies on disk (allocated blocks, not its apparent size).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Bytes available to root in the file system holding `dir` (or its nearest existing ancestor).
fn available_bytes(dir: &Path) -> Result<u64, Error> {
    let mut p = dir;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let st = nix::sys::statvfs::statvfs(p).map_err(|e| {
        Error::io(
            format!("reading the free space of {}", p.display()),
            e.into(),
        )
    })?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

#[derive(Debug)]
struct Reserved {
    id: u64,
    max: u64,
    overlay: Option<PathBuf>,
}

/// The disk reservations of this process's VMs: each may grow its overlay up to `disk_max`.
static LEDGER: std::sync::Mutex<Vec<Reserved>> = std::sync::Mutex::new(Vec::new());

/// A VM's claim on disk space, from before it is prepared until it is torn down: whoever holds one
/// may create an overlay that grows to `disk_max`. Taken with [`reserve_disk`]; released on drop.
#[derive(Debug)]
pub struct DiskReservation {
    id: u64,
    max: u64,
}

impl DiskReservation {
    /// The cap this reservation was taken for.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Records the overlay, so later admissions count what it already uses.
    pub(super) fn set_overlay(&self, overlay: &Path) {
        let mut l = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = l.iter_mut().find(|r| r.id == self.id) {
            r.overlay = Some(overlay.to_owned());
        }
    }
}

impl Drop for DiskReservation {
    fn drop(&mut self) {
        LEDGER
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| r.id != self.id);
    }
}

/// Records the reservation of a VM that already runs (taken over after a restart): no admission
/// check — its disk is in use whatever the answer — but later admissions count it.
pub fn adopt_reservation(max: u64, overlay: &Path) -> DiskReservation {
    static_next_id(|id| {
        let mut l = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
        l.push(Reserved {
            id,
            max,
            overlay: Some(overlay.to_owned()),
        });
        DiskReservation { id, max }
    })
}

fn static_next_id<T>(f: impl FnOnce(u64) -> T) -> T {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    f(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Admits one more VM only if the worst case fits: every running VM's overlay growing to its
/// `disk_max`, plus this one's, within the file system's free space (and within `disk_budget`,
/// when set, counting full reservations). Otherwise `Error::DiskSpace`: the caller keeps the job
/// waiting rather than start a VM that could fill the disk.
pub fn reserve_disk(config: &super::VmConfig) -> Result<DiskReservation, Error> {
    let max = config.disk_max();
    let mut l = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
    let still_to_grow: u64 = l
        .iter()
        .map(|r| {
            r.max
                .saturating_sub(r.overlay.as_deref().map_or(0, allocated_bytes))
        })
        .sum();
    let free = available_bytes(&config.disk_dir)?.saturating_sub(still_to_grow);
    let by_budget = config
        .disk_budget()
        .map(|b| b.saturating_sub(l.iter().map(|r| r.max).sum()));
    let available = by_budget.map_or(free, |b| b.min(free));
    if available < max {
        return Err(Error::DiskSpace {
            dir: config.disk_dir.clone(),
            needed: max,
            available,
        });
    }
    Ok(static_next_id(|id| {
        l.push(Reserved {
            id,
            max,
            overlay: None,
        });
        DiskReservation { id, max }
    }))
}

#[cfg(test)]
mod reservation_tests {
    use super::*;

    #[test]
    fn a_budget_admits_only_what_fits_and_dropping_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = super::super::VmConfig {
            disk_dir: dir.path().join("disks"),
            disk_max_mib: 100,
            disk_budget_mib: Some(250),
            ..Default::default()
        };
        let a = reserve_disk(&cfg).unwrap();
        let b = reserve_disk(&cfg).unwrap();
        match reserve_disk(&cfg) {
            Err(Error::DiskSpace {
                needed, available, ..
            }) => assert_eq!((needed, available), (100 << 20, 50 << 20)),
            other => panic!("{other:?}"),
        }
        drop(a);
        let _c = reserve_disk(&cfg).unwrap();
        drop(b);
        // Free space itself: a cap larger than the disk is never admitted.
        let huge = super::super::VmConfig {
            disk_max_mib: u64::MAX >> 21,
            disk_budget_mib: None,
            ..cfg.clone()
        };
        assert!(matches!(reserve_disk(&huge), Err(Error::DiskSpace { .. })));
    }
}
