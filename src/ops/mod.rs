//! See ARCHITECTURE.md for this module's role. Owned by the ops work item; replace freely.

/// Errors of the `ops` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}
