//! A job's registry credentials: the repository's CI user (created on first use, proven ours before
//! it is ever taken back) and the job's `orch-…` token, revoked again by the job or the sweep.
//!
//! Every call that authenticates as a CI user goes through [`with_password_retry`]: when Forgejo
//! refuses the stored password (someone changed it), the user is taken back with a new password —
//! only with proof it is ours — and the call is retried once. That rule exists once, here.

use std::future::Future;

use time::OffsetDateTime;

use super::ciuser::{candidate_usernames, marked_repo, marker, CiUser, CiUserStore};
use super::config::{ForkAccess, TokenPolicy};
use crate::forgejo::{self, AccessToken, Job, Repository, UserCreation};
use crate::ops::{Metrics, TokenAccess};
use crate::secret::Secret;

/// Why a CI user or a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Forgejo(#[from] forgejo::Error),
    /// `ci-users.json` could not be written.
    #[error(transparent)]
    Store(#[from] super::Error),
    /// A password reset was needed for a user the store does not know.
    #[error("no CI user of repository id {repo_id} in {path}", path = .path.display())]
    NotStored {
        repo_id: i64,
        path: std::path::PathBuf,
    },
    /// The CI user's name is held by a Forgejo account with no proof that fkr-qemu created it for
    /// this repository (README.md, "CI users"): never adopted.
    #[error(
        "CI user {username} for {repository} (repository id {repo_id}) cannot be used: {why}. \
         fkr-qemu never takes over an account it cannot prove it created for this repository. \
         A site admin checks that account and deletes or renames it (e.g. DELETE \
         /api/v1/admin/users/{username}); the next job then creates the CI user"
    )]
    Refused {
        username: String,
        repository: String,
        repo_id: i64,
        why: String,
    },
}

impl CredentialError {
    /// Forgejo answered 401: the password (or token) was refused.
    fn is_unauthorized(&self) -> bool {
        matches!(self, CredentialError::Forgejo(e) if e.status() == Some(401))
    }
}

/// A CI user as a job uses it: enough to authenticate and to take it back.
#[derive(Debug, Clone)]
pub struct CiUserRef {
    /// The repository the user belongs to (0: a version-1 entry not bound yet).
    pub repo_id: i64,
    pub username: String,
    pub password: Secret,
}

/// A minted token: enough to revoke it (the secret itself goes to the VM only).
#[derive(Debug, Clone)]
pub struct TokenRef {
    pub user: CiUserRef,
    pub id: i64,
    pub name: String,
}

/// Runs `op` with the user's password; on a 401, takes the user back with a new password (only
/// with proof it is ours, see [`Credentials::reset_password`]) and runs `op` once more. An
/// unbound user (`repo_id` 0) is never taken back: nothing proves it is still ours; nor is any
/// user when `may_reset` is false (the server's admin token routes need no password, so a 401
/// there is not about the password).
pub async fn with_password_retry<T, Op, Fut, Reset, ResetFut>(
    user: &mut CiUserRef,
    may_reset: bool,
    mut op: Op,
    reset: Reset,
) -> Result<T, CredentialError>
where
    Op: FnMut(Secret) -> Fut,
    Fut: Future<Output = Result<T, forgejo::Error>>,
    Reset: FnOnce(i64, String) -> ResetFut,
    ResetFut: Future<Output = Result<Secret, CredentialError>>,
{
    match op(user.password.clone())
        .await
        .map_err(CredentialError::from)
    {
        Err(e) if e.is_unauthorized() && may_reset && user.repo_id > 0 => {
            user.password = reset(user.repo_id, user.username.clone()).await?;
            Ok(op(user.password.clone()).await?)
        }
        other => other,
    }
}

/// The keys CI-user passwords are derived from (`forgejo.ci_password_key_file`): one per line,
/// the first derives, every one is accepted — so a key is rotated without two hosts undoing each
/// other's resets (README.md, "Several hosts").
#[derive(Clone, Default)]
pub struct PasswordKeys(Vec<Secret>);

