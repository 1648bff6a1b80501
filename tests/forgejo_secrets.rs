//! No secret (admin token, CI-user passwords, minted tokens, runner tokens) appears in any log line
//! the client writes — at TRACE, including reqwest's and hyper's — nor in any error's Display or
//! Debug, nor in the Debug of what the client returns.

mod common {
    pub mod emulator;
}

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::emulator::{Emulator, FaultKind};
use fkr_qemu::forgejo::{
    generate_password, token_name, Client, ClientConfig, Error, UserCreation, TOKEN_SCOPES,
};
use fkr_qemu::secret::Secret;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_secret_in_logs_errors_or_debug() {
    // The emulator runs on its own threads so that only the client's logs are captured here.
    let server_rt = tokio::runtime::Runtime::new().unwrap();
    let emu = server_rt.block_on(Emulator::start_default());
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut secrets: Vec<String> = vec![emu.admin_token().to_owned()];
    let mut shown: Vec<String> = Vec::new();
    let show_err = |e: Error, shown: &mut Vec<String>| {
        shown.push(format!("{e}"));
        shown.push(format!("{e:?}"));
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            shown.push(format!("{s} {s:?}"));
            src = s.source();
        }
    };

    rt.block_on(async {
        let mut cfg = ClientConfig::new(emu.url().parse().unwrap());
        cfg.retries = 1;
        cfg.retry_backoff_ms = 1;
        cfg.request_timeout_ms = 300;
        let c = Client::new(cfg.clone(), Secret::new(emu.admin_token())).unwrap();
        shown.push(format!("{c:?} {cfg:?}"));
        c.probe().await.unwrap();

        let u = c.new_ci_user("acme-widget-ci", "fkr-qemu:repo:1");
        secrets.push(u.password.expose().to_owned());
        shown.push(format!("{u:?}"));
        assert!(matches!(
            c.create_user(&u).await.unwrap(),
            UserCreation::Created(_)
        ));
        let again = c.create_user(&u).await.unwrap();
        shown.push(format!("{again:?}"));
        let new_password = generate_password();
        secrets.push(new_password.expose().to_owned());
        c.set_user_password(&u.username, &new_password, "fkr-qemu:repo:1")
            .await
            .unwrap();

        let t = c
            .create_token(&u.username, &new_password, &token_name(1), &TOKEN_SCOPES)
            .await
            .unwrap();
        secrets.push(t.token.expose().to_owned());
        shown.push(format!("{t:?}"));
        shown.push(format!(
            "{:?}",
            c.list_tokens(&u.username, &new_password).await.unwrap()
        ));
        // Error paths carrying secrets in their requests.
        show_err(
            c.create_token(&u.username, &t.token, "x", &TOKEN_SCOPES)
                .await
                .unwrap_err(),
            &mut shown,
        );
        show_err(
            c.create_token(&u.username, &u.password, "y", &TOKEN_SCOPES)
                .await
                .unwrap_err(),
            &mut shown,
        );
        c.delete_token(&u.username, &new_password, t.id)
            .await
            .unwrap();

        let r = c.register_runner("fr-00000001", "").await.unwrap();
        secrets.push(r.token.expose().to_owned());
        shown.push(format!("{r:?}"));
        shown.push(format!("{:?}", c.runners().await.unwrap()));

        emu.inject(
            "GET",
            "/admin/actions/runners",
            FaultKind::Status { status: 503 },
            None,
        );
        show_err(c.runners().await.unwrap_err(), &mut shown);
        emu.inject(
            "GET",
            "/admin/actions/runners/jobs",
            FaultKind::Delay { delay_ms: 1_000 },
            None,
        );
        show_err(c.jobs(&["external-host"]).await.unwrap_err(), &mut shown);
        emu.inject("GET", "/repositories/{id}", FaultKind::MalformedJson, None);
        show_err(c.repository(1).await.unwrap_err(), &mut shown);

        let wrong = Client::new(
            ClientConfig::new(emu.url().parse().unwrap()),
            Secret::new("f".repeat(40)),
        )
        .unwrap();
        show_err(wrong.probe().await.unwrap_err(), &mut shown);
        secrets.push("f".repeat(40));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut gone_cfg = ClientConfig::new(format!("http://127.0.0.1:{port}/").parse().unwrap());
        gone_cfg.retries = 0;
        let gone = Client::new(gone_cfg, Secret::new(emu.admin_token())).unwrap();
        show_err(gone.probe().await.unwrap_err(), &mut shown);
    });
    // The capture really sees what is logged: a canary logged through the same subscriber is found.
    tracing::info!(canary = "canary-6b1f0e4c9d2a7358", "capture check");
    drop(_guard);

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    // The capture works and is verbose: the client's own events and the HTTP stack's are there.
    assert!(logs.contains("Forgejo request"), "{logs}");
    assert!(logs.contains("retrying Forgejo request"), "{logs}");
    assert!(logs.lines().count() > 50, "{logs}");
    assert!(logs.contains("canary-6b1f0e4c9d2a7358"), "{logs}");
    for secret in &secrets {
        assert!(
            secret.len() >= 20,
            "test secrets are long enough to be unambiguous"
        );
        for (i, line) in logs.lines().enumerate() {
            assert!(
                !line.contains(secret.as_str()),
                "secret in log line {i}: {line}"
            );
        }
        for s in &shown {
            assert!(
                !s.contains(secret.as_str()),
                "secret in error or Debug output: {s}"
            );
        }
    }
    drop(emu);
    drop(server_rt);
}
