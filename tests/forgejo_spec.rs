//! Checks against Forgejo's own spec (tests/spec/, extracts of v15.0.0 and of the development branch
//! for the admin token routes): every request the client makes exists there with its query and body
//! fields, and every answer the emulator gives validates against the schema of its route and status.

mod common {
    pub mod emulator;
}
#[path = "spec/swagger.rs"]
mod swagger;

use std::collections::BTreeSet;

use common::emulator::{Emulator, LoggedRequest, Options, RunTrigger};
use fkr_qemu::forgejo::{token_name, Client, ClientConfig, Level, UserCreation, TOKEN_SCOPES};
use fkr_qemu::secret::Secret;
use serde_json::{json, Value};
use swagger::Spec;

fn spec(name: &str) -> Spec {
    Spec::load(&format!("{}/tests/spec/{name}", env!("CARGO_MANIFEST_DIR")))
}

fn v15() -> Spec {
    spec("forgejo-v15.0.0-subset.json")
}

fn v17dev() -> Spec {
    spec("forgejo-v17dev-admin-tokens.json")
}

fn client(emu: &Emulator, level: Level) -> Client {
    let mut c = ClientConfig::new(emu.url().parse().unwrap());
    c.level = level;
    c.retries = 0;
    Client::new(c, Secret::new(emu.admin_token())).unwrap()
}

