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
        return Err(Error::Config(format!(
            "base image path {} must be absolute",
            base.display()
        )));
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
