//! See ARCHITECTURE.md for this module's role. Owned by the forgejo work item; replace freely.

/// Errors of the `forgejo` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}
