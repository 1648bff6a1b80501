//! See ARCHITECTURE.md for this module's role. Owned by the controller work item; replace freely.

/// Errors of the `controller` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}
