//! The emulator's runner side, spoken the way the busybox stand-in runner speaks it: plain JSON POSTs
//! with `x-runner-uuid` / `x-runner-token`, knowing only a URL, a uuid, a token and a handle.

mod common {
    pub mod emulator;
}

use common::emulator::{Emulator, JobStatus};
use fkr_qemu::forgejo::{Client, ClientConfig, RegisteredRunner};
use fkr_qemu::secret::Secret;
use serde_json::{json, Value};

fn client(emu: &Emulator) -> Client {
    Client::new(
        ClientConfig::new(emu.url().parse().unwrap()),
        Secret::new(emu.admin_token()),
    )
    .unwrap()
}

struct Rpc<'a> {
    url: &'a str,
    uuid: String,
    token: String,
    http: reqwest::Client,
}

impl<'a> Rpc<'a> {
    fn new(emu: &'a Emulator, r: &RegisteredRunner) -> Self {
        Self {
            url: emu.url(),
            uuid: r.uuid.clone(),
            token: r.token.expose().to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!(
                "{}/api/actions/runner.v1.RunnerService/{method}",
                self.url
            ))
            .header("content-type", "application/json")
            .header("x-runner-uuid", &self.uuid)
            .header("x-runner-token", &self.token)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn ok(&self, method: &str, body: Value) -> Value {
        let (status, v) = self.call(method, body).await;
        assert_eq!(status, 200, "{method}: {v}");
        v
    }
}

/// What the stand-in runner does: declare (label names, as forgejo-runner), fetch by handle, log,
/// report the final result.
#[tokio::test]
async fn one_job_end_to_end_and_the_ephemeral_runner_is_gone() {
    let emu = Emulator::start_default().await;
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    let c = client(&emu);
    let runner = c.register_runner("fr-0000beef", "").await.unwrap();
    let rpc = Rpc::new(&emu, &runner);

    let declared = rpc
        .ok(
            "Declare",
            json!({"version": "stand-in", "labels": ["external-host"]}),
        )
        .await;
    assert_eq!(
        declared["runner"]["id"],
        json!(runner.id.to_string()),
        "int64 as string"
    );
    assert_eq!(declared["runner"]["labels"], json!(["external-host"]));
    assert_eq!(
        declared["runner"]["token"],
        json!(runner.token.expose()),
        "Forgejo's Declare answer has the token"
    );

    let fetched = rpc
        .ok(
            "FetchSingleTask",
            json!({"handle": job.handle, "tasksVersion": 0}),
        )
        .await;
    let task = &fetched["task"];
    let task_id: i64 = task["id"].as_str().unwrap().parse().unwrap();
    use base64::Engine;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(task["workflowPayload"].as_str().unwrap())
        .unwrap();
    assert!(String::from_utf8(payload)
        .unwrap()
        .contains("runs-on: [external-host]"));
    assert_eq!(task["context"]["repository"], "acme/widget");

    // Picked up: running, with its task id, still listed, no longer waiting.
    let listed = c.jobs(&["external-host"]).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].status.clone(), listed[0].task_id),
        (fkr_qemu::forgejo::JobStatus::Running, task_id)
    );
    assert!(c.waiting_jobs(&["external-host"]).await.unwrap().is_empty());
    // Forgejo counts a runner active only after it reports (`UpdateTask`/`UpdateLog`).
    assert_eq!(c.runners().await.unwrap()[0].status, "idle");

    let ack = rpc
        .ok("UpdateLog", json!({"taskId": task_id.to_string(), "index": "0", "rows": [{"content": "hello"}, {"content": "world"}]}))
        .await;
    assert_eq!(ack, json!({"ackIndex": "2"}));
    assert_eq!(c.runners().await.unwrap()[0].status, "active");
    // A retried upload of the same rows plus one new row keeps each row once.
    let ack = rpc
        .ok("UpdateLog", json!({"task_id": task_id, "index": 1, "rows": [{"content": "world"}, {"content": "bye"}], "noMore": true}))
        .await;
    assert_eq!(ack, json!({"ackIndex": "3"}));
    // A gap is only acknowledged; after noMore new rows are refused.
    let gap = json!({"taskId": task_id.to_string(), "index": "9", "rows": [{"content": "x"}]});
    assert_eq!(rpc.ok("UpdateLog", gap).await, json!({"ackIndex": "3"}));
    let more = json!({"taskId": task_id.to_string(), "index": "3", "rows": [{"content": "x"}]});
    let (status, v) = rpc.call("UpdateLog", more).await;
    assert_eq!((status, v["code"].as_str()), (409, Some("already_exists")));

    let done = rpc
        .ok("UpdateTask", json!({"state": {"id": task_id.to_string(), "result": "RESULT_SUCCESS"}, "outputs": {"k": "v"}}))
        .await;
    assert_eq!(
        done,
        json!({"state": {"id": task_id.to_string(), "result": "RESULT_SUCCESS"}, "sentOutputs": ["k"]})
    );

    // Finished: the job leaves the list; the ephemeral runner is deleted by the server.
    assert!(c.jobs(&["external-host"]).await.unwrap().is_empty());
    assert!(c.runners().await.unwrap().is_empty());
    assert!(!c.delete_runner(runner.id).await.unwrap());
    let j = emu.job(job.id).unwrap();
    assert_eq!(j.status, JobStatus::Success);
    assert_eq!(j.log, vec!["hello", "world", "bye"]);
    let deleted = emu.snapshot()["deleted_runners"].clone();
    assert_eq!(
        deleted[0]["deleted_because"],
        "ephemeral runner finished its task"
    );
    // The deleted runner's credentials no longer work.
    let (status, body) = rpc.call("FetchTask", json!({})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
}