/// Every client call, at every level, with its error paths; plus raw requests for the answers the
/// client never provokes. Returns the request log.
async fn exercise(version: &str) -> Vec<LoggedRequest> {
    let mut opts = Options {
        version: version.into(),
        ..Options::default()
    };
    opts.admin_scopes.extend([
        "write:organization".into(),
        "write:repository".into(),
        "write:user".into(),
    ]);
    let emu = Emulator::start(opts).await.unwrap();
    let c = client(&emu, Level::Instance);
    c.probe().await.unwrap();
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    emu.add_job("forgejo-admin/own", &["external-host"], "own");

    // Users.
    let u = c.new_ci_user("acme-widget-ci", "fkr-qemu:repo:1");
    assert!(matches!(
        c.create_user(&u).await.unwrap(),
        UserCreation::Created(_)
    ));
    assert!(matches!(
        c.create_user(&u).await.unwrap(),
        UserCreation::AlreadyExists { .. }
    ));
    c.user(&u.username).await.unwrap().unwrap();
    assert!(c.user("nobody").await.unwrap().is_none());
    c.set_user_password(&u.username, &u.password, "fkr-qemu:repo:1")
        .await
        .unwrap();
    c.set_user_password("nobody", &u.password, "fkr-qemu:repo:1")
        .await
        .unwrap_err();

    // Tokens (admin routes on a v16+ emulator, Basic auth on v15).
    let t = c
        .create_token(&u.username, &u.password, &token_name(job.id), &TOKEN_SCOPES)
        .await
        .unwrap();
    c.create_token(&u.username, &u.password, &t.name, &TOKEN_SCOPES)
        .await
        .unwrap_err();
    // A token as the Basic password: refused on v15; the admin routes need no password at all.
    let with_token = c
        .create_token(&u.username, &t.token, "with-a-token", &TOKEN_SCOPES)
        .await;
    assert_eq!(with_token.is_err(), !c.uses_admin_token_routes());
    c.list_tokens(&u.username, &u.password).await.unwrap();
    c.list_tokens("nobody", &u.password).await.unwrap_err();
    assert!(c
        .delete_token(&u.username, &u.password, t.id)
        .await
        .unwrap());
    assert!(!c
        .delete_token(&u.username, &u.password, t.id)
        .await
        .unwrap());

    // Repositories.
    c.repository(job.repo_id).await.unwrap();
    c.repository(99_999).await.unwrap_err();

    // Runs: a fork pull request's run beside the push run of `job`; every page, by id, missing.
    emu.add_job_in_run(
        "acme/widget",
        &["external-host"],
        "pr",
        RunTrigger::fork_pull_request(),
    );
    let runs = c
        .action_runs("acme", "widget", &["waiting", "running"])
        .await
        .unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.iter().any(|r| r.is_untrusted()));
    let run = c.action_run("acme", "widget", job.run_id).await.unwrap();
    assert!(!run.unwrap().is_untrusted());
    assert!(c
        .action_run("acme", "widget", 99_999)
        .await
        .unwrap()
        .is_none());
    c.action_runs("acme", "nope", &[]).await.unwrap_err();
    assert!(c.verify_password(&u.username, &u.password).await.unwrap());

    // Jobs and runners at every level; a picked-up job so that the list is not empty.
    for level in [
        Level::Instance,
        Level::Org("acme".into()),
        Level::Repo {
            owner: "acme".into(),
            repo: "widget".into(),
        },
        Level::User,
    ] {
        let lc = client(&emu, level);
        lc.jobs(&["external-host"]).await.unwrap();
        lc.jobs(&["nothing-matches"]).await.unwrap();
        let r = lc.register_runner("fr-00000001", "spec").await.unwrap();
        lc.runners().await.unwrap();
        assert!(lc.delete_runner(r.id).await.unwrap());
        assert!(!lc.delete_runner(r.id).await.unwrap());
    }
    let r = c.register_runner("fr-00000002", "").await.unwrap();
    let http = reqwest::Client::new();
    let rpc = |m: &str, body: Value| {
        http.post(format!(
            "{}/api/actions/runner.v1.RunnerService/{m}",
            emu.url()
        ))
        .header("content-type", "application/json")
        .header("x-runner-uuid", &r.uuid)
        .header("x-runner-token", r.token.expose())
        .body(body.to_string())
        .send()
    };
    rpc("Declare", json!({"labels": ["external-host"]}))
        .await
        .unwrap();
    rpc("FetchSingleTask", json!({"handle": job.handle}))
        .await
        .unwrap();
    c.jobs(&["external-host"]).await.unwrap();
    for _ in 0..60 {
        c.register_runner("fr-page", "").await.unwrap();
    }
    c.runners().await.unwrap();
    c.delete_user(&u.username, true).await.unwrap();
    c.delete_user(&u.username, true).await.unwrap();

    // Answers the client does not provoke.
    let get = |path: &str, auth: Option<String>| {
        let mut b = http.get(format!("{}/api/v1{path}", emu.url()));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.send()
    };
    get(
        &format!("/admin/actions/runners/{}", r.id),
        Some(format!("token {}", emu.admin_token())),
    )
    .await
    .unwrap();
    get("/admin/actions/runners", None).await.unwrap();
    get("/admin/actions/runners/jobs", Some("token wrong".into()))
        .await
        .unwrap();
    get(
        "/repos/acme/widget/actions/runners?visible=true&page=2&limit=1",
        Some(format!("token {}", emu.admin_token())),
    )
    .await
    .unwrap();
    for q in ["status=bogus", "event=pull_request&page=1&limit=1"] {
        get(
            &format!("/repos/acme/widget/actions/runs?{q}"),
            Some(format!("token {}", emu.admin_token())),
        )
        .await
        .unwrap();
    }
    emu.add_user("stale", "stale-password", true);
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("stale:stale-password");
    get("/user", Some(format!("Basic {basic}"))).await.unwrap();
    emu.requests()
}

fn rel(path: &str) -> Option<&str> {
    path.strip_prefix("/api/v1")
}

fn check_requests(log: &[LoggedRequest]) -> (BTreeSet<String>, Vec<String>) {
    let (v15, dev) = (v15(), v17dev());
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    for r in log.iter().filter(|r| r.fault.is_none()) {
        let Some(path) = rel(&r.path) else { continue };
        let spec = if v15.operation(&r.method, path).is_some() {
            &v15
        } else {
            &dev
        };
        let query: Vec<String> = r.query.keys().cloned().collect();
        match spec.check_request(&r.method, path, &query, r.request_body.as_ref()) {
            Ok(t) => {
                seen.insert(format!("{} {t}", r.method));
            }
            Err(e) => errors.extend(e),
        }
    }
    (seen, errors)
}

