//! The guest-side `forgejo-runner` stand-in (image-builder/test-guest-files/usr/local/bin/forgejo-runner)
//! against the emulator, on the host: with curl, and with nothing but busybox (as in the test guest).

mod common {
    pub mod emulator;
}

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::emulator::{Emulator, FaultKind};
use fkr_qemu::forgejo::{Client, ClientConfig};
use fkr_qemu::secret::Secret;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("image-builder/test-guest-files/usr/local/bin/forgejo-runner")
}

/// Registers an ephemeral runner and writes its token to a file; returns (uuid, token file).
async fn runner(emu: &Emulator, dir: &Path, name: &str) -> (String, PathBuf) {
    let client = Client::new(
        ClientConfig::new(emu.url().parse().unwrap()),
        Secret::new(emu.admin_token()),
    )
    .unwrap();
    let r = client.register_runner(name, "stand-in test").await.unwrap();
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, r.token.expose()).unwrap();
    (r.uuid, token_file)
}

async fn run(program: &str, args: &[&str], path_env: Option<&Path>) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    if let Some(p) = path_env {
        cmd.env_clear().env("PATH", p);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the stand-in finishes within 60 s")
        .expect("run the stand-in")
}

fn stdout(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A directory whose only commands are busybox applets (the test guest's userland).
fn busybox_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = which("busybox");
    for applet in [
        "sh", "awk", "cat", "chmod", "date", "hostname", "mktemp", "printf", "rm", "sed", "sleep",
        "timeout", "tr", "wget", "echo",
    ] {
        std::os::unix::fs::symlink(&busybox, bin.join(applet)).unwrap();
    }
    bin
}

fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not installed (apt-get install busybox-static)"))
}

#[tokio::test]
async fn standin_runs_the_job_of_its_handle_with_curl_and_with_busybox() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let script = script();
    let script = script.to_str().unwrap();
    let bb_path = busybox_path(dir.path());

    for (i, busybox_only) in [false, true].into_iter().enumerate() {
        // A decoy job first: the stand-in must take the one of its handle, not the first waiting one.
        emu.add_job("alice/web", &["external-host"], "decoy");
        let job = emu.add_job("alice/web", &["external-host"], "build");
        let (uuid, token_file) = runner(&emu, dir.path(), &format!("fr-0000000{i}")).await;
        let token_url = format!("file:{}", token_file.display());
        let args = [
            script,
            "one-job",
            "--url",
            emu.url(),
            "--uuid",
            &uuid,
            "--token-url",
            &token_url,
            "--label",
            "external-host:host",
            "--handle",
            &job.handle,
            "--wait",
        ];
        let out = if busybox_only {
            let busybox = which("busybox");
            run(
                busybox.to_str().unwrap(),
                &[&["sh"][..], &args].concat(),
                Some(&bb_path),
            )
            .await
        } else {
            run("sh", &args, None).await
        };
        let text = stdout(&out);
        assert!(out.status.success(), "busybox_only={busybox_only}: {text}");
        assert!(
            text.contains("fkr-runner: declared labels external-host as"),
            "{text}"
        );
        assert!(text.contains("fkr-runner: got task"), "{text}");
        assert!(text.contains("finished: success"), "{text}");
        let done = emu.job(job.id).unwrap();
        assert_eq!(format!("{:?}", done.status), "Success", "{done:?}");
        assert!(
            done.log
                .iter()
                .any(|l| l.contains("fkr stand-in runner ran task")),
            "{done:?}"
        );
        // The token never appears in what the stand-in prints.
        let token = std::fs::read_to_string(&token_file).unwrap();
        assert!(!text.contains(token.trim()), "token leaked: {text}");
        // It declared the label name (forgejo-runner's `ls.Names()`) and fetched with a request key.
        let runner = deleted_runner(&emu, &uuid);
        assert_eq!(
            runner["labels"],
            serde_json::json!(["external-host"]),
            "{runner}"
        );
        let task = done.task_id;
        assert!(
            emu.with_state(|s| s.request_keys.values().any(|t| *t == task)),
            "FetchSingleTask without x-runner-request-key"
        );
    }
}

