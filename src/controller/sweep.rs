//! The startup sweep: what a crashed or killed daemon left behind, found by our names only.
//!
//! - VMs: `vm::sweep` kills the QEMUs named by `<runtime_dir>/vms/fr-*/qemu.pid` (only when that pid
//!   really is a QEMU whose command line contains that VM dir) and removes the per-VM runtime and
//!   disk dirs and the VM cgroups no process uses.
//! - Network: `net::sweep` removes `fr-*` interfaces that are taps, and our nftables table.
//! - Tokens: every token of every CI user in `ci-users.json` that this host minted
//!   (`orch-<job>-<host_id>-<hex>`, or `orch-<job>-<hex>` from before host ids) is revoked; other
//!   hosts' tokens are left alone.
//! - Runners: runners named like our VMs (`fr-<8 hex>`), not busy (status other than `active`), and
//!   registered by this host (their description starts with this host's marker) are deleted.
//!
//! What `adopt.rs` took over (its VM dirs, taps and addresses, tokens and runners) is left alone.

use super::adopt::Keep;
use super::credentials::{CredentialError, Credentials, TokenRef};
use super::Config;
use crate::forgejo::{token_minter, TokenMinter};
use crate::ops::{Metrics, SweepKind};
use crate::types::VmName;

/// Runs every part; a failing part is logged and does not stop the others. `runner_markers`: what
/// the description of a runner this host registered starts with (this version's
/// `fkr-qemu@<host_id>`, and the full-hostname marker of versions before host ids).
pub(crate) async fn startup_sweep(
    cfg: &Config,
    creds: &Credentials,
    runner_markers: &[String],
    metrics: &Metrics,
    keep: &Keep,
) {
    tracing::info!("startup sweep...");
    let mut found = Vec::new();

    match crate::vm::sweep(&cfg.vm, &keep.vms) {
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

    match crate::net::sweep(&cfg.net, &keep.taps) {
        Ok(r) => {
            for tap in &r.taps_removed {
                tracing::info!("sweep: removed leftover tap {tap}");
            }
            found.push((SweepKind::Tap, r.taps_removed.len()));
        }
        Err(e) => tracing::warn!("sweep: network: {e}"),
    }

    found.push((SweepKind::Token, sweep_tokens(creds, keep).await));
    found.push((
        SweepKind::Runner,
        sweep_runners(creds, runner_markers, keep).await,
    ));

    for (kind, n) in &found {
        metrics.sweep_found(*kind, *n as u64);
    }
    let summary: Vec<String> = found
        .iter()
        .map(|(k, n)| format!("{n} {}", k.as_str()))
        .collect();
    tracing::info!("startup sweep done: {}", summary.join(", "));
}

async fn sweep_tokens(creds: &Credentials, keep: &Keep) -> usize {
    let mut revoked = 0;
    for mut user in creds.stored_users().await {
        let username = user.username.clone();
        let tokens = match creds.list_tokens(&mut user).await {
            Ok(t) => t,
            Err(CredentialError::Forgejo(e)) if e.is_not_found() => {
                tracing::warn!("sweep: CI user {username} no longer exists in Forgejo");
                continue;
            }
            Err(e) => {
                tracing::warn!("sweep: cannot list the tokens of {username}: {e}");
                continue;
            }
        };
        // Only this host's tokens, and those of versions before host ids (one host per Forgejo
        // then): another host's jobs keep theirs.
        let ours = |name: &str| match token_minter(name) {
            Some(TokenMinter::Host(h)) => h == creds.host_id,
            Some(TokenMinter::Legacy) => true,
            None => false,
        };
        for t in tokens
            .into_iter()
            .filter(|t| ours(&t.name) && !keep.tokens.contains(&t.name))
        {
            let token = TokenRef {
                user: user.clone(),
                id: t.id,
                name: t.name,
            };
            match creds.revoke_token(&token).await {
                Ok(_) => {
                    tracing::info!("sweep: revoked token {} of {username}", token.name);
                    revoked += 1;
                }
                Err(e) => {
                    tracing::warn!(
                        "sweep: cannot revoke token {} of {username}: {e}",
                        token.name
                    )
                }
            }
        }
    }
    revoked
}

async fn sweep_runners(creds: &Credentials, runner_markers: &[String], keep: &Keep) -> usize {
    let runners = match creds.client.runners().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("sweep: cannot list runners: {e}");
            return 0;
        }
    };
    let mut deleted = 0;
    for r in runners {
        // A marker and a space: `fkr-qemu@a` must not match host `ab`'s runners.
        let ours = VmName::is_valid(&r.name)
            && runner_markers.iter().any(|m| {
                r.description
                    .strip_prefix(m.as_str())
                    .is_some_and(|rest| rest.starts_with(' '))
            });
        if !ours || keep.runners.contains(&r.id) {
            continue;
        }
        if r.status == "active" {
            tracing::info!("sweep: runner {} is busy; leaving it", r.name);
            continue;
        }
        match creds.client.delete_runner(r.id).await {
            Ok(_) => {
                tracing::info!("sweep: deleted leftover runner {} ({})", r.name, r.id);
                deleted += 1;
            }
            Err(e) => tracing::warn!("sweep: cannot delete runner {}: {e}", r.name),
        }
    }
    deleted
}
