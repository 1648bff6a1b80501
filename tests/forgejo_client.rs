//! The Forgejo client against the emulator: every call, every error path, every documented quirk.

mod common {
    pub mod emulator;
}

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::emulator::{Emulator, FaultKind, Options};
use fkr_qemu::forgejo::{
    token_name, Client, ClientConfig, Error, JobStatus, Level, NewUser, UserCreation, Visibility,
    TOKEN_SCOPES,
};
use fkr_qemu::secret::Secret;

fn config(url: &str) -> ClientConfig {
    let mut c = ClientConfig::new(url.parse().unwrap());
    c.request_timeout_ms = 5_000;
    c.retries = 2;
    c.retry_backoff_ms = 10;
    c
}

fn client(emu: &Emulator) -> Client {
    Client::new(config(emu.url()), Secret::new(emu.admin_token())).unwrap()
}

fn client_at(emu: &Emulator, level: Level) -> Client {
    let mut c = config(emu.url());
    c.level = level;
    Client::new(c, Secret::new(emu.admin_token())).unwrap()
}

/// An emulator whose admin token can reach every runner level.
async fn all_levels_emulator() -> Emulator {
    let mut opts = Options::default();
    opts.admin_scopes.extend([
        "write:organization".into(),
        "write:repository".into(),
        "write:user".into(),
    ]);
    Emulator::start(opts).await.unwrap()
}

fn count(emu: &Emulator, method: &str, route: &str) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.method == method && r.route == route)
        .count()
}

/// A CI user created through the client, with its password.
async fn ci_user(c: &Client, owner: &str, repo: &str) -> NewUser {
    let u = c.new_ci_user(&format!("{owner}-{repo}-ci"), "fkr-qemu:repo:1");
    assert!(matches!(
        c.create_user(&u).await.unwrap(),
        UserCreation::Created(_)
    ));
    u
}

// ------------------------------------------------------------------------------------- version

#[tokio::test]
async fn probe_accepts_v15_without_admin_token_routes() {
    let emu = Emulator::start_default().await;
    let info = client(&emu).probe().await.unwrap();
    assert_eq!(info.major, 15);
    assert_eq!(info.version, "15.0.3+gitea-1.22.0");
    assert_eq!(info.login, "forgejo-admin");
    assert!(!info.admin_token_routes);
}

