//! Attacks on a job's Forgejo side (CI user and registry token) against the in-memory Forgejo
//! emulator: the real `registry_login`/`Credentials` code, no VM. Each test plays a hostile
//! repository owner or a stranger with an account of their own.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use url::Url;

use super::ciuser::{marker, CiUserStore};
use super::config::ConfigLayer;
use super::credentials::{Credentials, PasswordKeys};
use super::job::{registry_login, release, Held, StepError};
use super::joblist::JobLister;
use super::userdata::{self, RegistryAuth, RunnerParams};
use super::Config;
use crate::forgejo::{self, Job, JobStatus, Repository};
use crate::ops::Metrics;
use crate::secret::Secret;

// The emulator allows its own unused items (it serves many test crates).
#[path = "../../tests/emulator/mod.rs"]
pub(crate) mod emulator;

use emulator::{Emulator, Options, RunTrigger};

struct World {
    emu: Emulator,
    ctx: Arc<Ctx>,
    _state: tempfile::TempDir,
}

async fn world_with(opts: Options, tokens_toml: &str) -> World {
    let emu = Emulator::start(opts).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let ctx = ctx_for(&emu, state.path(), tokens_toml);
    World {
        emu,
        ctx,
        _state: state,
    }
}

async fn world() -> World {
    world_with(Options::default(), "").await
}

/// A controller context as `serve` builds it, on `state_dir` (a second one on another directory
/// is "another host" or "the state file was lost").
fn ctx_for(emu: &Emulator, state_dir: &Path, tokens_toml: &str) -> Arc<Ctx> {
    host_ctx(emu, state_dir, tokens_toml, "test", PasswordKeys::default())
}

/// The context of host `host_id` with password keys `keys` (several hosts share one emulator).
fn host_ctx(
    emu: &Emulator,
    state_dir: &Path,
    tokens_toml: &str,
    host_id: &str,
    keys: PasswordKeys,
) -> Arc<Ctx> {
    Arc::new(host_credentials(emu, state_dir, tokens_toml, host_id, keys))
}

/// Host `host_id`'s credentials against the emulator, its state in `state_dir`.
pub(crate) fn host_credentials(
    emu: &Emulator,
    state_dir: &Path,
    tokens_toml: &str,
    host_id: &str,
    keys: PasswordKeys,
) -> Credentials {
    let text = format!(
        "state_dir = {:?}\n[forgejo]\nurl = {:?}\nretries = 0\n{tokens_toml}",
        state_dir.display().to_string(),
        emu.url()
    );
    let token = emu.admin_token().to_owned();
    let env = move |k: &str| (k == "FORGEJO_ADMIN_TOKEN").then(|| token.clone());
    let cfg = Config::from_parts(&text, Path::new("test.toml"), &env, &ConfigLayer::default())
        .expect("test config");
    let client = forgejo::Client::new(cfg.forgejo.clone(), cfg.admin_token.clone()).unwrap();
    let users = CiUserStore::open(cfg.ci_users_path()).unwrap();
    Credentials {
        client,
        users: tokio::sync::Mutex::new(users),
        policy: cfg.tokens.clone(),
        metrics: Metrics::new(),
        host_id: host_id.to_owned(),
        keys,
        // No gap: these tests are about credentials and claims, not the request rate.
        job_lists: JobLister::new(std::time::Duration::ZERO),
    }
}

pub(crate) fn job_of(added: &emulator::AddedJob, with_run_id: bool) -> Job {
    Job {
        id: added.id,
        handle: added.handle.clone(),
        attempt: 1,
        repo_id: added.repo_id,
        owner_id: 0,
        name: "build".into(),
        runs_on: vec!["external-host".into()],
        needs: vec![],
        task_id: 0,
        status: JobStatus::Waiting,
        run_id: if with_run_id { added.run_id } else { 0 },
    }
}

type Ctx = Credentials;

async fn repo(ctx: &Ctx, id: i64) -> Repository {
    ctx.client.repository(id).await.unwrap()
}