impl PasswordKeys {
    /// Reads a key file: one key per non-empty line. Refused unless root owns it and no one else
    /// may read or write it (group and others have no permission at all).
    pub fn read(path: &std::path::Path) -> Result<PasswordKeys, super::Error> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| super::Error::io("cannot read", path, e))?;
        let why = if meta.uid() != 0 {
            Some(format!("is owned by uid {}, not root", meta.uid()))
        } else if meta.mode() & 0o077 != 0 {
            Some(format!(
                "has mode {:04o}: its group or others may read or write it",
                meta.mode() & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(super::Error::KeyFileUnsafe {
                path: path.to_owned(),
                why,
            });
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| super::Error::io("cannot read", path, e))?;
        let keys: Vec<Secret> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(Secret::new)
            .collect();
        if keys.is_empty() {
            return Err(super::Error::KeyFileEmpty {
                path: path.to_owned(),
            });
        }
        Ok(PasswordKeys(keys))
    }

    /// Keys given directly (tests).
    #[cfg(test)]
    pub fn new(keys: Vec<Secret>) -> PasswordKeys {
        PasswordKeys(keys)
    }

    /// Whether passwords are derived at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn identity(repo_id: i64, username: &str) -> String {
        format!("repo:{repo_id}:{username}")
    }

    /// The password every host sets for this CI user; `None` without keys.
    fn current(&self, repo_id: i64, username: &str) -> Option<Secret> {
        let key = self.0.first()?;
        Some(forgejo::derived_password(
            key.expose().as_bytes(),
            &Self::identity(repo_id, username),
        ))
    }

    /// Whether `password` is the one the first key derives for this CI user.
    fn is_current(&self, repo_id: i64, username: &str, password: &Secret) -> bool {
        self.current(repo_id, username)
            .is_some_and(|c| c.expose() == password.expose())
    }

    /// Whether one of these keys derives `password` for this CI user.
    fn derives(&self, repo_id: i64, username: &str, password: &Secret) -> bool {
        self.accepted(repo_id, username)
            .iter()
            .any(|c| c.expose() == password.expose())
    }

    /// Every password a host with one of these keys may have set, the current one first.
    fn accepted(&self, repo_id: i64, username: &str) -> Vec<Secret> {
        self.0
            .iter()
            .map(|k| {
                forgejo::derived_password(k.expose().as_bytes(), &Self::identity(repo_id, username))
            })
            .collect()
    }
}

/// The CI users of this host and the tokens minted for them.
pub struct Credentials {
    pub client: forgejo::Client,
    /// `ci-users.json`; its lock also serialises CI-user creation. With password keys it is a
    /// record, not the source of truth: every host derives the same passwords.
    pub users: tokio::sync::Mutex<CiUserStore>,
    pub policy: TokenPolicy,
    pub metrics: Metrics,
    /// Marks the tokens this host mints (`orch-<job>-<host_id>-…`).
    pub host_id: String,
    pub keys: PasswordKeys,
    /// Every job-list request of this host goes through it (rate limit, shared answers).
    pub job_lists: super::joblist::JobLister,
}

impl Credentials {
    /// A password reset can help a refused call: not with the admin token routes, which take no
    /// password.
    fn may_reset(&self) -> bool {
        !self.client.uses_admin_token_routes()
    }

    /// A CI user's password: derived from the shared key when there is one, else random.
    fn new_password(&self, repo_id: i64, username: &str) -> Secret {
        self.keys
            .current(repo_id, username)
            .unwrap_or_else(forgejo::generate_password)
    }

    /// A derived password the account already has (the current key's or an older one's), so
    /// that no reset is needed; `None` without keys or when none works.
    async fn working_derived_password(
        &self,
        repo_id: i64,
        username: &str,
    ) -> Result<Option<Secret>, CredentialError> {
        for candidate in self.keys.accepted(repo_id, username) {
            if self.client.verify_password(username, &candidate).await? {
                return Ok(Some(candidate));
            }
        }
        Ok(None)
    }

    /// What the job's registry token may do: write, unless Forgejo treats the job's run as
    /// untrusted (a pull request from a fork) and the repository is not on
    /// `tokens.fork_write_repos`.
    pub async fn token_access(&self, job: &Job, repo: &Repository) -> TokenAccess {
        let (untrusted, why) = self.run_is_untrusted(job, repo).await;
        if !untrusted {
            return TokenAccess::Write;
        }
        if self.policy.fork_write_allowed(&repo.full_name) {
            tracing::info!(
                "job {}: {why}; {} is on tokens.fork_write_repos: write token",
                job.id,
                repo.full_name
            );
            return TokenAccess::Write;
        }
        let access = match self.policy.fork_pull_requests {
            ForkAccess::Read => TokenAccess::Read,
            ForkAccess::None => TokenAccess::None,
        };
        tracing::info!("job {}: {why}: registry access {}", job.id, access.as_str());
        access
    }

