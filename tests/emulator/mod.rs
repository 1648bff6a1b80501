//! An in-memory Forgejo for tests: the REST routes the orchestrator uses, the runner's Connect RPC,
//! test controls, a request log and fault injection. See tests/emulator/README.md for exactly what
//! it implements and where it differs from Forgejo.
//!
//! Used as a library (`tests/common/emulator.rs`) and as the `forgejo-emulator` example binary.
// Every test crate links all of it but uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod control;
pub mod rest;
pub mod rpc;
pub mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

pub use state::{Fault, FaultKind, JobStatus, LoggedRequest, RunTrigger};

pub type Shared = Arc<Mutex<state::State>>;

/// Scopes of the admin token the emulator issues: what README.md says the orchestrator needs at
/// instance level (`write:admin` covers `read:admin` and the runner level's `write:` scope).
pub const ADMIN_SCOPES: &[&str] = &["write:admin", "read:user", "read:repository"];

/// Default reported version: a released v15.
pub const DEFAULT_VERSION: &str = "15.0.3+gitea-1.22.0";

#[derive(Debug, Clone)]
pub struct Options {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Reported by `GET /version`.
    pub version: String,
    /// The admin token; random when `None`.
    pub admin_token: Option<String>,
    pub admin_login: String,
    pub admin_scopes: Vec<String>,
    /// Serve `/admin/users/{username}/tokens`; by default when the version's major is ≥ 16.
    pub admin_token_routes: Option<bool>,
    /// `owner/name` repositories to create at start.
    pub repos: Vec<String>,
    /// The jobs search lists `run_id` (Forgejo's development branch); v15 does not.
    pub job_run_id: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            version: DEFAULT_VERSION.to_owned(),
            admin_token: None,
            admin_login: "forgejo-admin".to_owned(),
            admin_scopes: ADMIN_SCOPES.iter().map(|s| s.to_string()).collect(),
            admin_token_routes: None,
            repos: Vec::new(),
            job_run_id: false,
        }
    }
}

/// A job added through [`Emulator::add_job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedJob {
    pub id: i64,
    pub handle: String,
    pub repo_id: i64,
    /// The job's run (each added job gets a run of its own).
    pub run_id: i64,
}

/// A running emulator; stops when dropped.
pub struct Emulator {
    url: String,
    admin_token: String,
    state: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Emulator {
    /// Starts on 127.0.0.1 with every default.
    pub async fn start_default() -> Self {
        Self::start(Options::default())
            .await
            .expect("emulator starts")
    }

    pub async fn start(opts: Options) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let admin_token = opts
            .admin_token
            .clone()
            .unwrap_or_else(|| state::random_hex(20));
        let major: u64 = opts
            .version
            .trim_start_matches('v')
            .split(['.', '-', '+'])
            .next()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        let admin_token_routes = opts.admin_token_routes.unwrap_or(major >= 16);
        let mut st = state::State::new(state::Options {
            version: opts.version.clone(),
            admin_login: opts.admin_login.clone(),
            admin_token: admin_token.clone(),
            admin_scopes: opts.admin_scopes.clone(),
            admin_token_routes,
            public_url: url.clone(),
            job_run_id: opts.job_run_id,
        });
        for r in &opts.repos {
            if let Some((o, n)) = r.split_once('/') {
                st.ensure_repo(o, n);
            }
        }
        let shared: Shared = Arc::new(Mutex::new(st));
        let app = Router::new()
            .merge(rest::router(admin_token_routes))
            .merge(rpc::router())
            .route_layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                log_and_faults,
            ))
            .fallback(unmatched)
            .merge(control::router())
            .with_state(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            url,
            admin_token,
            state: shared,
            stop: Some(stop),
        })
    }

    /// `http://ADDR:PORT` (no trailing slash, no `/api/v1`).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn add_repo(&self, owner: &str, name: &str) -> i64 {
        self.with_state(|s| s.ensure_repo(owner, name))
    }

    /// Adds a waiting job to `owner/name` with `runs-on: labels`.
    pub fn add_job(&self, repo: &str, labels: &[&str], name: &str) -> AddedJob {
        self.add_job_in_run(repo, labels, name, state::RunTrigger::push())
    }

    /// Adds a waiting job in a new run triggered by `trigger` (e.g. a pull request from a fork).
    pub fn add_job_in_run(
        &self,
        repo: &str,
        labels: &[&str],
        name: &str,
        trigger: state::RunTrigger,
    ) -> AddedJob {
        let (owner, repo) = repo.split_once('/').expect("repo is owner/name");
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let (id, handle, repo_id, run_id) =
            self.with_state(|s| s.add_job_in_run(owner, repo, &labels, name, trigger));
        AddedJob {
            id,
            handle,
            repo_id,
            run_id,
        }
    }

    /// A user who signed up by themselves with `email` (not created through the admin API: no
    /// `login_name`), e.g. someone squatting a CI user's name.
    pub fn register_user(&self, login: &str, email: &str, password: &str) -> i64 {
        self.with_state(|s| s.insert_user(login, email, password, false, false))
    }

    /// Adds a user directly (e.g. one with `must_change_password`).
    pub fn add_user(&self, login: &str, password: &str, must_change_password: bool) -> i64 {
        self.with_state(|s| {
            s.insert_user(
                login,
                &format!("{login}@users.forgejo.emulator"),
                password,
                false,
                must_change_password,
            )
        })
    }

    /// The whole state as JSON (users without passwords, tokens without secrets, runners, deleted
    /// runners, jobs with results and logs, faults, request log).
    pub fn snapshot(&self) -> Value {
        self.with_state(|s| s.snapshot())
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.with_state(|s| s.requests.clone())
    }

    pub fn clear_requests(&self) {
        self.with_state(|s| s.requests.clear())
    }

    pub fn inject(&self, method: &str, route: &str, kind: FaultKind, times: Option<u32>) {
        let f = Fault {
            method: method.to_owned(),
            route: route.to_owned(),
            kind,
            times,
        };
        self.with_state(|s| s.faults.push(f))
    }

    pub fn clear_faults(&self) {
        self.with_state(|s| s.faults.clear())
    }

    pub fn job(&self, id: i64) -> Option<state::Job> {
        self.with_state(|s| s.jobs.iter().find(|j| j.id == id).cloned())
    }

    /// Names of the live tokens of `login`.
    pub fn token_names(&self, login: &str) -> Vec<String> {
        self.with_state(|s| {
            let Some(uid) = s.user_by_login(login).map(|u| u.id) else {
                return Vec::new();
            };
            s.tokens
                .iter()
                .filter(|t| t.user_id == uid)
                .map(|t| t.name.clone())
                .collect()
        })
    }

    /// Direct access to the state, for assertions and set-ups the controls do not cover.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut state::State) -> R) -> R {
        f(&mut self.state.lock().expect("emulator state lock"))
    }

    /// Stops serving (also done on drop).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `/api/v1/admin/actions/runners/:runner_id` → `/admin/actions/runners/{runner_id}` (the spec's
