//! The controller behind `fkr-qemu serve`: configuration, discovery, dispatch, CI users, the startup
//! sweep, and the per-job state machine. See ARCHITECTURE.md, section "Controller".

use std::path::{Path, PathBuf};

mod adopt;
pub mod check;
pub mod ciuser;
mod claim;
pub mod config;
mod credentials;
pub mod daemon;
pub mod duration;
mod job;
mod joblist;
mod leftovers;
mod pacing;
mod pool;
mod ports;
#[cfg(test)]
mod prepare_tests;
mod queue;
mod sweep;
pub mod userdata;

pub use crate::types::JobState;
pub use config::Config;

/// Errors of the `controller` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The cause is part of the message (and deliberately not also a `source`, so a report that
    /// walks the chain prints it once).
    #[error("{what} {path}: {error}", path = .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// A password key file someone but root may read or change: whoever reads it can log in as
    /// every CI user, whoever writes it can make every host set passwords they know.
    #[error("the key file {path} {why}: it must be owned by root and readable and writable by root alone (chown root:root, chmod 0600)", path = .path.display())]
    KeyFileUnsafe { path: PathBuf, why: String },
    #[error("the key file {path} holds no key (one key per line)", path = .path.display())]
    KeyFileEmpty { path: PathBuf },
    #[error("state file {path} is corrupt ({message}); fix or move it away", path = .path.display())]
    StateCorrupt { path: PathBuf, message: String },
    /// `--check-config`: the admin token's scopes could not be read.
    #[error("Forgejo check failed: cannot list the admin token's scopes: {error}")]
    TokenScopesUnreadable { error: String },
    /// `--check-config`: Forgejo refused to list the admin user's tokens.
    #[error(
        "Forgejo check failed: listing the admin user's tokens answered HTTP {status} (the token \
         needs read:user)"
    )]
    TokenListRefused { status: u16 },
    /// `--check-config`: the admin token lacks scopes `serve` needs.
    #[error("Forgejo check failed: the admin token lacks the scope(s) {missing}; it has {have}; it needs {need}")]
    TokenScopesMissing {
        missing: String,
        have: String,
        need: String,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl AsRef<Path>, error: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.as_ref().to_owned(),
            error,
        }
    }

    /// What kind of failure this is.
    pub fn class(&self) -> crate::types::ErrorClass {
        use crate::types::ErrorClass;
        match self {
            Error::Config(_) => ErrorClass::Config,
            Error::TokenScopesUnreadable { .. }
            | Error::TokenListRefused { .. }
            | Error::TokenScopesMissing { .. } => ErrorClass::Forgejo,
            Error::KeyFileUnsafe { .. } | Error::KeyFileEmpty { .. } => ErrorClass::Config,
            Error::Io { .. } | Error::StateCorrupt { .. } => ErrorClass::Runtime,
        }
    }
}
