//! The HTTP core (auth, timeouts, retries, error mapping, observer) and the API calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LINK};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use url::Url;

use super::types::{
    AccessTokenWire, ActionRunListWire, CreateTokenBody, CreateUserBody, EditUserBody,
    RegisterRunnerBody, RepositoryWire, ServerVersionWire,
};
use super::{
    ci_email, generate_password, AccessToken, ActionRun, ClientConfig, Error, Job, JobStatus,
    Level, MintedToken, NewUser, RegisteredRunner, Repository, Runner, User, UserCreation,
};
use crate::secret::Secret;

/// The oldest Forgejo major version with ephemeral runners, the runner registration API and job
/// handles.
pub const MIN_MAJOR_VERSION: u64 = 15;

/// Page size for the paginated lists (runners, tokens).
const PAGE_LIMIT: u32 = 50;

/// Called after every HTTP request (each retry counts) with the route template (e.g.
/// `/admin/actions/runners/{runner_id}`), the HTTP status (0 when no answer came: timeout or
/// transport error) and the latency. For metrics; must not block.
pub trait RequestObserver: Send + Sync {
    fn observe(&self, route: &'static str, status: u16, latency: Duration);
}

impl<F> RequestObserver for F
where
    F: Fn(&'static str, u16, Duration) + Send + Sync,
{
    fn observe(&self, route: &'static str, status: u16, latency: Duration) {
        self(route, status, latency)
    }
}

/// What [`Client::probe`] found out about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// As the server reports it, e.g. `15.0.3+gitea-1.22.0`.
    pub version: String,
    pub major: u64,
    /// The token owner's login (the site admin at instance level).
    pub login: String,
    /// The server has `/admin/users/{username}/tokens` (development branch, v16+): the admin token
    /// manages CI-user tokens and no password is needed.
    pub admin_token_routes: bool,
}

/// The typed Forgejo client. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `<url>/api/v1`
    api: Url,
    config: ClientConfig,
    admin_token: Secret,
    observer: Option<Arc<dyn RequestObserver>>,
    repos: Mutex<HashMap<i64, Repository>>,
    admin_token_routes: AtomicBool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("api", &self.inner.api.as_str())
            .field("level", &self.inner.config.level)
            .field("admin_token", &self.inner.admin_token)
            .finish_non_exhaustive()
    }
}

enum Auth<'a> {
    /// `Authorization: token <admin token>`
    Admin,
    /// HTTP Basic with a user's password.
    Basic {
        username: &'a str,
        password: &'a Secret,
    },
}

struct Request<'a> {
    method: Method,
    route: &'static str,
    /// Path segments after `/api/v1`, unencoded.
    segments: Vec<&'a str>,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    auth: Auth<'a>,
}

impl<'a> Request<'a> {
    fn new(method: Method, route: &'static str, segments: Vec<&'a str>) -> Self {
        Self {
            method,
            route,
            segments,
            query: Vec::new(),
            body: None,
            auth: Auth::Admin,
        }
    }

    fn query(mut self, key: &'static str, value: impl ToString) -> Self {
        self.query.push((key, value.to_string()));
        self
    }

    fn json(mut self, body: &impl Serialize) -> Self {
        self.body = Some(serde_json::to_vec(body).expect("request bodies serialize"));
        self
    }

    fn basic(mut self, username: &'a str, password: &'a Secret) -> Self {
        self.auth = Auth::Basic { username, password };
        self
    }
}

