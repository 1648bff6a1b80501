//! The startup sweep: what a crashed or killed daemon left behind, found by our names only.
//!
//! - VMs: `vm::sweep` kills the QEMUs named by `<runtime_dir>/vms/fr-*/qemu.pid` (only when that pid
//!   really is a QEMU whose command line contains that VM dir) and removes the per-VM runtime and
//!   disk dirs and the VM cgroups no process uses.
//! - Network: `net::sweep` removes `fr-*` interfaces that are taps, and our nftables table.
//! - Tokens: every `orch-*` token of every CI user in `ci-users.json` is revoked.
//! - Runners: runners named like our VMs (`fr-<8 hex>`), not busy (status other than `active`), and
//!   registered by this host (their description starts with this host's marker) are deleted.

use std::sync::Arc;

use super::job::reset_password;
use super::Ctx;
use crate::forgejo::{AccessToken, TOKEN_PREFIX};
use crate::ops::SweepKind;
use crate::types::VmName;

/// Runs every part; a failing part is logged and does not stop the others.
pub(crate) async fn startup_sweep(ctx: &Arc<Ctx>) {
    tracing::info!("startup sweep...");
    let mut found = Vec::new();

    match crate::vm::sweep(&ctx.cfg.vm) {
        Ok(r) => {
            for (name, pid) in &r.killed {
                tracing::info!("sweep: killed QEMU {pid} of leftover VM {name}");
            }
            for name in &r.removed {
                tracing::info!("sweep: removed the files of leftover VM {name}");
            }
            if r.cgroups > 0 {
                tracing::info!("sweep: removed {} leftover VM cgroup(s)", r.cgroups);
            }
            for (path, why) in &r.failed {
                tracing::warn!("sweep: cannot clean {}: {why}", path.display());
            }
            found.push((SweepKind::Process, r.killed.len()));
            found.push((SweepKind::VmDir, r.removed.len()));
        }
        Err(e) => tracing::warn!("sweep: VMs: {e}"),
    }

    match crate::net::sweep(&ctx.cfg.net) {
        Ok(r) => {
            for tap in &r.taps_removed {
                tracing::info!("sweep: removed leftover tap {tap}");
            }
            found.push((SweepKind::Tap, r.taps_removed.len()));
        }
        Err(e) => tracing::warn!("sweep: network: {e}"),
    }

    found.push((SweepKind::Token, sweep_tokens(ctx).await));
    found.push((SweepKind::Runner, sweep_runners(ctx).await));

    for (kind, n) in &found {
        ctx.metrics.sweep_found(*kind, *n as u64);
    }
    let summary: Vec<String> = found
        .iter()
        .map(|(k, n)| format!("{n} {}", k.as_str()))
        .collect();
    tracing::info!("startup sweep done: {}", summary.join(", "));
}

async fn sweep_tokens(ctx: &Arc<Ctx>) -> usize {
    let users: Vec<(i64, String, crate::secret::Secret)> = {
        let store = ctx.users.lock().await;
        store
            .users()
            .map(|u| (u.repo_id, u.username.clone(), u.password.clone()))
            .collect()
    };
    let mut revoked = 0;
    for (repo_id, username, mut password) in users {
        let tokens: Vec<AccessToken> = match ctx.forgejo.list_tokens(&username, &password).await {
            Ok(t) => t,
            // An unbound entry (older state file) is never taken back: no proof it is still ours.
            Err(e) if e.status() == Some(401) && repo_id > 0 => {
                match reset_password(ctx, repo_id, &username).await {
                    Ok(p) => password = p,
                    Err(e) => {
                        tracing::warn!("sweep: cannot take CI user {username} back: {e}");
                        continue;
                    }
                }
                match ctx.forgejo.list_tokens(&username, &password).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!("sweep: cannot list the tokens of {username}: {e}");
                        continue;
                    }
                }
            }
            Err(e) if e.is_not_found() => {
                tracing::warn!("sweep: CI user {username} no longer exists in Forgejo");
                continue;
            }
            Err(e) => {
                tracing::warn!("sweep: cannot list the tokens of {username}: {e}");
                continue;
            }
        };
        for t in tokens.iter().filter(|t| t.name.starts_with(TOKEN_PREFIX)) {
            match ctx.forgejo.delete_token(&username, &password, t.id).await {
                Ok(_) => {
                    tracing::info!("sweep: revoked token {} of {username}", t.name);
                    revoked += 1;
                }
                Err(e) => {
                    tracing::warn!("sweep: cannot revoke token {} of {username}: {e}", t.name)
                }
            }
        }
    }
    revoked
}

async fn sweep_runners(ctx: &Arc<Ctx>) -> usize {
    let runners = match ctx.forgejo.runners().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("sweep: cannot list runners: {e}");
            return 0;
        }
    };
    let mut deleted = 0;
    for r in runners {
        let ours = VmName::parse(&r.name).is_ok() && r.description.starts_with(&ctx.runner_marker);
        if !ours {
            continue;
        }
        if r.status == "active" {
            tracing::info!("sweep: runner {} is busy; leaving it", r.name);
            continue;
        }
        match ctx.forgejo.delete_runner(r.id).await {
            Ok(_) => {
                tracing::info!("sweep: deleted leftover runner {} ({})", r.name, r.id);
                deleted += 1;
            }
            Err(e) => tracing::warn!("sweep: cannot delete runner {}: {e}", r.name),
        }
    }
    deleted
}
