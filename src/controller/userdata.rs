//! The job VM's cloud-init user-data (the subset fixed in ARCHITECTURE.md, "Seed contract"; also valid for real cloud-init).
//!
//! What it does in the guest:
//! - `/etc/fkr/runner-token` (root, 0600): the ephemeral runner's token, read by the runner through
//!   `--token-url file:/etc/fkr/runner-token`, so it never appears in a process's argv.
//! - Registry auth for the Forgejo host, with the CI user and the job's `orch-…` token, so workflows push
//!   `<host>/<ci user>/<image>:<tag>` without a login step (a pull request from a fork gets a
//!   `read:package` token here, which pulls but cannot push; with `fork_pull_requests = "none"` no
//!   registry files are written at all):
//!   - Docker: `/root/.docker/config.json` (root, 0600);
//!   - Podman/containers: `/root/.config/containers/auth.json` (root, 0600) — the per-user file that
//!     containers-auth.json(5) reads when `$XDG_RUNTIME_DIR/containers/auth.json` does not exist (it never
//!     does in a fresh VM); a runtime-dir file would live on a tmpfs cloud-init may run before.
//!   - the first `runcmd` copies both into `/home/runner/` (owned by `runner`, 0600, dirs 0700) when a
//!     `runner` user exists, so jobs running as that user find them too. A copy at runtime rather than a
//!     `write_files` entry with `owner: runner:runner`, because cloud-init's `write_files` runs before users
//!     may exist and fails on an unknown owner.
//! - The second `runcmd` runs `forgejo-runner one-job … --wait` for exactly this job and always exits 0
//!   (it prints the runner's exit status), then `power_state` powers the VM off whatever happened.

use base64::Engine;
use url::Url;

use crate::secret::Secret;

/// Where the runner token lives in the guest.
pub const RUNNER_TOKEN_PATH: &str = "/etc/fkr/runner-token";
/// Guest paths of the registry auth files written for root.
pub const DOCKER_CONFIG_PATH: &str = "/root/.docker/config.json";
pub const CONTAINERS_AUTH_PATH: &str = "/root/.config/containers/auth.json";

/// The runner side of a job VM.
#[derive(Debug, Clone)]
pub struct RunnerParams<'a> {
    /// Forgejo's URL as the guest reaches it.
    pub forgejo_url: &'a Url,
    pub runner_uuid: &'a str,
    pub runner_token: &'a Secret,
    /// The label this host serves; the runner declares `<label>:host`.
    pub label: &'a str,
    /// The job attempt's handle.
    pub handle: &'a str,
}

/// Credentials for the Forgejo container registry.
#[derive(Debug, Clone)]
pub struct RegistryAuth<'a> {
    /// `host[:port]` of the registry (Forgejo's host as the guest reaches it).
    pub host: String,
    pub username: &'a str,
    pub token: &'a Secret,
}

impl<'a> RegistryAuth<'a> {
    /// The registry host of a Forgejo URL: `host` or `host:port` when the port is not the default.
    pub fn host_of(url: &Url) -> String {
        let host = url.host_str().unwrap_or_default();
        match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        }
    }
}

