//! The shapes of the Forgejo API the orchestrator reads and writes. Unknown fields are ignored
//! (newer servers add some, e.g. `run_id`); Go's `null` for an empty slice reads as empty.

use crate::secret::Secret;
use serde::{Deserialize, Deserializer, Serialize};

use super::Visibility;

/// Scopes of the tokens minted for CI users: push and pull the CI user's own packages.
pub const TOKEN_SCOPES: [&str; 2] = ["write:package", "read:package"];

/// Reads JSON `null` as the type's default (Go writes nil slices as `null`).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Status of a job as the runner-jobs search reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    Waiting,
    Running,
    /// Anything else a future server may report.
    Other(String),
}

impl<'de> Deserialize<'de> for JobStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "waiting" => JobStatus::Waiting,
            "running" => JobStatus::Running,
            _ => JobStatus::Other(s),
        })
    }
}

/// `ActionRunJob`: one attempt of a job, from `…/actions/runners/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Job {
    pub id: i64,
    /// Opaque identifier of this attempt; what `forgejo-runner one-job --handle` takes. A re-run
    /// gets a new handle.
    #[serde(default, deserialize_with = "null_as_default")]
    pub handle: String,
    #[serde(default)]
    pub attempt: i64,
    pub repo_id: i64,
    #[serde(default)]
    pub owner_id: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub runs_on: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub needs: Vec<String>,
    /// 0 until a runner picked the job up.
    #[serde(default)]
    pub task_id: i64,
    pub status: JobStatus,
}

/// What the orchestrator needs of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    pub id: i64,
    /// `owner.login`
    pub owner: String,
    pub name: String,
    pub full_name: String,
}

#[derive(Deserialize)]
pub(crate) struct RepositoryWire {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub full_name: String,
    pub owner: RepositoryOwnerWire,
}

#[derive(Deserialize)]
pub(crate) struct RepositoryOwnerWire {
    pub login: String,
}

/// `User`, the fields the orchestrator reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct User {
    pub id: i64,
    pub login: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub email: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub visibility: String,
    #[serde(default)]
    pub is_admin: bool,
}

/// A CI user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub email: String,
    pub password: Secret,
    pub visibility: Visibility,
}

/// Outcome of [`Client::create_user`](super::Client::create_user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCreation {
    Created(User),
    /// Forgejo answered 422: the name or the e-mail address is taken (or the name is reserved). The
    /// caller reconciles, e.g. by looking the user up and resetting its password.
    AlreadyExists {
        message: String,
    },
}

/// An access token as listed (`sha1` is empty in lists: the secret is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AccessToken {
    pub id: i64,
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub scopes: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub token_last_eight: String,
}

/// A freshly minted token, with its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedToken {
    pub id: i64,
    pub name: String,
    pub token: Secret,
    pub scopes: Vec<String>,
}

#[derive(Deserialize)]
pub(crate) struct AccessTokenWire {
    pub id: i64,
    pub name: String,
    pub sha1: Secret,
    #[serde(default, deserialize_with = "null_as_default")]
    pub scopes: Vec<String>,
}

/// `RegisterRunnerResponse`: what a runner needs to connect, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegisteredRunner {
    pub id: i64,
    pub uuid: String,
    pub token: Secret,
}

/// `ActionRunner`, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Runner {
    pub id: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub uuid: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub description: String,
    #[serde(default)]
    pub owner_id: i64,
    #[serde(default)]
    pub repo_id: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub version: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Vec<String>,
    #[serde(default)]
    pub ephemeral: bool,
    /// `offline`, `idle` or `active`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
}

#[derive(Serialize)]
pub(crate) struct CreateUserBody<'a> {
    pub username: &'a str,
    pub email: &'a str,
    pub password: &'a str,
    pub must_change_password: bool,
    pub send_notify: bool,
    pub visibility: &'a str,
}

#[derive(Serialize)]
pub(crate) struct EditUserBody<'a> {
    pub password: &'a str,
    pub must_change_password: bool,
}

#[derive(Serialize)]
pub(crate) struct CreateTokenBody<'a> {
    pub name: &'a str,
    pub scopes: &'a [&'a str],
}

#[derive(Serialize)]
pub(crate) struct RegisterRunnerBody<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub ephemeral: bool,
}

#[derive(Deserialize)]
pub(crate) struct ServerVersionWire {
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ignores_unknown_fields_and_nulls() {
        let j: Job = serde_json::from_str(
            r#"{"id":3,"handle":"h","attempt":1,"repo_id":7,"owner_id":2,"name":"b","needs":null,
                "runs_on":["external-host"],"task_id":0,"status":"waiting","run_id":99}"#,
        )
        .unwrap();
        assert_eq!(j.status, JobStatus::Waiting);
        assert!(j.needs.is_empty());
        assert_eq!(j.runs_on, vec!["external-host"]);
    }

    #[test]
    fn wire_token_debug_hides_secret() {
        let t: AccessTokenWire =
            serde_json::from_str(r#"{"id":1,"name":"n","sha1":"deadbeefcafe","scopes":null}"#)
                .unwrap();
        let r = RegisteredRunner {
            id: 1,
            uuid: "u".into(),
            token: t.sha1.clone(),
        };
        assert!(!format!("{r:?}").contains("deadbeefcafe"));
    }
}
