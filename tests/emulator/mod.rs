//! An in-memory Forgejo for tests: the REST routes the orchestrator uses, the runner's Connect RPC,
//! test controls, a request log and fault injection. See tests/emulator/README.md for exactly what
//! it implements and where it differs from Forgejo.
//!
//! Used as a library (`tests/common/emulator.rs`) and as the `forgejo-emulator` example binary.
// A library compiled whole into each user, each using part of it: several test crates (through
// tests/common/emulator.rs), the `forgejo-emulator` example and the lib's unit tests
// (src/controller/prepare_tests.rs). It cannot be a crate of its own (a dev-dependency) without a
// workspace, so its unused parts are allowed here, in one place.
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

/// A runner as the state shows it (live, or deleted with the reason).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RunnerView {
    pub id: i64,
    pub uuid: String,
    pub name: String,
    pub description: String,
    /// What its `Declare` sent: empty until the runner has declared (its VM booted that far).
    pub version: String,
    /// Forgejo's clock: `offline`, `idle` or `active`.
    pub status: String,
    /// Tasks handed out to it.
    pub tasks: Vec<i64>,
    /// `None` while it exists.
    #[serde(default)]
    pub deleted_because: Option<String>,
}

/// The one handle on an emulator, whichever way it runs: in this process (`Emulator::start`, for
/// async tests that also reach into its state) or as the `forgejo-emulator` process
/// (`Emulator::spawn`, e.g. behind NAT in a network namespace for `serve` tests). The test controls
/// are the same for both; the process is driven over its `/_emulator/` routes. Stops when dropped.
pub struct Emulator {
    url: String,
    admin_token: String,
    backend: Backend,
}

enum Backend {
    InProcess {
        state: Shared,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    },
    Process {
        child: std::process::Child,
        /// Runs a program where the emulator is reachable (e.g. `nsenter --net=… --`).
        prefix: Vec<String>,
    },
}

impl Emulator {
    /// Starts in this process on 127.0.0.1 with every default.
    pub async fn start_default() -> Self {
        Self::start(Options::default())
            .await
            .expect("emulator starts")
    }

