//! `fkr-qemu serve --check-config` and config errors, against the in-process emulator (no VM).

mod common {
    pub mod emulator;
}

use std::path::Path;
use std::process::Output;

use common::emulator::Emulator;

/// The admin token from the environment, and nothing else of the caller's Forgejo settings.
fn token_only(cmd: &mut tokio::process::Command, token: &str) {
    cmd.env("FORGEJO_ADMIN_TOKEN", token)
        .env_remove("FORGEJO_URL")
        .env_remove("FORGEJO_ADMIN_TOKEN_FILE")
        .env_remove("CREDENTIALS_DIRECTORY");
}

async fn check(config: &Path, token: &str) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fkr-qemu"));
    cmd.args([
        "serve",
        "--check-config",
        "--config",
        config.to_str().unwrap(),
    ]);
    token_only(&mut cmd, token);
    cmd.output().await.unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn config(dir: &Path, url: &str, extra: &str) -> std::path::PathBuf {
    let p = dir.join("config.toml");
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-guest/test-guest.qcow2");
    std::fs::write(
        &p,
        format!(
            "base_image = {image:?}\nstate_dir = {state:?}\nruntime_dir = {run:?}\n{extra}\n\
             [forgejo]\nurl = {url:?}\nrequest_timeout_ms = 5000\n[net]\ndns_servers = [\"192.0.2.53\"]\n",
            image = image.display().to_string(),
            state = dir.join("state").display().to_string(),
            run = dir.join("run").display().to_string(),
        ),
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_check_config_validates_and_prints_the_redacted_config() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), emu.url(), "max_vms = 4");
    let out = check(&cfg, emu.admin_token()).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("max_vms = 4") && t.contains("[forgejo]") && t.contains("[vm]"),
        "{t}"
    );
    assert!(
        t.contains("admin token: [redacted], from FORGEJO_ADMIN_TOKEN"),
        "{t}"
    );
    assert!(t.contains("Forgejo 15."), "{t}");
    assert!(t.contains("# configuration OK"), "{t}");
    assert!(!t.contains(emu.admin_token()), "the token leaked: {t}");
    assert!(
        !t.contains("WARNING"),
        "plain http to loopback is fine: {t}"
    );

    // A runner_url in plain http to a public address is accepted, with a warning (check-config
    // never contacts runner_url).
    let text_cfg = std::fs::read_to_string(&cfg).unwrap().replace(
        "request_timeout_ms = 5000\n",
        "request_timeout_ms = 5000\nrunner_url = \"http://203.0.113.5:3000/\"\n",
    );
    std::fs::write(&cfg, text_cfg).unwrap();
    let out = check(&cfg, emu.admin_token()).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("# WARNING: forgejo.runner_url http://203.0.113.5:3000/ is plain http"),
        "{t}"
    );

    // A wrong token is a Forgejo failure (exit 4), never echoed.
    let out = check(&cfg, "not-the-token-0123456789").await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(!text(&out).contains("not-the-token-0123456789"));
}

/// What `--check-config` prints is a config file that `serve --config` accepts, and it gives the
/// same configuration again.
#[tokio::test(flavor = "multi_thread")]
async fn serve_check_config_output_is_a_config_file_for_the_same_config() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        emu.url(),
        "max_vms = 2\npoll_interval = \"750ms\"\n[tokens]\nfork_write_repos = [\"acme/web\"]",
    );
    let first = check(&cfg, emu.admin_token()).await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &first.stdout).unwrap();
    let second = check(&printed, emu.admin_token()).await;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&first.stdout)
    );
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("poll_interval = \"750ms\""),
        "{}",
        text(&first)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_config_errors_have_their_exit_codes() {
    let emu = Emulator::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    // Unknown key: usage/config error (2), naming the key and its line.
    let cfg = config(dir.path(), emu.url(), "max_vm = 4");
    let out = check(&cfg, emu.admin_token()).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("line 4, max_vm: "), "{}", text(&out));
    // Missing base image: missing dependency (3).
    let cfg = config(dir.path(), emu.url(), "");
    let text_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("test-guest.qcow2", "nope.qcow2");
    std::fs::write(&cfg, text_cfg).unwrap();
    let out = check(&cfg, emu.admin_token()).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("nope.qcow2"), "{}", text(&out));
    // No token at all: config error (2).
    let cfg = config(dir.path(), emu.url(), "");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fkr-qemu"))
        .args(["serve", "--check-config", "--config", cfg.to_str().unwrap()])
        .env_remove("FORGEJO_ADMIN_TOKEN")
        .env_remove("FORGEJO_ADMIN_TOKEN_FILE")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("admin token"), "{}", text(&out));
}

/// `ip netns exec` mounts a fresh sysfs: no cgroup hierarchy is visible, so no VM could be
/// confined. `serve` must say so and exit before it talks to Forgejo (where it would create CI
/// users and runners for jobs it can never run), and `--check-config` must report it. The
/// namespace is the test's own; its loopback is down and nothing listens, so no traffic leaves.
#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_a_host_where_no_vm_can_be_confined() {
    let ns = format!("fkr-nocg-{}", std::process::id());
    let add = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(add.success());
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _ns = Ns(ns.clone());
    let dir = tempfile::tempdir().unwrap();
    // 127.0.0.1:9 inside the namespace: nothing answers, so an old daemon would wait for
    // Forgejo for ever instead of exiting.
    let cfg = config(dir.path(), "http://127.0.0.1:9/", "");
    let run = |check: bool| {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &ns,
            env!("CARGO_BIN_EXE_fkr-qemu"),
            "serve",
        ]);
        if check {
            cmd.arg("--check-config");
        }
        cmd.args(["--config", cfg.to_str().unwrap()]);
        token_only(&mut cmd, "0123456789abcdef0123456789abcdef01234567");
        cmd.kill_on_drop(true).output()
    };
    for check in [false, true] {
        let out = tokio::time::timeout(std::time::Duration::from_secs(30), run(check))
            .await
            .unwrap_or_else(|_| {
                panic!("serve (check={check}) did not exit: it went on without cgroups")
            })
            .unwrap();
        let t = text(&out);
        assert_ne!(out.status.code(), Some(0), "{t}");
        assert!(t.contains("cannot be confined"), "check={check}: {t}");
        assert!(
            !t.contains("waiting for Forgejo") && !t.contains("discovery"),
            "check={check}: it got past the host check: {t}"
        );
    }
}