#[tokio::test]
async fn probe_refuses_v14_naming_found_and_needed() {
    let emu = Emulator::start(Options {
        version: "14.0.2+gitea-1.22.0".into(),
        ..Options::default()
    })
    .await
    .unwrap();
    let err = client(&emu).probe().await.unwrap_err();
    assert!(matches!(err, Error::UnsupportedVersion { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("14.0.2+gitea-1.22.0") && msg.contains("15.0.0"),
        "{msg}"
    );
    assert_eq!(err.class(), fkr_qemu::types::ErrorClass::Forgejo);
}

#[tokio::test]
async fn probe_detects_admin_token_routes_and_uses_them() {
    let emu = Emulator::start(Options {
        version: "16.0.0-dev-42-gabc+gitea-1.22.0".into(),
        ..Options::default()
    })
    .await
    .unwrap();
    let c = client(&emu);
    assert!(c.probe().await.unwrap().admin_token_routes);
    let u = ci_user(&c, "acme", "widget").await;
    // A wrong password does not matter: the admin token does the work.
    let wrong = Secret::new("not-the-password");
    let t = c
        .create_token(&u.username, &wrong, &token_name(7), &TOKEN_SCOPES)
        .await
        .unwrap();
    assert_eq!(c.list_tokens(&u.username, &wrong).await.unwrap().len(), 1);
    assert!(c.delete_token(&u.username, &wrong, t.id).await.unwrap());
    let token_calls: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.route.contains("/tokens"))
        .collect();
    assert!(
        token_calls
            .iter()
            .all(|r| r.route.starts_with("/admin/users/") && r.auth == "token"),
        "{token_calls:#?}"
    );
}

// ------------------------------------------------------------------------------------- jobs

#[tokio::test]
async fn empty_job_list_is_null_and_reads_as_empty() {
    let emu = Emulator::start_default().await;
    let jobs = client(&emu).jobs(&["external-host"]).await.unwrap();
    assert!(jobs.is_empty());
    // The quirk is really exercised: the server sent the JSON literal null.
    let r = emu.requests().pop().unwrap();
    assert_eq!(r.route, "/admin/actions/runners/jobs");
    assert_eq!(r.response_body, Some(serde_json::Value::Null));
}

#[tokio::test]
async fn running_jobs_are_listed_but_not_waiting() {
    let emu = Emulator::start_default().await;
    let a = emu.add_job("acme/widget", &["external-host"], "a");
    let b = emu.add_job("acme/widget", &["external-host"], "b");
    emu.with_state(|s| {
        let id = s.id();
        s.runners.push(common::emulator::state::Runner {
            id,
            uuid: "u".into(),
            token: "t".into(),
            name: "r".into(),
            description: String::new(),
            scope: common::emulator::state::RunnerScope::Instance,
            ephemeral: true,
            labels: vec!["external-host".into()],
            version: String::new(),
            last_online: None,
            last_active: None,
            tasks: Vec::new(),
        });
        s.assign(id, a.id);
    });
    let c = client(&emu);
    let all = c.jobs(&["external-host"]).await.unwrap();
    assert_eq!(all.len(), 2, "the server lists running jobs too");
    let running = all.iter().find(|j| j.id == a.id).unwrap();
    assert_eq!(running.status, JobStatus::Running);
    assert_ne!(running.task_id, 0);
    let waiting = c.waiting_jobs(&["external-host"]).await.unwrap();
    assert_eq!(waiting.iter().map(|j| j.id).collect::<Vec<_>>(), vec![b.id]);
    let j = &waiting[0];
    assert_eq!(
        (j.handle.as_str(), j.attempt, j.repo_id, j.name.as_str()),
        (b.handle.as_str(), 1, b.repo_id, "b")
    );
    assert_eq!(j.runs_on, vec!["external-host"]);
    assert!(j.needs.is_empty());
}

#[tokio::test]
async fn jobs_follow_the_subset_rule() {
    let emu = Emulator::start_default().await;
    let j = emu.add_job("acme/widget", &["external-host", "big"], "b");
    let c = client(&emu);
    assert!(c.waiting_jobs(&["external-host"]).await.unwrap().is_empty());
    let ids: Vec<i64> = c
        .waiting_jobs(&["other", "big", "external-host"])
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![j.id]);
    let r = emu.requests().pop().unwrap();
    assert_eq!(
        r.query.get("labels").map(String::as_str),
        Some("other,big,external-host")
    );
}

#[tokio::test]
async fn jobs_and_runners_at_repo_org_and_user_level() {
    let emu = all_levels_emulator().await;
    let mine = emu.add_job("acme/widget", &["external-host"], "mine");
    emu.add_job("other/thing", &["external-host"], "theirs");
    let admin_repo = emu.add_job("forgejo-admin/own", &["external-host"], "own");

    let repo = client_at(
        &emu,
        Level::Repo {
            owner: "acme".into(),
            repo: "widget".into(),
        },
    );
    let ids: Vec<i64> = repo
        .waiting_jobs(&["external-host"])
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![mine.id]);
    let org = client_at(&emu, Level::Org("acme".into()));
    let ids: Vec<i64> = org
        .waiting_jobs(&["external-host"])
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![mine.id]);
    let user = client_at(&emu, Level::User);
    let ids: Vec<i64> = user
        .waiting_jobs(&["external-host"])
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![admin_repo.id]);

    for (c, route) in [
        (&repo, "/repos/{owner}/{repo}/actions/runners"),
        (&org, "/orgs/{org}/actions/runners"),
        (&user, "/user/actions/runners"),
    ] {
        let r = c.register_runner("fr-0000abcd", "test").await.unwrap();
        let listed = c.runners().await.unwrap();
        assert_eq!(
            listed.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![r.id],
            "{route}"
        );
        assert!(listed[0].ephemeral);
        assert!(c.delete_runner(r.id).await.unwrap());
        assert!(c.runners().await.unwrap().is_empty());
        assert_eq!(count(&emu, "POST", route), 1);
    }
    assert!(emu.with_state(|s| s.runners.is_empty()));
}

