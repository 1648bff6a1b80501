//! The controller behind `fkr-qemu serve`: configuration, discovery, dispatch, CI users, the startup
//! sweep, and the per-job state machine. See ARCHITECTURE.md, section "Controller".

use std::path::{Path, PathBuf};

pub mod check;
pub mod ciuser;
pub mod config;
pub mod daemon;
pub mod duration;
mod job;
#[cfg(test)]
mod prepare_tests;
mod queue;
mod sweep;
pub mod userdata;

pub use crate::types::JobState;
pub use config::Config;

/// What every job task shares with the scheduler.
pub(crate) struct Ctx {
    pub cfg: Config,
    pub forgejo: crate::forgejo::Client,
    /// `ci-users.json`; its lock also serialises CI-user creation.
    pub users: tokio::sync::Mutex<ciuser::CiUserStore>,
    /// Set up after the startup sweep (which removes our firewall table first).
    pub net: Option<crate::net::HostNetwork>,
    pub board: crate::ops::StatusBoard,
    pub metrics: crate::ops::Metrics,
    /// `fkr-qemu@<hostname>`: starts every runner description, so the sweep deletes only this
    /// host's runners.
    pub runner_marker: String,
}

impl Ctx {
    pub(crate) fn net(&self) -> &crate::net::HostNetwork {
        self.net
            .as_ref()
            .expect("the host network is set up before discovery starts")
    }
}

/// Errors of the `controller` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{what} {path}: {source}", path = .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({message}); fix or move it away", path = .path.display())]
    StateCorrupt { path: PathBuf, message: String },
    #[error("{0}")]
    InvalidInput(String),
    #[error("missing: {0}")]
    Missing(String),
    #[error("Forgejo check failed: {0}")]
    ForgejoCheck(String),
    /// The CI user's name is held by a Forgejo account with no proof that fkr-qemu created it for
    /// this repository (README.md, "CI users"): never adopted.
    #[error(
        "CI user {username} for {repository} (repository id {repo_id}) cannot be used: {why}. \
         fkr-qemu never takes over an account it cannot prove it created for this repository. \
         A site admin checks that account and deletes or renames it (e.g. DELETE \
         /api/v1/admin/users/{username}); the next job then creates the CI user"
    )]
    CiUserRefused {
        username: String,
        repository: String,
        repo_id: i64,
        why: String,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.as_ref().to_owned(),
            source,
        }
    }

    /// What kind of failure this is.
    pub fn class(&self) -> crate::types::ErrorClass {
        use crate::types::ErrorClass;
        match self {
            Error::Config(_) => ErrorClass::Config,
            Error::Missing(_) => ErrorClass::MissingDependency,
            Error::ForgejoCheck(_) => ErrorClass::Forgejo,
            Error::Io { .. }
            | Error::StateCorrupt { .. }
            | Error::InvalidInput(_)
            | Error::CiUserRefused { .. } => ErrorClass::Runtime,
        }
    }
}