    /// Whether the job's run is untrusted, with the reason. The run comes from the job's `run_id`
    /// when the server lists it (v16+); otherwise from the repository's waiting and running runs,
    /// where any untrusted run (or none at all, or an error) makes the job untrusted: which of
    /// them is this job's cannot be told.
    async fn run_is_untrusted(&self, job: &Job, repo: &Repository) -> (bool, String) {
        if job.run_id > 0 {
            return match self
                .client
                .action_run(&repo.owner, &repo.name, job.run_id)
                .await
            {
                Ok(Some(run)) if run.is_untrusted() => (
                    true,
                    format!(
                        "run {} is a pull request from a fork ({})",
                        run.id, run.event
                    ),
                ),
                Ok(Some(_)) => (false, String::new()),
                Ok(None) => (
                    true,
                    format!("run {} not found: treated as a fork", job.run_id),
                ),
                Err(e) => (
                    true,
                    format!("cannot read run {}: {e}; treated as a fork", job.run_id),
                ),
            };
        }
        match self
            .client
            .action_runs(&repo.owner, &repo.name, &["waiting", "running"])
            .await
        {
            Ok(runs) if runs.is_empty() => (
                true,
                "no waiting or running run of the repository: treated as a fork".to_owned(),
            ),
            Ok(runs) => match runs.iter().find(|r| r.is_untrusted()) {
                Some(r) => (
                    true,
                    format!(
                        "run {} of the repository is a pull request from a fork, and the job's run cannot be told apart",
                        r.id
                    ),
                ),
                None => (false, String::new()),
            },
            Err(e) => (
                true,
                format!("cannot list the repository's runs: {e}; treated as a fork"),
            ),
        }
    }

    /// Mints the job's token `name` for `user` with `scopes`, taking the user back once if its
    /// password is refused.
    pub async fn mint_token(
        &self,
        user: &CiUserRef,
        name: &str,
        scopes: &[&str],
    ) -> Result<(TokenRef, Secret), CredentialError> {
        let mut user = user.clone();
        let username = user.username.clone();
        let minted = with_password_retry(
            &mut user,
            self.may_reset(),
            |password| {
                let (client, username) = (&self.client, &username);
                async move { client.create_token(username, &password, name, scopes).await }
            },
            |repo_id, username| async move { self.reset_password(repo_id, &username).await },
        )
        .await?;
        let token = TokenRef {
            user,
            id: minted.id,
            name: minted.name,
        };
        Ok((token, minted.token))
    }

    /// Revokes a token, taking its user back once if the password is refused.
    pub async fn revoke_token(&self, token: &TokenRef) -> Result<bool, CredentialError> {
        let mut user = token.user.clone();
        let username = user.username.clone();
        with_password_retry(
            &mut user,
            self.may_reset(),
            |password| {
                let (client, username) = (&self.client, &username);
                async move { client.delete_token(username, &password, token.id).await }
            },
            |repo_id, username| async move { self.reset_password(repo_id, &username).await },
        )
        .await
    }

    /// Every token of `user`, taking the user back once if the password is refused (`user` then
    /// holds the new password).
    pub async fn list_tokens(
        &self,
        user: &mut CiUserRef,
    ) -> Result<Vec<AccessToken>, CredentialError> {
        let username = user.username.clone();
        with_password_retry(
            user,
            self.may_reset(),
            |password| {
                let (client, username) = (&self.client, &username);
                async move { client.list_tokens(username, &password).await }
            },
            |repo_id, username| async move { self.reset_password(repo_id, &username).await },
        )
        .await
    }

    /// How many stored CI users have a password the first key does not derive (an older key's,
    /// or a random one from before the key file); 0 without keys.
    pub async fn users_on_older_keys(&self) -> usize {
        if self.keys.is_empty() {
            return 0;
        }
        let store = self.users.lock().await;
        store
            .users()
            .filter(|u| u.repo_id > 0 && !self.keys.is_current(u.repo_id, &u.username, &u.password))
            .count()
    }

