//! The REST API under `/api/v1`: the routes the orchestrator uses, with Forgejo's checks in
//! Forgejo's order (authentication, `must_change_password`, token scope, object lookup, permission,
//! then the route's own rules).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::state::{
    normalize_scopes, random_hex, random_uuid, valid_username, ApiError, JobStatus, Principal,
    Runner, RunnerScope, State as Emu, KNOWN_SCOPES,
};
use super::Shared;

/// Marks a response with how its caller authenticated, for the request log.
#[derive(Clone, Copy)]
pub struct AuthKind(pub &'static str);

/// A successful answer.
pub struct Reply {
    status: u16,
    body: Option<Value>,
    headers: Vec<(String, String)>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            headers: Vec::new(),
        }
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: String) -> Self {
        self.headers.push((name.to_owned(), value));
        self
    }
}

/// Forgejo's default and maximum page sizes (`[api] DEFAULT_PAGING_NUM`, `MAX_RESPONSE_ITEMS`).
const DEFAULT_LIMIT: usize = 30;
const MAX_LIMIT: usize = 50;

pub fn router(admin_token_routes: bool) -> Router<Shared> {
    let mut r = Router::new()
        .route("/api/v1/version", get(version))
        .route("/api/v1/user", get(current_user))
        .route("/api/v1/users/:username", get(get_user))
        .route("/api/v1/admin/users", post(create_user))
        .route(
            "/api/v1/admin/users/:username",
            axum::routing::patch(edit_user).delete(delete_user),
        )
        .route(
            "/api/v1/users/:username/tokens",
            get(list_tokens).post(create_token),
        )
        .route(
            "/api/v1/users/:username/tokens/:token",
            axum::routing::delete(delete_token),
        )
        .route("/api/v1/repositories/:id", get(get_repository))
        .route("/api/v1/repos/:owner/:repo/actions/runs", get(list_runs))
        .route(
            "/api/v1/repos/:owner/:repo/actions/runs/:run_id",
            get(get_run),
        );
    if admin_token_routes {
        r = r
            .route(
                "/api/v1/admin/users/:username/tokens",
                get(list_tokens).post(create_token),
            )
            .route(
                "/api/v1/admin/users/:username/tokens/:token",
                axum::routing::delete(delete_token),
            );
    }
    for prefix in [
        "/api/v1/admin",
        "/api/v1/orgs/:org",
        "/api/v1/repos/:owner/:repo",
        "/api/v1/user",
    ] {
        r = r
            .route(
                &format!("{prefix}/actions/runners"),
                get(list_runners).post(register_runner),
            )
            .route(&format!("{prefix}/actions/runners/jobs"), get(search_jobs))
            .route(
                &format!("{prefix}/actions/runners/:runner_id"),
                get(get_runner).delete(delete_runner),
            );
    }
    r
}

/// Authenticates, applies the `must_change_password` rule, runs `f` under the state lock.
fn call(
    s: &Shared,
    h: &HeaderMap,
    f: impl FnOnce(&mut Emu, &Principal) -> Result<Reply, ApiError>,
) -> Response {
    let mut st = s.lock().expect("emulator state lock");
    let header = h.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let (kind, result) = match st.authenticate(header) {
        Err(e) => ("invalid", Err(e)),
        Ok(p) => (
            p.kind(),
            st.check_must_change_password(&p)
                .and_then(|()| f(&mut st, &p)),
        ),
    };
    let (status, body, headers) = match result {
        Ok(r) => (r.status, r.body, r.headers),
        Err(e) => (e.status, Some(e.body), Vec::new()),
    };
    let mut resp = match body {
        Some(b) => (
            axum::http::StatusCode::from_u16(status).expect("valid status"),
            axum::Json(b),
        )
            .into_response(),
        None => axum::http::StatusCode::from_u16(status)
            .expect("valid status")
            .into_response(),
    };
    for (k, v) in headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).expect("valid header name"),
            v.parse().expect("valid header value"),
        );
    }
    resp.extensions_mut().insert(AuthKind(kind));
    resp
}