// ------------------------------------------------------------------------------------- repositories

#[tokio::test]
async fn repositories_are_looked_up_once() {
    let emu = Emulator::start_default().await;
    let id = emu.add_repo("acme", "widget");
    let c = client(&emu);
    for _ in 0..3 {
        let r = c.repository(id).await.unwrap();
        assert_eq!(
            (
                r.id,
                r.owner.as_str(),
                r.name.as_str(),
                r.full_name.as_str()
            ),
            (id, "acme", "widget", "acme/widget")
        );
    }
    assert_eq!(count(&emu, "GET", "/repositories/{id}"), 1);
    let err = c.repository(9999).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

// ------------------------------------------------------------------------------------- users

#[tokio::test]
async fn ci_user_is_created_usable_with_an_undeliverable_address() {
    let emu = Emulator::start_default().await;
    let mut cfg = config(emu.url());
    cfg.ci_user_visibility = Visibility::Private;
    let c = Client::new(cfg, Secret::new(emu.admin_token())).unwrap();
    let u = c.new_ci_user("acme-widget-ci", "fkr-qemu:repo:1");
    assert_eq!(u.username, "acme-widget-ci");
    assert_eq!(u.email, "acme-widget-ci@fkr-qemu.invalid");
    let UserCreation::Created(created) = c.create_user(&u).await.unwrap() else {
        panic!("not created")
    };
    assert_eq!(
        (created.login.as_str(), created.visibility.as_str()),
        ("acme-widget-ci", "private")
    );
    let body = emu.requests().pop().unwrap().request_body.unwrap();
    assert_eq!(body["must_change_password"], false);
    assert_eq!(body["send_notify"], false);
    // must_change_password=false is what lets the user act at all.
    c.create_token(&u.username, &u.password, &token_name(1), &TOKEN_SCOPES)
        .await
        .unwrap();
    let found = c.user(&u.username).await.unwrap().unwrap();
    assert_eq!(found.id, created.id);
    assert!(c.user("nobody-here").await.unwrap().is_none());
}

#[tokio::test]
async fn existing_user_or_email_is_a_state_to_reconcile() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let u = ci_user(&c, "acme", "widget").await;
    let again = c.new_ci_user("acme-widget-ci", "fkr-qemu:repo:1");
    match c.create_user(&again).await.unwrap() {
        UserCreation::AlreadyExists { message } => {
            assert!(message.contains("already exists"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let same_mail = NewUser {
        username: "someone-else".into(),
        ..again.clone()
    };
    assert!(matches!(
        c.create_user(&same_mail).await.unwrap(),
        UserCreation::AlreadyExists { .. }
    ));
    // Reconcile: take the user back with a new password; the old one stops working.
    c.set_user_password(&u.username, &again.password, "fkr-qemu:repo:1")
        .await
        .unwrap();
    c.create_token(&u.username, &again.password, &token_name(2), &TOKEN_SCOPES)
        .await
        .unwrap();
    let err = c
        .create_token(&u.username, &u.password, &token_name(3), &TOKEN_SCOPES)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
}

#[tokio::test]
async fn user_who_must_change_password_is_refused_everywhere() {
    let emu = Emulator::start_default().await;
    emu.add_user("stale-ci", "an-old-password", true);
    let c = client(&emu);
    let pw = Secret::new("an-old-password");
    for err in [
        c.create_token("stale-ci", &pw, &token_name(1), &TOKEN_SCOPES)
            .await
            .unwrap_err(),
        c.list_tokens("stale-ci", &pw).await.unwrap_err(),
        c.delete_token("stale-ci", &pw, 1).await.unwrap_err(),
    ] {
        assert_eq!(err.status(), Some(403), "{err}");
        assert!(
            err.to_string().contains("must change your password"),
            "{err}"
        );
    }
    // Clearing the flag (what set_user_password does) lets the user in.
    c.set_user_password("stale-ci", &pw, "fkr-qemu:repo:1")
        .await
        .unwrap();
    assert!(c.list_tokens("stale-ci", &pw).await.unwrap().is_empty());
}

#[tokio::test]
async fn delete_user() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let u = ci_user(&c, "acme", "widget").await;
    assert!(c.delete_user(&u.username, true).await.unwrap());
    assert!(!c.delete_user(&u.username, true).await.unwrap());
    assert!(c.user(&u.username).await.unwrap().is_none());
}

// ------------------------------------------------------------------------------------- tokens

#[tokio::test]
async fn tokens_create_list_delete_with_password_basic_auth() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let u = ci_user(&c, "acme", "widget").await;
    let name = token_name(42);
    let t = c
        .create_token(&u.username, &u.password, &name, &TOKEN_SCOPES)
        .await
        .unwrap();
    assert_eq!(t.name, name);
    assert_eq!(t.token.expose().len(), 40);
    assert!(t.scopes.contains(&"write:package".to_owned()));
    let listed = c.list_tokens(&u.username, &u.password).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].name.as_str()),
        (t.id, name.as_str())
    );
    assert_eq!(listed[0].token_last_eight, t.token.expose()[32..]);
    assert!(c
        .delete_token(&u.username, &u.password, t.id)
        .await
        .unwrap());
    assert!(!c
        .delete_token(&u.username, &u.password, t.id)
        .await
        .unwrap());
    assert!(c
        .list_tokens(&u.username, &u.password)
        .await
        .unwrap()
        .is_empty());
    let calls: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.route.contains("/tokens"))
        .collect();
    assert!(
        calls
            .iter()
            .all(|r| r.route.starts_with("/users/") && r.auth == "basic-password"),
        "{calls:#?}"
    );
}