#[tokio::test]
async fn a_non_ephemeral_runner_survives_its_job() {
    let emu = Emulator::start_default().await;
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    let runner = emu.with_state(|s| {
        let id = s.id();
        s.runners.push(common::emulator::state::Runner {
            id,
            uuid: "11111111-1111-4111-a111-111111111111".into(),
            token: "a".repeat(40),
            name: "long-lived".into(),
            description: String::new(),
            scope: common::emulator::state::RunnerScope::Instance,
            ephemeral: false,
            labels: Vec::new(),
            version: String::new(),
            last_online: None,
            last_active: None,
            tasks: Vec::new(),
        });
        RegisteredRunner {
            id,
            uuid: "11111111-1111-4111-a111-111111111111".into(),
            token: Secret::new("a".repeat(40)),
        }
    });
    let rpc = Rpc::new(&emu, &runner);
    rpc.ok("Declare", json!({"labels": ["external-host"]}))
        .await;
    let t = rpc
        .ok("FetchSingleTask", json!({"handle": job.handle}))
        .await;
    let id = t["task"]["id"].clone();
    rpc.ok("UpdateTask", json!({"state": {"id": id, "result": 2}}))
        .await;
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Failure);
    assert_eq!(client(&emu).runners().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_job_goes_only_to_matching_labels_and_only_once() {
    let emu = Emulator::start_default().await;
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    let c = client(&emu);
    let undeclared = Rpc::new(&emu, &c.register_runner("fr-1", "").await.unwrap());
    let wrong = Rpc::new(&emu, &c.register_runner("fr-2", "").await.unwrap());
    let right = Rpc::new(&emu, &c.register_runner("fr-3", "").await.unwrap());
    let late = Rpc::new(&emu, &c.register_runner("fr-4", "").await.unwrap());
    wrong.ok("Declare", json!({"labels": ["docker"]})).await;
    right
        .ok("Declare", json!({"labels": ["external-host", "docker"]}))
        .await;
    late.ok("Declare", json!({"labels": ["external-host"]}))
        .await;

    for r in [&undeclared, &wrong] {
        let v = r.ok("FetchSingleTask", json!({"handle": job.handle})).await;
        assert!(v.get("task").is_none(), "{v}");
    }
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Waiting);
    let v = right
        .ok("FetchSingleTask", json!({"handle": job.handle}))
        .await;
    assert!(v.get("task").is_some());
    let v = late
        .ok("FetchSingleTask", json!({"handle": job.handle}))
        .await;
    assert!(v.get("task").is_none(), "handed out once only: {v}");
    // An unknown handle is no task either.
    assert!(late
        .ok("FetchSingleTask", json!({"handle": "nope"}))
        .await
        .get("task")
        .is_none());
    // Without a handle (or with an empty one) Forgejo hands out any job the runner may take.
    let other = emu.add_job("acme/widget", &["external-host"], "other");
    let v = late.ok("FetchSingleTask", json!({"handle": ""})).await;
    assert!(v.get("task").is_some(), "{v}");
    assert_eq!(emu.job(other.id).unwrap().status, JobStatus::Running);
}