/// Decodes a JSON body as Forgejo's binding does: a body that does not decode is a 422.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::new(422, format!("invalid JSON body: {e}")))
}

fn required(field: &str, value: &Option<String>) -> Result<String, ApiError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v.clone()),
        _ => Err(ApiError::new(422, format!("[{field}]: Required"))),
    }
}

/// Applies `page`/`limit` and returns the page with `X-Total-Count` and, when there are other
/// pages, a `Link` header with `next`/`last`/`first`/`prev` like Forgejo's `SetLinkHeader`.
fn paginate<T>(
    items: Vec<T>,
    q: &HashMap<String, String>,
    path: &str,
    base: &str,
) -> (Vec<T>, Vec<(String, String)>) {
    let page = q
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p > 0)
        .unwrap_or(1);
    let limit = q
        .get("limit")
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(DEFAULT_LIMIT)
        .min(MAX_LIMIT);
    let total = items.len();
    let pages = total.div_ceil(limit).max(1);
    let mut headers = vec![("x-total-count".to_owned(), total.to_string())];
    let link =
        |p: usize, rel: &str| format!("<{base}{path}?limit={limit}&page={p}>; rel=\"{rel}\"");
    let mut links = Vec::new();
    if page < pages {
        links.push(link(page + 1, "next"));
        links.push(link(pages, "last"));
    }
    if page > 1 {
        links.push(link(1, "first"));
        links.push(link(page - 1, "prev"));
    }
    if !links.is_empty() {
        headers.push(("link".to_owned(), links.join(",")));
    }
    let slice = items
        .into_iter()
        .skip((page - 1) * limit)
        .take(limit)
        .collect();
    (slice, headers)
}

// ---------------------------------------------------------------------- misc

async fn version(State(s): State<Shared>, h: HeaderMap) -> Response {
    call(&s, &h, |st, _| {
        Ok(Reply::json(200, json!({"version": st.opts.version})))
    })
}

async fn current_user(State(s): State<Shared>, h: HeaderMap) -> Response {
    call(&s, &h, |st, p| {
        st.require_scope(p, "read:user")?;
        let id = st.require_signed_in(p)?;
        let u = st.user(id).expect("principal exists").clone();
        Ok(Reply::json(200, st.user_json_authed(&u, true)))
    })
}

async fn get_user(State(s): State<Shared>, h: HeaderMap, Path(username): Path<String>) -> Response {
    call(&s, &h, |st, p| {
        st.require_scope(p, "read:user")?;
        let u = st
            .user_by_login(&username)
            .cloned()
            .ok_or_else(ApiError::not_found)?;
        let viewer_admin = p
            .user_id()
            .and_then(|id| st.user(id))
            .is_some_and(|v| v.is_admin);
        let visible = match u.visibility.as_str() {
            "public" => true,
            "limited" => p.user_id().is_some(),
            _ => viewer_admin || p.user_id() == Some(u.id),
        };
        if !visible {
            return Err(ApiError::not_found());
        }
        let authed = viewer_admin || p.user_id() == Some(u.id);
        Ok(Reply::json(200, st.user_json_authed(&u, authed)))
    })
}

async fn get_repository(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>) -> Response {
    call(&s, &h, |st, p| {
        st.require_signed_in(p)?;
        st.require_scope(p, "read:repository")?;
        let id: i64 = id.parse().map_err(|_| ApiError::not_found())?;
        let r = st.repo(id).cloned().ok_or_else(ApiError::not_found)?;
        Ok(Reply::json(200, st.repo_json(&r)))
    })
}

// ---------------------------------------------------------------------- runs

/// The statuses Forgejo's `StatusFromString` knows.
const RUN_STATUSES: &[&str] = &[
    "unknown",
    "waiting",
    "running",
    "success",
    "failure",
    "cancelled",
    "skipped",
    "blocked",
];