    /// Starts in this process.
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
            backend: Backend::InProcess {
                state: shared,
                stop: Some(stop),
            },
        })
    }

    /// Starts the `forgejo-emulator` binary (`binary`) listening on `listen`, run through `prefix`
    /// (e.g. `["nsenter", "--net=/run/netns/x", "--"]`, or nothing); its controls are `curl` calls
    /// run through the same prefix. Blocks until it prints its JSON line.
    pub fn spawn(binary: &std::path::Path, listen: &str, prefix: &[&str]) -> Self {
        use std::io::BufRead;
        let prefix: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        let mut child = Self::command(&prefix, binary.to_str().expect("UTF-8 path"))
            .args(["--listen", listen])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the emulator's first line");
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("emulator said {line:?}: {e}"));
        Self {
            url: v["url"]
                .as_str()
                .expect("url")
                .trim_end_matches('/')
                .to_owned(),
            admin_token: v["admin_token"].as_str().expect("admin_token").to_owned(),
            backend: Backend::Process { child, prefix },
        }
    }

    fn command(prefix: &[String], program: &str) -> std::process::Command {
        match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => std::process::Command::new(program),
        }
    }

    /// `curl` against a control route of the emulator process; its answer as JSON (`null` if none).
    fn control(&self, method: &str, route: &str, body: Option<Value>) -> Value {
        let Backend::Process { prefix, .. } = &self.backend else {
            unreachable!("controls over HTTP are for the emulator process")
        };
        let mut cmd = Self::command(prefix, "curl");
        cmd.args(["-sS", "--fail-with-body", "--max-time", "20", "-X", method]);
        if let Some(body) = body {
            cmd.args([
                "-H",
                "content-type: application/json",
                "-d",
                &body.to_string(),
            ]);
        }
        let out = cmd
            .arg(format!("{}/_emulator/{route}", self.url))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "{method} /_emulator/{route}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// `http://ADDR:PORT` (no trailing slash, no `/api/v1`).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn add_repo(&self, owner: &str, name: &str) -> i64 {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.ensure_repo(owner, name)),
            Backend::Process { .. } => {
                self.control("POST", "repos", Some(json!({"owner": owner, "name": name})))["id"]
                    .as_i64()
                    .expect("repo id")
            }
        }
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
        let (owner, repo_name) = repo.split_once('/').expect("repo is owner/name");
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        match &self.backend {
            Backend::InProcess { .. } => {
                let (id, handle, repo_id, run_id) =
                    self.with_state(|s| s.add_job_in_run(owner, repo_name, &labels, name, trigger));
                AddedJob {
                    id,
                    handle,
                    repo_id,
                    run_id,
                }
            }
            Backend::Process { .. } => {
                let v = self.control(
                    "POST",
                    "jobs",
                    Some(json!({"repo": repo, "labels": labels, "name": name, "run": trigger})),
                );
                AddedJob {
                    id: v["id"].as_i64().expect("job id"),
                    handle: v["handle"].as_str().expect("job handle").to_owned(),
                    repo_id: v["repo_id"].as_i64().expect("repo id"),
                    run_id: v["run_id"].as_i64().expect("run id"),
                }
            }
        }
    }

    /// A user who signed up by themselves with `email` (not created through the admin API: no
    /// `login_name`), e.g. someone squatting a CI user's name.
    pub fn register_user(&self, login: &str, email: &str, password: &str) -> i64 {
        match &self.backend {
            Backend::InProcess { .. } => {
                self.with_state(|s| s.insert_user(login, email, password, false, false))
            }
            Backend::Process { .. } => self.control(
                "POST",
                "users",
                Some(json!({"login": login, "password": password, "email": email})),
            )["id"]
                .as_i64()
                .expect("user id"),
        }
    }

    /// Adds a user directly (e.g. one with `must_change_password`).
    pub fn add_user(&self, login: &str, password: &str, must_change_password: bool) -> i64 {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| {
                s.insert_user(
                    login,
                    &format!("{login}@users.forgejo.emulator"),
                    password,
                    false,
                    must_change_password,
                )
            }),
            Backend::Process { .. } => self.control(
                "POST",
                "users",
                Some(json!({"login": login, "password": password,
                    "must_change_password": must_change_password})),
            )["id"]
                .as_i64()
                .expect("user id"),
        }
    }

    /// The whole state as JSON (users without passwords, tokens without secrets, runners, deleted
    /// runners, jobs with results and logs, faults, request log).
    pub fn snapshot(&self) -> Value {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.snapshot()),
            Backend::Process { .. } => self.control("GET", "state", None),
        }
    }

    /// The state without the request log (users, tokens, repositories, runners, jobs, runs,
    /// faults): what the helpers below read, cheap however many requests were made.
    pub fn objects(&self) -> Value {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.objects()),
            Backend::Process { .. } => self.control("GET", "state?requests=false", None),
        }
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.requests.clone()),
            Backend::Process { .. } => {
                serde_json::from_value(self.control("GET", "requests", None))
                    .expect("the request log")
            }
        }
    }

    pub fn clear_requests(&self) {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.requests.clear()),
            Backend::Process { .. } => {
                self.control("DELETE", "requests", None);
            }
        }
    }

    /// Makes `method route` answer with `kind`, for `times` requests (`None`: until cleared).
    pub fn inject(&self, method: &str, route: &str, kind: FaultKind, times: Option<u32>) {
        let f = Fault {
            method: method.to_owned(),
            route: route.to_owned(),
            kind,
            times,
        };
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.faults.push(f)),
            Backend::Process { .. } => {
                self.control("POST", "faults", Some(json!(f)));
            }
        }
    }

    pub fn clear_faults(&self) {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.faults.clear()),
            Backend::Process { .. } => {
                self.control("DELETE", "faults", None);
            }
        }
    }

    pub fn job(&self, id: i64) -> Option<state::Job> {
        self.jobs().into_iter().find(|j| j.id == id)
    }

    /// Every job, in the order they were added.
    pub fn jobs(&self) -> Vec<state::Job> {
        match &self.backend {
            Backend::InProcess { .. } => self.with_state(|s| s.jobs.clone()),
            Backend::Process { .. } => {
                serde_json::from_value(self.objects()["jobs"].take()).expect("jobs")
            }
        }
    }

    /// Names of the live tokens of `login`.
    pub fn token_names(&self, login: &str) -> Vec<String> {
        self.objects()["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .filter(|t| t["user"].as_str() == Some(login))
            .map(|t| t["name"].as_str().expect("token name").to_owned())
            .collect()
    }

    /// Names of the runners that exist.
    pub fn runner_names(&self) -> Vec<String> {
        self.objects()["runners"]
            .as_array()
            .expect("runners")
            .iter()
            .map(|r| r["name"].as_str().expect("runner name").to_owned())
            .collect()
    }

    /// Names of the runners deleted so far (by the server or by a client).
    pub fn deleted_runner_names(&self) -> Vec<String> {
        self.objects()["deleted_runners"]
            .as_array()
            .expect("deleted runners")
            .iter()
            .map(|r| r["name"].as_str().expect("runner name").to_owned())
            .collect()
    }

    /// Every runner registered so far, live or deleted, in registration order.
    pub fn runners_ever(&self) -> Vec<RunnerView> {
        let mut state = self.objects();
        let mut all: Vec<RunnerView> =
            serde_json::from_value(state["runners"].take()).expect("runners");
        all.extend(
            serde_json::from_value::<Vec<RunnerView>>(state["deleted_runners"].take())
                .expect("deleted runners"),
        );
        all.sort_by_key(|r| r.id);
        all
    }

    /// Logins of every user (and organisation).
    pub fn user_logins(&self) -> Vec<String> {
        self.objects()["users"]
            .as_array()
            .expect("users")
            .iter()
            .map(|u| u["login"].as_str().expect("login").to_owned())
            .collect()
    }

    /// The scopes of each token created for `login` (successfully, through either token route),
    /// in order, from the request log: tokens are revoked when their job ends.
    pub fn token_scopes_requested(&self, login: &str) -> Vec<Vec<String>> {
        let routes = [
            format!("/api/v1/users/{login}/tokens"),
            format!("/api/v1/admin/users/{login}/tokens"),
        ];
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.status == 201 && routes.contains(&r.path))
            .map(|r| {
                r.request_body.as_ref().expect("a token request has a body")["scopes"]
                    .as_array()
                    .expect("scopes")
                    .iter()
                    .map(|s| s.as_str().expect("scope").to_owned())
                    .collect()
            })
            .collect()
    }

    /// Direct access to the state, for assertions and set-ups the controls do not cover. Only for
    /// the emulator in this process.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut state::State) -> R) -> R {
        match &self.backend {
            Backend::InProcess { state, .. } => f(&mut state.lock().expect("emulator state lock")),
            Backend::Process { .. } => {
                panic!("with_state needs the emulator in this process (Emulator::start)")
            }
        }
    }

    /// Stops serving (also done on drop).
    pub fn stop(&mut self) {
        match &mut self.backend {
            Backend::InProcess { stop, .. } => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
            }
            Backend::Process { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
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
        FaultKind::Delay { .. } | FaultKind::Hang { .. } => {
            unreachable!("delays and hangs are applied around the handler")
        }
    }
}