/// Forgejo stores declared labels as sent and hands a job only to a runner holding every `runs-on`
/// entry as a whole string (`ItRunsOn`): `external-host:host` is not `external-host`.
#[tokio::test]
async fn a_label_with_its_scheme_does_not_match_the_job_label() {
    let emu = Emulator::start_default().await;
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    let c = client(&emu);
    let scheme = Rpc::new(&emu, &c.register_runner("fr-1", "").await.unwrap());
    let name = Rpc::new(&emu, &c.register_runner("fr-2", "").await.unwrap());
    scheme
        .ok("Declare", json!({"labels": ["external-host:host"]}))
        .await;
    name.ok("Declare", json!({"labels": ["external-host"]}))
        .await;
    let labels: Vec<_> = c
        .runners()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.labels)
        .collect();
    assert!(
        labels.contains(&vec!["external-host:host".to_owned()]),
        "stored as sent: {labels:?}"
    );

    for (method, body) in [
        ("FetchSingleTask", json!({"handle": job.handle})),
        ("FetchTask", json!({})),
    ] {
        let v = scheme.ok(method, body).await;
        assert!(v.get("task").is_none(), "{method}: {v}");
    }
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Waiting);
    let v = name
        .ok("FetchSingleTask", json!({"handle": job.handle}))
        .await;
    assert!(v.get("task").is_some(), "{v}");
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Running);
}

/// `ItRunsOn` is false for a job without `runs-on`, whatever the runner's labels.
#[tokio::test]
async fn a_job_without_runs_on_goes_to_no_runner() {
    let emu = Emulator::start_default().await;
    let job = emu.add_job("acme/widget", &[], "build");
    let c = client(&emu);
    let r = Rpc::new(&emu, &c.register_runner("fr-1", "").await.unwrap());
    r.ok("Declare", json!({"labels": ["external-host"]})).await;
    let v = r.ok("FetchSingleTask", json!({"handle": job.handle})).await;
    assert!(v.get("task").is_none(), "{v}");
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Waiting);
}

/// The labels given to the RPC `Register` are the runner's labels until a `Declare` replaces them.
#[tokio::test]
async fn register_labels_count_until_declare_replaces_them() {
    let emu = Emulator::start_default().await;
    let token = emu.with_state(|s| s.registration_token.clone());
    let v: Value = reqwest::Client::new()
        .post(format!(
            "{}/api/actions/runner.v1.RunnerService/Register",
            emu.url()
        ))
        .header("content-type", "application/json")
        .body(
            json!({"name": "long-lived", "token": token, "labels": ["external-host"]}).to_string(),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rpc = Rpc {
        url: emu.url(),
        uuid: v["runner"]["uuid"].as_str().unwrap().to_owned(),
        token: v["runner"]["token"].as_str().unwrap().to_owned(),
        http: reqwest::Client::new(),
    };
    let first = emu.add_job("acme/widget", &["external-host"], "first");
    let t = rpc.ok("FetchTask", json!({})).await;
    assert!(t.get("task").is_some(), "registered labels match: {t}");
    assert_eq!(emu.job(first.id).unwrap().status, JobStatus::Running);

    rpc.ok("Declare", json!({"labels": ["docker"]})).await;
    let second = emu.add_job("acme/widget", &["external-host"], "second");
    let t = rpc.ok("FetchTask", json!({})).await;
    assert!(t.get("task").is_none(), "Declare replaced them: {t}");
    assert_eq!(emu.job(second.id).unwrap().status, JobStatus::Waiting);
}

/// Forgejo looks for a job only when the runner's `tasksVersion` differs from the latest of its
/// scope; the one-job runner always sends 0, which never is the latest.
#[tokio::test]
async fn an_unchanged_tasks_version_gets_no_task() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let r = c.register_runner("fr-1", "").await.unwrap();
    let rpc = Rpc::new(&emu, &r);
    rpc.ok("Declare", json!({"labels": ["external-host"]}))
        .await;
    let job = emu.add_job("acme/widget", &["docker"], "build");
    let v = rpc.ok("FetchTask", json!({"tasksVersion": 0})).await;
    assert!(v.get("task").is_none(), "{v}");
    let latest = v["tasksVersion"].as_str().unwrap().to_owned();
    assert_ne!(latest, "0");

    // Now the runner could take the job, but its version is the latest: Forgejo does not look.
    rpc.ok("Declare", json!({"labels": ["docker"]})).await;
    for method in ["FetchTask", "FetchSingleTask"] {
        let v = rpc
            .ok(
                method,
                json!({"tasksVersion": latest, "handle": job.handle}),
            )
            .await;
        assert!(v.get("task").is_none(), "{method}: {v}");
        assert_eq!(v["tasksVersion"], json!(latest));
    }
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Waiting);
    let v = rpc
        .ok(
            "FetchSingleTask",
            json!({"tasksVersion": 0, "handle": job.handle}),
        )
        .await;
    assert!(v.get("task").is_some(), "{v}");

    // A new waiting job raises the version: the old one fetches again.
    let next = emu.add_job("acme/widget", &["docker"], "next");
    let v = Rpc::new(&emu, &c.register_runner("fr-2", "").await.unwrap());
    v.ok("Declare", json!({"labels": ["docker"]})).await;
    let got = v.ok("FetchTask", json!({"tasksVersion": latest})).await;
    assert!(got.get("task").is_some(), "{got}");
    assert_eq!(emu.job(next.id).unwrap().status, JobStatus::Running);
}