#[tokio::test]
async fn token_list_pages_by_total_count() {
    // Forgejo sets only X-Total-Count (no Link) on the token list.
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let u = ci_user(&c, "acme", "widget").await;
    for i in 0..61 {
        c.create_token(
            &u.username,
            &u.password,
            &format!("orch-{i}-00000000"),
            &TOKEN_SCOPES,
        )
        .await
        .unwrap();
    }
    assert_eq!(
        c.list_tokens(&u.username, &u.password).await.unwrap().len(),
        61
    );
    let pages: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.route == "/users/{username}/tokens")
        .collect();
    assert_eq!(pages.len(), 2);
    assert!(!pages[0].response_headers.contains_key("link"));
    assert_eq!(pages[0].response_headers["x-total-count"], "61");
}

#[tokio::test]
async fn reused_token_name_is_400() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let u = ci_user(&c, "acme", "widget").await;
    c.create_token(&u.username, &u.password, "orch-1-aaaa", &TOKEN_SCOPES)
        .await
        .unwrap();
    let err = c
        .create_token(&u.username, &u.password, "orch-1-aaaa", &TOKEN_SCOPES)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("has been used already"), "{err}");
}

#[tokio::test]
async fn token_routes_take_only_a_password() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let u = ci_user(&c, "acme", "widget").await;
    let user_token = c
        .create_token(&u.username, &u.password, "with-user-scope", &["write:user"])
        .await
        .unwrap();
    let package_token = c
        .create_token(&u.username, &u.password, "package-only", &TOKEN_SCOPES)
        .await
        .unwrap();
    // A token as the Basic password: 401 when its scopes would do, 403 (scope check first) when not.
    let err = c
        .create_token(&u.username, &user_token.token, "x", &TOKEN_SCOPES)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let err = c
        .list_tokens(&u.username, &package_token.token)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("read:user"), "{err}");
    // A token in the Authorization header is no password either: 401 once its scopes pass,
    // 403 naming the scope before that (the admin token has only read:user).
    let http = reqwest::Client::new();
    for (token, status) in [(user_token.token.expose(), 401), (emu.admin_token(), 403)] {
        let resp = http
            .post(format!("{}/api/v1/users/{}/tokens", emu.url(), u.username))
            .header("authorization", format!("token {token}"))
            .json(&serde_json::json!({"name": "y", "scopes": ["write:package"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
    }
    assert!(c
        .list_tokens(&u.username, &u.password)
        .await
        .unwrap()
        .iter()
        .all(|t| t.name != "x" && t.name != "y"));
}

// ------------------------------------------------------------------------------------- runners

#[tokio::test]
async fn runners_register_list_delete() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let r = c.register_runner("fr-0123abcd", "job 7").await.unwrap();
    assert_eq!(r.token.expose().len(), 40);
    assert_eq!(r.uuid.len(), 36);
    let body = emu.requests().pop().unwrap().request_body.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"name": "fr-0123abcd", "description": "job 7", "ephemeral": true})
    );
    let listed = c.runners().await.unwrap();
    assert_eq!(listed.len(), 1);
    let l = &listed[0];
    assert_eq!(
        (
            l.id,
            l.uuid.as_str(),
            l.name.as_str(),
            l.description.as_str()
        ),
        (r.id, r.uuid.as_str(), "fr-0123abcd", "job 7")
    );
    assert!(l.ephemeral && l.labels.is_empty());
    assert_eq!(l.status, "offline");
    assert!(c.delete_runner(r.id).await.unwrap());
    assert!(!c.delete_runner(r.id).await.unwrap());
}

