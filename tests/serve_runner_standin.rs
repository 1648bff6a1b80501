//! The guest-side `forgejo-runner` stand-in (image-builder/test-guest-files/usr/local/bin/forgejo-runner)
//! against the emulator, on the host: with curl, and with nothing but busybox (as in the test guest).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::emulator::Emulator;
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
            text.contains("fkr-runner: declared labels external-host:host"),
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
    }
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