/// What a job's preparation holds; `release` gives it back the way the job does.
struct Res {
    ctx: Arc<Ctx>,
    held: Held,
}

impl Res {
    /// Returns how many release steps failed.
    async fn release(&mut self) -> usize {
        let vm = crate::types::VmName::generate();
        release(
            &*self.ctx,
            &Default::default(),
            &vm,
            std::mem::take(&mut self.held),
        )
        .await
    }
}

/// Runs the job's Forgejo preparation; returns the login (if any) and the resources holding the
/// token (release them to revoke it).
async fn login(ctx: &Arc<Ctx>, job: &Job) -> (Result<Option<(String, Secret)>, StepError>, Res) {
    let mut held = Held::default();
    let r = repo(ctx, job.repo_id).await;
    let out = registry_login(
        &**ctx,
        &ctx.metrics,
        &Default::default(),
        &ctx.host_id,
        job,
        &r,
        &mut held,
    )
    .await;
    (
        out,
        Res {
            ctx: ctx.clone(),
            held,
        },
    )
}

/// The scopes of the token `name` of user `login`, as Forgejo stored them.
fn token_scopes(emu: &Emulator, login: &str, name_prefix: &str) -> Vec<Vec<String>> {
    emu.with_state(|s| {
        let uid = s.user_by_login(login).map(|u| u.id);
        s.tokens
            .iter()
            .filter(|t| Some(t.user_id) == uid && t.name.starts_with(name_prefix))
            .map(|t| t.scopes.clone())
            .collect()
    })
}

/// The registry credentials the VM's user-data carries: `user:token` of each auth file.
fn seed_registry_auth(login: Option<&(String, Secret)>) -> Vec<String> {
    let url = Url::parse("http://10.0.0.1:3000/").unwrap();
    let runner_token = Secret::new("runner-token");
    let auth = login.map(|(u, t)| RegistryAuth {
        host: RegistryAuth::host_of(&url),
        username: u,
        token: t,
    });
    let doc = userdata::render(
        &RunnerParams {
            forgejo_url: &url,
            runner_uuid: "uuid",
            runner_token: &runner_token,
            label: "external-host",
            handle: "h",
        },
        auth.as_ref(),
    )
    .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut pairs = Vec::new();
    let mut path = "";
    for line in doc.lines() {
        if let Some(p) = line.strip_prefix("- path: ") {
            path = p;
        } else if let Some(c) = line.strip_prefix("  content: ") {
            if path == userdata::DOCKER_CONFIG_PATH || path == userdata::CONTAINERS_AUTH_PATH {
                let json: serde_json::Value =
                    serde_json::from_slice(&b64.decode(c).unwrap()).unwrap();
                let pair = json["auths"]["10.0.0.1:3000"]["auth"].as_str().unwrap();
                pairs.push(String::from_utf8(b64.decode(pair).unwrap()).unwrap());
            }
        }
    }
    pairs
}