const CLIENT_ROUTES: &[&str] = &[
    "GET /version",
    "GET /user",
    "GET /users/{username}",
    "POST /admin/users",
    "PATCH /admin/users/{username}",
    "DELETE /admin/users/{username}",
    "POST /users/{username}/tokens",
    "GET /users/{username}/tokens",
    "DELETE /users/{username}/tokens/{token}",
    "GET /repositories/{id}",
    "GET /repos/{owner}/{repo}/actions/runs",
    "GET /repos/{owner}/{repo}/actions/runs/{run_id}",
    "GET /admin/actions/runners/jobs",
    "GET /orgs/{org}/actions/runners/jobs",
    "GET /repos/{owner}/{repo}/actions/runners/jobs",
    "GET /user/actions/runners/jobs",
    "POST /admin/actions/runners",
    "GET /admin/actions/runners",
    "DELETE /admin/actions/runners/{runner_id}",
    "POST /orgs/{org}/actions/runners",
    "GET /orgs/{org}/actions/runners",
    "DELETE /orgs/{org}/actions/runners/{runner_id}",
    "POST /repos/{owner}/{repo}/actions/runners",
    "GET /repos/{owner}/{repo}/actions/runners",
    "DELETE /repos/{owner}/{repo}/actions/runners/{runner_id}",
    "POST /user/actions/runners",
    "GET /user/actions/runners",
    "DELETE /user/actions/runners/{runner_id}",
];

