//! The emulator's in-memory Forgejo: users, tokens, repositories, runners, jobs and tasks, and the
//! rules that decide who may do what. HTTP framing lives in `rest.rs`, `rpc.rs` and `control.rs`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Every scope name Forgejo accepts (an unknown one is a 400).
pub const KNOWN_SCOPES: &[&str] = &[
    "all",
    "public-only",
    "read:activitypub",
    "write:activitypub",
    "read:admin",
    "write:admin",
    "read:misc",
    "write:misc",
    "read:notification",
    "write:notification",
    "read:organization",
    "write:organization",
    "read:package",
    "write:package",
    "read:issue",
    "write:issue",
    "read:repository",
    "write:repository",
    "read:user",
    "write:user",
];

/// The categories in Forgejo's order, used to normalise scope lists.
const CATEGORIES: &[&str] = &[
    "activitypub",
    "admin",
    "misc",
    "notification",
    "organization",
    "package",
    "issue",
    "repository",
    "user",
];

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub login: String,
    pub email: String,
    pub password: String,
    pub is_admin: bool,
    pub must_change_password: bool,
    pub visibility: String,
    /// An organisation (owns repositories, cannot sign in).
    pub is_org: bool,
    pub created: String,
    /// Set only through the admin API (create/edit); shown only to site admins and the user.
    pub login_name: String,
    /// Always 0 (local users): the emulator has no external authentication sources.
    pub source_id: i64,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub id: i64,
    pub user_id: i64,
    pub name: String,
    pub secret: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Repo {
    pub id: i64,
    pub owner_id: i64,
    pub name: String,
}

/// Where a runner is registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum RunnerScope {
    Instance,
    /// Owner (user or organisation) id.
    Owner(i64),
    Repo(i64),
}

/// Forgejo's `RunnerOfflineTime` and `RunnerIdleTime` (models/actions/runner.go).
pub const RUNNER_OFFLINE_TIME: Duration = Duration::from_secs(60);
pub const RUNNER_IDLE_TIME: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Runner {
    pub id: i64,
    pub uuid: String,
    pub token: String,
    pub name: String,
    pub description: String,
    pub scope: RunnerScope,
    pub ephemeral: bool,
    /// Labels as the runner sent them (`Register`, then replaced by each `Declare`), stored and matched
    /// verbatim like Forgejo's `AgentLabels`; empty for a runner registered through the REST API.
    pub labels: Vec<String>,
    pub version: String,
    /// Forgejo's `LastOnline`: the runner's last authenticated RPC call (`Register` is not one).
    pub last_online: Option<SystemTime>,
    /// Forgejo's `LastActive`: its last `UpdateTask` or `UpdateLog` call.
    pub last_active: Option<SystemTime>,
    /// Tasks handed out to it.
    pub tasks: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Waiting,
    Running,
    Success,
    Failure,
    Cancelled,
    Skipped,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Waiting => "waiting",
            JobStatus::Running => "running",
            JobStatus::Success => "success",
            JobStatus::Failure => "failure",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: i64,
    pub handle: String,
    pub attempt: i64,
    pub repo_id: i64,
    pub owner_id: i64,
    pub name: String,
    pub runs_on: Vec<String>,
    pub status: JobStatus,
    pub task_id: i64,
    pub runner_id: Option<i64>,
    /// The run this job belongs to (listed by the jobs search only with `Options::job_run_id`).
    pub run_id: i64,
    /// Log lines the runner uploaded, in order.
    pub log: Vec<String>,
    /// The runner sent `noMore`: further rows are refused.
    pub log_closed: bool,
    pub outputs: BTreeMap<String, String>,
}

/// What triggered a run (`ActionRun`'s `event`, `trigger_event`, `is_fork_pull_request`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunTrigger {
    /// The webhook event: `push`, `pull_request`, …
    pub event: String,
    /// The workflow's `on:` event that matched (`pull_request_target` for that event).
    pub trigger_event: String,
    /// A pull request from a fork (or from an untrusted user), as Forgejo marks it.
    pub is_fork_pull_request: bool,
}

impl RunTrigger {
    pub fn push() -> Self {
        Self {
            event: "push".into(),
            trigger_event: "push".into(),
            is_fork_pull_request: false,
        }
    }