fn refusals(ctx: &Ctx) -> String {
    ctx.metrics
        .encode()
        .lines()
        .find(|l| l.starts_with("fkr_qemu_ci_user_refusals_total "))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn dash_ambiguous_repositories_never_share_a_ci_user_in_either_order() {
    for first_is_dashed_owner in [false, true] {
        let w = world().await;
        let a = w.emu.add_job("acme/my-app", &["external-host"], "build");
        let b = w.emu.add_job("acme-my/app", &["external-host"], "build");
        let order = if first_is_dashed_owner {
            [&b, &a]
        } else {
            [&a, &b]
        };
        let mut logins = Vec::new();
        let mut held = Vec::new();
        for added in order {
            let (out, res) = login(&w.ctx, &job_of(added, false)).await;
            let (user, token) = out.unwrap().expect("a push job gets a token");
            logins.push((added.repo_id, user.clone(), token));
            held.push(res);
        }
        let (ua, ub) = (&logins[0].1, &logins[1].1);
        assert_ne!(
            ua, ub,
            "order {first_is_dashed_owner}: one CI user for two repositories"
        );
        // Each token authenticates as its own repository's user, marked for that repository id.
        for (repo_id, user, token) in &logins {
            let (owner_login, marked) = w.emu.with_state(|s| {
                let t = s
                    .tokens
                    .iter()
                    .find(|t| t.secret == token.expose())
                    .unwrap();
                let u = s.user(t.user_id).unwrap();
                (u.login.clone(), u.login_name.clone())
            });
            assert_eq!(&owner_login, user);
            assert_eq!(marked, marker(*repo_id));
        }
        let names: Vec<&str> = logins.iter().map(|l| l.1.as_str()).collect();
        assert!(names.contains(&"acme-my-app-ci"), "{names:?}");
        assert!(
            names.contains(&format!("acme-my-app-{}_ci", b.repo_id).as_str()),
            "{names:?}"
        );
        for mut r in held {
            assert_eq!(r.release().await, 0);
        }
    }
}

#[tokio::test]
async fn a_recreated_repository_does_not_inherit_the_renamed_ones_ci_user() {
    let w = world().await;
    let old = w.emu.add_job("acme/app", &["external-host"], "build");
    let (out, mut res) = login(&w.ctx, &job_of(&old, false)).await;
    assert_eq!(out.unwrap().unwrap().0, "acme-app-ci");
    res.release().await;
    // The owner renames acme/app and someone (here: the same org) creates a new acme/app.
    w.emu.with_state(|s| {
        s.repos
            .iter_mut()
            .find(|r| r.id == old.repo_id)
            .unwrap()
            .name = "app-old".into()
    });
    let new = w.emu.add_job("acme/app", &["external-host"], "build");
    assert_ne!(new.repo_id, old.repo_id);
    // Another host, or this one after losing its state file: only Forgejo's marker decides.
    let other_host = tempfile::tempdir().unwrap();
    for ctx in [w.ctx.clone(), ctx_for(&w.emu, other_host.path(), "")] {
        let (out, mut res) = login(&ctx, &job_of(&new, false)).await;
        let user = out.unwrap().unwrap().0;
        assert_eq!(user, format!("acme-app-{}_ci", new.repo_id));
        res.release().await;
    }
    // The renamed repository keeps its user.
    let (out, mut res) = login(&w.ctx, &job_of(&old, false)).await;
    assert_eq!(out.unwrap().unwrap().0, "acme-app-ci");
    res.release().await;
}

/// The squatter's account is untouched: same password, no token.
fn assert_untouched(emu: &Emulator, login: &str) {
    let (pw, tokens) = emu.with_state(|s| {
        let u = s.user_by_login(login).unwrap();
        (
            u.password.clone(),
            s.tokens.iter().filter(|t| t.user_id == u.id).count(),
        )
    });
    assert_eq!((pw.as_str(), tokens), ("squatter-password", 0));
}

/// A squatter blocks no repository while the other, injective name (`<stem>-<repo id>_ci`) is
/// free: the job gets a CI user and a token under that name, the squatter's account stays as it is.
async fn squatted_then_fallback(squat: impl FnOnce(&Emulator)) {
    let w = world().await;
    squat(&w.emu);
    let added = w.emu.add_job("acme/web", &["external-host"], "build");
    let fallback = super::ciuser::id_username("acme", "web", added.repo_id);
    let (out, mut res) = login(&w.ctx, &job_of(&added, false)).await;
    let (user, token) = out.unwrap().expect("a login");
    assert_eq!(user, fallback);
    assert!(!token.expose().is_empty());
    assert_eq!(w.emu.token_names(&fallback).len(), 1);
    let stored = w
        .ctx
        .users
        .lock()
        .await
        .get(added.repo_id)
        .cloned()
        .unwrap();
    assert_eq!(stored.username, fallback);
    let marked = w
        .emu
        .with_state(|s| s.user_by_login(&fallback).unwrap().login_name.clone());
    assert_eq!(marked, marker(added.repo_id));
    assert_eq!(refusals(&w.ctx), "fkr_qemu_ci_user_refusals_total 0");
    assert_eq!(res.release().await, 0);
}

#[tokio::test]
async fn a_squatter_on_the_ci_users_name_is_never_adopted_and_the_other_name_is_used() {
    squatted_then_fallback(|emu| {
        // A stranger signs up first with the CI user's name and exactly the address fkr-qemu
        // derives.
        emu.register_user(
            "acme-web-ci",
            "acme-web-ci@fkr-qemu.invalid",
            "squatter-password",
        );
    })
    .await;
}

#[tokio::test]
async fn a_squatter_on_the_ci_users_email_is_never_adopted_and_the_other_name_is_used() {
    squatted_then_fallback(|emu| {
        // Another name, but the address fkr-qemu derives for the first name.
        emu.register_user(
            "mallory",
            "acme-web-ci@fkr-qemu.invalid",
            "squatter-password",
        );
    })
    .await;
}

#[tokio::test]
async fn squatters_on_both_names_are_refused_and_never_adopted() {
    let w = world().await;
    let repo_id = w.emu.add_repo("acme", "web");
    let fallback = super::ciuser::id_username("acme", "web", repo_id);
    w.emu.register_user(
        "acme-web-ci",
        "acme-web-ci@fkr-qemu.invalid",
        "squatter-password",
    );
    w.emu
        .register_user(&fallback, "mallory2@example.org", "squatter-password");
    let added = w.emu.add_job("acme/web", &["external-host"], "build");
    assert_eq!(added.repo_id, repo_id);
    let (out, _res) = login(&w.ctx, &job_of(&added, false)).await;
    let e = out.unwrap_err().to_string();
    assert!(
        e.contains("CI user acme-web-ci for acme/web")
            && e.contains(&format!("the other name {fallback} cannot be used either"))
            && e.contains("never takes over")
            && e.contains("DELETE /api/v1/admin/users/acme-web-ci"),
        "{e}"
    );
    assert!(!e.contains("squatter-password"), "{e}");
    assert_untouched(&w.emu, "acme-web-ci");
    assert_untouched(&w.emu, &fallback);
    assert!(w.ctx.users.lock().await.get(added.repo_id).is_none());
    assert_eq!(refusals(&w.ctx), "fkr_qemu_ci_user_refusals_total 1");
}

#[tokio::test]
async fn a_deleted_and_reregistered_ci_user_is_not_taken_back_from_the_state_file() {
    let w = world().await;
    let added = w.emu.add_job("acme/web", &["external-host"], "build");
    let (out, mut res) = login(&w.ctx, &job_of(&added, false)).await;
    assert_eq!(out.unwrap().unwrap().0, "acme-web-ci");
    res.release().await;
    // An admin deletes the CI user; a stranger registers the name. The state file still has it.
    w.emu
        .with_state(|s| s.users.retain(|u| u.login != "acme-web-ci"));
    w.emu.register_user(
        "acme-web-ci",
        "acme-web-ci@fkr-qemu.invalid",
        "squatter-password",
    );
    let (out, _res) = login(&w.ctx, &job_of(&added, false)).await;
    let e = out.unwrap_err().to_string();
    assert!(e.contains("never takes over"), "{e}");
    let pw = w
        .emu
        .with_state(|s| s.user_by_login("acme-web-ci").unwrap().password.clone());
    assert_eq!(pw, "squatter-password");
}

#[tokio::test]
async fn our_marked_user_is_taken_back_when_the_state_file_is_lost() {
    let w = world().await;
    let added = w.emu.add_job("acme/web", &["external-host"], "build");
    let (out, mut res) = login(&w.ctx, &job_of(&added, false)).await;
    assert_eq!(out.unwrap().unwrap().0, "acme-web-ci");
    res.release().await;
    let dir = tempfile::tempdir().unwrap();
    let fresh = ctx_for(&w.emu, dir.path(), "");
    let r = repo(&fresh, added.repo_id).await;
    let user = fresh.ensure_ci_user(&r).await.unwrap();
    let (user, password) = (user.username, user.password);
    assert_eq!(user, "acme-web-ci");
    assert!(fresh
        .client
        .verify_password(&user, &password)
        .await
        .unwrap());
    // The marker survived the password reset (Forgejo's EditUser rewrites login_name).
    let marked = w
        .emu
        .with_state(|s| s.user_by_login("acme-web-ci").unwrap().login_name.clone());
    assert_eq!(marked, marker(added.repo_id));
}

/// `PATCH /admin/users/<login>` requests: password resets (and marker writes) of a CI user.
fn admin_edits(emu: &Emulator, login: &str) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(&format!("/admin/users/{login}")))
        .count()
}