/// and the client's template); RPC paths stay whole.
pub fn route_template(matched: &str) -> String {
    let t = matched.strip_prefix("/api/v1").unwrap_or(matched);
    t.split('/')
        .map(|seg| match seg.strip_prefix(':') {
            Some(name) => format!("{{{name}}}"),
            None => seg.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn fault_response(route: &str, kind: &FaultKind) -> Response {
    let rpc = route.starts_with("/api/actions/");
    match kind {
        FaultKind::Status { status } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if rpc {
                let mut r = rpc::connect_error("unavailable", "injected fault");
                *r.status_mut() = status;
                r
            } else {
                (
                    status,
                    axum::Json(json!({"message": "injected fault", "url": state::SWAGGER_URL})),
                )
                    .into_response()
            }
        }
        FaultKind::MalformedJson => (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"id\": 1, \"na",
        )
            .into_response(),
        FaultKind::Unauthorized => {
            if rpc {
                rpc::connect_error("unauthenticated", "unregistered runner")
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"message": "user does not exist [uid: 0, name: ]", "url": state::SWAGGER_URL})),
                )
                    .into_response()
            }
        }
        FaultKind::Delay { .. } => unreachable!("delays are applied around the handler"),
    }
}

/// Applies faults and records every API request with its answer.
async fn log_and_faults(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| route_template(m.as_str()))
        .unwrap_or_default();
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, 16 << 20).await.unwrap_or_default();
    let request_body = serde_json::from_slice::<Value>(&bytes).ok();
    let fault = s
        .lock()
        .expect("emulator state lock")
        .take_fault(&method, &route);

    let (resp, delay) = match &fault {
        None => (
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await,
            None,
        ),
        // A delay runs the request, then holds the answer back: the client times out while the
        // server has done the work (the case that makes non-idempotent retries dangerous).
        Some(FaultKind::Delay { delay_ms }) => (
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await,
            Some(Duration::from_millis(*delay_ms)),
        ),
        Some(kind) => (fault_response(&route, kind), None),
    };

    let (rparts, rbody) = resp.into_parts();
    let rbytes = to_bytes(rbody, usize::MAX).await.unwrap_or_default();
    let auth = rparts
        .extensions
        .get::<rest::AuthKind>()
        .map_or("none", |a| a.0)
        .to_owned();
    let response_body = serde_json::from_slice::<Value>(&rbytes).ok();
    let response_text = if response_body.is_none() && !rbytes.is_empty() {
        Some(String::from_utf8_lossy(&rbytes).into_owned())
    } else {
        None
    };
    let response_headers = rparts
        .headers
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "link" | "x-total-count" | "content-type"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    s.lock()
        .expect("emulator state lock")
        .requests
        .push(LoggedRequest {
            method,
            path,
            route,
            query,
            auth,
            request_body,
            status: rparts.status.as_u16(),
            response_body,
            response_text,
            response_headers,
            fault: fault.map(|f| format!("{f:?}")),
        });
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    Response::from_parts(rparts, Body::from(rbytes))
}

/// Unknown paths: Forgejo's API answers 404 with its not-found body.
async fn unmatched(State(s): State<Shared>, req: Request) -> Response {
    let body = state::ApiError::not_found().body;
    s.lock()
        .expect("emulator state lock")
        .requests
        .push(LoggedRequest {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            route: "<unmatched>".to_owned(),
            query: BTreeMap::new(),
            auth: "none".to_owned(),
            request_body: None,
            status: 404,
            response_body: Some(body.clone()),
            response_text: None,
            response_headers: BTreeMap::new(),
            fault: None,
        });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}