/// Repeated query keys (`status=a&status=b`), which `Query<HashMap>` would collapse.
fn query_all(raw: Option<&str>, key: &str) -> Vec<String> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// `GET /repos/{owner}/{repo}/actions/runs`: `read:repository`; 404 unknown repository; `status`
/// and `event` filters (repeatable; an unknown status is a 400 `unknown status: …`); `page`,
/// `limit`; newest first; `{"total_count", "workflow_runs"}`.
async fn list_runs(
    State(s): State<Shared>,
    h: HeaderMap,
    Path((owner, repo)): Path<(String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    call(&s, &h, |st, p| {
        st.require_scope(p, "read:repository")?;
        let repo_id = st
            .repo_by_name(&owner, &repo)
            .map(|r| r.id)
            .ok_or_else(ApiError::not_found)?;
        let statuses = query_all(raw.as_deref(), "status");
        if let Some(bad) = statuses
            .iter()
            .find(|s| !RUN_STATUSES.contains(&s.as_str()))
        {
            return Err(ApiError::new(400, format!("unknown status: {bad}")));
        }
        let events = query_all(raw.as_deref(), "event");
        let mut runs: Vec<_> = st
            .runs
            .iter()
            .filter(|r| r.repo_id == repo_id)
            .filter(|r| statuses.is_empty() || statuses.iter().any(|s| s == st.run_status(r)))
            .filter(|r| events.is_empty() || events.contains(&r.trigger.event))
            .cloned()
            .collect();
        runs.reverse();
        let total = runs.len();
        let (page, _) = paginate(runs, &q, "", "");
        let entries: Vec<Value> = page.iter().map(|r| st.run_json(r)).collect();
        Ok(Reply::json(
            200,
            json!({"total_count": total, "workflow_runs": entries}),
        ))
    })
}

/// `GET /repos/{owner}/{repo}/actions/runs/{run_id}`: 404 unless the run is that repository's.
async fn get_run(
    State(s): State<Shared>,
    h: HeaderMap,
    Path((owner, repo, run_id)): Path<(String, String, String)>,
) -> Response {
    call(&s, &h, |st, p| {
        st.require_scope(p, "read:repository")?;
        let repo_id = st
            .repo_by_name(&owner, &repo)
            .map(|r| r.id)
            .ok_or_else(ApiError::not_found)?;
        let id: i64 = run_id.parse().map_err(|_| ApiError::not_found())?;
        let run = st
            .runs
            .iter()
            .find(|r| r.id == id && r.repo_id == repo_id)
            .cloned()
            .ok_or_else(ApiError::not_found)?;
        Ok(Reply::json(200, st.run_json(&run)))
    })
}

// ---------------------------------------------------------------------- users

#[derive(Deserialize)]
struct CreateUserOption {
    username: Option<String>,
    email: Option<String>,
    password: Option<String>,
    must_change_password: Option<bool>,
    visibility: Option<String>,
    /// Accepted and ignored: the emulator sends no mail.
    #[serde(rename = "send_notify")]
    _send_notify: Option<bool>,
    login_name: Option<String>,
    source_id: Option<i64>,
}

/// The emulator has no authentication sources: only 0 (local) exists. Forgejo's `parseAuthSource`
/// answers an unknown source with 422.
fn check_source(id: Option<i64>) -> Result<(), ApiError> {
    match id {
        None | Some(0) => Ok(()),
        Some(id) => Err(ApiError::new(
            422,
            format!("login source does not exist [id: {id}]"),
        )),
    }
}

fn check_password(pw: &str) -> Result<(), ApiError> {
    if pw.is_empty() {
        return Err(ApiError::new(400, "password is empty"));
    }
    if pw.chars().count() < 8 {
        return Err(ApiError::new(
            400,
            "password is too short (minimum 8 characters)",
        ));
    }
    Ok(())
}

fn check_visibility(v: &str) -> Result<(), ApiError> {
    if matches!(v, "public" | "limited" | "private") {
        Ok(())
    } else {
        Err(ApiError::new(422, format!("invalid visibility: {v}")))
    }
}

async fn create_user(State(s): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    call(&s, &h, |st, p| {
        st.require_scope(p, "write:admin")?;
        st.require_site_admin(p)?;
        let o: CreateUserOption = parse_body(&body)?;
        let username = required("Username", &o.username)?;
        let email = required("Email", &o.email)?;
        if !valid_username(&username) {
            return Err(ApiError::new(
                422,
                format!("user name is invalid [name: {username}]"),
            ));
        }
        if st.user_by_login(&username).is_some() {
            return Err(ApiError::new(
                422,
                format!("user already exists [name: {username}]"),
            ));
        }
        if !email.contains('@') {
            return Err(ApiError::new(
                422,
                format!("e-mail invalid [email: {email}]"),
            ));
        }
        if st
            .users
            .iter()
            .any(|u| u.email.eq_ignore_ascii_case(&email))
        {
            return Err(ApiError::new(
                422,
                format!("e-mail already in use [email: {email}]"),
            ));
        }
        let password = o.password.unwrap_or_default();
        check_password(&password)?;
        let visibility = o.visibility.unwrap_or_else(|| "public".into());
        check_visibility(&visibility)?;
        check_source(o.source_id)?;
        // Forgejo's default: the new user must change the password at first sign-in.
        let must_change = o.must_change_password.unwrap_or(true);
        let id = st.insert_user(&username, &email, &password, false, must_change);
        let u = st
            .users
            .iter_mut()
            .find(|u| u.id == id)
            .expect("just inserted");
        u.visibility = visibility;
        u.login_name = o.login_name.unwrap_or_default();
        let u = u.clone();
        Ok(Reply::json(201, st.user_json_authed(&u, true)))
    })
}

#[derive(Deserialize)]
struct EditUserOption {
    password: Option<String>,
    must_change_password: Option<bool>,
    visibility: Option<String>,
    email: Option<String>,
    login_name: Option<String>,
    source_id: Option<i64>,
}

async fn edit_user(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(username): Path<String>,
    body: Bytes,
) -> Response {
    call(&s, &h, |st, p| {
        st.require_scope(p, "write:admin")?;
        st.require_site_admin(p)?;
        let id = st
            .user_by_login(&username)
            .map(|u| u.id)
            .ok_or_else(ApiError::not_found)?;
        let o: EditUserOption = parse_body(&body)?;
        if let Some(pw) = o.password.as_deref().filter(|p| !p.is_empty()) {
            check_password(pw)?;
        }
        if let Some(v) = &o.visibility {
            check_visibility(v)?;
        }
        // Forgejo's EditUser: both or neither (an older EditUser even cleared login_name when it
        // was left out; the client always sends both).
        if o.login_name.is_some() != o.source_id.is_some() {
            return Err(ApiError::new(
                422,
                "source_id and login_name must be specified together",
            ));
        }
        check_source(o.source_id)?;
        if let Some(e) = &o.email {
            if st
                .users
                .iter()
                .any(|u| u.id != id && u.email.eq_ignore_ascii_case(e))
            {
                return Err(ApiError::new(
                    422,
                    format!("e-mail already in use [email: {e}]"),
                ));
            }
        }
        let u = st
            .users
            .iter_mut()
            .find(|u| u.id == id)
            .expect("found above");
        if let Some(pw) = o.password.filter(|p| !p.is_empty()) {
            u.password = pw;
        }
        if let Some(m) = o.must_change_password {
            u.must_change_password = m;
        }
        if let Some(v) = o.visibility {
            u.visibility = v;
        }
        if let Some(e) = o.email {
            u.email = e;
        }
        if let Some(l) = o.login_name {
            u.login_name = l;
        }
        let u = u.clone();
        Ok(Reply::json(200, st.user_json_authed(&u, true)))
    })
}

async fn delete_user(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(username): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    call(&s, &h, |st, p| {
        st.require_scope(p, "write:admin")?;
        let admin = st.require_site_admin(p)?;
        let id = st
            .user_by_login(&username)
            .map(|u| u.id)
            .ok_or_else(ApiError::not_found)?;
        if id == admin {
            return Err(ApiError::new(422, "you cannot delete yourself"));
        }
        let purge = q.get("purge").is_some_and(|v| v == "true");
        if !purge && st.repos.iter().any(|r| r.owner_id == id) {
            return Err(ApiError::new(
                422,
                format!("user still has ownership of repositories [uid: {id}]"),
            ));
        }
        st.users.retain(|u| u.id != id);
        st.tokens.retain(|t| t.user_id != id);
        let owned: Vec<i64> = st
            .runners
            .iter()
            .filter(|r| r.scope == RunnerScope::Owner(id))
            .map(|r| r.id)
            .collect();
        for r in owned {
            st.delete_runner(r, "owner deleted");
        }
        Ok(Reply::no_content())
    })
}

// ---------------------------------------------------------------------- tokens

/// The checks shared by the token routes, in Forgejo's order. `/users/{username}/tokens`
/// (released Forgejo): token scope (`user`), the user exists, the doer is that user or a site admin.
/// `/admin/users/{username}/tokens` (development branch): admin scope, signed in, site admin, user
/// exists.
fn token_route_user(
    st: &Emu,
    p: &Principal,
    route: &str,
    username: &str,
    write: bool,
) -> Result<i64, ApiError> {
    if route.starts_with("/api/v1/admin/") {
        st.require_scope(p, if write { "write:admin" } else { "read:admin" })?;
        st.require_site_admin(p)?;
        return st
            .user_by_login(username)
            .map(|u| u.id)
            .ok_or_else(ApiError::not_found);
    }
    st.require_scope(p, if write { "write:user" } else { "read:user" })?;
    let target = st
        .user_by_login(username)
        .map(|u| u.id)
        .ok_or_else(ApiError::not_found)?;
    let doer = p.user_id().ok_or_else(|| {
        ApiError::new(
            403,
            "doer should be the site admin or be same as the contextUser",
        )
    })?;
    if doer != target && !st.user(doer).is_some_and(|u| u.is_admin) {
        return Err(ApiError::new(
            403,
            "doer should be the site admin or be same as the contextUser",
        ));
    }
    Ok(target)
}

/// Forgejo's `reqBasicOrRevProxyAuth`, on creating and deleting tokens through
/// `/users/{username}/tokens`: only HTTP Basic with a password will do; a token — in the header or
/// as the Basic password — is refused. (Listing does not have this check.)
fn require_password_auth(route: &str, p: &Principal) -> Result<(), ApiError> {
    if route.starts_with("/api/v1/admin/") || matches!(p, Principal::Password { .. }) {
        Ok(())
    } else {
        Err(ApiError::new(401, "auth method not allowed"))
    }
}

#[derive(Deserialize)]
struct CreateAccessTokenOption {
    name: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

async fn create_token(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path(username): Path<String>,
    body: Bytes,
) -> Response {
    call(&s, &h, |st, p| {
        let user_id = token_route_user(st, p, route.as_str(), &username, true)?;
        let o: CreateAccessTokenOption = parse_body(&body)?;
        let name = required("Name", &o.name)?;
        require_password_auth(route.as_str(), p)?;
        if st
            .tokens
            .iter()
            .any(|t| t.user_id == user_id && t.name == name)
        {
            return Err(ApiError::new(
                400,
                "access token name has been used already",
            ));
        }
        let scopes = o.scopes.unwrap_or_default();
        if let Some(bad) = scopes.iter().find(|s| !KNOWN_SCOPES.contains(&s.as_str())) {
            return Err(ApiError::new(
                400,
                format!("invalid access token scope provided: {bad}"),
            ));
        }
        let scopes = normalize_scopes(&scopes);
        if scopes.is_empty() {
            return Err(ApiError::new(400, "access token must have a scope"));
        }
        let id = st.id();
        let token = super::state::Token {
            id,
            user_id,
            name,
            secret: random_hex(20),
            scopes,
        };
        let body = st.token_json(&token, true);
        st.tokens.push(token);
        Ok(Reply::json(201, body))
    })
}

async fn list_tokens(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path(username): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    call(&s, &h, |st, p| {
        let user_id = token_route_user(st, p, route.as_str(), &username, false)?;
        let all: Vec<Value> = st
            .tokens
            .iter()
            .filter(|t| t.user_id == user_id)
            .map(|t| st.token_json(t, false))
            .collect();
        let path = route.as_str().replace(":username", &username);
        let (page, headers) = paginate(all, &q, &path, &st.opts.public_url);
        let mut reply = Reply::json(200, Value::Array(page));
        for (k, v) in headers.into_iter().filter(|(k, _)| k == "x-total-count") {
            // Forgejo sets only X-Total-Count on this route.
            reply = reply.header(&k, v);
        }
        Ok(reply)
    })
}

async fn delete_token(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path((username, token)): Path<(String, String)>,
) -> Response {
    call(&s, &h, |st, p| {
        let user_id = token_route_user(st, p, route.as_str(), &username, true)?;
        require_password_auth(route.as_str(), p)?;
        let matches: Vec<i64> = match token.parse::<i64>() {
            Ok(id) => st
                .tokens
                .iter()
                .filter(|t| t.user_id == user_id && t.id == id)
                .map(|t| t.id)
                .collect(),
            Err(_) => st
                .tokens
                .iter()
                .filter(|t| t.user_id == user_id && t.name == token)
                .map(|t| t.id)
                .collect(),
        };
        match matches.as_slice() {
            [] => Err(ApiError::not_found()),
            [id] => {
                let id = *id;
                st.tokens.retain(|t| t.id != id);
                Ok(Reply::no_content())
            }
            _ => Err(ApiError::new(
                422,
                format!("multiple matches for token name '{token}'"),
            )),
        }
    })
}

// ---------------------------------------------------------------------- runners and jobs

/// The level a runner route addresses, resolved and permission-checked.
struct Level {
    scope: RunnerScope,
    /// Admin routes see every runner.
    admin: bool,
}

fn resolve_level(
    st: &Emu,
    p: &Principal,
    route: &str,
    params: &HashMap<String, String>,
    write: bool,
) -> Result<Level, ApiError> {
    let rw = if write { "write" } else { "read" };
    if route.starts_with("/api/v1/admin/") {
        st.require_scope(p, &format!("{rw}:admin"))?;
        st.require_site_admin(p)?;
        return Ok(Level {
            scope: RunnerScope::Instance,
            admin: true,
        });
    }
    if let Some(org) = params.get("org") {
        st.require_scope(p, &format!("{rw}:organization"))?;
        let doer = st.require_signed_in(p)?;
        let o = st
            .user_by_login(org)
            .filter(|u| u.is_org)
            .ok_or_else(ApiError::not_found)?;
        // The emulator has no memberships: only site admins own organisations.
        if !st.user(doer).is_some_and(|u| u.is_admin) {
            return Err(ApiError::new(403, "Must be an organization owner"));
        }
        return Ok(Level {
            scope: RunnerScope::Owner(o.id),
            admin: false,
        });
    }
    if let (Some(owner), Some(repo)) = (params.get("owner"), params.get("repo")) {
        st.require_scope(p, &format!("{rw}:repository"))?;
        let doer = st.require_signed_in(p)?;
        let r = st
            .repo_by_name(owner, repo)
            .ok_or_else(ApiError::not_found)?;
        if r.owner_id != doer && !st.user(doer).is_some_and(|u| u.is_admin) {
            return Err(ApiError::new(403, "user should be the owner of the repo"));
        }
        return Ok(Level {
            scope: RunnerScope::Repo(r.id),
            admin: false,
        });
    }
    st.require_scope(p, &format!("{rw}:user"))?;
    let doer = st.require_signed_in(p)?;
    Ok(Level {
        scope: RunnerScope::Owner(doer),
        admin: false,
    })
}

/// Runners of the level itself, or with `visible` also those of the levels below it.
fn runner_visible(st: &Emu, level: &Level, r: &Runner, visible: bool) -> bool {
    if r.scope == level.scope {
        return true;
    }
    if !visible {
        return false;
    }
    match (&level.scope, &r.scope) {
        (RunnerScope::Instance, _) => true,
        (RunnerScope::Owner(o), RunnerScope::Repo(repo)) => {
            st.repo(*repo).is_some_and(|x| x.owner_id == *o)
        }
        _ => false,
    }
}

async fn list_runners(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path(params): Path<HashMap<String, String>>,
    Query(q): Query<HashMap<String, String>>,
    uri: axum::http::Uri,
) -> Response {
    call(&s, &h, |st, p| {
        let level = resolve_level(st, p, route.as_str(), &params, false)?;
        let visible = q.get("visible").is_some_and(|v| v == "true");
        let all: Vec<Value> = st
            .runners
            .iter()
            .filter(|r| runner_visible(st, &level, r, visible))
            .map(|r| st.runner_json(r))
            .collect();
        let (page, headers) = paginate(all, &q, uri.path(), &st.opts.public_url);
        let mut reply = Reply::json(200, Value::Array(page));
        for (k, v) in headers {
            reply = reply.header(&k, v);
        }
        Ok(reply)
    })
}

#[derive(Deserialize)]
struct RegisterRunnerOptions {
    name: Option<String>,
    description: Option<String>,
    ephemeral: Option<bool>,
}

async fn register_runner(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    call(&s, &h, |st, p| {
        let level = resolve_level(st, p, route.as_str(), &params, true)?;
        let o: RegisterRunnerOptions = parse_body(&body)?;
        let name = required("Name", &o.name)?;
        let id = st.id();
        let runner = Runner {
            id,
            uuid: random_uuid(),
            token: random_hex(20),
            name,
            description: o.description.unwrap_or_default(),
            scope: level.scope,
            ephemeral: o.ephemeral.unwrap_or(false),
            labels: Vec::new(),
            version: String::new(),
            last_online: None,
            last_active: None,
            tasks: Vec::new(),
        };
        let body = json!({"id": runner.id, "uuid": runner.uuid, "token": runner.token});
        st.runners.push(runner);
        Ok(Reply::json(201, body))
    })
}

fn find_runner(st: &Emu, level: &Level, id: &str) -> Result<i64, ApiError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::new(400, format!("invalid runner id: {id}")))?;
    st.runners
        .iter()
        .find(|r| r.id == id && (level.admin || r.scope == level.scope))
        .map(|r| r.id)
        .ok_or_else(ApiError::not_found)
}

