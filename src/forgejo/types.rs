//! The shapes of the Forgejo API the orchestrator reads and writes. Unknown fields are ignored
//! (newer servers add some, e.g. `run_id`); Go's `null` for an empty slice reads as empty.

use crate::secret::Secret;
use serde::{Deserialize, Deserializer, Serialize};

use super::Visibility;

/// Scopes of the tokens minted for CI users: push and pull the CI user's own packages.
pub const TOKEN_SCOPES: [&str; 2] = ["write:package", "read:package"];

/// Scopes of the tokens minted for untrusted runs (pull requests from forks): pull only.
pub const READ_TOKEN_SCOPES: [&str; 1] = ["read:package"];

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
    /// The job's run; only the development branch (v16+) lists it, 0 when absent.
    #[serde(default)]
    pub run_id: i64,
}

/// `ActionRun`: the fields that decide how far a job's code is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActionRun {
    pub id: i64,
    /// The webhook event, e.g. `push`, `pull_request`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub event: String,
    /// The `on:` event of the workflow that matched, e.g. `pull_request_target`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub trigger_event: String,
    /// A pull request from a fork or from an untrusted user.
    #[serde(default)]
    pub is_fork_pull_request: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
}

impl ActionRun {
    /// Forgejo's own rule (`GetSecretsOfTask`): a fork pull request's run gets no secrets and a
    /// read-only token, except under `pull_request_target`, which runs the base branch's workflow.
    pub fn is_untrusted(&self) -> bool {
        self.is_fork_pull_request && self.trigger_event != "pull_request_target"
    }
}

#[derive(Deserialize)]
pub(crate) struct ActionRunListWire {
    #[serde(default)]
    pub total_count: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub workflow_runs: Vec<ActionRun>,
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
    /// The external login name; only site admins can set it (and see it), so fkr-qemu marks its CI
    /// users with it (see `controller::ciuser`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub login_name: String,
    /// The authentication source; 0 = local (password) users.
    #[serde(default)]
    pub source_id: i64,
}

/// A CI user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub email: String,
    pub password: Secret,
    pub visibility: Visibility,
    /// Written to `login_name` at creation: the proof that fkr-qemu created the user, and for
    /// which repository.
    pub login_name: String,
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
    pub login_name: &'a str,
    pub source_id: i64,
}

/// Every edit carries `login_name` and `source_id`: Forgejo v15's `EditUser` writes `login_name`
/// even when the field is absent (clearing our marker), newer versions want both or neither.
#[derive(Serialize)]
pub(crate) struct EditUserBody<'a> {
    pub password: &'a str,
    pub must_change_password: bool,
    pub login_name: &'a str,
    pub source_id: i64,
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