    /// A `pull_request` run from a fork.
    pub fn fork_pull_request() -> Self {
        Self {
            event: "pull_request".into(),
            trigger_event: "pull_request".into(),
            is_fork_pull_request: true,
        }
    }
}

/// `ActionRun`: one workflow run; its status follows its jobs.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: i64,
    pub repo_id: i64,
    /// `index_in_repo`: 1, 2, … per repository.
    pub index: i64,
    pub trigger: RunTrigger,
    pub created: String,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub id: i64,
    pub job_id: i64,
    pub runner_id: i64,
    pub token: String,
}

/// Who is making a REST call.
#[derive(Debug, Clone)]
pub enum Principal {
    Anonymous,
    /// `Authorization: token …` (or `Bearer`).
    Token {
        user_id: i64,
        scopes: Vec<String>,
    },
    /// HTTP Basic with the user's password: full access, like a browser session.
    Password {
        user_id: i64,
    },
    /// HTTP Basic whose password is a token: authenticated like the token, but not "basic auth" for
    /// the routes that insist on a password.
    BasicToken {
        user_id: i64,
        scopes: Vec<String>,
    },
}

impl Principal {
    pub fn user_id(&self) -> Option<i64> {
        match self {
            Principal::Anonymous => None,
            Principal::Token { user_id, .. }
            | Principal::Password { user_id }
            | Principal::BasicToken { user_id, .. } => Some(*user_id),
        }
    }

    /// Scopes limiting this principal, `None` when unlimited (password auth).
    pub fn scopes(&self) -> Option<&[String]> {
        match self {
            Principal::Token { scopes, .. } | Principal::BasicToken { scopes, .. } => Some(scopes),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Anonymous => "none",
            Principal::Token { .. } => "token",
            Principal::Password { .. } => "basic-password",
            Principal::BasicToken { .. } => "basic-token",
        }
    }
}

/// A fault to inject on one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Route template as in the spec and the request log: `/admin/actions/runners/{runner_id}` for
    /// the REST API (relative to `/api/v1`), `/api/actions/runner.v1.RunnerService/FetchTask` for RPC.
    pub route: String,
    #[serde(flatten)]
    pub kind: FaultKind,
    /// How many requests it hits; `None` = until cleared.
    #[serde(default)]
    pub times: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FaultKind {
    /// Answer with this status and a Forgejo-style error body.
    Status { status: u16 },
    /// Wait this long, then handle the request normally.
    Delay { delay_ms: u64 },
    /// Answer 200 with a body that is not valid JSON.
    MalformedJson,
    /// Answer 401 as for a bad token.
    Unauthorized,
    /// The whole server hangs from this request on for `hang_ms`: it accepts connections and
    /// reads requests but answers nothing (a stalled Forgejo). Every request that arrives
    /// meanwhile, this one included, is handled when the hang ends — even when its client gave
    /// up meanwhile, as Go's server finishes a handler whose client went away.
    Hang { hang_ms: u64 },
}

/// One request as the emulator saw it (control routes are not logged).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedRequest {
    pub method: String,
    /// The concrete path, e.g. `/api/v1/admin/actions/runners/3`.
    pub path: String,
    /// The route template (see [`Fault::route`]); `<unmatched>` for unknown paths.
    pub route: String,
    pub query: BTreeMap<String, String>,
    /// How the caller authenticated: `none`, `token`, `basic-password`, `basic-token`, `runner`.
    pub auth: String,
    pub request_body: Option<Value>,
    pub status: u16,
    pub response_body: Option<Value>,
    /// The raw response body when it is not JSON (e.g. an injected malformed body).
    pub response_text: Option<String>,
    pub response_headers: BTreeMap<String, String>,
    /// A fault was applied to this request.
    pub fault: Option<String>,
    /// When the request arrived, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub at_ms: u64,
}

/// An error answer of the REST API: status and Forgejo's JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub body: Value,
}

impl ApiError {
    /// Forgejo's `APIError`: `{"message", "url"}`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"message": message.into(), "url": SWAGGER_URL}),
        }
    }

    /// Forgejo's `ctx.NotFound()`: `APINotFound`.
    pub fn not_found() -> Self {
        Self {
            status: 404,
            body: json!({"message": "The target couldn't be found.", "url": SWAGGER_URL, "errors": []}),
        }
    }
}