    /// Moves a stored CI user whose password none of this host's keys derives (the key it came
    /// from was retired, or it predates the key file) to the first key's password, so that a
    /// retired key mints no more tokens: only when the account still carries our marker for the
    /// repository. `None`: nothing to move, or no proof (the stored password is kept; a refused
    /// password is handled like any other).
    async fn move_to_current_key(&self, u: &CiUser) -> Result<Option<Secret>, CredentialError> {
        if self.keys.is_empty()
            || !self.may_reset()
            || u.repo_id <= 0
            || self.keys.derives(u.repo_id, &u.username, &u.password)
        {
            return Ok(None);
        }
        let existing = self.client.user(&u.username).await?;
        let proven = existing
            .as_ref()
            .and_then(|a| marked_repo(&a.login_name, a.source_id))
            == Some(u.repo_id);
        if !proven {
            return Ok(None);
        }
        let Some(password) = self.keys.current(u.repo_id, &u.username) else {
            return Ok(None);
        };
        self.client
            .set_user_password(&u.username, &password, &marker(u.repo_id))
            .await?;
        tracing::info!(
            "moved CI user {} to the first password key (its password came from a key this host no longer has, or from before the key file)",
            u.username
        );
        Ok(Some(password))
    }

    /// Every CI user in the store.
    pub async fn stored_users(&self) -> Vec<CiUserRef> {
        let store = self.users.lock().await;
        store
            .users()
            .map(|u| CiUserRef {
                repo_id: u.repo_id,
                username: u.username.clone(),
                password: u.password.clone(),
            })
            .collect()
    }

    /// Sets a new password for the stored CI user of repository `repo_id` and stores it — only
    /// when the Forgejo account of that name still carries our marker for that repository. (A
    /// stored name proves nothing once the account may have been deleted and registered again by
    /// someone else.)
    pub async fn reset_password(
        &self,
        repo_id: i64,
        username: &str,
    ) -> Result<Secret, CredentialError> {
        let mut store = self.users.lock().await;
        let Some(stored) = store.get(repo_id).cloned() else {
            return Err(CredentialError::NotStored {
                repo_id,
                path: store.path().to_owned(),
            });
        };
        let existing = self.client.user(username).await?;
        let proven = existing
            .as_ref()
            .and_then(|u| marked_repo(&u.login_name, u.source_id))
            == Some(repo_id);
        if !proven {
            self.metrics.ci_user_refused();
            return Err(CredentialError::Refused {
                username: username.to_owned(),
                repository: stored.repository.clone(),
                repo_id,
                why: match existing {
                    None => "the account no longer exists in Forgejo".to_owned(),
                    Some(_) => "its stored password is refused and the account does not carry \
                                fkr-qemu's marker for this repository"
                        .to_owned(),
                },
            });
        }
        // Another host (or this one before a lost state file) may have set the derived password
        // already: then there is nothing to reset.
        if let Some(password) = self.working_derived_password(repo_id, username).await? {
            store.put(CiUser {
                password: password.clone(),
                ..stored
            })?;
            tracing::info!("CI user {username} has the password derived from the shared key");
            return Ok(password);
        }
        let password = self.new_password(repo_id, username);
        self.client
            .set_user_password(username, &password, &marker(repo_id))
            .await?;
        store.put(CiUser {
            password: password.clone(),
            ..stored
        })?;
        tracing::info!("reset the password of CI user {username} (the stored one was refused)");
        Ok(password)
    }