async fn get_runner(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    call(&s, &h, |st, p| {
        let level = resolve_level(st, p, route.as_str(), &params, false)?;
        let id = find_runner(st, &level, &params["runner_id"])?;
        let r = st
            .runners
            .iter()
            .find(|r| r.id == id)
            .expect("found")
            .clone();
        Ok(Reply::json(200, st.runner_json(&r)))
    })
}

async fn delete_runner(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    call(&s, &h, |st, p| {
        let level = resolve_level(st, p, route.as_str(), &params, true)?;
        let id = find_runner(st, &level, &params["runner_id"])?;
        st.delete_runner(id, "deleted through the API");
        Ok(Reply::no_content())
    })
}

async fn search_jobs(
    State(s): State<Shared>,
    h: HeaderMap,
    route: MatchedPath,
    Path(params): Path<HashMap<String, String>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    call(&s, &h, |st, p| {
        let level = resolve_level(st, p, route.as_str(), &params, false)?;
        let labels: Option<Vec<&str>> = q.get("labels").map(|l| {
            l.split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect()
        });
        let jobs: Vec<Value> = st
            .jobs
            .iter()
            // Picked-up jobs stay in the list until they finish.
            .filter(|j| matches!(j.status, JobStatus::Waiting | JobStatus::Running))
            .filter(|j| level.admin || st.scope_covers_job(&level.scope, j))
            // Subset rule: every `runs-on` label of the job is among the queried labels. A job
            // without `runs-on` matches only an empty `labels=` (Forgejo's `ItRunsOn`).
            .filter(|j| {
                labels.as_ref().map_or(true, |ls| {
                    if j.runs_on.is_empty() {
                        return ls.is_empty();
                    }
                    j.runs_on.iter().all(|r| ls.contains(&r.as_str()))
                })
            })
            .map(|j| st.job_json(j))
            .collect();
        // Go's nil slice: an empty result is `null`.
        let body = if jobs.is_empty() {
            Value::Null
        } else {
            Value::Array(jobs)
        };
        Ok(Reply::json(200, body))
    })
}