pub const SWAGGER_URL: &str = "http://forgejo.emulator/api/swagger";

#[derive(Debug, Clone)]
pub struct Options {
    pub version: String,
    pub admin_login: String,
    pub admin_token: String,
    pub admin_scopes: Vec<String>,
    pub admin_token_routes: bool,
    /// Base URL that the emulator puts into bodies (`html_url`, …).
    pub public_url: String,
    /// The jobs search lists each job's `run_id` (Forgejo's development branch does; v15 does not).
    pub job_run_id: bool,
}

pub struct State {
    pub opts: Options,
    next_id: i64,
    pub users: Vec<User>,
    pub tokens: Vec<Token>,
    pub repos: Vec<Repo>,
    pub runners: Vec<Runner>,
    pub deleted_runners: Vec<(Runner, String)>,
    pub jobs: Vec<Job>,
    /// Runs have their own id sequence, as in Forgejo (a table of their own).
    pub runs: Vec<Run>,
    next_run_id: i64,
    pub tasks: Vec<Task>,
    pub faults: Vec<Fault>,
    /// Set by a [`FaultKind::Hang`]: until then no request is handled.
    pub hung_until: Option<std::time::Instant>,
    pub requests: Vec<LoggedRequest>,
    /// Instance registration token for the RPC `Register` call.
    pub registration_token: String,
    /// `x-runner-request-key` → task handed out under it, so a retried fetch gets the same task.
    pub request_keys: HashMap<(i64, String), i64>,
    /// Forgejo's `action_tasks_version` rows: (owner id, repo id) → version; (0, 0) is the instance.
    pub tasks_versions: HashMap<(i64, i64), i64>,
    pub admin_id: i64,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formats")
}

pub fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

