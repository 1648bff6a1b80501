//! Errors of the Forgejo client. None of them carries a secret: messages name the route template,
//! the status and what Forgejo said, never headers or credentials.

/// Errors of the `forgejo` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `forgejo.url` is not an http(s) URL that can carry a path.
    #[error("forgejo.url {url} is not an http(s) URL that can be a base URL")]
    BadUrl { url: String },
    /// The HTTP client could not be built (TLS roots, proxy settings).
    #[error("cannot build the HTTP client: {error}")]
    HttpClient { error: String },
    /// The admin token cannot be sent as a header value.
    #[error("the admin token contains characters not allowed in a header")]
    AdminTokenNotAHeader,

    /// The server is older than the floor: it cannot bind a runner to one job.
    #[error(
        "Forgejo at {url} runs version {found}; fkr-qemu needs Forgejo {needed} or newer \
         (ephemeral runners and job handles arrived in v15.0.0)"
    )]
    UnsupportedVersion {
        url: String,
        found: String,
        needed: String,
    },

    /// Forgejo answered with a non-2xx status.
    #[error("Forgejo answered {method} {route} with HTTP {status}: {message}")]
    Api {
        method: &'static str,
        route: &'static str,
        status: u16,
        /// Forgejo's `message` field, or the start of the body when it is not Forgejo's JSON.
        message: String,
    },

    /// The request did not complete within the per-request timeout.
    #[error("Forgejo did not answer {method} {route} within {timeout_ms} ms")]
    Timeout {
        method: &'static str,
        route: &'static str,
        timeout_ms: u128,
    },

    /// The request could not be sent or its answer not read (connection refused, reset, TLS, …).
    #[error("cannot reach Forgejo for {method} {route}: {source}")]
    Transport {
        method: &'static str,
        route: &'static str,
        #[source]
        source: reqwest::Error,
    },

    /// A 2xx answer whose body or headers are not what the API documents.
    #[error("Forgejo's answer to {method} {route} is not valid: {detail}")]
    InvalidResponse {
        method: &'static str,
        route: &'static str,
        detail: String,
    },
}

impl Error {
    /// The HTTP status Forgejo answered with, when it answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for an HTTP 404 answer.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Worth retrying for an idempotent call: 5xx answers, timeouts and transport failures.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Api { status, .. } => *status >= 500,
            Error::Timeout { .. } | Error::Transport { .. } => true,
            _ => false,
        }
    }

    /// What kind of failure this is.
    pub fn class(&self) -> crate::types::ErrorClass {
        match self {
            Error::BadUrl { .. } | Error::HttpClient { .. } | Error::AdminTokenNotAHeader => {
                crate::types::ErrorClass::Config
            }
            _ => crate::types::ErrorClass::Forgejo,
        }
    }
}