#[tokio::test]
async fn hosts_sharing_a_key_share_ci_users_without_resetting_a_password() {
    let w = world().await;
    let key = || PasswordKeys::new(vec![Secret::new("the hosts' shared key")]);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = host_ctx(&w.emu, dir_a.path(), "", "host-a", key());
    let b = host_ctx(&w.emu, dir_b.path(), "", "host-b", key());
    let added = w.emu.add_job("acme/web", &["external-host"], "build");
    let (out_a, mut res_a) = login(&a, &job_of(&added, false)).await;
    assert_eq!(out_a.unwrap().unwrap().0, "acme-web-ci");
    // Host B does not know the user (its own state file is empty): creating it is refused, and
    // the password it derives already works. No reset, so host A's jobs keep working.
    let (out_b, mut res_b) = login(&b, &job_of(&added, false)).await;
    assert_eq!(out_b.unwrap().unwrap().0, "acme-web-ci");
    assert_eq!(
        admin_edits(&w.emu, "acme-web-ci"),
        0,
        "{:?}",
        w.emu.requests()
    );
    // Each host's token says whose it is; each host revokes its own.
    let names = w.emu.token_names("acme-web-ci");
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().any(|n| n.contains("-host-a-")), "{names:?}");
    assert!(names.iter().any(|n| n.contains("-host-b-")), "{names:?}");
    assert_eq!(res_a.release().await, 0);
    assert_eq!(res_b.release().await, 0);
    assert!(w.emu.token_names("acme-web-ci").is_empty());

    // Someone changes the password: the next host to notice sets the derived one again, and
    // the other host's password (the same) works right after.
    w.emu.with_state(|s| {
        s.users
            .iter_mut()
            .find(|u| u.login == "acme-web-ci")
            .unwrap()
            .password = "changed-by-an-admin".into()
    });
    let (out_a, mut res_a) = login(&a, &job_of(&added, false)).await;
    out_a.unwrap().unwrap();
    assert_eq!(admin_edits(&w.emu, "acme-web-ci"), 1);
    let (out_b, mut res_b) = login(&b, &job_of(&added, false)).await;
    out_b.unwrap().unwrap();
    assert_eq!(
        admin_edits(&w.emu, "acme-web-ci"),
        1,
        "host B needed no reset"
    );
    res_a.release().await;
    res_b.release().await;
}