/// `UpdateTask` as Forgejo's `UpdateTaskByState` and output handling: a finished task stays as it
/// is, the first value of an output wins, `sentOutputs` lists every stored key, and an ephemeral
/// runner is deleted on any final result it reports.
#[tokio::test]
async fn update_task_keeps_a_finished_task_and_first_output_values() {
    let emu = Emulator::start_default().await;
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    let c = client(&emu);
    let r = c.register_runner("fr-1", "").await.unwrap();
    let rpc = Rpc::new(&emu, &r);
    rpc.ok("Declare", json!({"labels": ["external-host"]}))
        .await;
    let t = rpc
        .ok("FetchSingleTask", json!({"handle": job.handle}))
        .await;
    let id = t["task"]["id"].clone();

    let v = rpc
        .ok(
            "UpdateTask",
            json!({"state": {"id": id}, "outputs": {"k": "first"}}),
        )
        .await;
    assert_eq!(v, json!({"state": {"id": id}, "sentOutputs": ["k"]}));
    let long = "x".repeat(256);
    let v = rpc
        .ok(
            "UpdateTask",
            json!({"state": {"id": id}, "outputs": {"k": "second", "k2": "v", long.clone(): "v"}}),
        )
        .await;
    assert_eq!(v["sentOutputs"], json!(["k", "k2"]));
    assert_eq!(emu.job(job.id).unwrap().outputs["k"], "first");

    // The task was cancelled meanwhile (as from the web UI): a success report changes nothing, yet the
    // ephemeral runner that reports it is deleted.
    emu.with_state(|s| {
        s.jobs.iter_mut().find(|j| j.id == job.id).unwrap().status = JobStatus::Cancelled;
    });
    let v = rpc
        .ok(
            "UpdateTask",
            json!({"state": {"id": id, "result": "RESULT_SUCCESS"}}),
        )
        .await;
    assert_eq!(v["state"]["result"], "RESULT_CANCELLED");
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Cancelled);
    assert!(c.runners().await.unwrap().is_empty());
}

#[tokio::test]
async fn fetch_task_request_key_replay_and_one_task_per_ephemeral_runner() {
    let emu = Emulator::start_default().await;
    let a = emu.add_job("acme/widget", &["external-host"], "a");
    emu.add_job("acme/widget", &["external-host"], "b");
    let c = client(&emu);
    let r = c.register_runner("fr-1", "").await.unwrap();
    let rpc = Rpc::new(&emu, &r);
    rpc.ok("Declare", json!({"labels": ["external-host"]}))
        .await;
    let fetch = |key: &'static str| {
        let http = rpc.http.clone();
        let (url, uuid, token) = (rpc.url.to_owned(), rpc.uuid.clone(), rpc.token.clone());
        async move {
            http.post(format!(
                "{url}/api/actions/runner.v1.RunnerService/FetchTask"
            ))
            .header("content-type", "application/json")
            .header("x-runner-uuid", uuid)
            .header("x-runner-token", token)
            .header("x-runner-request-key", key)
            .body("{}")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
        }
    };
    let first = fetch("7c0a5e0e-0000-4000-8000-000000000001").await;
    let again = fetch("7c0a5e0e-0000-4000-8000-000000000001").await;
    assert_eq!(
        first["task"]["id"], again["task"]["id"],
        "same key, same task"
    );
    assert!(first.get("tasksVersion").is_some());
    assert!(
        again.get("tasksVersion").is_none(),
        "a recovered task comes with tasks version 0: {again}"
    );
    assert_eq!(emu.job(a.id).unwrap().status, JobStatus::Running);
    let other = fetch("7c0a5e0e-0000-4000-8000-000000000002").await;
    assert!(
        other.get("task").is_none(),
        "an ephemeral runner gets one task: {other}"
    );
}

