//! The Forgejo API client: exactly the calls the orchestrator needs, against Forgejo ≥ 15.
//!
//! - [`Client`] speaks to `…/api/v1` with the admin token (jobs, repositories, users, runners) or with
//!   HTTP Basic auth and a CI user's password (that user's tokens; released Forgejo accepts nothing else
//!   there). [`Client::probe`] checks the version and detects the admin token routes of newer servers.
//! - Every non-2xx answer becomes [`Error::Api`] with the status and Forgejo's message; transport
//!   failures and timeouts have their own variants. Only idempotent calls are retried.
//! - Secrets (admin token, passwords, minted tokens) are [`Secret`](crate::secret::Secret)s.
//!
//! See ARCHITECTURE.md, "Forgejo client and emulator".

mod client;
mod config;
mod error;
mod names;
mod types;

pub use client::{Client, RequestObserver, ServerInfo, MIN_MAJOR_VERSION};
pub use config::{ClientConfig, Level, Visibility};
pub use error::Error;
pub use names::{
    ci_email, derived_password, generate_password, host_token_name, token_minter, token_name,
    TokenMinter, TOKEN_PREFIX,
};
pub use types::{
    AccessToken, ActionRun, Job, JobStatus, MintedToken, NewUser, RegisteredRunner, Repository,
    Runner, User, UserCreation, READ_TOKEN_SCOPES, TOKEN_SCOPES,
};