#[tokio::test]
async fn a_new_key_is_accepted_while_hosts_roll_it_out() {
    let w = world().await;
    let old = Secret::new("old key");
    let new = Secret::new("new key");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let added = w.emu.add_job("acme/web", &["external-host"], "build");
    // Host A already runs with the new key first; host B still has only the old one... then
    // B learns both (old first): neither undoes the other.
    let a = host_ctx(
        &w.emu,
        dir_a.path(),
        "",
        "host-a",
        PasswordKeys::new(vec![new.clone(), old.clone()]),
    );
    let (out, mut res) = login(&a, &job_of(&added, false)).await;
    out.unwrap().unwrap();
    res.release().await;
    let b = host_ctx(
        &w.emu,
        dir_b.path(),
        "",
        "host-b",
        PasswordKeys::new(vec![old, new]),
    );
    let (out, mut res) = login(&b, &job_of(&added, false)).await;
    out.unwrap().unwrap();
    res.release().await;
    assert_eq!(
        admin_edits(&w.emu, "acme-web-ci"),
        0,
        "{:?}",
        w.emu.requests()
    );
}

#[tokio::test]
async fn fork_pull_requests_get_a_read_only_token_and_push_jobs_write() {
    // v15 (the run is found among the repository's runs) and the development branch (`run_id`).
    for job_run_id in [false, true] {
        let w = world_with(
            Options {
                job_run_id,
                ..Options::default()
            },
            "",
        )
        .await;
        let push = w.emu.add_job("acme/web", &["external-host"], "build");
        let (out, mut res) = login(&w.ctx, &job_of(&push, job_run_id)).await;
        let push_login = out.unwrap().unwrap();
        let prefix = format!("orch-{}-", push.id);
        assert_eq!(
            token_scopes(&w.emu, "acme-web-ci", &prefix),
            vec![vec!["write:package".to_string()]]
        );
        assert_eq!(
            seed_registry_auth(Some(&push_login)),
            vec![format!("acme-web-ci:{}", push_login.1.expose()); 2]
        );
        res.release().await;
        // The push job is done; a fork's pull request runs next.
        w.emu.with_state(|s| {
            s.jobs.iter_mut().find(|j| j.id == push.id).unwrap().status =
                emulator::JobStatus::Success
        });
        let pr = w.emu.add_job_in_run(
            "acme/web",
            &["external-host"],
            "build",
            RunTrigger::fork_pull_request(),
        );
        let (out, mut res) = login(&w.ctx, &job_of(&pr, job_run_id)).await;
        let pr_login = out.unwrap().unwrap();
        let scopes = token_scopes(&w.emu, "acme-web-ci", &format!("orch-{}-", pr.id));
        assert_eq!(
            scopes,
            vec![vec!["read:package".to_string()]],
            "run_id {job_run_id}"
        );
        assert!(!scopes[0].iter().any(|s| s.starts_with("write:")));
        assert_eq!(
            seed_registry_auth(Some(&pr_login)),
            vec![format!("acme-web-ci:{}", pr_login.1.expose()); 2]
        );
        res.release().await;
    }
}