pub fn random_uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Normalises a scope list as Forgejo stores it: `all` absorbs everything, a `write:` scope
/// absorbs the `read:` scope of its category.
pub fn normalize_scopes(scopes: &[String]) -> Vec<String> {
    if scopes.iter().any(|s| s == "all") {
        let mut v = vec!["all".to_owned()];
        if scopes.iter().any(|s| s == "public-only") {
            v.push("public-only".to_owned());
        }
        return v;
    }
    let mut out = Vec::new();
    if scopes.iter().any(|s| s == "public-only") {
        out.push("public-only".to_owned());
    }
    for cat in CATEGORIES {
        let w = format!("write:{cat}");
        let r = format!("read:{cat}");
        if scopes.contains(&w) {
            out.push(w);
        } else if scopes.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// Whether `scopes` grant `required` (`write:x` grants `read:x`; `all` grants everything).
pub fn scope_grants(scopes: &[String], required: &str) -> bool {
    if scopes.iter().any(|s| s == "all" || s == required) {
        return true;
    }
    match required.strip_prefix("read:") {
        Some(cat) => scopes.iter().any(|s| s.strip_prefix("write:") == Some(cat)),
        None => false,
    }
}

/// Forgejo's user-name rules.
pub fn valid_username(name: &str) -> bool {
    let punct = |c: char| matches!(c, '-' | '_' | '.');
    !name.is_empty()
        && name.len() <= 40
        && name.chars().all(|c| c.is_ascii_alphanumeric() || punct(c))
        && !name.starts_with(punct)
        && !name.ends_with(punct)
        && !name
            .chars()
            .zip(name.chars().skip(1))
            .any(|(a, b)| punct(a) && punct(b))
}

impl State {
    pub fn new(opts: Options) -> Self {
        let mut s = Self {
            opts,
            next_id: 1,
            users: Vec::new(),
            tokens: Vec::new(),
            repos: Vec::new(),
            runners: Vec::new(),
            deleted_runners: Vec::new(),
            jobs: Vec::new(),
            runs: Vec::new(),
            next_run_id: 1,
            tasks: Vec::new(),
            hung_until: None,
            faults: Vec::new(),
            requests: Vec::new(),
            registration_token: random_hex(20),
            request_keys: HashMap::new(),
            tasks_versions: HashMap::new(),
            admin_id: 0,
        };
        let login = s.opts.admin_login.clone();
        let admin = s.insert_user(
            &login,
            &format!("{login}@forgejo.emulator"),
            &random_hex(16),
            true,
            false,
        );
        s.admin_id = admin;
        let (token, scopes) = (s.opts.admin_token.clone(), s.opts.admin_scopes.clone());
        let id = s.id();
        s.tokens.push(Token {
            id,
            user_id: admin,
            name: "fkr-qemu-admin".into(),
            secret: token,
            scopes,
        });
        s
    }

    pub fn id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn insert_user(
        &mut self,
        login: &str,
        email: &str,
        password: &str,
        is_admin: bool,
        must_change: bool,
    ) -> i64 {
        let id = self.id();
        self.users.push(User {
            id,
            login: login.to_owned(),
            email: email.to_owned(),
            password: password.to_owned(),
            is_admin,
            must_change_password: must_change,
            visibility: "public".into(),
            is_org: false,
            created: now_rfc3339(),
            login_name: String::new(),
            source_id: 0,
        });
        id
    }

    pub fn user(&self, id: i64) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    pub fn user_by_login(&self, login: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.login.eq_ignore_ascii_case(login))
    }

    pub fn repo(&self, id: i64) -> Option<&Repo> {
        self.repos.iter().find(|r| r.id == id)
    }

    pub fn repo_by_name(&self, owner: &str, name: &str) -> Option<&Repo> {
        let owner = self.user_by_login(owner)?;
        self.repos
            .iter()
            .find(|r| r.owner_id == owner.id && r.name.eq_ignore_ascii_case(name))
    }

    /// Ensures `owner/name` exists (the owner as an organisation when new); returns its id.
    pub fn ensure_repo(&mut self, owner: &str, name: &str) -> i64 {
        if let Some(r) = self.repo_by_name(owner, name) {
            return r.id;
        }
        let owner_id = match self.user_by_login(owner) {
            Some(u) => u.id,
            None => {
                let id = self.insert_user(
                    owner,
                    &format!("{owner}@org.forgejo.emulator"),
                    "",
                    false,
                    false,
                );
                self.users.last_mut().expect("just inserted").is_org = true;
                id
            }
        };
        let id = self.id();
        self.repos.push(Repo {
            id,
            owner_id,
            name: name.to_owned(),
        });
        id
    }

    /// A waiting job of `repo` whose `runs-on` is `labels`, in a new `push` run; returns (id,
    /// handle, repo id).
    pub fn add_job(
        &mut self,
        owner: &str,
        repo: &str,
        labels: &[String],
        name: &str,
    ) -> (i64, String, i64) {
        let (id, handle, repo_id, _) =
            self.add_job_in_run(owner, repo, labels, name, RunTrigger::push());
        (id, handle, repo_id)
    }

    /// A waiting job in a new run triggered by `trigger`; returns (id, handle, repo id, run id).
    pub fn add_job_in_run(
        &mut self,
        owner: &str,
        repo: &str,
        labels: &[String],
        name: &str,
        trigger: RunTrigger,
    ) -> (i64, String, i64, i64) {
        let repo_id = self.ensure_repo(owner, repo);
        let owner_id = self.repo(repo_id).expect("ensured").owner_id;
        let run_id = self.next_run_id;
        self.next_run_id += 1;
        let index = 1 + self.runs.iter().filter(|r| r.repo_id == repo_id).count() as i64;
        self.runs.push(Run {
            id: run_id,
            repo_id,
            index,
            trigger,
            created: now_rfc3339(),
        });
        let id = self.id();
        let handle = random_uuid();
        self.jobs.push(Job {
            id,
            handle: handle.clone(),
            attempt: 1,
            repo_id,
            owner_id,
            name: name.to_owned(),
            runs_on: labels.to_vec(),
            status: JobStatus::Waiting,
            task_id: 0,
            runner_id: None,
            run_id,
            log: Vec::new(),
            log_closed: false,
            outputs: BTreeMap::new(),
        });
        // As Forgejo's `InsertRun` for a run with a waiting job.
        self.increase_tasks_version(owner_id, repo_id);
        (id, handle, repo_id, run_id)
    }

    /// A run's status as Forgejo aggregates it from its jobs: `running` while any job runs,
    /// else `waiting` while any waits, else the first job's result.
    pub fn run_status(&self, run: &Run) -> &'static str {
        let jobs: Vec<&Job> = self.jobs.iter().filter(|j| j.run_id == run.id).collect();
        if jobs.iter().any(|j| j.status == JobStatus::Running) {
            "running"
        } else if jobs.iter().any(|j| j.status == JobStatus::Waiting) {
            "waiting"
        } else {
            jobs.first().map_or("unknown", |j| j.status.as_str())
        }
    }

    /// Resolves the `Authorization` header. `Err` = 401.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let Some(value) = authorization else {
            return Ok(Principal::Anonymous);
        };
        let (kind, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        match kind.to_ascii_lowercase().as_str() {
            "token" | "bearer" => match self.tokens.iter().find(|t| t.secret == rest) {
                Some(t) => Ok(Principal::Token {
                    user_id: t.user_id,
                    scopes: t.scopes.clone(),
                }),
                // Forgejo's auth group fails with the user lookup's error.
                None => Err(ApiError::new(401, "user does not exist [uid: 0, name: ]")),
            },
            "basic" => {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ApiError::new(401, "invalid basic auth header"))?;
                let (login, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
                // Forgejo tries the password as a token first.
                if let Some(t) = self
                    .tokens
                    .iter()
                    .find(|t| !password.is_empty() && t.secret == password)
                {
                    return Ok(Principal::BasicToken {
                        user_id: t.user_id,
                        scopes: t.scopes.clone(),
                    });
                }
                match self.user_by_login(login) {
                    Some(u) if !u.is_org && !u.password.is_empty() && u.password == password => {
                        Ok(Principal::Password { user_id: u.id })
                    }
                    _ => Err(ApiError::new(
                        401,
                        format!("user does not exist [uid: 0, name: {login}]"),
                    )),
                }
            }
            _ => Err(ApiError::new(401, "invalid authorization header")),
        }
    }

    /// What every API call made as a user checks first: a user who must change their password is
    /// refused with 403.
    pub fn check_must_change_password(&self, p: &Principal) -> Result<(), ApiError> {
        if let Some(u) = p.user_id().and_then(|id| self.user(id)) {
            if u.must_change_password {
                return Err(ApiError {
                    status: 403,
                    body: json!({"message": format!(
                        "You must change your password. Change it at: {}/user/change_password",
                        self.opts.public_url
                    )}),
                });
            }
        }
        Ok(())
    }

    /// Forgejo's `tokenRequiresScopes`: a token must hold one of `required`.
    pub fn require_scope(&self, p: &Principal, required: &str) -> Result<(), ApiError> {
        match p.scopes() {
            Some(scopes) if !scope_grants(scopes, required) => Err(ApiError::new(
                403,
                format!("token does not have at least one of required scope(s): [{required}]"),
            )),
            _ => Ok(()),
        }
    }

    pub fn require_signed_in(&self, p: &Principal) -> Result<i64, ApiError> {
        p.user_id()
            .ok_or_else(|| ApiError::new(401, "token is required"))
    }

    pub fn require_site_admin(&self, p: &Principal) -> Result<i64, ApiError> {
        let id = self.require_signed_in(p)?;
        if self.user(id).is_some_and(|u| u.is_admin) {
            Ok(id)
        } else {
            Err(ApiError::new(403, "user should be the site admin"))
        }
    }

    // ------------------------------------------------------------------ JSON shapes

    /// `User` as seen by someone who is neither a site admin nor the user (Forgejo's `toUser`
    /// with `authed = false`: no `login_name`/`source_id`).
    pub fn user_json(&self, u: &User) -> Value {
        self.user_json_authed(u, false)
    }

    /// `User`; with `authed` (the viewer is a site admin or the user) including `login_name` and
    /// `source_id`.
    pub fn user_json_authed(&self, u: &User, authed: bool) -> Value {
        let (login_name, source_id) = if authed {
            (u.login_name.clone(), u.source_id)
        } else {
            (String::new(), 0)
        };
        json!({
            "id": u.id,
            "login": u.login,
            "login_name": login_name,
            "source_id": source_id,
            "full_name": "",
            "email": u.email,
            "avatar_url": format!("{}/avatars/{}", self.opts.public_url, random_hex(4)),
            "html_url": format!("{}/{}", self.opts.public_url, u.login),
            "language": "",
            "is_admin": u.is_admin,
            "last_login": "0001-01-01T00:00:00Z",
            "created": u.created,
            "restricted": false,
            "active": true,
            "prohibit_login": false,
            "location": "",
            "pronouns": "",
            "website": "",
            "description": "",
            "visibility": u.visibility,
            "followers_count": 0,
            "following_count": 0,
            "starred_repos_count": 0,
        })
    }

    pub fn repo_json(&self, r: &Repo) -> Value {
        let owner = self.user(r.owner_id).expect("repo owner exists");
        let full = format!("{}/{}", owner.login, r.name);
        let base = &self.opts.public_url;
        let mut v = json!({
            "id": r.id,
            "owner": self.user_json(owner),
            "name": r.name,
            "full_name": full,
            "description": "",
            "empty": false,
            "private": false,
            "fork": false,
            "template": false,
            "parent": null,
            "mirror": false,
            "size": 0,
            "language": "",
            "languages_url": format!("{base}/api/v1/repos/{full}/languages"),
            "html_url": format!("{base}/{full}"),
            "url": format!("{base}/api/v1/repos/{full}"),
            "link": "",
            "ssh_url": format!("git@forgejo.emulator:{full}.git"),
            "clone_url": format!("{base}/{full}.git"),
            "original_url": "",
            "website": "",
            "stars_count": 0,
            "forks_count": 0,
            "watchers_count": 0,
            "open_issues_count": 0,
            "open_pr_counter": 0,
            "release_counter": 0,
            "default_branch": "main",
        });
        let rest = json!({
            "archived": false,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "archived_at": "1970-01-01T00:00:00Z",
            "has_issues": true,
            "has_wiki": false,
            "has_pull_requests": true,
            "has_projects": false,
            "has_releases": true,
            "has_packages": true,
            "has_actions": true,
            "ignore_whitespace_conflicts": false,
            "allow_merge_commits": true,
            "allow_rebase": true,
            "allow_rebase_explicit": true,
            "allow_squash_merge": true,
            "allow_fast_forward_only_merge": true,
            "allow_rebase_update": true,
            "default_delete_branch_after_merge": false,
            "default_merge_style": "merge",
            "default_allow_maintainer_edit": false,
            "avatar_url": "",
            "internal": false,
            "mirror_interval": "",
            "object_format_name": "sha1",
            "mirror_updated": "0001-01-01T00:00:00Z",
            "repo_transfer": null,
            "topics": null,
        });
        // Two halves: one `json!` this large exceeds the macro recursion limit.
        v.as_object_mut()
            .expect("object")
            .extend(rest.as_object().expect("object").clone());
        v
    }

    pub fn job_json(&self, j: &Job) -> Value {
        let mut v = self.job_json_v15(j);
        if self.opts.job_run_id {
            v["run_id"] = json!(j.run_id);
        }
        v
    }

    fn job_json_v15(&self, j: &Job) -> Value {
        json!({
            "id": j.id,
            "handle": j.handle,
            "attempt": j.attempt,
            "repo_id": j.repo_id,
            "owner_id": j.owner_id,
            "name": j.name,
            "needs": null,
            "runs_on": j.runs_on,
            "task_id": j.task_id,
            "status": j.status.as_str(),
        })
    }

    /// `ActionRun` (Forgejo's `ToActionRun`); the trigger user is shown as to a non-admin.
    pub fn run_json(&self, run: &Run) -> Value {
        let repo = self.repo(run.repo_id).expect("run's repo exists").clone();
        let owner = self.user(repo.owner_id).expect("repo owner exists");
        let base = &self.opts.public_url;
        let status = self.run_status(run);
        let done = !matches!(status, "waiting" | "running");
        json!({
            "id": run.id,
            "title": format!("{} run {}", run.trigger.event, run.index),
            "repository": self.repo_json(&repo),
            "workflow_id": "ci.yml",
            "index_in_repo": run.index,
            "trigger_user": self.user_json(owner),
            "ScheduleID": 0,
            "prettyref": "main",
            "is_ref_deleted": false,
            "commit_sha": "0000000000000000000000000000000000000000",
            "is_fork_pull_request": run.trigger.is_fork_pull_request,
            "need_approval": false,
            "approved_by": 0,
            "event": run.trigger.event,
            "event_payload": "{}",
            "trigger_event": run.trigger.trigger_event,
            "status": status,
            "started": if status == "waiting" { "0001-01-01T00:00:00Z".to_owned() } else { run.created.clone() },
            "stopped": if done { run.created.clone() } else { "0001-01-01T00:00:00Z".to_owned() },
            "created": run.created,
            "updated": run.created,
            "duration": 0,
            "html_url": format!("{base}/{}/{}/actions/runs/{}", owner.login, repo.name, run.index),
        })
    }

    /// Forgejo's `ActionRunner.Status`, from time alone: `offline` a minute after the last call,
    /// `idle` 10 s after the last `UpdateTask`/`UpdateLog`, else `active` (whatever its job's state).
    pub fn runner_status(&self, r: &Runner) -> &'static str {
        let within = |t: Option<SystemTime>, d: Duration| {
            t.and_then(|t| t.elapsed().ok())
                .is_some_and(|elapsed| elapsed <= d)
        };
        if !within(r.last_online, RUNNER_OFFLINE_TIME) {
            "offline"
        } else if !within(r.last_active, RUNNER_IDLE_TIME) {
            "idle"
        } else {
            "active"
        }
    }

    pub fn runner_json(&self, r: &Runner) -> Value {
        let (owner_id, repo_id) = match r.scope {
            RunnerScope::Instance => (0, 0),
            RunnerScope::Owner(o) => (o, 0),
            RunnerScope::Repo(id) => (0, id),
        };
        // Go writes a never-declared runner's nil label slice as `null`.
        let labels = if r.labels.is_empty() {
            Value::Null
        } else {
            json!(r.labels)
        };
        json!({
            "id": r.id,
            "uuid": r.uuid,
            "name": r.name,
            "description": r.description,
            "owner_id": owner_id,
            "repo_id": repo_id,
            "version": r.version,
            "labels": labels,
            "ephemeral": r.ephemeral,
            "status": self.runner_status(r),
        })
    }

    pub fn token_json(&self, t: &Token, with_secret: bool) -> Value {
        json!({
            "id": t.id,
            "name": t.name,
            "sha1": if with_secret { t.secret.clone() } else { String::new() },
            "token_last_eight": t.secret[t.secret.len().saturating_sub(8)..],
            "scopes": t.scopes,
            "repositories": null,
        })
    }

    // ------------------------------------------------------------------ runners and jobs

    /// Whether a runner registered at `scope` may take `job`.
    pub fn scope_covers_job(&self, scope: &RunnerScope, job: &Job) -> bool {
        match scope {
            RunnerScope::Instance => true,
            RunnerScope::Owner(o) => job.owner_id == *o,
            RunnerScope::Repo(r) => job.repo_id == *r,
        }
    }

    /// Whether `runner` may run `job`: its scope covers the job, and Forgejo's `ItRunsOn`: every
    /// `runs-on` entry is one of the runner's labels, compared as whole strings (`external-host:host`
    /// is not `external-host`); a runner without labels or a job without `runs-on` never matches.
    pub fn runner_matches(&self, runner: &Runner, job: &Job) -> bool {
        self.scope_covers_job(&runner.scope, job)
            && !runner.labels.is_empty()
            && !job.runs_on.is_empty()
            && job.runs_on.iter().all(|l| runner.labels.contains(l))
    }

    /// Forgejo's `IncreaseTaskVersion`: bumps the instance's version and those of the owner and the
    /// repository (a missing row starts at 1).
    pub fn increase_tasks_version(&mut self, owner_id: i64, repo_id: i64) {
        let mut keys = vec![(0, 0)];
        if owner_id > 0 {
            keys.push((owner_id, 0));
        }
        if repo_id > 0 {
            keys.push((0, repo_id));
        }
        for k in keys {
            let v = self.tasks_versions.entry(k).or_insert(0);
            *v += 1;
        }
    }

    /// The tasks version a runner of `scope` sees (Forgejo's `getLatestTasksVersion`: never 0, since a
    /// runner reads 0 as "server without tasks versions").
    pub fn latest_tasks_version(&mut self, scope: &RunnerScope) -> i64 {
        let (owner_id, repo_id) = match scope {
            RunnerScope::Instance => (0, 0),
            RunnerScope::Owner(o) => (*o, 0),
            RunnerScope::Repo(r) => (0, *r),
        };
        let v = self
            .tasks_versions
            .get(&(owner_id, repo_id))
            .copied()
            .unwrap_or(0);
        if v == 0 {
            self.increase_tasks_version(owner_id, repo_id);
            return 1;
        }
        v
    }

    /// Hands `job_id` to `runner_id` as a new task; the job turns `running`.
    pub fn assign(&mut self, runner_id: i64, job_id: i64) -> i64 {
        let task_id = self.id();
        self.tasks.push(Task {
            id: task_id,
            job_id,
            runner_id,
            token: random_hex(20),
        });
        let job = self
            .jobs
            .iter_mut()
            .find(|j| j.id == job_id)
            .expect("job exists");
        job.status = JobStatus::Running;
        job.task_id = task_id;
        job.runner_id = Some(runner_id);
        self.runners
            .iter_mut()
            .find(|r| r.id == runner_id)
            .expect("runner exists")
            .tasks
            .push(task_id);
        task_id
    }

    pub fn delete_runner(&mut self, id: i64, reason: &str) -> bool {
        match self.runners.iter().position(|r| r.id == id) {
            Some(i) => {
                let r = self.runners.remove(i);
                self.deleted_runners.push((r, reason.to_owned()));
                true
            }
            None => false,
        }
    }

    // ------------------------------------------------------------------ faults

    /// Takes the fault matching this request, if any (counting down `times`).
    pub fn take_fault(&mut self, method: &str, route: &str) -> Option<FaultKind> {
        let i = self.faults.iter().position(|f| {
            f.method.eq_ignore_ascii_case(method)
                && f.route == route
                && !matches!(f.kind, FaultKind::Hang { .. })
        })?;
        self.take_fault_at(i)
    }

    /// Uses fault `i` once (removing it when it has no uses left).
    pub fn take_fault_at(&mut self, i: usize) -> Option<FaultKind> {
        let kind = self.faults[i].kind.clone();
        if let Some(times) = self.faults[i].times.as_mut() {
            *times = times.saturating_sub(1);
            if *times == 0 {
                self.faults.remove(i);
            }
        }
        Some(kind)
    }

    // ------------------------------------------------------------------ snapshot

    pub fn snapshot(&self) -> Value {
        let mut v = self.objects();
        v["requests"] = json!(self.requests);
        v
    }

    /// [`State::snapshot`] without the request log (which grows with every request).
    pub fn objects(&self) -> Value {
        let users: Vec<Value> = self
            .users
            .iter()
            .map(|u| {
                json!({
                    "id": u.id, "login": u.login, "email": u.email, "is_admin": u.is_admin, "is_org": u.is_org,
                    "must_change_password": u.must_change_password, "visibility": u.visibility,
                    "login_name": u.login_name,
                })
            })
            .collect();
        let tokens: Vec<Value> = self
            .tokens
            .iter()
            .map(|t| {
                json!({
                    "id": t.id, "user": self.user(t.user_id).map(|u| u.login.clone()), "name": t.name,
                    "scopes": t.scopes,
                })
            })
            .collect();
        let runner = |r: &Runner| {
            json!({
                "id": r.id, "uuid": r.uuid, "name": r.name, "description": r.description, "scope": r.scope,
                "ephemeral": r.ephemeral, "labels": r.labels, "version": r.version,
                "status": self.runner_status(r), "tasks": r.tasks,
            })
        };
        let runners: Vec<Value> = self.runners.iter().map(runner).collect();
        let deleted: Vec<Value> = self
            .deleted_runners
            .iter()
            .map(|(r, why)| {
                let mut v = runner(r);
                v["deleted_because"] = json!(why);
                v
            })
            .collect();
        let repos: Vec<Value> = self
            .repos
            .iter()
            .map(|r| json!({"id": r.id, "owner": self.user(r.owner_id).map(|u| u.login.clone()), "name": r.name}))
            .collect();
        json!({
            "version": self.opts.version,
            "admin_login": self.opts.admin_login,
            "users": users,
            "tokens": tokens,
            "repos": repos,
            "runners": runners,
            "deleted_runners": deleted,
            "jobs": self.jobs,
            "runs": self.runs.iter().map(|r| {
                let mut v = json!(r);
                v["status"] = json!(self.run_status(r));
                v
            }).collect::<Vec<_>>(),
            "faults": self.faults,
        })
    }
}

/// Seconds since the epoch, for log rows without a time.
pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