#[tokio::test]
async fn runner_list_follows_pagination() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let mut ids = Vec::new();
    for i in 0..123 {
        ids.push(
            c.register_runner(&format!("fr-{i:08x}"), "")
                .await
                .unwrap()
                .id,
        );
    }
    let listed: Vec<i64> = c.runners().await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(listed, ids, "all pages, in order");
    let pages: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.route == "/admin/actions/runners")
        .collect();
    assert_eq!(pages.len(), 3, "50 + 50 + 23");
    assert!(pages[0].response_headers["link"].contains("rel=\"next\""));
    assert_eq!(pages[0].response_headers["x-total-count"], "123");
    assert!(!pages[2]
        .response_headers
        .get("link")
        .is_some_and(|l| l.contains("rel=\"next\"")));
}

// ------------------------------------------------------------------------------------- errors

#[tokio::test]
async fn idempotent_calls_retry_5xx() {
    let emu = Emulator::start_default().await;
    emu.inject(
        "GET",
        "/version",
        FaultKind::Status { status: 503 },
        Some(2),
    );
    client(&emu).probe().await.unwrap();
    assert_eq!(count(&emu, "GET", "/version"), 3);

    emu.inject(
        "DELETE",
        "/admin/actions/runners/{runner_id}",
        FaultKind::Status { status: 502 },
        Some(1),
    );
    let c = client(&emu);
    let r = c.register_runner("fr-1", "").await.unwrap();
    assert!(c.delete_runner(r.id).await.unwrap());
    assert_eq!(
        count(&emu, "DELETE", "/admin/actions/runners/{runner_id}"),
        2
    );
}

