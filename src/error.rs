//! The crate-level error: one variant per module. Each says its [`ErrorClass`]; only the binary
//! (`cli`) turns a class into an exit status.

use crate::types::ErrorClass;

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
    /// What kind of failure this is (the binary maps it to an exit code).
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Vm(e) => e.class(),
            Error::Forgejo(e) => e.class(),
            Error::Net(e) => e.class(),
            Error::Controller(e) => e.class(),
            Error::Ops(e) => e.class(),
            Error::Usage(_) => ErrorClass::Config,
        }
    }
}
