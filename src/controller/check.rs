//! `serve --check-config`: everything that can be checked before serving, then the effective config.
//!
//! Checks: the base image exists; QEMU, `qemu-img` and the UEFI firmware are found; QEMU can be
//! confined (systemd scopes or the daemon's cgroups, [`host_ready`]); the network
//! configuration is usable (uplink, DNS servers); the state dir is writable; Forgejo answers, is
//! v15+, accepts the admin token, and the token carries the scopes `serve` needs.

use std::path::Path;

use super::{Config, Error};
use crate::forgejo::{Client, Level};

/// The admin token's scopes `serve` needs at this runner level.
pub fn required_scopes(level: &Level) -> Vec<&'static str> {
    let mut s = vec!["write:admin", "read:user", "read:repository"];
    let w = level.write_scope();
    if !s.contains(&w) {
        s.push(w);
    }
    s
}

/// Whether the token's `have` scopes cover `need` (`all` covers everything, `write:x` covers `read:x`).
pub fn scope_covered(have: &[String], need: &str) -> bool {
    have.iter().any(|h| {
        h == "all"
            || h == need
            || need
                .strip_prefix("read:")
                .is_some_and(|area| h.strip_prefix("write:") == Some(area))
    })
}

/// The admin token's scopes, found among its owner's tokens by the last eight characters.
async fn token_scopes(cfg: &Config, login: &str) -> Result<Option<Vec<String>>, Error> {
    #[derive(serde::Deserialize)]
    struct Listed {
        #[serde(default)]
        scopes: Vec<String>,
        #[serde(default)]
        token_last_eight: String,
    }
    let secret = cfg.admin_token.expose();
    let last8 = &secret[secret.len().saturating_sub(8)..];
    let url = cfg
        .forgejo
        .url
        .join(&format!("api/v1/users/{login}/tokens?limit=50"))
        .map_err(|e| Error::TokenScopesUnreadable {
            error: e.to_string(),
        })?;
    let resp = reqwest::Client::new()
        .get(url)
        .header("Authorization", format!("token {secret}"))
        .timeout(cfg.forgejo.request_timeout())
        .send()
        .await
        .map_err(|e| Error::TokenScopesUnreadable {
            error: e.to_string(),
        })?;
    if resp.status().as_u16() == 401 {
        // Some servers take only Basic auth on the token routes: the scopes cannot be read here.
        return Ok(None);
    }
    if !resp.status().is_success() {
        return Err(Error::TokenListRefused {
            status: resp.status().as_u16(),
        });
    }
    let listed: Vec<Listed> = resp
        .json()
        .await
        .map_err(|e| Error::TokenScopesUnreadable {
            error: e.to_string(),
        })?;
    Ok(listed
        .into_iter()
        .find(|t| t.token_last_eight == last8)
        .map(|t| t.scopes))
}

/// `program` itself when it names a path, else its first match in `PATH`.
fn find_program(program: &Path) -> Option<std::path::PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// What every VM launch needs from this host, checked before `serve` takes a job (and by
/// `--check-config`): QEMU, the firmware, and a way to confine QEMU (systemd scopes, or cgroups
/// the daemon may create). A host without them would create CI users and runners for jobs it can
/// never run. Returns what it found, one note each.
pub async fn host_ready(cfg: &Config) -> Result<Vec<String>, crate::Error> {
    let qemu = find_program(&cfg.vm.qemu).ok_or_else(|| crate::vm::Error::QemuNotFound {
        path: cfg.vm.qemu.clone(),
    })?;
    crate::vm::discover_firmware(&cfg.vm)?;
    let host = crate::vm::confine::host(&cfg.vm).await?;
    Ok(vec![
        format!("qemu: {}", qemu.display()),
        format!("confinement: {host}"),
    ])
}

/// Checks files and Forgejo, prints the effective configuration (secrets redacted) on stdout.
pub async fn check_config(cfg: &Config) -> Result<(), crate::Error> {
    let mut notes = Vec::new();
    // First and on its own line, so the firmware is reported even when a later check fails.
    let fw = crate::vm::discover_firmware(&cfg.vm)?;
    println!(
        "# firmware: {} ({}) + {} ({}), from {}",
        fw.code.display(),
        fw.code_format,
        fw.vars_template.display(),
        fw.vars_format,
        fw.source
    );
    if !cfg.base_image.is_file() {
        return Err(crate::vm::Error::BaseImageMissing {
            path: cfg.base_image.clone(),
        }
        .into());
    }
    notes.extend(host_ready(cfg).await?);
    crate::vm::check_base_image(&cfg.vm.qemu_img, &cfg.base_image).await?;
    let dns = cfg.net.resolved_dns_servers()?;
    notes.push(format!("VM DNS servers: {dns:?}"));

    let client = Client::new(cfg.forgejo.clone(), cfg.admin_token.clone())?;
    let info = client.probe().await?;
    notes.push(format!(
        "Forgejo {} at {} (token of {})",
        info.version, cfg.forgejo.url, info.login
    ));
    client.jobs(&[cfg.label.as_str()]).await?;
    client.runners().await?;
    let need = required_scopes(&cfg.forgejo.level);
    match token_scopes(cfg, &info.login).await? {
        Some(have) => {
            let missing: Vec<&str> = need
                .iter()
                .copied()
                .filter(|n| !scope_covered(&have, n))
                .collect();
            if !missing.is_empty() {
                return Err(Error::TokenScopesMissing {
                    missing: missing.join(", "),
                    have: have.join(", "),
                    need: need.join(", "),
                }
                .into());
            }
            notes.push(format!(
                "admin token scopes: {} (needs {})",
                have.join(", "),
                need.join(", ")
            ));
        }
        None => notes.push(format!(
            "admin token scopes: cannot be read from {}'s token list; make sure it has {}",
            info.login,
            need.join(", ")
        )),
    }

    for w in cfg.plain_http_warnings() {
        tracing::warn!("{w}");
        notes.push(format!("WARNING: {w}"));
    }
    print!("{}", cfg.to_toml());
    for n in notes {
        println!("# {n}");
    }
    println!("# configuration OK");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_path_or_by_path() {
        assert!(find_program(Path::new("sh")).is_some());
        assert!(find_program(Path::new("/bin/sh")).is_some());
        assert!(find_program(Path::new("no-such-program-fkr")).is_none());
        assert!(find_program(Path::new("/nonexistent/qemu")).is_none());
    }

    #[test]
    fn scopes() {
        let have: Vec<String> = ["write:admin", "write:user", "read:repository"]
            .map(String::from)
            .into();
        assert!(scope_covered(&have, "read:admin"));
        assert!(scope_covered(&have, "read:user"));
        assert!(!scope_covered(&have, "write:repository"));
        assert!(scope_covered(&["all".to_owned()], "write:organization"));
        let need = required_scopes(&Level::Repo {
            owner: "o".into(),
            repo: "r".into(),
        });
        assert_eq!(
            need,
            [
                "write:admin",
                "read:user",
                "read:repository",
                "write:repository"
            ]
        );
        assert_eq!(
            required_scopes(&Level::Instance),
            ["write:admin", "read:user", "read:repository"]
        );
    }
}