#[tokio::test]
async fn persistent_5xx_gives_up_with_status_and_message() {
    let emu = Emulator::start_default().await;
    emu.inject(
        "GET",
        "/admin/actions/runners/jobs",
        FaultKind::Status { status: 500 },
        None,
    );
    let err = client(&emu).jobs(&["external-host"]).await.unwrap_err();
    assert_eq!(err.status(), Some(500));
    let msg = err.to_string();
    assert!(
        msg.contains("500")
            && msg.contains("injected fault")
            && msg.contains("/admin/actions/runners/jobs"),
        "{msg}"
    );
    assert_eq!(
        count(&emu, "GET", "/admin/actions/runners/jobs"),
        3,
        "1 + 2 retries"
    );
}

#[tokio::test]
async fn non_idempotent_calls_are_not_retried() {
    let emu = Emulator::start_default().await;
    emu.inject(
        "POST",
        "/admin/actions/runners",
        FaultKind::Status { status: 503 },
        Some(1),
    );
    let err = client(&emu).register_runner("fr-1", "").await.unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert_eq!(count(&emu, "POST", "/admin/actions/runners"), 1);
    emu.inject(
        "POST",
        "/admin/users",
        FaultKind::Status { status: 500 },
        Some(1),
    );
    let c = client(&emu);
    assert_eq!(
        c.create_user(&c.new_ci_user("a-b-ci", "fkr-qemu:repo:1"))
            .await
            .unwrap_err()
            .status(),
        Some(500)
    );
    assert_eq!(count(&emu, "POST", "/admin/users"), 1);
}

#[tokio::test]
async fn timeouts_are_typed_and_retried_only_when_idempotent() {
    let emu = Emulator::start_default().await;
    let id = emu.add_repo("acme", "widget");
    let mut cfg = config(emu.url());
    cfg.request_timeout_ms = 300;
    cfg.retries = 1;
    let c = Client::new(cfg, Secret::new(emu.admin_token())).unwrap();
    emu.inject(
        "GET",
        "/repositories/{id}",
        FaultKind::Delay { delay_ms: 2_000 },
        None,
    );
    let err = c.repository(id).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("300 ms"), "{err}");
    assert_eq!(count(&emu, "GET", "/repositories/{id}"), 2);
    // A timed-out POST is not repeated: the server may have done it (here it did).
    emu.inject(
        "POST",
        "/admin/actions/runners",
        FaultKind::Delay { delay_ms: 2_000 },
        None,
    );
    assert!(matches!(
        c.register_runner("fr-1", "").await.unwrap_err(),
        Error::Timeout { .. }
    ));
    assert_eq!(count(&emu, "POST", "/admin/actions/runners"), 1);
    assert_eq!(emu.with_state(|s| s.runners.len()), 1);
}

#[tokio::test]
async fn malformed_json_is_an_invalid_response() {
    let emu = Emulator::start_default().await;
    emu.inject(
        "GET",
        "/admin/actions/runners/jobs",
        FaultKind::MalformedJson,
        Some(1),
    );
    let err = client(&emu).jobs(&["external-host"]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidResponse { .. }), "{err:?}");
    assert_eq!(
        count(&emu, "GET", "/admin/actions/runners/jobs"),
        1,
        "not retried"
    );
}

#[tokio::test]
async fn unauthorized_is_not_retried() {
    let emu = Emulator::start_default().await;
    emu.inject("GET", "/version", FaultKind::Unauthorized, None);
    let err = client(&emu).probe().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert!(err.to_string().contains("user does not exist"), "{err}");
    assert_eq!(count(&emu, "GET", "/version"), 1);

    let emu = Emulator::start_default().await;
    let bad = Client::new(
        config(emu.url()),
        Secret::new("0000000000000000000000000000000000000000"),
    )
    .unwrap();
    assert_eq!(bad.runners().await.unwrap_err().status(), Some(401));
}