#[tokio::test]
async fn an_ambiguous_run_is_treated_as_a_fork() {
    // v15: no run_id; a push run and a fork's run wait side by side.
    let w = world().await;
    let push = w.emu.add_job("acme/web", &["external-host"], "build");
    w.emu.add_job_in_run(
        "acme/web",
        &["external-host"],
        "build",
        RunTrigger::fork_pull_request(),
    );
    let (out, mut res) = login(&w.ctx, &job_of(&push, false)).await;
    out.unwrap().unwrap();
    assert_eq!(
        token_scopes(&w.emu, "acme-web-ci", &format!("orch-{}-", push.id)),
        vec![vec!["read:package".to_string()]]
    );
    res.release().await;
    // A run id the repository does not have: not trusted either.
    let mut stranger = job_of(&push, false);
    stranger.run_id = 99_999;
    let (out, mut res) = login(&w.ctx, &stranger).await;
    out.unwrap().unwrap();
    assert_eq!(
        token_scopes(&w.emu, "acme-web-ci", &format!("orch-{}-", push.id)).len(),
        1,
        "the first token was revoked"
    );
    assert_eq!(
        token_scopes(&w.emu, "acme-web-ci", &format!("orch-{}-", push.id))[0],
        vec!["read:package".to_string()]
    );
    res.release().await;
}