#[tokio::test]
async fn every_client_request_is_in_the_v15_spec() {
    let log = exercise("15.0.3+gitea-1.22.0").await;
    let (seen, errors) = check_requests(&log);
    assert!(errors.is_empty(), "{errors:#?}");
    let missing: Vec<_> = CLIENT_ROUTES
        .iter()
        .filter(|r| !seen.contains(**r))
        .collect();
    assert!(
        missing.is_empty(),
        "the scenario did not exercise {missing:?}"
    );
    // The probe of the admin token routes is checked against the development branch's spec.
    assert!(
        seen.contains("GET /admin/users/{username}/tokens"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn admin_token_route_requests_are_in_the_dev_spec() {
    let log = exercise("16.0.0-dev+gitea-1.22.0").await;
    let (seen, errors) = check_requests(&log);
    assert!(errors.is_empty(), "{errors:#?}");
    for r in [
        "POST /admin/users/{username}/tokens",
        "GET /admin/users/{username}/tokens",
        "DELETE /admin/users/{username}/tokens/{token}",
    ] {
        assert!(seen.contains(r), "{r} not exercised: {seen:?}");
    }
}

/// Validates every logged REST answer; returns the errors and the statuses the spec does not declare.
fn check_responses(log: &[LoggedRequest]) -> (Vec<String>, BTreeSet<String>, usize) {
    let (v15, dev) = (v15(), v17dev());
    let mut errors = Vec::new();
    let mut undeclared = BTreeSet::new();
    let mut checked = 0;
    for r in log.iter().filter(|r| r.fault.is_none()) {
        let Some(path) = rel(&r.path) else { continue };
        let spec = if v15.operation(&r.method, path).is_some() {
            &v15
        } else {
            &dev
        };
        let Some(op) = spec.operation(&r.method, path) else {
            errors.push(format!(
                "{} {path}: answered by the emulator but not in the spec",
                r.method
            ));
            continue;
        };
        let body = r.response_body.clone();
        if let Some(text) = &r.response_text {
            errors.push(format!(
                "{} {}: body is not JSON: {text}",
                r.method, op.template
            ));
            continue;
        }
        checked += 1;
        let at = format!("{} {} -> {}", r.method, op.template, r.status);
        match spec.response_schema(&op, r.status) {
            Some(Some(schema)) => match &body {
                Some(b) => {
                    if let Err(e) = spec.validate(schema, b) {
                        errors.extend(e.into_iter().map(|e| format!("{at}: {e}")));
                    }
                }
                None => errors.push(format!("{at}: no body, the spec wants one")),
            },
            Some(None) => {
                if body.is_some() {
                    errors.push(format!("{at}: a body where the spec declares none"));
                }
            }
            None if r.status < 400 => {
                errors.push(format!("{at}: success status not declared by the spec"))
            }
            None => {
                // Forgejo answers some errors its spec does not list; they still have its error shape.
                undeclared.insert(at.clone());
                let def = if r.status == 404 {
                    "APINotFound"
                } else {
                    "APIError"
                };
                let schema = json!({"$ref": format!("#/definitions/{def}")});
                match &body {
                    Some(b) => {
                        if let Err(e) = v15.validate(&schema, b) {
                            errors.extend(e.into_iter().map(|e| format!("{at} (as {def}): {e}")));
                        }
                    }
                    None => errors.push(format!("{at}: error without a body")),
                }
            }
        }
    }
    (errors, undeclared, checked)
}

#[tokio::test]
async fn every_emulator_answer_validates_against_the_spec() {
    for version in ["15.0.3+gitea-1.22.0", "16.0.0-dev+gitea-1.22.0"] {
        let log = exercise(version).await;
        let (errors, undeclared, checked) = check_responses(&log);
        assert!(errors.is_empty(), "{version}: {errors:#?}");
        assert!(checked > 100, "{version}: only {checked} answers checked");
        eprintln!("{version}: {checked} answers valid; statuses the spec does not declare: {undeclared:#?}");
    }
}

/// The checks really fail on wrong bodies, wrong requests, wrong paths.
#[tokio::test]
async fn wrong_bodies_and_requests_fail_the_checks() {
    let spec = v15();
    let log = exercise("15.0.3+gitea-1.22.0").await;
    let list = log
        .iter()
        .find(|r| r.method == "GET" && r.path == "/api/v1/admin/actions/runners" && r.status == 200)
        .unwrap()
        .clone();
    let op = spec.operation("GET", "/admin/actions/runners").unwrap();
    let schema = spec.response_schema(&op, 200).unwrap().unwrap();
    let good = list.response_body.clone().unwrap();
    spec.validate(schema, &good).unwrap();
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        spec.validate(schema, &v).unwrap_err()
    };
    assert!(mutate(&|v| v[0]["status"] = json!("busy"))[0].contains("not one of"));
    assert!(mutate(&|v| v[0]["id"] = json!("3"))[0].contains("expected an integer"));
    assert!(mutate(&|v| v[0]["surprise"] = json!(1))[0].contains("not in the schema"));
    assert!(mutate(&|v| v[0]["name"] = Value::Null)[0].contains("null"));
    assert!(mutate(&|v| *v = json!({"id": 1}))[0].contains("expected an array"));
    assert!(mutate(&|v| v[0]["labels"] = json!("external-host"))[0].contains("expected an array"));

    let user_op = spec.operation("POST", "/admin/users").unwrap();
    let user_schema = spec.response_schema(&user_op, 201).unwrap().unwrap();
    let created = log
        .iter()
        .find(|r| r.method == "POST" && r.status == 201 && r.path == "/api/v1/admin/users")
        .unwrap();
    let mut bad = created.response_body.clone().unwrap();
    bad["created"] = json!("yesterday");
    assert!(spec.validate(user_schema, &bad).unwrap_err()[0].contains("date-time"));

    // Requests: unknown path, method, query parameter, body field, missing required field.
    assert!(spec
        .check_request("GET", "/admin/actions/runnerz", &[], None)
        .is_err());
    assert!(spec
        .check_request("PUT", "/admin/actions/runners", &[], None)
        .is_err());
    assert!(spec
        .check_request(
            "GET",
            "/admin/actions/runners/jobs",
            &["labelz".into()],
            None
        )
        .is_err());
    let body = json!({"username": "a", "email": "a@b.invalid", "must_change_pasword": false});
    assert!(spec
        .check_request("POST", "/admin/users", &[], Some(&body))
        .is_err());
    assert!(spec
        .check_request("POST", "/admin/users", &[], Some(&json!({"username": "a"})))
        .is_err());
    assert!(spec
        .check_request(
            "POST",
            "/admin/actions/runners",
            &[],
            Some(&json!({"ephemeral": "yes", "name": "n"}))
        )
        .is_err());
    // … and accept the right ones.
    spec.check_request(
        "GET",
        "/admin/actions/runners/jobs",
        &["labels".into()],
        None,
    )
    .unwrap();
    spec.check_request(
        "POST",
        "/admin/actions/runners",
        &[],
        Some(&json!({"name": "n", "ephemeral": true})),
    )
    .unwrap();
    // The admin token routes are not in v15.
    assert!(spec
        .check_request("POST", "/admin/users/x/tokens", &[], None)
        .is_err());
    v17dev()
        .check_request(
            "POST",
            "/admin/users/x/tokens",
            &[],
            Some(&json!({"name": "n", "scopes": []})),
        )
        .unwrap();
}