/// Applies faults and records every API request with its answer. While the server hangs
/// ([`FaultKind::Hang`]) a request waits for the hang's end in a task of its own, so it is handled
/// even when its client gives up and closes the connection meanwhile.
async fn log_and_faults(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let hung = {
        let mut st = s.lock().expect("emulator state lock");
        let now = std::time::Instant::now();
        if let Some(i) = st.faults.iter().position(|f| {
            matches!(f.kind, FaultKind::Hang { .. })
                && f.method.eq_ignore_ascii_case(req.method().as_str())
                && req
                    .extensions()
                    .get::<MatchedPath>()
                    .is_some_and(|m| route_template(m.as_str()) == f.route)
        }) {
            if let Some(FaultKind::Hang { hang_ms }) = st.take_fault_at(i) {
                let until = now + Duration::from_millis(hang_ms);
                st.hung_until = Some(st.hung_until.map_or(until, |u| u.max(until)));
            }
        }
        st.hung_until.filter(|u| *u > now)
    };
    match hung {
        None => handle_logged(s, req, next).await,
        Some(until) => tokio::spawn(async move {
            tokio::time::sleep_until(until.into()).await;
            handle_logged(s, req, next).await
        })
        .await
        .unwrap_or_else(|e| {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("emulator: {e}")).into_response()
        }),
    }
}

async fn handle_logged(s: Shared, req: Request, next: Next) -> Response {
    let at_ms = state::unix_now().as_millis() as u64;
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
            at_ms,
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
            at_ms: state::unix_now().as_millis() as u64,
        });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}
