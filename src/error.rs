//! The crate-level error: one variant per module, each mapped to an exit code by the binary.

/// Exit codes of the `fkr-qemu` binary (documented in README.md).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// A check failed (for example `boot-test` ran but a phase failed).
    pub const CHECK_FAILED: u8 = 1;
    /// Bad usage or configuration.
    pub const CONFIG: u8 = 2;
    /// A required host tool or file is missing (qemu, OVMF, base image, ...).
    pub const MISSING_DEPENDENCY: u8 = 3;
    /// Forgejo refused or could not be reached.
    pub const FORGEJO: u8 = 4;
    /// Host networking failed.
    pub const NETWORK: u8 = 5;
    /// Any other runtime failure.
    pub const RUNTIME: u8 = 6;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error(transparent)]
    Forgejo(#[from] crate::forgejo::Error),
    #[error(transparent)]
    Net(#[from] crate::net::Error),
    #[error(transparent)]
    Controller(#[from] crate::controller::Error),
    #[error(transparent)]
    Ops(#[from] crate::ops::Error),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The process exit code for this error. Modules refine this through their own `exit_code`
    /// where they can tell a missing dependency from a runtime failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Vm(e) => e.exit_code(),
            Error::Forgejo(e) => e.exit_code(),
            Error::Net(e) => e.exit_code(),
            Error::Controller(e) => e.exit_code(),
            Error::Ops(e) => e.exit_code(),
            Error::Usage(_) => exit::CONFIG,
        }
    }
}
