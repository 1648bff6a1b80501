use std::path::PathBuf;

use crate::types::ErrorClass;

/// What to install when QEMU itself is missing.
const INSTALL_QEMU: &str = "install QEMU (Debian/Ubuntu: `apt-get install qemu-system-x86`; \
     Fedora: `dnf install qemu-system-x86-core`; Arch: `pacman -S qemu-base`) or set the qemu path";
const INSTALL_QEMU_IMG: &str = "install qemu-img (Debian/Ubuntu: `apt-get install qemu-utils`; \
     Fedora: `dnf install qemu-img`; Arch: `pacman -S qemu-img`)";
const INSTALL_OVMF: &str =
    "install OVMF (Debian/Ubuntu: `apt-get install ovmf`; Fedora: `dnf install \
     edk2-ovmf`; Arch: `pacman -S edk2-ovmf`) or set firmware_code and firmware_vars";

/// Errors of the VM driver. Messages name the cause and, for missing things, what to install.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("QEMU binary `{}` not found: {INSTALL_QEMU}", path.display())]
    QemuNotFound { path: PathBuf },
    #[error("`{}` not found: {INSTALL_QEMU_IMG}", path.display())]
    QemuImgNotFound { path: PathBuf },
    #[error("no UEFI firmware (OVMF) for x86_64 q35 without secure boot found (looked in {searched}): {INSTALL_OVMF}")]
    FirmwareNotFound { searched: String },
    #[error("firmware file `{}` does not exist: {INSTALL_OVMF}", path.display())]
    FirmwareFileMissing { path: PathBuf },
    #[error("base image `{}` does not exist: build it (image-builder/) or pass another image", path.display())]
    BaseImageMissing { path: PathBuf },
    #[error("base image `{}` is not a usable qcow2 image ({reason}): rebuild it (image-builder/) or pass another image", path.display())]
    BaseImageInvalid { path: PathBuf, reason: String },
    #[error("KVM was requested but cannot run guests on this host: {reason}")]
    KvmUnavailable { reason: String },
    #[error(transparent)]
    InvalidName(#[from] crate::types::InvalidVmName),
    #[error("base image path {} must be absolute", path.display())]
    RelativeBaseImage { path: PathBuf },
    #[error("all {count} VM uids from {base} are in use: raise [vm] uid_count")]
    UidsExhausted { base: u32, count: u32 },
    #[error("set both [vm] firmware_code and firmware_vars, or neither")]
    FirmwarePairIncomplete,
    #[error("VM state cannot go from {from} to {to}")]
    InvalidTransition {
        from: crate::vm::VmState,
        to: crate::vm::VmState,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Tool { command: String, detail: String },
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    EarlyExit { status: String, stderr: String },
    #[error("VM cgroup: {0}")]
    Cgroup(String),
    #[error("systemd scope: {0}")]
    Scope(String),
    #[error("QMP: {0}")]
    Qmp(String),
    /// QEMU sent more than the daemon holds for it (an escaped QEMU attacking the daemon).
    #[error("QMP peer dropped: {0}")]
    QmpPeerDropped(crate::vm::qmp::Misbehaviour),
    #[error("the supervisor of VM {name} ended abnormally: {detail}")]
    Supervisor { name: String, detail: String },
    #[error("not enough disk space for another VM in {}: its overlay may grow to {needed} bytes (disk_max), and {available} bytes are left once the running VMs may grow to theirs (free space, disk_budget)", dir.display())]
    DiskSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("boot-test failed at phase `{phase}`: {detail}")]
    BootTestFailed { phase: String, detail: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// What kind of failure this is: missing tools, firmware or image are missing dependencies,
    /// a corrupt image fails the check, configuration mistakes are configuration, the rest runtime.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::QemuNotFound { .. }
            | Error::QemuImgNotFound { .. }
            | Error::FirmwareNotFound { .. }
            | Error::FirmwareFileMissing { .. }
            | Error::BaseImageMissing { .. }
            | Error::KvmUnavailable { .. } => ErrorClass::MissingDependency,
            Error::BaseImageInvalid { .. } | Error::BootTestFailed { .. } => {
                ErrorClass::CheckFailed
            }
            Error::InvalidName(_)
            | Error::RelativeBaseImage { .. }
            | Error::UidsExhausted { .. }
            | Error::FirmwarePairIncomplete => ErrorClass::Config,
            Error::InvalidTransition { .. }
            | Error::Io { .. }
            | Error::Tool { .. }
            | Error::EarlyExit { .. }
            | Error::Qmp(_)
            | Error::QmpPeerDropped(_)
            | Error::Supervisor { .. }
            | Error::DiskSpace { .. }
            | Error::Cgroup(_)
            | Error::Scope(_) => ErrorClass::Runtime,
        }
    }
}
