//! The `forgejo-emulator` binary as a separate process, driven only over HTTP: its JSON line on
//! stdout, the `/_emulator/` control routes, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fkr_qemu::forgejo::{Client, ClientConfig};
use fkr_qemu::secret::Secret;
use serde_json::{json, Value};

/// `target/<profile>/examples/forgejo-emulator`, next to this test's `deps/` directory.
fn emulator_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("examples").join("forgejo-emulator");
    assert!(bin.exists(), "{} is missing: `cargo test` and `cargo nextest run` build it; else `cargo build --examples`", bin.display());
    bin
}

/// Kills the child if the test fails half-way.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_url_and_token_serves_controls_and_stops_on_sigterm() {
    let mut child = Running(
        Command::new(emulator_binary())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--repo",
                "acme/widget",
                "--version",
                "15.0.1+gitea-1.22.0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .expect("a line within 30 s")
        .unwrap();
    let hello: Value = serde_json::from_str(&line).unwrap();
    let url = hello["url"].as_str().unwrap().to_owned();
    let token = hello["admin_token"].as_str().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{url}/_emulator/{path}"))
            .json(&body)
            .send()
    };

    let job: Value = post(
        "jobs",
        json!({"repo": "acme/widget", "labels": ["external-host"], "name": "build"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let r = post("repos", json!({"owner": "acme", "name": "gadget"}))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = post(
        "users",
        json!({"login": "stale", "password": "password1", "must_change_password": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = post(
        "faults",
        json!({"method": "GET", "route": "/version", "kind": "status", "status": 503, "times": 1}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = post(
        "faults",
        json!({"method": "GET", "route": "/version", "kind": "nonsense"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    let mut cfg = ClientConfig::new(url.parse().unwrap());
    cfg.retry_backoff_ms = 10;
    let c = Client::new(cfg, Secret::new(token.clone())).unwrap();
    assert_eq!(c.probe().await.unwrap().version, "15.0.1+gitea-1.22.0");
    let jobs = c.waiting_jobs(&["external-host"]).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(json!(jobs[0].handle), job["handle"]);
    let repo = c.repository(jobs[0].repo_id).await.unwrap();
    assert_eq!(repo.full_name, "acme/widget");

    let state: Value = http
        .get(format!("{url}/_emulator/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let versions: Vec<&Value> = state["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["route"] == "/version")
        .collect();
    assert_eq!(versions.len(), 2, "the injected 503, then the retry");
    assert_eq!(versions[0]["status"], 503);
    assert!(state["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["login"] == "stale" && u["must_change_password"] == true));
    assert_eq!(state["repos"].as_array().unwrap().len(), 2);
    let requests: Value = http
        .get(format!("{url}/_emulator/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(requests, state["requests"]);
    let r = http
        .delete(format!("{url}/_emulator/faults"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);

    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
