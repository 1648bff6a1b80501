//! See ARCHITECTURE.md for this module's role. Owned by the vm work item; replace freely.

/// Errors of the `vm` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}