/// Quotes `s` for `sh` (single quotes; `'` becomes `'\''`).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A YAML single-quoted scalar (`'` becomes `''`); `s` must be one line.
fn yaml_single(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A value that cannot go into the user-data as it is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Control characters could end a YAML scalar or a shell word early.
    #[error("{what} contains control characters")]
    ControlCharacters { what: &'static str },
}

fn check_one_line(what: &'static str, s: &str) -> Result<(), Error> {
    if s.chars().any(char::is_control) {
        return Err(Error::ControlCharacters { what });
    }
    Ok(())
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The registry auth file content (Docker's `config.json` and containers' `auth.json` share it).
pub fn registry_auth_json(auth: &RegistryAuth<'_>) -> String {
    let pair = b64(format!("{}:{}", auth.username, auth.token.expose()).as_bytes());
    serde_json::json!({ "auths": { auth.host.clone(): { "auth": pair } } }).to_string()
}

/// The `forgejo-runner one-job` command line (the token is only referenced by its file).
pub fn runner_command(r: &RunnerParams<'_>) -> String {
    format!(
        "forgejo-runner one-job --url {} --uuid {} --token-url file:{RUNNER_TOKEN_PATH} --label {} --handle {} --wait",
        sh_quote(r.forgejo_url.as_str()),
        sh_quote(r.runner_uuid),
        sh_quote(&format!("{}:host", r.label)),
        sh_quote(r.handle),
    )
}

/// What a job VM is given, whichever way it gets it: root-only files (path, content) and the
/// commands to run in order with `sh -c`. The cold path renders it as user-data ([`render`]); a
/// warm VM gets it over the job agent's channel ([`JobPlan::agent_payload`]). Holds secrets.
pub struct JobPlan {
    pub files: Vec<(&'static str, String)>,
    pub commands: Vec<String>,
}

impl JobPlan {
    /// Checks every value and builds the files and commands.
    pub fn new(
        runner: &RunnerParams<'_>,
        registry: Option<&RegistryAuth<'_>>,
    ) -> Result<JobPlan, Error> {
        for (what, v) in [
            ("the runner uuid", runner.runner_uuid),
            ("the runner token", runner.runner_token.expose()),
            ("the label", runner.label),
            ("the job handle", runner.handle),
        ] {
            check_one_line(what, v)?;
        }
        if let Some(registry) = registry {
            for (what, v) in [
                ("the registry host", registry.host.as_str()),
                ("the CI user name", registry.username),
                ("the registry token", registry.token.expose()),
            ] {
                check_one_line(what, v)?;
            }
        }
        let mut files = vec![(RUNNER_TOKEN_PATH, runner.runner_token.expose().to_owned())];
        if let Some(registry) = registry {
            let auth = registry_auth_json(registry);
            files.push((DOCKER_CONFIG_PATH, auth.clone()));
            files.push((CONTAINERS_AUTH_PATH, auth));
        }
        let copy_for_runner = "if id runner >/dev/null 2>&1; then \
            for f in .docker/config.json .config/containers/auth.json; do \
            d=/home/runner/$(dirname $f); mkdir -p $d && chmod 0700 $d && cp /root/$f /home/runner/$f \
            && chmod 0600 /home/runner/$f; done; \
            chown -R runner:runner /home/runner/.docker /home/runner/.config; fi";
        let run = format!(
            "echo \"fkr: starting forgejo-runner for job handle {h}\"; {cmd}; \
             echo \"fkr: forgejo-runner exited with status $?\"",
            h = runner.handle.replace(['"', '\\', '$', '`'], "_"),
            cmd = runner_command(runner),
        );
        let commands = match registry {
            Some(_) => vec![copy_for_runner.to_owned(), run],
            None => vec![run],
        };
        Ok(JobPlan { files, commands })
    }

    /// The warm pool's payload: the same files (0600) and the commands as one script.
    pub fn agent_payload(&self) -> crate::vm::agent::Payload {
        use crate::vm::agent::{Payload, PayloadFile};
        Payload {
            files: self
                .files
                .iter()
                .map(|(path, content)| PayloadFile {
                    path: (*path).to_owned(),
                    mode: 0o600,
                    content: Secret::new(content.clone()),
                })
                .collect(),
            command: Secret::new(self.commands.join("\n")),
        }
    }
}

/// Renders the user-data. The result contains secrets (the runner token, the registry token): it goes
/// only into the VM's 0600 seed image. Without `registry`, no registry auth files are written.
pub fn render(
    runner: &RunnerParams<'_>,
    registry: Option<&RegistryAuth<'_>>,
) -> Result<String, Error> {
    Ok(JobPlan::new(runner, registry)?.user_data())
}

impl JobPlan {
    /// The plan as cloud-config user-data (a cold VM's seed); it contains the plan's secrets.
    pub fn user_data(&self) -> String {
        let plan = self;
        let mut out = String::from("#cloud-config\nwrite_files:\n");
        for (path, content) in &plan.files {
            out.push_str(&format!(
            "- path: {path}\n  owner: root:root\n  permissions: '0600'\n  encoding: b64\n  content: {}\n",
            b64(content.as_bytes())
        ));
        }
        out.push_str("runcmd:\n");
        for cmd in &plan.commands {
            out.push_str(&format!("- {}\n", yaml_single(cmd)));
        }
        out.push_str("power_state:\n  mode: poweroff\n  timeout: 30\n  condition: true\n");
        out
    }
}

/// A warm VM's user-data: nothing of any job. The guest's job agent (enabled by the presence of
/// its virtio-serial port) waits for the payload; there is no `power_state`, since the VM must
/// stay up until a job is bound to it.
pub const WARM_USER_DATA: &str = "#cloud-config\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(handle: &str) -> String {
        let url = Url::parse("http://10.0.0.1:3000/").unwrap();
        let tok = Secret::new("runner-token-abc");
        let reg = Secret::new("pkg-token-xyz");
        render(
            &RunnerParams {
                forgejo_url: &url,
                runner_uuid: "1234-uuid",
                runner_token: &tok,
                label: "external-host",
                handle,
            },
            Some(&RegistryAuth {
                host: RegistryAuth::host_of(&url),
                username: "alice-web-ci",
                token: &reg,
            }),
        )
        .unwrap()
    }

    /// A tiny parser for exactly the "Seed contract" shape, as the test guest reads it.
    /// (path, permissions, decoded content) per file; runcmd lines; power_state lines.
    type Parsed = (Vec<(String, String, String)>, Vec<String>, Vec<String>);

    fn parse(doc: &str) -> Parsed {
        let mut files = Vec::new();
        let mut cmds = Vec::new();
        let mut power = Vec::new();
        let mut section = "";
        let mut cur: Option<(String, String, String)> = None;
        for line in doc.lines().skip(1) {
            if !line.starts_with(' ') && !line.starts_with('-') {
                section = line.trim_end_matches(':');
                continue;
            }
            match section {
                "write_files" => {
                    if let Some(p) = line.strip_prefix("- path: ") {
                        files.extend(cur.take());
                        cur = Some((p.to_owned(), String::new(), String::new()));
                    } else if let Some(m) = line.strip_prefix("  permissions: ") {
                        cur.as_mut().unwrap().1 = m.to_owned();
                    } else if let Some(c) = line.strip_prefix("  content: ") {
                        let bytes = base64::engine::general_purpose::STANDARD.decode(c).unwrap();
                        cur.as_mut().unwrap().2 = String::from_utf8(bytes).unwrap();
                    } else {
                        assert!(
                            line == "  owner: root:root" || line == "  encoding: b64",
                            "unexpected line {line:?}"
                        );
                    }
                }
                "runcmd" => {
                    let s = line
                        .strip_prefix("- '")
                        .unwrap()
                        .strip_suffix('\'')
                        .unwrap();
                    assert!(
                        !s.replace("''", "").contains('\''),
                        "unescaped quote in {s}"
                    );
                    cmds.push(s.replace("''", "'"));
                }
                "power_state" => power.push(line.trim().to_owned()),
                other => panic!("unexpected section {other}"),
            }
        }
        files.extend(cur);
        (files, cmds, power)
    }

    #[test]
    fn follows_the_contract_shape() {
        let doc = sample("h-1");
        assert!(doc.starts_with("#cloud-config\nwrite_files:\n"));
        let (files, cmds, power) = parse(&doc);
        let paths: Vec<_> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            paths,
            [RUNNER_TOKEN_PATH, DOCKER_CONFIG_PATH, CONTAINERS_AUTH_PATH]
        );
        assert!(files.iter().all(|f| f.1 == "'0600'"));
        assert_eq!(files[0].2, "runner-token-abc");
        let auth: serde_json::Value = serde_json::from_str(&files[1].2).unwrap();
        let pair = auth["auths"]["10.0.0.1:3000"]["auth"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(pair)
            .unwrap();
        assert_eq!(decoded, b"alice-web-ci:pkg-token-xyz");
        assert_eq!(files[1].2, files[2].2);
        assert_eq!(cmds.len(), 2);
        assert!(cmds[1].contains(
            "forgejo-runner one-job --url 'http://10.0.0.1:3000/' --uuid '1234-uuid' \
             --token-url file:/etc/fkr/runner-token --label 'external-host:host' --handle 'h-1' --wait"
        ));
        assert!(
            cmds[1].ends_with("exited with status $?\""),
            "runcmd must end with exit 0: {}",
            cmds[1]
        );
        assert!(!cmds
            .iter()
            .any(|c| c.contains("runner-token-abc") || c.contains("pkg-token-xyz")));
        assert_eq!(power, ["mode: poweroff", "timeout: 30", "condition: true"]);
    }

    #[test]
    fn commands_run_under_sh() {
        // The runcmd lines must be valid sh (parse only: `sh -n`).
        let doc = sample("we'ird \"handle\" $x");
        let (_, cmds, _) = parse(&doc);
        for c in cmds {
            let st = std::process::Command::new("sh")
                .args(["-n", "-c", &c])
                .status()
                .unwrap();
            assert!(st.success(), "sh -n failed for {c}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        assert_eq!(yaml_single("a'b"), "'a''b'");
        let url = Url::parse("https://git.example.org/").unwrap();
        assert_eq!(RegistryAuth::host_of(&url), "git.example.org");
    }

    #[test]
    fn rejects_multiline_values() {
        let url = Url::parse("http://h/").unwrap();
        let tok = Secret::new("t");
        let e = render(
            &RunnerParams {
                forgejo_url: &url,
                runner_uuid: "u",
                runner_token: &tok,
                label: "l",
                handle: "a\nb",
            },
            Some(&RegistryAuth {
                host: "h".into(),
                username: "u",
                token: &tok,
            }),
        )
        .unwrap_err();
        assert!(e.to_string().contains("handle"), "{e}");
    }

    #[test]
    fn without_registry_auth_no_credentials_are_written() {
        let url = Url::parse("http://10.0.0.1:3000/").unwrap();
        let tok = Secret::new("runner-token-abc");
        let doc = render(
            &RunnerParams {
                forgejo_url: &url,
                runner_uuid: "1234-uuid",
                runner_token: &tok,
                label: "external-host",
                handle: "h-1",
            },
            None,
        )
        .unwrap();
        let (files, cmds, power) = parse(&doc);
        let paths: Vec<_> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(paths, [RUNNER_TOKEN_PATH]);
        assert_eq!(cmds.len(), 1);
        assert!(cmds[0].contains("forgejo-runner one-job"), "{}", cmds[0]);
        assert!(
            !doc.contains(".docker") && !doc.contains("containers"),
            "{doc}"
        );
        assert_eq!(power.len(), 3);
    }
}
