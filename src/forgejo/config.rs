//! Client configuration, embedded by the controller in its TOML file (`[forgejo]`).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Where runners are registered and waiting jobs are searched.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Level {
    /// `/admin/actions/…`: every repository of the instance (needs a site-admin token).
    #[default]
    Instance,
    /// `/orgs/{org}/actions/…`
    Org(String),
    /// `/repos/{owner}/{repo}/actions/…`
    Repo { owner: String, repo: String },
    /// `/user/actions/…`: the token owner's own repositories.
    User,
}

impl Level {
    /// The token scope registering runners at this level needs (README.md lists it).
    pub fn write_scope(&self) -> &'static str {
        match self {
            Level::Instance => "write:admin",
            Level::Org(_) => "write:organization",
            Level::Repo { .. } => "write:repository",
            Level::User => "write:user",
        }
    }
}

/// Visibility of the CI users: who may pull the images they push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    Public,
    /// Signed-in users only.
    Limited,
    /// The CI user itself and site admins only: a private repository's images stay private.
    #[default]
    Private,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Limited => "limited",
            Visibility::Private => "private",
        }
    }
}

/// Settings of [`Client`](super::Client). The admin token is passed separately as a
/// [`Secret`](crate::secret::Secret) so that this struct can be logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Base URL of the Forgejo instance, e.g. `https://forgejo.example.org/` (no `/api/v1`).
    pub url: url::Url,
    /// Runner registration and job search level.
    #[serde(default)]
    pub level: Level,
    /// Whole-request timeout, in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// TCP/TLS connect timeout, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Extra attempts for idempotent calls after a 5xx, timeout or connection error.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay in milliseconds; doubles on each further attempt.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Visibility given to newly created CI users.
    #[serde(default)]
    pub ci_user_visibility: Visibility,
    /// Domain of the CI users' e-mail addresses. The default is under the reserved `.invalid` TLD
    /// (RFC 2606), so that no mail can ever be delivered there.
    #[serde(default = "default_email_domain")]
    pub ci_user_email_domain: String,
}

impl ClientConfig {
    /// A configuration with every default, for `url`.
    pub fn new(url: url::Url) -> Self {
        Self {
            url,
            level: Level::default(),
            request_timeout_ms: default_request_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            retries: default_retries(),
            retry_backoff_ms: default_retry_backoff_ms(),
            ci_user_visibility: Visibility::default(),
            ci_user_email_domain: default_email_domain(),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn retry_backoff(&self) -> Duration {
        Duration::from_millis(self.retry_backoff_ms)
    }
}

fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_retries() -> u32 {
    3
}
fn default_retry_backoff_ms() -> u64 {
    500
}
fn default_email_domain() -> String {
    "fkr-qemu.invalid".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_toml_takes_defaults() {
        let c: ClientConfig = toml::from_str(r#"url = "https://f.example/""#).unwrap();
        assert_eq!(c.level, Level::Instance);
        assert_eq!(c.request_timeout(), Duration::from_secs(30));
        assert_eq!(c.ci_user_visibility, Visibility::Private);
        assert_eq!(c.ci_user_email_domain, "fkr-qemu.invalid");
    }

    #[test]
    fn levels_parse_from_toml() {
        let c: ClientConfig = toml::from_str(
            "url = \"https://f.example/\"\nci_user_visibility = \"limited\"\n[level.repo]\nowner = \"o\"\nrepo = \"r\"\n",
        )
        .unwrap();
        assert_eq!(
            c.level,
            Level::Repo {
                owner: "o".into(),
                repo: "r".into()
            }
        );
        assert_eq!(c.ci_user_visibility, Visibility::Limited);
        let c: ClientConfig =
            toml::from_str("url = \"https://f.example/\"\nlevel = { org = \"acme\" }\n").unwrap();
        assert_eq!(c.level, Level::Org("acme".into()));
        assert_eq!(c.level.write_scope(), "write:organization");
        let c: ClientConfig =
            toml::from_str("url = \"https://f.example/\"\nlevel = \"user\"\n").unwrap();
        assert_eq!(c.level, Level::User);
        assert!(
            toml::from_str::<ClientConfig>("url = \"https://f.example/\"\nbogus = 1\n").is_err()
        );
    }
}