#[tokio::test]
async fn missing_scope_is_403_naming_the_scope() {
    let emu = Emulator::start(Options {
        admin_scopes: vec!["write:admin".into()],
        ..Options::default()
    })
    .await
    .unwrap();
    let id = emu.add_repo("acme", "widget");
    let err = client(&emu).repository(id).await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert!(err.to_string().contains("read:repository"), "{err}");
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(&format!("http://127.0.0.1:{port}/"));
    cfg.retries = 1;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let c = Client::new(cfg, Secret::new("t"))
        .unwrap()
        .with_observer(Arc::new(
            move |route: &'static str, status: u16, _lat: Duration| {
                s2.lock().unwrap().push((route, status));
            },
        ));
    let err = c.probe().await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![("/version", 0), ("/version", 0)]
    );
}

#[tokio::test]
async fn observer_sees_route_templates_and_statuses() {
    let emu = Emulator::start_default().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let c = client(&emu).with_observer(Arc::new(
        move |route: &'static str, status: u16, lat: Duration| {
            assert!(lat < Duration::from_secs(5));
            s2.lock().unwrap().push((route, status));
        },
    ));
    c.probe().await.unwrap();
    let r = c.register_runner("fr-1", "").await.unwrap();
    c.delete_runner(r.id).await.unwrap();
    c.delete_runner(r.id).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            ("/version", 200),
            ("/user", 200),
            ("/admin/users/{username}/tokens", 404),
            ("/admin/actions/runners", 201),
            ("/admin/actions/runners/{runner_id}", 204),
            ("/admin/actions/runners/{runner_id}", 404),
        ]
    );
}

#[tokio::test]
async fn runs_are_listed_across_pages_and_filtered_by_status() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let mut ids = Vec::new();
    for i in 0..60 {
        let trigger = if i == 37 {
            common::emulator::RunTrigger::fork_pull_request()
        } else {
            common::emulator::RunTrigger::push()
        };
        ids.push(emu.add_job_in_run("acme/widget", &["external-host"], "b", trigger));
    }
    // One finished run drops out of the waiting/running list.
    emu.with_state(|s| {
        s.jobs
            .iter_mut()
            .find(|j| j.id == ids[0].id)
            .unwrap()
            .status = common::emulator::JobStatus::Success
    });
    let runs = c
        .action_runs("acme", "widget", &["waiting", "running"])
        .await
        .unwrap();
    assert_eq!(runs.len(), 59);
    assert_eq!(runs.iter().filter(|r| r.is_untrusted()).count(), 1);
    assert!(!runs.iter().any(|r| r.id == ids[0].run_id));
    assert_eq!(
        count(&emu, "GET", "/repos/{owner}/{repo}/actions/runs"),
        2,
        "two pages of 50"
    );
    let fork = c
        .action_run("acme", "widget", ids[37].run_id)
        .await
        .unwrap()
        .unwrap();
    assert!(fork.is_fork_pull_request && fork.is_untrusted());
    assert_eq!(fork.event, "pull_request");
    // A run id of another repository is not this repository's run.
    let other = emu.add_job("acme/other", &["external-host"], "b");
    assert!(c
        .action_run("acme", "widget", other.run_id)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn only_admins_see_the_login_name_marker() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let mut u = c.new_ci_user("acme-widget-ci", "fkr-qemu:repo:7");
    u.visibility = fkr_qemu::forgejo::Visibility::Public;
    c.create_user(&u).await.unwrap();
    let seen = c.user("acme-widget-ci").await.unwrap().unwrap();
    assert_eq!(
        (seen.login_name.as_str(), seen.source_id),
        ("fkr-qemu:repo:7", 0)
    );
    // A password reset keeps the marker (the client resends it).
    c.set_user_password("acme-widget-ci", &u.password, "fkr-qemu:repo:7")
        .await
        .unwrap();
    // Another signed-in user sees the account, not the marker.
    emu.add_user("someone", "someone-password", false);
    let basic: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/users/acme-widget-ci", emu.url()))
        .basic_auth("someone", Some("someone-password"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(basic["login_name"], "");
    let again = c.user("acme-widget-ci").await.unwrap().unwrap();
    assert_eq!(again.login_name, "fkr-qemu:repo:7");
}