    /// The CI user of `repo`, created on first use (see `ciuser` for the rule and the proof an
    /// existing account must carry). Concurrent jobs of one repository create it once (the
    /// store's lock is held across the creation).
    pub async fn ensure_ci_user(&self, repo: &Repository) -> Result<CiUserRef, CredentialError> {
        let (owner, name, repo_id) = (repo.owner.as_str(), repo.name.as_str(), repo.id);
        let full_name = format!("{owner}/{name}");
        let found = |u: &CiUser| CiUserRef {
            repo_id,
            username: u.username.clone(),
            password: u.password.clone(),
        };
        let mut store = self.users.lock().await;
        if let Some(mut u) = store.get(repo_id).cloned() {
            if let Some(password) = self.move_to_current_key(&u).await? {
                u.password = password;
                store.put(u.clone())?;
            }
            if u.repository != full_name {
                // Renamed or transferred: same id, same user; keep the record readable.
                tracing::info!(
                    "repository id {repo_id} is now {full_name} (was {}); it keeps CI user {}",
                    u.repository,
                    u.username
                );
                store.put(CiUser {
                    repository: full_name.clone(),
                    ..u.clone()
                })?;
            }
            return Ok(found(&u));
        }
        if let Some(old) = store.unbound(owner, name).cloned() {
            // A version-1 entry: bind it to this id only if its password still works (only we
            // know it), and mark the account so that it can be proven later without the file.
            if self
                .client
                .verify_password(&old.username, &old.password)
                .await?
            {
                self.client
                    .set_user_password(&old.username, &old.password, &marker(repo_id))
                    .await?;
                tracing::info!(
                    "bound CI user {} to {full_name} (repository id {repo_id})",
                    old.username
                );
                let bound = CiUser {
                    repo_id,
                    repository: full_name,
                    ..old
                };
                store.put(bound.clone())?;
                return Ok(found(&bound));
            }
            tracing::warn!(
                "the stored password of CI user {} ({full_name}, from an older state file) is \
                 refused; not using it",
                old.username
            );
        }
        // Names held by accounts fkr-qemu cannot prove it made for this repository (a squatter on
        // the name or on its e-mail address): never adopted, but they must not block the
        // repository's CI while the other, injective name is free.
        let mut refusals: Vec<(String, String)> = Vec::new();
        for username in candidate_usernames(owner, name, repo_id) {
            if let Some(holder) = store.held_by_other(&username, repo_id) {
                tracing::info!(
                    "CI user name {username} belongs to {holder}; trying the next name for {full_name}"
                );
                continue;
            }
            let mut new = self.client.new_ci_user(&username, &marker(repo_id));
            new.password = self.new_password(repo_id, &username);
            let mut password = new.password.clone();
            tracing::info!("creating CI user {username} for {full_name}");
            match self.client.create_user(&new).await? {
                UserCreation::Created(_) => {}
                UserCreation::AlreadyExists { message } => {
                    let existing = self.client.user(&username).await?;
                    match existing
                        .as_ref()
                        .map(|u| marked_repo(&u.login_name, u.source_id))
                    {
                        Some(Some(id)) if id == repo_id => {
                            // Ours for this repository (state lost or another host). With a
                            // shared key it already has a password this host can derive.
                            if let Some(p) =
                                self.working_derived_password(repo_id, &username).await?
                            {
                                tracing::info!("CI user {username} exists already (another host or a lost state file); using the password derived from the shared key");
                                password = p;
                            } else if !self.may_reset() {
                                // The admin token routes mint and revoke without the user's
                                // password: leave whatever another host set.
                                tracing::info!("CI user {username} exists already; the server's admin token routes need no password of it");
                            } else {
                                tracing::info!("CI user {username} exists already; resetting its password (it carries our marker for repository id {repo_id})");
                                self.client
                                    .set_user_password(&username, &password, &marker(repo_id))
                                    .await?;
                            }
                        }
                        Some(Some(other)) => {
                            tracing::info!("CI user name {username} belongs to repository id {other}; trying the next name for {full_name}");
                            continue;
                        }
                        Some(None) => {
                            tracing::warn!("CI user name {username} is held by a Forgejo account without fkr-qemu's marker; not using it, trying the next name for {full_name}");
                            refusals.push((
                                username.clone(),
                                "a Forgejo account of that name exists without fkr-qemu's marker \
                                 (its login_name is not fkr-qemu:repo:<id> of this repository)"
                                    .to_owned(),
                            ));
                            continue;
                        }
                        None => {
                            tracing::warn!("Forgejo refused to create CI user {username} ({message}) and shows no account of that name (reserved, or its e-mail address {} is taken); trying the next name for {full_name}", new.email);
                            refusals.push((
                                username.clone(),
                                format!("Forgejo refused to create it ({message}) and shows no account of that name (the name is reserved or its e-mail address {} is taken)", new.email),
                            ));
                            continue;
                        }
                    }
                }
            }
            if let Some((taken, _)) = refusals.first() {
                tracing::warn!("CI user of {full_name} is {username}: the name {taken} is held by an account fkr-qemu did not create for this repository");
            }
            let user = CiUser {
                username,
                repository: full_name,
                repo_id,
                password,
                created_at: OffsetDateTime::now_utc(),
            };
            store.put(user.clone())?;
            return Ok(found(&user));
        }
        let (username, why) = match refusals.split_first() {
            Some(((first, why), rest)) => (
                first.clone(),
                std::iter::once(why.clone())
                    .chain(
                        rest.iter()
                            .map(|(n, w)| format!("the other name {n} cannot be used either: {w}")),
                    )
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            None => (
                candidate_usernames(owner, name, repo_id)
                    .pop()
                    .unwrap_or_default(),
                "every name the rule gives is held by another repository".to_owned(),
            ),
        };
        self.metrics.ci_user_refused();
        Err(CredentialError::Refused {
            username,
            repository: full_name,
            repo_id,
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn status(code: u16) -> forgejo::Error {
        forgejo::Error::Api {
            method: "GET",
            route: "/users/{username}/tokens",
            status: code,
            message: String::new(),
        }
    }

    fn user(repo_id: i64) -> CiUserRef {
        CiUserRef {
            repo_id,
            username: "alice-web-ci".into(),
            password: Secret::new("old"),
        }
    }

    /// `op` answers from `answers` in turn and records the password it was given.
    async fn run(
        repo_id: i64,
        answers: Vec<Result<u32, forgejo::Error>>,
        reset: Result<&'static str, ()>,
    ) -> (Result<u32, CredentialError>, Vec<String>, usize, CiUserRef) {
        let answers = std::sync::Mutex::new(answers.into_iter());
        let seen = std::sync::Mutex::new(Vec::new());
        let resets = AtomicUsize::new(0);
        let mut u = user(repo_id);
        let r = with_password_retry(
            &mut u,
            true,
            |pw| {
                seen.lock().unwrap().push(pw.expose().to_owned());
                let next = answers.lock().unwrap().next().expect("an answer");
                async move { next }
            },
            |id, name| {
                resets.fetch_add(1, Ordering::SeqCst);
                assert_eq!((id, name.as_str()), (repo_id, "alice-web-ci"));
                async move {
                    reset
                        .map(Secret::new)
                        .map_err(|()| CredentialError::NotStored {
                            repo_id: id,
                            path: "ci-users.json".into(),
                        })
                }
            },
        )
        .await;
        let seen = seen.into_inner().unwrap();
        (r, seen, resets.into_inner(), u)
    }

    #[tokio::test]
    async fn a_refused_password_is_reset_once_and_the_call_retried_with_the_new_one() {
        let (r, seen, resets, u) = run(7, vec![Err(status(401)), Ok(1)], Ok("new")).await;
        assert_eq!(r.unwrap(), 1);
        assert_eq!(seen, ["old", "new"]);
        assert_eq!(resets, 1);
        assert_eq!(
            u.password.expose(),
            "new",
            "the caller keeps the new password"
        );
    }

    #[tokio::test]
    async fn a_second_refusal_is_an_error_not_a_loop() {
        let (r, seen, resets, _) =
            run(7, vec![Err(status(401)), Err(status(401))], Ok("new")).await;
        assert!(r.unwrap_err().is_unauthorized());
        assert_eq!((seen.len(), resets), (2, 1));
    }

    #[tokio::test]
    async fn other_errors_and_unbound_users_are_never_reset() {
        let (r, seen, resets, _) = run(7, vec![Err(status(500))], Ok("new")).await;
        assert!(matches!(r, Err(CredentialError::Forgejo(_))));
        assert_eq!((seen.len(), resets), (1, 0));
        // An unbound entry (older state file): nothing proves the account is still ours.
        let (r, seen, resets, _) = run(0, vec![Err(status(401))], Ok("new")).await;
        assert!(r.unwrap_err().is_unauthorized());
        assert_eq!((seen.len(), resets), (1, 0));
    }

    #[tokio::test]
    async fn a_failed_reset_ends_it() {
        let (r, seen, resets, u) = run(7, vec![Err(status(401))], Err(())).await;
        assert!(matches!(r, Err(CredentialError::NotStored { .. })));
        assert_eq!((seen.len(), resets), (1, 1));
        assert_eq!(u.password.expose(), "old");
    }
}
