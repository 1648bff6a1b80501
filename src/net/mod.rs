//! See ARCHITECTURE.md for this module's role. Owned by the net work item; replace freely.

/// Errors of the `net` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}
