//! One module per subcommand. Each has a clap `Args` struct and `run`, so `main.rs` stays a thin
//! dispatcher and each subcommand's owner edits only its own file.

pub mod boot_test;
pub mod ci_users;
pub mod console;
pub mod generate;
pub mod handover;
pub mod list;
pub mod serve;
pub mod status;

use crate::types::ErrorClass;

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

/// The exit code for an error of class `class`: the only place that knows exit codes.
pub fn exit_code(class: ErrorClass) -> u8 {
    match class {
        ErrorClass::CheckFailed => exit::CHECK_FAILED,
        ErrorClass::Config => exit::CONFIG,
        ErrorClass::MissingDependency => exit::MISSING_DEPENDENCY,
        ErrorClass::Forgejo => exit::FORGEJO,
        ErrorClass::Network => exit::NETWORK,
        ErrorClass::Runtime => exit::RUNTIME,
    }
}