#[tokio::test]
async fn rpc_errors() {
    let emu = Emulator::start_default().await;
    let c = client(&emu);
    let r = c.register_runner("fr-1", "").await.unwrap();
    let bad = Rpc {
        url: emu.url(),
        uuid: r.uuid.clone(),
        token: "0".repeat(40),
        http: reqwest::Client::new(),
    };
    let (status, v) = bad.call("Declare", json!({})).await;
    assert_eq!(
        (status, v["code"].as_str(), v["message"].as_str()),
        (401, Some("unauthenticated"), Some("unregistered runner"))
    );
    let rpc = Rpc::new(&emu, &r);
    let (status, v) = rpc
        .call(
            "UpdateTask",
            json!({"state": {"id": "999", "result": "RESULT_SUCCESS"}}),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str(), v["message"].as_str()),
        (
            500,
            Some("internal"),
            Some("update task: resource does not exist")
        )
    );
    let (status, v) = rpc.call("UpdateLog", json!({"taskId": "999"})).await;
    assert_eq!(
        (status, v["code"].as_str(), v["message"].as_str()),
        (
            500,
            Some("internal"),
            Some("get task: task with id 999: resource does not exist")
        )
    );
    // Another runner's task.
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    let owner = Rpc::new(&emu, &c.register_runner("fr-2", "").await.unwrap());
    owner
        .ok("Declare", json!({"labels": ["external-host"]}))
        .await;
    let t = owner
        .ok("FetchSingleTask", json!({"handle": job.handle}))
        .await;
    let (status, v) = rpc
        .call("UpdateTask", json!({"state": {"id": t["task"]["id"]}}))
        .await;
    assert_eq!(
        (status, v["message"].as_str()),
        (500, Some("update task: invalid runner for task"))
    );
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/actions/runner.v1.RunnerService/Declare",
            emu.url()
        ))
        .header("content-type", "application/proto")
        .header("x-runner-uuid", &r.uuid)
        .header("x-runner-token", r.token.expose())
        .body(vec![0u8])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
}

#[tokio::test]
async fn register_with_the_registration_token() {
    let emu = Emulator::start_default().await;
    let token = emu.with_state(|s| s.registration_token.clone());
    let http = reqwest::Client::new();
    let url = format!("{}/api/actions/runner.v1.RunnerService/Register", emu.url());
    let body = json!({"name": "legacy", "token": token, "labels": ["external-host"], "version": "v12", "ephemeral": true});
    let v: Value = http
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["runner"]["name"], "legacy");
    assert_eq!(v["runner"]["token"].as_str().unwrap().len(), 40);
    assert_eq!(v["runner"]["ephemeral"], true);
    assert_eq!(v["runner"]["labels"], json!(["external-host"]));
    assert!(
        v["runner"].get("status").is_none(),
        "Forgejo's Register answer sets no status: {v}"
    );
    let resp = http
        .post(&url)
        .header("content-type", "application/json")
        .body(json!({"name": "x", "token": "wrong"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

/// A runner's status is Forgejo's clock, not its job's state: `offline` until its first call and a
/// minute after its last, `active` only within 10 s of an `UpdateTask`/`UpdateLog`.
#[tokio::test]
async fn runner_status_follows_its_calls_not_its_job() {
    let emu = Emulator::start_default().await;
    let job = emu.add_job("acme/widget", &["external-host"], "build");
    let c = client(&emu);
    let r = c.register_runner("fr-1", "").await.unwrap();
    let status = || async { c.runners().await.unwrap()[0].status.clone() };
    assert_eq!(status().await, "offline");
    let rpc = Rpc::new(&emu, &r);
    rpc.ok("Declare", json!({"labels": ["external-host"]}))
        .await;
    assert_eq!(status().await, "idle");
    let t = rpc
        .ok("FetchSingleTask", json!({"handle": job.handle}))
        .await;
    assert_eq!(status().await, "idle", "running a job is not being active");
    rpc.ok("UpdateTask", json!({"state": {"id": t["task"]["id"]}}))
        .await;
    assert_eq!(status().await, "active");

    // Its job still runs, but the runner went quiet.
    let ago = |secs| Some(std::time::SystemTime::now() - std::time::Duration::from_secs(secs));
    emu.with_state(|s| s.runners[0].last_active = ago(11));
    assert_eq!(status().await, "idle");
    emu.with_state(|s| s.runners[0].last_online = ago(61));
    assert_eq!(status().await, "offline");
    assert_eq!(emu.job(job.id).unwrap().status, JobStatus::Running);
}