/// The runner `uuid` as the emulator keeps it after the server deleted it (ephemeral, task done).
fn deleted_runner(emu: &Emulator, uuid: &str) -> serde_json::Value {
    emu.snapshot()["deleted_runners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["uuid"] == uuid)
        .unwrap_or_else(|| panic!("runner {uuid} was not deleted"))
        .clone()
}

/// The stand-in's command line for `handle`, without `--wait`, with these labels.
fn one_job(
    emu: &Emulator,
    uuid: &str,
    token_url: &str,
    labels: &[&str],
    handle: &str,
) -> Vec<String> {
    let script = script();
    let mut args: Vec<String> = [
        script.to_str().unwrap(),
        "one-job",
        "--url",
        emu.url(),
        "--uuid",
        uuid,
        "--token-url",
        token_url,
        "--handle",
        handle,
    ]
    .map(str::to_owned)
    .to_vec();
    for l in labels {
        args.extend(["--label".to_owned(), (*l).to_owned()]);
    }
    args
}

async fn run_sh(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("sh", &args, None).await
}

/// A job whose `runs-on` is two labels, a runner given both with schemes: it declares both names and
/// gets the job (the emulator matches whole strings, as Forgejo).
#[tokio::test]
async fn standin_declares_every_label_name_and_refuses_malformed_arguments() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let job = emu.add_job("alice/web", &["external-host", "big"], "build");
    let (uuid, token_file) = runner(&emu, dir.path(), "fr-000000b1").await;
    let token_url = format!("file:{}", token_file.display());
    let out = run_sh(&one_job(
        &emu,
        &uuid,
        &token_url,
        &["external-host:host", "big:docker://node:22"],
        &job.handle,
    ))
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(
        deleted_runner(&emu, &uuid)["labels"],
        serde_json::json!(["external-host", "big"])
    );
    assert_eq!(format!("{:?}", emu.job(job.id).unwrap().status), "Success");

    // What labels.Parse refuses ends the runner before it calls Forgejo.
    let (uuid, token_file) = runner(&emu, dir.path(), "fr-000000b2").await;
    let token_url = format!("file:{}", token_file.display());
    emu.clear_requests();
    for bad in [
        "external-host:host:arg",
        "external-host:vm",
        " external-host",
    ] {
        let out = run_sh(&one_job(&emu, &uuid, &token_url, &[bad], "h")).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {text}");
        assert!(text.contains("malformed label"), "{bad:?}: {text}");
    }
    // So does a URL that is not http(s), or a uuid that is not a UUID.
    let good = one_job(&emu, &uuid, &token_url, &["external-host:host"], "h");
    for (flag, bad) in [("--url", "ftp://127.0.0.1/"), ("--uuid", "fr-000000b2")] {
        let mut args = good.clone();
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = bad.to_owned();
        let out = run_sh(&args).await;
        assert_eq!(out.status.code(), Some(1), "{flag} {bad}: {}", stdout(&out));
    }
    assert!(emu.requests().is_empty(), "{:?}", emu.requests());
}

/// forgejo-runner calls `Declare` once: a failure ends it (exit 1), even with `--wait`.
#[tokio::test]
async fn standin_does_not_retry_declare() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let job = emu.add_job("alice/web", &["external-host"], "build");
    let (uuid, token_file) = runner(&emu, dir.path(), "fr-000000c1").await;
    let token_url = format!("file:{}", token_file.display());
    emu.inject(
        "POST",
        "/api/actions/runner.v1.RunnerService/Declare",
        FaultKind::Status { status: 503 },
        Some(1),
    );
    emu.clear_requests();
    let mut args = one_job(
        &emu,
        &uuid,
        &token_url,
        &["external-host:host"],
        &job.handle,
    );
    args.push("--wait".into());
    let out = run_sh(&args).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let declares = emu
        .requests()
        .iter()
        .filter(|r| r.route.ends_with("/Declare"))
        .count();
    assert_eq!(declares, 1);
    assert_eq!(format!("{:?}", emu.job(job.id).unwrap().status), "Waiting");
}

/// Without `--wait`, a failed `FetchSingleTask` is "no task received" (exit 2); once it has a task,
/// the final report is retried and the exit status is 0.
#[tokio::test]
async fn standin_fetch_failure_is_exit_2_and_the_report_is_retried() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let job = emu.add_job("alice/web", &["external-host"], "build");
    let (uuid, token_file) = runner(&emu, dir.path(), "fr-000000d1").await;
    let token_url = format!("file:{}", token_file.display());
    let args = one_job(
        &emu,
        &uuid,
        &token_url,
        &["external-host:host"],
        &job.handle,
    );

    emu.inject(
        "POST",
        "/api/actions/runner.v1.RunnerService/FetchSingleTask",
        FaultKind::Status { status: 500 },
        Some(1),
    );
    let out = run_sh(&args).await;
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert_eq!(format!("{:?}", emu.job(job.id).unwrap().status), "Waiting");

    emu.inject(
        "POST",
        "/api/actions/runner.v1.RunnerService/UpdateTask",
        FaultKind::Status { status: 503 },
        Some(2),
    );
    let out = run_sh(&args).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("finished: success"), "{text}");
    assert_eq!(format!("{:?}", emu.job(job.id).unwrap().status), "Success");
}

#[tokio::test]
async fn standin_without_wait_exits_2_when_there_is_no_task() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let (uuid, token_file) = runner(&emu, dir.path(), "fr-000000aa").await;
    let token_url = format!("file:{}", token_file.display());
    let script = script();
    let out = run(
        "sh",
        &[
            script.to_str().unwrap(),
            "one-job",
            "--url",
            emu.url(),
            "--uuid",
            &uuid,
            "--token-url",
            &token_url,
            "--label",
            "external-host:host",
            "--handle",
            "no-such-handle",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    // Bad usage is an error, not a hang.
    let out = run(
        "sh",
        &[script.to_str().unwrap(), "one-job", "--url", emu.url()],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
}
