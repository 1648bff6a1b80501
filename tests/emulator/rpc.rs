//! The runner side: Connect RPC (unary, JSON codec only) under `/api/actions/runner.v1.RunnerService/`,
//! message shapes from forgejo/actions-proto (`runner/v1/messages.proto`). Requests are read the way
//! protojson reads them (snake_case or lowerCamelCase names; int64 as number or string; enums as
//! name or number); answers are written the way protojson writes them (lowerCamelCase, int64 as
//! strings, enums by name, fields with default values left out).

use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::rest::AuthKind;
use super::state::{random_hex, random_uuid, JobStatus, Runner, RunnerScope, State as Emu};
use super::Shared;

pub const PREFIX: &str = "/api/actions/runner.v1.RunnerService";

pub fn router() -> Router<Shared> {
    Router::new()
        .route(&format!("{PREFIX}/Register"), post(register))
        .route(&format!("{PREFIX}/Declare"), post(declare))
        .route(&format!("{PREFIX}/FetchTask"), post(fetch_task))
        .route(
            &format!("{PREFIX}/FetchSingleTask"),
            post(fetch_single_task),
        )
        .route(&format!("{PREFIX}/UpdateTask"), post(update_task))
        .route(&format!("{PREFIX}/UpdateLog"), post(update_log))
}

/// A Connect error: HTTP status from the code, body `{"code", "message"}`.
pub fn connect_error(code: &str, message: &str) -> Response {
    let status = match code {
        "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "permission_denied" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "already_exists" | "aborted" => StatusCode::CONFLICT,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "unimplemented" => StatusCode::NOT_IMPLEMENTED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        axum::Json(json!({"code": code, "message": message})),
    )
        .into_response()
}

struct RpcError(&'static str, String);

type RpcResult = Result<Value, RpcError>;

/// Common framing: content type, JSON decoding, runner authentication, state lock, answer.
fn rpc(
    s: &Shared,
    h: &HeaderMap,
    body: &Bytes,
    authenticated: bool,
    f: impl FnOnce(&mut Emu, Option<i64>, &Value) -> RpcResult,
) -> Response {
    let ct = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        let mut r = connect_error(
            "unimplemented",
            "the emulator speaks only the Connect JSON codec (application/json)",
        );
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return r;
    }
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return connect_error("invalid_argument", "request body is not a JSON object"),
            Err(e) => {
                return connect_error("invalid_argument", &format!("cannot decode request: {e}"))
            }
        }
    };
    let mut st = s.lock().expect("emulator state lock");
    let runner = if authenticated {
        let uuid = h
            .get("x-runner-uuid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let token = h
            .get("x-runner-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match st
            .runners
            .iter_mut()
            .find(|r| r.uuid == uuid && r.token == token && !uuid.is_empty())
        {
            Some(r) => {
                r.last_online = Some(SystemTime::now());
                Some(r.id)
            }
            None => return connect_error("unauthenticated", "unregistered runner"),
        }
    } else {
        None
    };
    let mut resp = match f(&mut st, runner, &req) {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(RpcError(code, msg)) => connect_error(code, &msg),
    };
    resp.extensions_mut()
        .insert(AuthKind(if runner.is_some() { "runner" } else { "none" }));
    resp
}

/// A field by its proto name or its JSON (lowerCamelCase) name.
fn field<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    let camel: String = {
        let mut out = String::new();
        let mut up = false;
        for c in snake.chars() {
            if c == '_' {
                up = true;
            } else if up {
                out.extend(c.to_uppercase());
                up = false;
            } else {
                out.push(c);
            }
        }
        out
    };
    v.get(snake)
        .or_else(|| v.get(&camel))
        .filter(|x| !x.is_null())
}

fn int64(v: Option<&Value>) -> Result<i64, RpcError> {
    match v {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| RpcError("invalid_argument", format!("bad int64 {n}"))),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| RpcError("invalid_argument", format!("bad int64 {s:?}"))),
        Some(other) => Err(RpcError("invalid_argument", format!("bad int64 {other}"))),
    }
}

