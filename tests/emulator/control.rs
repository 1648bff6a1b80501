//! Test controls over HTTP under `/_emulator/` (not logged, never faulted), for tests and demos
//! that drive an emulator in another process or network namespace.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::state::{Fault, RunTrigger};
use super::Shared;

pub fn router() -> Router<Shared> {
    Router::new()
        .route("/_emulator/state", get(state))
        .route("/_emulator/requests", get(requests).delete(clear_requests))
        .route("/_emulator/jobs", post(add_job))
        .route("/_emulator/repos", post(add_repo))
        .route("/_emulator/users", post(add_user))
        .route("/_emulator/faults", post(add_fault).delete(clear_faults))
}

fn bad_request(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"message": msg.into()})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct StateQuery {
    /// `false`: leave the request log out (`GET /_emulator/requests` has it).
    #[serde(default = "yes")]
    requests: bool,
}

fn yes() -> bool {
    true
}

async fn state(
    State(s): State<Shared>,
    axum::extract::Query(q): axum::extract::Query<StateQuery>,
) -> Json<Value> {
    let st = s.lock().expect("emulator state lock");
    Json(if q.requests {
        st.snapshot()
    } else {
        st.objects()
    })
}

async fn requests(State(s): State<Shared>) -> Json<Value> {
    Json(json!(s.lock().expect("emulator state lock").requests))
}

async fn clear_requests(State(s): State<Shared>) -> StatusCode {
    s.lock().expect("emulator state lock").requests.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct AddJob {
    /// `owner/name`; created (with an organisation owner) when missing.
    repo: String,
    labels: Vec<String>,
    #[serde(default = "default_job_name")]
    name: String,
    /// The run's trigger; a `push` run when absent.
    #[serde(default)]
    run: Option<RunTrigger>,
}

fn default_job_name() -> String {
    "build".to_owned()
}

async fn add_job(
    State(s): State<Shared>,
    body: Result<Json<AddJob>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(j)) = body else {
        return bad_request(
            "body: {\"repo\": \"owner/name\", \"labels\": [..], \"name\"?, \"run\"?: \
             {\"event\", \"trigger_event\", \"is_fork_pull_request\"}}",
        );
    };
    let Some((owner, repo)) = j.repo.split_once('/') else {
        return bad_request("repo must be owner/name");
    };
    let trigger = j.run.unwrap_or_else(RunTrigger::push);
    let (id, handle, repo_id, run_id) = s
        .lock()
        .expect("emulator state lock")
        .add_job_in_run(owner, repo, &j.labels, &j.name, trigger);
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "handle": handle, "repo_id": repo_id, "run_id": run_id})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct AddRepo {
    owner: String,
    name: String,
}

async fn add_repo(
    State(s): State<Shared>,
    body: Result<Json<AddRepo>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(r)) = body else {
        return bad_request("body: {\"owner\", \"name\"}");
    };
    let id = s
        .lock()
        .expect("emulator state lock")
        .ensure_repo(&r.owner, &r.name);
    (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
}

#[derive(Deserialize)]
struct AddUser {
    login: String,
    password: String,
    #[serde(default)]
    must_change_password: bool,
    #[serde(default)]
    admin: bool,
    /// The address a self-registered user chose (default `<login>@users.forgejo.emulator`).
    #[serde(default)]
    email: Option<String>,
}

async fn add_user(
    State(s): State<Shared>,
    body: Result<Json<AddUser>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(u)) = body else {
        return bad_request(
            "body: {\"login\", \"password\", \"must_change_password\"?, \"admin\"?, \"email\"?}",
        );
    };
    let mut st = s.lock().expect("emulator state lock");
    if st.user_by_login(&u.login).is_some() {
        return bad_request(format!("user {} exists", u.login));
    }
    let email = u
        .email
        .clone()
        .unwrap_or_else(|| format!("{}@users.forgejo.emulator", u.login));
    if st
        .users
        .iter()
        .any(|x| x.email.eq_ignore_ascii_case(&email))
    {
        return bad_request(format!("e-mail {email} is in use"));
    }
    let id = st.insert_user(
        &u.login,
        &email,
        &u.password,
        u.admin,
        u.must_change_password,
    );
    (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
}

async fn add_fault(
    State(s): State<Shared>,
    body: Result<Json<Fault>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(f)) => {
            s.lock().expect("emulator state lock").faults.push(f);
            StatusCode::CREATED.into_response()
        }
        Err(e) => bad_request(format!(
            "{e}; body: {{\"method\", \"route\", \"kind\": \"status\"|\"delay\"|\"malformed_json\"|\"unauthorized\"|\"hang\", \
             \"status\"?, \"delay_ms\"?, \"hang_ms\"?, \"times\"?}}"
        )),
    }
}

async fn clear_faults(State(s): State<Shared>) -> StatusCode {
    s.lock().expect("emulator state lock").faults.clear();
    StatusCode::NO_CONTENT
}