#[tokio::test]
async fn pull_request_target_and_the_allow_list_get_write_and_none_gets_nothing() {
    let w = world_with(
        Options {
            job_run_id: true,
            ..Options::default()
        },
        "[tokens]\nfork_write_repos = [\"Acme/Trusted\"]\n",
    )
    .await;
    let target = w.emu.add_job_in_run(
        "acme/web",
        &["external-host"],
        "build",
        RunTrigger {
            event: "pull_request".into(),
            trigger_event: "pull_request_target".into(),
            is_fork_pull_request: true,
        },
    );
    let allowed = w.emu.add_job_in_run(
        "acme/trusted",
        &["external-host"],
        "build",
        RunTrigger::fork_pull_request(),
    );
    for (added, user) in [(&target, "acme-web-ci"), (&allowed, "acme-trusted-ci")] {
        let (out, mut res) = login(&w.ctx, &job_of(added, true)).await;
        out.unwrap().unwrap();
        assert_eq!(
            token_scopes(&w.emu, user, &format!("orch-{}-", added.id)),
            vec![vec!["write:package".to_string()]]
        );
        res.release().await;
    }

    let w = world_with(
        Options {
            job_run_id: true,
            ..Options::default()
        },
        "[tokens]\nfork_pull_requests = \"none\"\n",
    )
    .await;
    let pr = w.emu.add_job_in_run(
        "acme/web",
        &["external-host"],
        "build",
        RunTrigger::fork_pull_request(),
    );
    let (out, _res) = login(&w.ctx, &job_of(&pr, true)).await;
    assert!(out.unwrap().is_none());
    assert!(seed_registry_auth(None).is_empty());
    // No CI user was even created for it.
    assert!(w
        .emu
        .with_state(|s| s.user_by_login("acme-web-ci").is_none()));
    let metrics = w.ctx.metrics.encode();
    assert!(
        metrics.contains("fkr_qemu_job_tokens_total{access=\"none\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn after_a_key_rotation_the_next_job_moves_the_ci_user_and_the_old_keys_password_stops_working(
) {
    let w = world().await;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Secret::new("old key"), Secret::new("new key"));
    let added = w.emu.add_job("acme/web", &["external-host"], "build");
    let before = host_ctx(
        &w.emu,
        dir.path(),
        "",
        "host-a",
        PasswordKeys::new(vec![old.clone()]),
    );
    let (out, mut res) = login(&before, &job_of(&added, false)).await;
    out.unwrap().unwrap();
    res.release().await;
    let identity = format!("repo:{}:acme-web-ci", added.repo_id);
    let old_pw = forgejo::derived_password(old.expose().as_bytes(), &identity);
    let new_pw = forgejo::derived_password(new.expose().as_bytes(), &identity);
    assert!(before
        .client
        .verify_password("acme-web-ci", &old_pw)
        .await
        .unwrap());
    drop(before);
    // The rotation is done: the new key first, then the old one dropped. Same state file.
    let after = host_ctx(
        &w.emu,
        dir.path(),
        "",
        "host-a",
        PasswordKeys::new(vec![new]),
    );
    assert_eq!(after.users_on_older_keys().await, 1);
    let (out, mut res) = login(&after, &job_of(&added, false)).await;
    out.unwrap().unwrap();
    res.release().await;
    assert!(
        !after
            .client
            .verify_password("acme-web-ci", &old_pw)
            .await
            .unwrap(),
        "the retired key's password still works"
    );
    assert!(after
        .client
        .verify_password("acme-web-ci", &new_pw)
        .await
        .unwrap());
    assert_eq!(after.users_on_older_keys().await, 0);
    assert_eq!(admin_edits(&w.emu, "acme-web-ci"), 1, "one move, once");
    // The next job uses it as it is.
    let (out, mut res) = login(&after, &job_of(&added, false)).await;
    out.unwrap().unwrap();
    res.release().await;
    assert_eq!(admin_edits(&w.emu, "acme-web-ci"), 1);
}

#[test]
fn a_key_file_not_owned_by_root_or_open_to_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, "k\n").unwrap();
    for mode in [0o640, 0o620, 0o604, 0o602, 0o660] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = PasswordKeys::read(&path)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(PasswordKeys::read(&path).is_ok());
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let e = PasswordKeys::read(&path)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("owned by uid 65534, not root"), "{e}");
}