fn string(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Inserts `key: value` unless the value is the proto3 default (protojson leaves those out).
fn put(m: &mut Map<String, Value>, key: &str, value: Value) {
    let default = match &value {
        Value::Null => true,
        Value::String(s) => s.is_empty() || s == "0",
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty() && key != "context",
        Value::Number(_) => false,
    };
    if !default {
        m.insert(key.to_owned(), value);
    }
}

/// `runner.v1.Runner` as Forgejo's `Register` and `Declare` fill it: with the token, without a status.
fn runner_message(r: &Runner) -> Value {
    let mut m = Map::new();
    put(&mut m, "id", json!(r.id.to_string()));
    put(&mut m, "uuid", json!(r.uuid));
    put(&mut m, "token", json!(r.token));
    put(&mut m, "name", json!(r.name));
    put(&mut m, "version", json!(r.version));
    put(&mut m, "labels", json!(r.labels));
    put(&mut m, "ephemeral", json!(r.ephemeral));
    Value::Object(m)
}

/// `runner.v1.Task` for `task_id`.
fn task_message(st: &Emu, task_id: i64) -> Value {
    let task = st
        .tasks
        .iter()
        .find(|t| t.id == task_id)
        .expect("task exists");
    let job = st
        .jobs
        .iter()
        .find(|j| j.id == task.job_id)
        .expect("job exists");
    let repo = st.repo(job.repo_id).expect("repo exists");
    let owner = st
        .user(repo.owner_id)
        .map(|u| u.login.clone())
        .unwrap_or_default();
    let full = format!("{owner}/{}", repo.name);
    let workflow = format!(
        "name: ci\non: push\njobs:\n  {name}:\n    name: {name}\n    runs-on: [{labels}]\n    steps:\n    - run: echo job {id} of {full}\n",
        name = job.name,
        labels = job.runs_on.join(", "),
        id = job.id,
    );
    let base = &st.opts.public_url;
    let context = json!({
        "actor": owner,
        "api_url": format!("{base}/api/v1"),
        "event": {},
        "event_name": "push",
        "forgejo_default_actions_url": "https://data.forgejo.org",
        "job": job.name,
        "ref": "refs/heads/main",
        "ref_name": "main",
        "ref_type": "branch",
        "repository": full,
        "repository_owner": owner,
        "run_attempt": job.attempt.to_string(),
        "run_id": job.id.to_string(),
        "run_number": "1",
        "server_url": base,
        "sha": "0000000000000000000000000000000000000000",
        "token": task.token,
        "gitea_runtime_token": task.token,
        "workflow": "ci",
    });
    let secrets = json!({
        "GITHUB_TOKEN": task.token, "GITEA_TOKEN": task.token, "FORGEJO_TOKEN": task.token,
    });
    let mut m = Map::new();
    put(&mut m, "id", json!(task.id.to_string()));
    put(
        &mut m,
        "workflowPayload",
        json!(base64::engine::general_purpose::STANDARD.encode(workflow)),
    );
    put(&mut m, "context", context);
    put(&mut m, "secrets", secrets);
    Value::Object(m)
}

/// The answer of the fetch calls: `{"task"?, "tasksVersion"}`.
fn fetch_answer(st: &Emu, task: Option<i64>, tasks_version: i64) -> Value {
    let mut m = Map::new();
    if let Some(t) = task {
        m.insert("task".into(), task_message(st, t));
    }
    put(&mut m, "tasksVersion", json!(tasks_version.to_string()));
    Value::Object(m)
}

/// Forgejo's `FetchTask`/`FetchSingleTask` for `runner`: a task handed out earlier under the same
/// `x-runner-request-key` is handed out again (whatever its state; answered with tasks version 0);
/// otherwise, only when the runner's `tasks_version` differs from the latest one of its scope, the
/// first waiting job it may take (`PickTask`: never a second one for an ephemeral runner; scope;
/// `ItRunsOn`; and the job of `handle` when one is given).
fn fetch(
    st: &mut Emu,
    runner: i64,
    tasks_version: i64,
    handle: Option<&str>,
    key: Option<&str>,
) -> Value {
    if let Some(&t) = key.and_then(|k| st.request_keys.get(&(runner, k.to_owned()))) {
        return fetch_answer(st, Some(t), 0);
    }
    let r = st
        .runners
        .iter()
        .find(|r| r.id == runner)
        .expect("authenticated runner exists")
        .clone();
    let latest = st.latest_tasks_version(&r.scope);
    if tasks_version == latest || exhausted(&r) {
        return fetch_answer(st, None, latest);
    }
    let job = st
        .jobs
        .iter()
        .find(|j| {
            j.status == JobStatus::Waiting
                && handle.map_or(true, |h| j.handle == h)
                && st.runner_matches(&r, j)
        })
        .map(|j| j.id);
    let task = job.map(|j| st.assign(runner, j));
    if let (Some(t), Some(k)) = (task, key) {
        st.request_keys.insert((runner, k.to_owned()), t);
    }
    fetch_answer(st, task, latest)
}

/// An ephemeral runner gets one task in its life.
fn exhausted(r: &Runner) -> bool {
    r.ephemeral && !r.tasks.is_empty()
}

fn request_key(h: &HeaderMap) -> Option<String> {
    h.get("x-runner-request-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
}

async fn register(State(s): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    rpc(&s, &h, &body, false, |st, _, req| {
        let name = string(field(req, "name"));
        let token = string(field(req, "token"));
        if token.is_empty() || name.is_empty() {
            return Err(RpcError(
                "invalid_argument",
                "missing runner token, name".into(),
            ));
        }
        if token != st.registration_token {
            return Err(RpcError(
                "invalid_argument",
                "runner registration token not found".into(),
            ));
        }
        let id = st.id();
        let runner = Runner {
            id,
            uuid: random_uuid(),
            token: random_hex(20),
            name,
            description: String::new(),
            scope: RunnerScope::Instance,
            ephemeral: field(req, "ephemeral")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            // Kept as given: they are the runner's labels until its first `Declare` replaces them.
            labels: strings(field(req, "labels")),
            version: string(field(req, "version")),
            // `Register` is not intercepted: the runner stays offline until its first call.
            last_online: None,
            last_active: None,
            tasks: Vec::new(),
        };
        let msg = runner_message(&runner);
        st.runners.push(runner);
        Ok(json!({"runner": msg}))
    })
}

async fn declare(State(s): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    rpc(&s, &h, &body, true, |st, runner, req| {
        let id = runner.expect("authenticated");
        let r = st
            .runners
            .iter_mut()
            .find(|r| r.id == id)
            .expect("authenticated runner exists");
        // Replaces whatever `Register` or an earlier `Declare` stored; stored as sent, not parsed.
        r.labels = strings(field(req, "labels"));
        r.version = string(field(req, "version"));
        Ok(json!({"runner": runner_message(r)}))
    })
}

async fn fetch_task(State(s): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    let key = request_key(&h);
    rpc(&s, &h, &body, true, |st, runner, req| {
        let id = runner.expect("authenticated");
        let tasks_version = int64(field(req, "tasks_version"))?;
        Ok(fetch(st, id, tasks_version, None, key.as_deref()))
    })
}

async fn fetch_single_task(State(s): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    let key = request_key(&h);
    rpc(&s, &h, &body, true, |st, runner, req| {
        let id = runner.expect("authenticated");
        let tasks_version = int64(field(req, "tasks_version"))?;
        // As Forgejo: no handle (or an empty one) means any job the runner may take.
        let handle = string(field(req, "handle"));
        let handle = (!handle.is_empty()).then_some(handle.as_str());
        Ok(fetch(st, id, tasks_version, handle, key.as_deref()))
    })
}

fn parse_result(v: Option<&Value>) -> Result<Option<JobStatus>, RpcError> {
    let name = match v {
        None => return Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(0) => "RESULT_UNSPECIFIED",
            Some(1) => "RESULT_SUCCESS",
            Some(2) => "RESULT_FAILURE",
            Some(3) => "RESULT_CANCELLED",
            Some(4) => "RESULT_SKIPPED",
            _ => return Err(RpcError("invalid_argument", format!("unknown result {n}"))),
        },
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(RpcError("invalid_argument", format!("bad result {other}"))),
    };
    Ok(match name {
        "RESULT_UNSPECIFIED" => None,
        "RESULT_SUCCESS" => Some(JobStatus::Success),
        "RESULT_FAILURE" => Some(JobStatus::Failure),
        "RESULT_CANCELLED" => Some(JobStatus::Cancelled),
        "RESULT_SKIPPED" => Some(JobStatus::Skipped),
        other => {
            return Err(RpcError(
                "invalid_argument",
                format!("unknown result {other}"),
            ))
        }
    })
}

/// The task `task_id` of `runner`, and its job's index. Forgejo answers a missing task and another
/// runner's task with `internal`; `UpdateTask` (`UpdateTaskByState`) and `UpdateLog` (`GetTaskByID`)
/// word it differently.
fn own_task(st: &Emu, runner: i64, task_id: i64, update_task: bool) -> Result<usize, RpcError> {
    let Some(task) = st.tasks.iter().find(|t| t.id == task_id) else {
        let msg = if update_task {
            "update task: resource does not exist".to_owned()
        } else {
            format!("get task: task with id {task_id}: resource does not exist")
        };
        return Err(RpcError("internal", msg));
    };
    if task.runner_id != runner {
        let msg = if update_task {
            "update task: invalid runner for task"
        } else {
            "invalid runner for task"
        };
        return Err(RpcError("internal", msg.into()));
    }
    Ok(st
        .jobs
        .iter()
        .position(|j| j.id == task.job_id)
        .expect("job of task exists"))
}

/// Forgejo's interceptor marks a runner active on every `UpdateTask` and `UpdateLog`, before the call
/// is handled (so even when it then fails).
fn mark_active(st: &mut Emu, runner: i64) {
    if let Some(r) = st.runners.iter_mut().find(|r| r.id == runner) {
        r.last_active = Some(SystemTime::now());
    }
}

/// Forgejo ignores (logs) an output whose key is longer than 255 bytes or whose value exceeds 1 MiB.
fn output_accepted(key: &str, value: &str) -> bool {
    key.len() <= 255 && value.len() <= 1024 * 1024
}

async fn update_task(State(s): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    rpc(&s, &h, &body, true, |st, runner, req| {
        let id = runner.expect("authenticated");
        mark_active(st, id);
        let state = field(req, "state")
            .ok_or_else(|| RpcError("invalid_argument", "state is required".into()))?;
        let task_id = int64(field(state, "id"))?;
        let job = own_task(st, id, task_id, true)?;
        let result = parse_result(field(state, "result"))?;
        let outputs: Vec<(String, String)> = field(req, "outputs")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let j = &mut st.jobs[job];
        // A finished task is final: a later state changes nothing (`UpdateTaskByState`).
        if j.status == JobStatus::Running {
            if let Some(r) = result {
                // A final result finishes the job: it leaves the jobs list.
                j.status = r;
            }
        }
        // `InsertTaskOutputIfNotExist`: the first value of a key stays, even after the task ended.
        for (k, v) in outputs {
            if output_accepted(&k, &v) {
                j.outputs.entry(k).or_insert(v);
            }
        }
        // Every key stored for the task, not only those of this request.
        let sent: Vec<String> = j.outputs.keys().cloned().collect();
        let current = j.status;
        // Forgejo deletes an ephemeral runner on any final result it reports, even for a task that
        // had already finished (e.g. cancelled).
        if result.is_some() && st.runners.iter().any(|r| r.id == id && r.ephemeral) {
            st.delete_runner(id, "ephemeral runner finished its task");
        }
        let result_name = match current {
            JobStatus::Success => "RESULT_SUCCESS",
            JobStatus::Failure => "RESULT_FAILURE",
            JobStatus::Cancelled => "RESULT_CANCELLED",
            JobStatus::Skipped => "RESULT_SKIPPED",
            JobStatus::Waiting | JobStatus::Running => "RESULT_UNSPECIFIED",
        };
        let mut state_msg = Map::new();
        put(&mut state_msg, "id", json!(task_id.to_string()));
        if result_name != "RESULT_UNSPECIFIED" {
            state_msg.insert("result".into(), json!(result_name));
        }
        let mut m = Map::new();
        m.insert("state".into(), Value::Object(state_msg));
        put(&mut m, "sentOutputs", json!(sent));
        Ok(Value::Object(m))
    })
}

async fn update_log(State(s): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    rpc(&s, &h, &body, true, |st, runner, req| {
        let id = runner.expect("authenticated");
        mark_active(st, id);
        let task_id = int64(field(req, "task_id"))?;
        let index = int64(field(req, "index"))?;
        let job = own_task(st, id, task_id, false)?;
        let rows: Vec<String> = field(req, "rows")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|r| string(field(r, "content"))).collect())
            .unwrap_or_default();
        let no_more = field(req, "no_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if index < 0 {
            return Err(RpcError(
                "invalid_argument",
                format!("negative index {index}"),
            ));
        }
        let j = &mut st.jobs[job];
        let ack = j.log.len() as i64;
        // As Forgejo: nothing new (no rows, a gap, or only rows already received) just acknowledges.
        if !rows.is_empty() && index <= ack && rows.len() as i64 + index > ack {
            if j.log_closed {
                return Err(RpcError(
                    "already_exists",
                    "log file has been archived".into(),
                ));
            }
            // Rows before `ack` were received already (a retry): keep only the new ones.
            j.log.extend(rows.into_iter().skip((ack - index) as usize));
            j.log_closed = no_more;
        }
        let log = &j.log;
        let mut m = Map::new();
        put(&mut m, "ackIndex", json!(log.len().to_string()));
        Ok(Value::Object(m))
    })
}