struct Response {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

impl Client {
    /// A client for `config.url` acting with `admin_token`. No I/O: call [`Client::probe`] first.
    pub fn new(config: ClientConfig, admin_token: Secret) -> Result<Self, Error> {
        let mut api = config.url.clone();
        if api.cannot_be_a_base() || !matches!(api.scheme(), "http" | "https") {
            return Err(Error::BadUrl {
                url: config.url.to_string(),
            });
        }
        api.set_query(None);
        api.set_fragment(None);
        api.path_segments_mut()
            .map_err(|()| Error::BadUrl {
                url: config.url.to_string(),
            })?
            .pop_if_empty()
            .extend(["api", "v1"]);
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout())
            .connect_timeout(config.connect_timeout())
            .user_agent(concat!("fkr-qemu/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::HttpClient {
                error: e.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                api,
                config,
                admin_token,
                observer: None,
                repos: Mutex::new(HashMap::new()),
                admin_token_routes: AtomicBool::new(false),
            }),
        })
    }

    /// The same client, reporting every request to `observer` (see [`RequestObserver`]).
    pub fn with_observer(self, observer: Arc<dyn RequestObserver>) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            http: shared.http.clone(),
            api: shared.api.clone(),
            config: shared.config.clone(),
            admin_token: shared.admin_token.clone(),
            observer: None,
            repos: Mutex::new(shared.repos.lock().expect("repo cache lock").clone()),
            admin_token_routes: AtomicBool::new(shared.admin_token_routes.load(Ordering::Relaxed)),
        });
        Self {
            inner: Arc::new(Inner {
                observer: Some(observer),
                ..inner
            }),
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Whether CI-user tokens go through the admin routes (set by [`Client::probe`]).
    pub fn uses_admin_token_routes(&self) -> bool {
        self.inner.admin_token_routes.load(Ordering::Relaxed)
    }

    // ---------------------------------------------------------------- version

    /// Checks the server version (refusing anything older than [`MIN_MAJOR_VERSION`]), checks that
    /// the admin token works, and detects the admin token routes of newer servers.
    pub async fn probe(&self) -> Result<ServerInfo, Error> {
        let v: ServerVersionWire = self
            .get_json(Request::new(Method::GET, "/version", vec!["version"]))
            .await?;
        let major = parse_major(&v.version).unwrap_or(0);
        if major < MIN_MAJOR_VERSION {
            return Err(Error::UnsupportedVersion {
                url: self.inner.config.url.to_string(),
                found: v.version,
                needed: format!("{MIN_MAJOR_VERSION}.0.0"),
            });
        }
        let me: User = self
            .get_json(Request::new(Method::GET, "/user", vec!["user"]))
            .await?;
        // Older servers have no such route and answer 404; newer ones list the tokens.
        let probe = Request::new(
            Method::GET,
            "/admin/users/{username}/tokens",
            vec!["admin", "users", &me.login, "tokens"],
        )
        .query("limit", 1);
        let admin_token_routes = match self.send(probe).await {
            Ok(_) => true,
            Err(Error::Api {
                status: 404 | 405, ..
            }) => false,
            Err(e) => return Err(e),
        };
        self.inner
            .admin_token_routes
            .store(admin_token_routes, Ordering::Relaxed);
        tracing::info!(version = %v.version, login = %me.login, admin_token_routes, "Forgejo server checked");
        Ok(ServerInfo {
            version: v.version,
            major,
            login: me.login,
            admin_token_routes,
        })
    }

    // ---------------------------------------------------------------- jobs

    /// Every job the search returns for `labels` (the server's subset rule: a job is listed when
    /// all its `runs-on` labels are among `labels`), `waiting` and `running` alike.
    pub async fn jobs(&self, labels: &[&str]) -> Result<Vec<Job>, Error> {
        let (route, mut segments) = self.level_path(
            "/admin/actions/runners/jobs",
            "/orgs/{org}/actions/runners/jobs",
            "/repos/{owner}/{repo}/actions/runners/jobs",
            "/user/actions/runners/jobs",
        );
        segments.push("jobs");
        let mut req = Request::new(Method::GET, route, segments);
        if !labels.is_empty() {
            req = req.query("labels", labels.join(","));
        }
        // An empty result is the JSON literal `null`.
        let jobs: Option<Vec<Job>> = self.get_json(req).await?;
        Ok(jobs.unwrap_or_default())
    }

    /// The `waiting` jobs among [`Client::jobs`]: the list also has jobs a runner already picked up.
    pub async fn waiting_jobs(&self, labels: &[&str]) -> Result<Vec<Job>, Error> {
        let mut jobs = self.jobs(labels).await?;
        jobs.retain(|j| j.status == JobStatus::Waiting);
        Ok(jobs)
    }

    // ---------------------------------------------------------------- repositories

    /// Owner and name of a repository, cached (a repository's id never changes owner in practice;
    /// a transfer is picked up on restart).
    pub async fn repository(&self, id: i64) -> Result<Repository, Error> {
        if let Some(r) = self.inner.repos.lock().expect("repo cache lock").get(&id) {
            return Ok(r.clone());
        }
        let id_s = id.to_string();
        let wire: RepositoryWire = self
            .get_json(Request::new(
                Method::GET,
                "/repositories/{id}",
                vec!["repositories", &id_s],
            ))
            .await?;
        let full_name = if wire.full_name.is_empty() {
            format!("{}/{}", wire.owner.login, wire.name)
        } else {
            wire.full_name
        };
        let repo = Repository {
            id: wire.id,
            owner: wire.owner.login,
            name: wire.name,
            full_name,
        };
        self.inner
            .repos
            .lock()
            .expect("repo cache lock")
            .insert(id, repo.clone());
        Ok(repo)
    }

    // ---------------------------------------------------------------- runs

    /// One run of `owner/repo`; `None` when there is none of that id in that repository.
    pub async fn action_run(
        &self,
        owner: &str,
        repo: &str,
        run_id: i64,
    ) -> Result<Option<ActionRun>, Error> {
        let id = run_id.to_string();
        match self
            .get_json(Request::new(
                Method::GET,
                "/repos/{owner}/{repo}/actions/runs/{run_id}",
                vec!["repos", owner, repo, "actions", "runs", &id],
            ))
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The runs of `owner/repo` in any of `statuses` (e.g. `waiting`, `running`), all pages.
    pub async fn action_runs(
        &self,
        owner: &str,
        repo: &str,
        statuses: &[&str],
    ) -> Result<Vec<ActionRun>, Error> {
        const ROUTE: &str = "/repos/{owner}/{repo}/actions/runs";
        let mut all = Vec::new();
        for page in 1..=1_000u32 {
            let mut req = Request::new(
                Method::GET,
                ROUTE,
                vec!["repos", owner, repo, "actions", "runs"],
            );
            for s in statuses {
                req = req.query("status", s);
            }
            let req = req.query("page", page).query("limit", PAGE_LIMIT);
            let list: ActionRunListWire = self.get_json(req).await?;
            let got = list.workflow_runs.len();
            all.extend(list.workflow_runs);
            // The body carries the total; no Link header is needed.
            if got == 0 || all.len() as i64 >= list.total_count {
                break;
            }
        }
        Ok(all)
    }

    // ---------------------------------------------------------------- users

    /// A CI user to create under `username` (the controller derives it from `owner/repo`): an e-mail
    /// address that cannot receive mail, a fresh strong password, the configured visibility and
    /// `login_name` (the controller's ownership marker, which only site admins can set).
    pub fn new_ci_user(&self, username: &str, login_name: &str) -> NewUser {
        NewUser {
            email: ci_email(username, &self.inner.config.ci_user_email_domain),
            username: username.to_owned(),
            password: generate_password(),
            visibility: self.inner.config.ci_user_visibility,
            login_name: login_name.to_owned(),
        }
    }

    /// A user by name, `None` when there is none.
    pub async fn user(&self, username: &str) -> Result<Option<User>, Error> {
        match self
            .get_json(Request::new(
                Method::GET,
                "/users/{username}",
                vec!["users", username],
            ))
            .await
        {
            Ok(u) => Ok(Some(u)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `password` is `username`'s password (`GET /user` with HTTP Basic auth): proof that
    /// whoever holds it set it.
    pub async fn verify_password(&self, username: &str, password: &Secret) -> Result<bool, Error> {
        let req = Request::new(Method::GET, "/user", vec!["user"]).basic(username, password);
        match self.send(req).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(401) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a user with `must_change_password: false` (Forgejo's default is true, and such a user
    /// is refused on every API call) and no notification mail. A 422 (name or e-mail taken) is
    /// [`UserCreation::AlreadyExists`], for the caller to reconcile.
    pub async fn create_user(&self, user: &NewUser) -> Result<UserCreation, Error> {
        let body = CreateUserBody {
            username: &user.username,
            email: &user.email,
            password: user.password.expose(),
            must_change_password: false,
            send_notify: false,
            visibility: user.visibility.as_str(),
            login_name: &user.login_name,
            // A local user: only then is `login_name` a field nobody but an admin can write.
            source_id: 0,
        };
        let req = Request::new(Method::POST, "/admin/users", vec!["admin", "users"]).json(&body);
        match self.send(req).await {
            Ok(resp) => Ok(UserCreation::Created(self.decode(
                Method::POST,
                "/admin/users",
                &resp,
            )?)),
            Err(Error::Api {
                status: 422,
                message,
                ..
            }) => Ok(UserCreation::AlreadyExists { message }),
            Err(e) => Err(e),
        }
    }

    /// Sets a user's password (and clears `must_change_password`): how an existing CI user whose
    /// password was lost is taken back. `login_name` is written again with it (Forgejo v15 clears
    /// it on any edit that leaves it out): pass the user's marker.
    pub async fn set_user_password(
        &self,
        username: &str,
        password: &Secret,
        login_name: &str,
    ) -> Result<User, Error> {
        let body = EditUserBody {
            password: password.expose(),
            must_change_password: false,
            login_name,
            source_id: 0,
        };
        let req = Request::new(
            Method::PATCH,
            "/admin/users/{username}",
            vec!["admin", "users", username],
        )
        .json(&body);
        let resp = self.send(req).await?;
        self.decode(Method::PATCH, "/admin/users/{username}", &resp)
    }

    /// Deletes a user (with `purge`, also what it owns, e.g. packages). `false` when it did not exist.
    pub async fn delete_user(&self, username: &str, purge: bool) -> Result<bool, Error> {
        let req = Request::new(
            Method::DELETE,
            "/admin/users/{username}",
            vec!["admin", "users", username],
        )
        .query("purge", purge);
        self.delete(req).await
    }

    // ---------------------------------------------------------------- tokens

    /// A request on `username`'s tokens (or one of them): through the admin routes when the server
    /// has them, else the user's own routes with HTTP Basic auth and the user's password (released
    /// Forgejo accepts nothing else there). The one place that chooses the route.
    fn tokens_request<'a>(
        &self,
        method: Method,
        username: &'a str,
        password: &'a Secret,
        token_id: Option<&'a str>,
    ) -> Request<'a> {
        let admin = self.uses_admin_token_routes();
        let route = match (admin, token_id.is_some()) {
            (true, false) => "/admin/users/{username}/tokens",
            (true, true) => "/admin/users/{username}/tokens/{token}",
            (false, false) => "/users/{username}/tokens",
            (false, true) => "/users/{username}/tokens/{token}",
        };
        let mut segments = if admin { vec!["admin"] } else { Vec::new() };
        segments.extend(["users", username, "tokens"]);
        segments.extend(token_id);
        let req = Request::new(method, route, segments);
        if admin {
            req
        } else {
            req.basic(username, password)
        }
    }

    /// Mints a token for `username`. Through the admin routes when the server has them, else with
    /// HTTP Basic auth and the user's own password (released Forgejo accepts nothing else).
    pub async fn create_token(
        &self,
        username: &str,
        password: &Secret,
        name: &str,
        scopes: &[&str],
    ) -> Result<MintedToken, Error> {
        let body = CreateTokenBody { name, scopes };
        let req = self.tokens_request(Method::POST, username, password, None);
        let route = req.route;
        let resp = self.send(req.json(&body)).await?;
        let wire: AccessTokenWire = self.decode(Method::POST, route, &resp)?;
        if wire.sha1.is_empty() {
            return Err(Error::InvalidResponse {
                method: "POST",
                route,
                detail: "the new token's secret (sha1) is empty".into(),
            });
        }
        Ok(MintedToken {
            id: wire.id,
            name: wire.name,
            token: wire.sha1,
            scopes: wire.scopes,
        })
    }

    /// Every token of `username` (without secrets).
    pub async fn list_tokens(
        &self,
        username: &str,
        password: &Secret,
    ) -> Result<Vec<AccessToken>, Error> {
        self.paginate(|page| {
            let req = self.tokens_request(Method::GET, username, password, None);
            req.query("page", page).query("limit", PAGE_LIMIT)
        })
        .await
    }

    /// Deletes one of `username`'s tokens by id. `false` when it did not exist.
    pub async fn delete_token(
        &self,
        username: &str,
        password: &Secret,
        token_id: i64,
    ) -> Result<bool, Error> {
        let id = token_id.to_string();
        let req = self.tokens_request(Method::DELETE, username, password, Some(&id));
        self.delete(req).await
    }

    // ---------------------------------------------------------------- runners

    /// Registers an ephemeral runner at the configured level. It has no labels until the runner
    /// process declares them; Forgejo deletes it after its one job, never if it gets no job.
    pub async fn register_runner(
        &self,
        name: &str,
        description: &str,
    ) -> Result<RegisteredRunner, Error> {
        let (route, segments) = self.level_path(
            "/admin/actions/runners",
            "/orgs/{org}/actions/runners",
            "/repos/{owner}/{repo}/actions/runners",
            "/user/actions/runners",
        );
        let body = RegisterRunnerBody {
            name,
            description,
            ephemeral: true,
        };
        let resp = self
            .send(Request::new(Method::POST, route, segments).json(&body))
            .await?;
        self.decode(Method::POST, route, &resp)
    }

    /// Deletes a runner. `false` when it did not exist (e.g. Forgejo already removed it after its job).
    pub async fn delete_runner(&self, id: i64) -> Result<bool, Error> {
        let (route, mut segments) = self.level_path(
            "/admin/actions/runners/{runner_id}",
            "/orgs/{org}/actions/runners/{runner_id}",
            "/repos/{owner}/{repo}/actions/runners/{runner_id}",
            "/user/actions/runners/{runner_id}",
        );
        let id = id.to_string();
        segments.push(&id);
        self.delete(Request::new(Method::DELETE, route, segments))
            .await
    }

    /// Every runner of the configured level (all pages; lower levels not included).
    pub async fn runners(&self) -> Result<Vec<Runner>, Error> {
        let (route, segments) = self.level_path(
            "/admin/actions/runners",
            "/orgs/{org}/actions/runners",
            "/repos/{owner}/{repo}/actions/runners",
            "/user/actions/runners",
        );
        self.paginate(|page| {
            Request::new(Method::GET, route, segments.clone())
                .query("visible", false)
                .query("page", page)
                .query("limit", PAGE_LIMIT)
        })
        .await
    }

    // ---------------------------------------------------------------- plumbing

    /// The route template and segments of the configured level, ending in `…/actions/runners`.
    fn level_path(
        &self,
        instance: &'static str,
        org: &'static str,
        repo: &'static str,
        user: &'static str,
    ) -> (&'static str, Vec<&str>) {
        let tail = ["actions", "runners"];
        match &self.inner.config.level {
            Level::Instance => (instance, [&["admin"][..], &tail].concat()),
            Level::Org(o) => (org, [&["orgs", o.as_str()][..], &tail].concat()),
            Level::Repo { owner, repo: r } => (
                repo,
                [&["repos", owner.as_str(), r.as_str()][..], &tail].concat(),
            ),
            Level::User => (user, [&["user"][..], &tail].concat()),
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, req: Request<'_>) -> Result<T, Error> {
        let (method, route) = (req.method.clone(), req.route);
        let resp = self.send(req).await?;
        self.decode(method, route, &resp)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        method: Method,
        route: &'static str,
        resp: &Response,
    ) -> Result<T, Error> {
        serde_json::from_slice(&resp.body).map_err(|e| Error::InvalidResponse {
            method: method_name(&method),
            route,
            detail: format!("HTTP {} with a body that does not parse: {e}", resp.status),
        })
    }

    async fn delete(&self, req: Request<'_>) -> Result<bool, Error> {
        match self.send(req).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Fetches pages 1, 2, … while the server's `Link` header names a next page (falling back on
    /// `X-Total-Count` when there is no `Link`), stopping at an empty page.
    async fn paginate<'a, T, F>(&self, mut page_request: F) -> Result<Vec<T>, Error>
    where
        T: DeserializeOwned,
        F: FnMut(u32) -> Request<'a>,
    {
        let mut all = Vec::new();
        for page in 1..=10_000u32 {
            let req = page_request(page);
            let (method, route) = (req.method.clone(), req.route);
            let resp = self.send(req).await?;
            let items: Option<Vec<T>> = self.decode(method, route, &resp)?;
            let items = items.unwrap_or_default();
            let got = items.len();
            all.extend(items);
            let has_next = match resp.headers.get(LINK).and_then(|v| v.to_str().ok()) {
                Some(link) => link.split(',').any(|part| part.contains("rel=\"next\"")),
                None => resp
                    .headers
                    .get("x-total-count")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .is_some_and(|total| all.len() < total),
            };
            if got == 0 || !has_next {
                return Ok(all);
            }
        }
        Ok(all)
    }

    /// Sends with retries: idempotent methods are retried with exponential backoff on 5xx,
    /// timeouts and connection errors; POST and PATCH never are (a lost answer may hide a success).
    async fn send(&self, req: Request<'_>) -> Result<Response, Error> {
        let idempotent = matches!(
            req.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE
        );
        let attempts = if idempotent {
            1 + self.inner.config.retries
        } else {
            1
        };
        let mut delay = self.inner.config.retry_backoff();
        let mut attempt = 1;
        loop {
            match self.send_once(&req).await {
                Err(e) if attempt < attempts && e.is_transient() => {
                    tracing::warn!(route = req.route, attempt, error = %e, "retrying Forgejo request");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn send_once(&self, req: &Request<'_>) -> Result<Response, Error> {
        let method = method_name(&req.method);
        let mut url = self.inner.api.clone();
        url.path_segments_mut()
            .expect("checked in Client::new")
            .extend(&req.segments);
        if !req.query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(req.query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let mut builder = self
            .inner
            .http
            .request(req.method.clone(), url)
            .header("accept", "application/json");
        match req.auth {
            Auth::Admin => {
                let mut value =
                    HeaderValue::from_str(&format!("token {}", self.inner.admin_token.expose()))
                        .map_err(|_| Error::AdminTokenNotAHeader)?;
                value.set_sensitive(true);
                builder = builder.header(AUTHORIZATION, value);
            }
            // reqwest marks the Basic header sensitive.
            Auth::Basic { username, password } => {
                builder = builder.basic_auth(username, Some(password.expose()))
            }
        }
        if let Some(body) = &req.body {
            builder = builder
                .header("content-type", "application/json")
                .body(body.clone());
        }

        let started = Instant::now();
        let result = async {
            let resp = builder.send().await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?.to_vec();
            Ok::<_, reqwest::Error>(Response {
                status,
                headers,
                body,
            })
        }
        .await;
        let latency = started.elapsed();
        let status = result.as_ref().map_or(0, |r| r.status);
        if let Some(observer) = &self.inner.observer {
            observer.observe(req.route, status, latency);
        }
        tracing::debug!(
            method,
            route = req.route,
            status,
            latency_ms = latency.as_millis() as u64,
            "Forgejo request"
        );

        let resp = result.map_err(|e| {
            if e.is_timeout() {
                Error::Timeout {
                    method,
                    route: req.route,
                    timeout_ms: self.inner.config.request_timeout().as_millis(),
                }
            } else {
                Error::Transport {
                    method,
                    route: req.route,
                    source: e.without_url(),
                }
            }
        })?;
        if (200..300).contains(&resp.status) {
            Ok(resp)
        } else {
            Err(Error::Api {
                method,
                route: req.route,
                status: resp.status,
                message: error_message(&resp.body),
            })
        }
    }
}

/// Forgejo's `message` field, or the start of a body that is not Forgejo's JSON error.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ApiError {
        message: Option<String>,
    }
    if let Ok(ApiError { message: Some(m) }) = serde_json::from_slice::<ApiError>(body) {
        if !m.is_empty() {
            return m;
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_owned();
    }
    let mut short: String = text.chars().take(200).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// Major version of a Forgejo version string: `15.0.3+gitea-1.22.0` → 15, `v16.0.0-dev-12-g1` → 16.
fn parse_major(version: &str) -> Option<u64> {
    let v = version.trim().trim_start_matches('v');
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors() {
        assert_eq!(parse_major("15.0.3+gitea-1.22.0"), Some(15));
        assert_eq!(parse_major("v16.0.0-dev-12-gabc"), Some(16));
        assert_eq!(parse_major("1.22.0"), Some(1));
        assert_eq!(parse_major("dev"), None);
    }

    #[test]
    fn error_messages() {
        assert_eq!(error_message(br#"{"message":"nope","url":"u"}"#), "nope");
        assert_eq!(
            error_message(b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
        assert_eq!(error_message(b""), "(empty body)");
        assert!(error_message(&[b'x'; 500]).ends_with('…'));
    }

    #[test]
    fn api_url_and_debug() {
        let c = Client::new(
            ClientConfig::new("https://f.example/git/".parse().unwrap()),
            Secret::new("s3cr3t"),
        )
        .unwrap();
        assert_eq!(c.inner.api.as_str(), "https://f.example/git/api/v1");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert!(Client::new(
            ClientConfig::new("mailto:x@y".parse().unwrap()),
            Secret::new("t")
        )
        .is_err());
    }
}
