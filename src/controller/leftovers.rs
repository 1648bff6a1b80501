//! This host's own leftovers on Forgejo, removed while the daemon runs — not only by the startup
//! sweep. Forgejo tokens never expire and a runner that never got a job is never deleted by
//! Forgejo, so whatever a failed or lost call leaves must be found and removed again.
//!
//! - *Live names.* Every job marks the name of its runner and of its token live before it asks
//!   Forgejo to create them, and lets go of them once it released them. A runner or token marked
//!   with this host's id whose name no live job holds is a leftover of this host: a claim of a
//!   previous attempt whose registration answer was lost, a token whose mint answer was lost.
//! - *Chores.* A revocation or deletion that failed (5xx, timeout, connection error), and a
//!   creation whose answer may have been lost, become chores that [`reap`] retries in the
//!   background with a bounded backoff ([`backoff`]) until they succeed. A lost creation is looked
//!   for twice, [`LOOK_AGAIN`] apart: a stalled Forgejo may carry the creation out only when it
//!   answers again, after the first look. The number of chores is on the status board
//!   (`forgejo_cleanup_pending`) and in the metrics.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::credentials::{CiUserRef, CredentialError, Credentials, TokenRef};
use crate::forgejo::{token_minter, Runner, TokenMinter};
use crate::ops::{Metrics, StatusBoard};
use crate::types::VmName;

/// How long after a successful look a lost creation is looked for once more.
pub(crate) const LOOK_AGAIN: Duration = Duration::from_secs(20);

/// The retry delay after `failures` failed attempts: 1 s, doubling, at most 30 s.
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(5)).min(Duration::from_secs(30))
}

/// Whether `r` is a runner this host registered (`marker` is `fkr-qemu@<host_id>`): named like
/// our VMs, its description the marker and a space (so host `a` never matches host `ab`).
pub(crate) fn is_own_runner(r: &Runner, marker: &str) -> bool {
    VmName::is_valid(&r.name)
        && r.description
            .strip_prefix(marker)
            .is_some_and(|rest| rest.starts_with(' '))
}

/// Something left on Forgejo to remove.
#[derive(Debug, Clone)]
pub(crate) enum Chore {
    RevokeToken(TokenRef),
    DeleteRunner {
        id: i64,
        name: String,
    },
    /// A runner registration whose answer was lost: delete this host's runners no job holds.
    FindRunners,
    /// A token mint whose answer was lost: revoke this host's tokens of the user no job holds.
    FindTokens(CiUserRef),
}

impl Chore {
    fn looks(&self) -> u32 {
        match self {
            Chore::FindRunners | Chore::FindTokens(_) => 2,
            Chore::RevokeToken(_) | Chore::DeleteRunner { .. } => 1,
        }
    }

    /// Whether `self` and `other` remove the same thing (a chore is queued once).
    fn same(&self, other: &Chore) -> bool {
        match (self, other) {
            (Chore::RevokeToken(a), Chore::RevokeToken(b)) => a.id == b.id,
            (Chore::DeleteRunner { id: a, .. }, Chore::DeleteRunner { id: b, .. }) => a == b,
            (Chore::FindRunners, Chore::FindRunners) => true,
            (Chore::FindTokens(a), Chore::FindTokens(b)) => a.username == b.username,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Chore::RevokeToken(t) => format!("revoking token {} of {}", t.name, t.user.username),
            Chore::DeleteRunner { id, name } => format!("deleting runner {name} ({id})"),
            Chore::FindRunners => "looking for this host's lost runner registrations".to_owned(),
            Chore::FindTokens(u) => format!("looking for lost tokens of {}", u.username),
        }
    }
}

#[derive(Debug)]
struct Pending {
    chore: Chore,
    failures: u32,
    looks_left: u32,
    due: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    runners: HashSet<String>,
    tokens: HashSet<String>,
    pending: Vec<Pending>,
}

/// The names live jobs hold, and the chores left to do.
#[derive(Debug, Default)]
pub(crate) struct Leftovers {
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
}

impl Leftovers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("leftovers lock")
    }

    /// A job is about to register runner `name` (before the request: its answer may be lost).
    pub fn hold_runner(&self, name: &str) {
        self.lock().runners.insert(name.to_owned());
    }

    /// A job is about to mint token `name`.
    pub fn hold_token(&self, name: &str) {
        self.lock().tokens.insert(name.to_owned());
    }

    /// A job released what it held (or handed it to a chore).
    pub fn let_go(&self, runner: Option<&str>, token: Option<&str>) {
        let mut inner = self.lock();
        if let Some(r) = runner {
            inner.runners.remove(r);
        }
        if let Some(t) = token {
            inner.tokens.remove(t);
        }
    }

    pub fn runner_is_live(&self, name: &str) -> bool {
        self.lock().runners.contains(name)
    }

    pub fn token_is_live(&self, name: &str) -> bool {
        self.lock().tokens.contains(name)
    }

    /// Queues `chore` for the background reaper, due at once (unless it is queued already).
    pub fn add(&self, chore: Chore) {
        let mut inner = self.lock();
        if inner.pending.iter().any(|p| p.chore.same(&chore)) {
            return;
        }
        tracing::info!("{} is left for the background cleanup", chore.describe());
        let looks_left = chore.looks();
        inner.pending.push(Pending {
            chore,
            failures: 0,
            looks_left,
            due: Instant::now(),
        });
        drop(inner);
        self.wake.notify_one();
    }

    /// Chores not done yet.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// The due chores (taken out).
    fn take_due(&self, now: Instant) -> Vec<Pending> {
        let mut inner = self.lock();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.pending)
            .into_iter()
            .partition(|p| p.due <= now);
        inner.pending = later;
        due
    }

    /// When the next chore is due.
    fn next_due(&self) -> Option<Instant> {
        self.lock().pending.iter().map(|p| p.due).min()
    }

    fn put_back(&self, p: Pending) {
        self.lock().pending.push(p);
    }
}

/// Retries the chores in the background for as long as the daemon runs. `marker`:
/// `fkr-qemu@<host_id>`, which starts the description of every runner this host registers.
pub(crate) async fn reap(
    creds: &Credentials,
    own: &Leftovers,
    marker: &str,
    metrics: &Metrics,
    board: &StatusBoard,
) {
    loop {
        for mut p in own.take_due(Instant::now()) {
            match run_chore(creds, own, marker, &p.chore).await {
                Ok(()) => {
                    p.looks_left = p.looks_left.saturating_sub(1);
                    if p.looks_left > 0 {
                        p.failures = 0;
                        p.due = Instant::now() + LOOK_AGAIN;
                        own.put_back(p);
                    } else {
                        tracing::debug!("background cleanup: done {}", p.chore.describe());
                    }
                }
                Err(e) => {
                    let delay = backoff(p.failures);
                    p.failures = p.failures.saturating_add(1);
                    metrics.cleanup_retried();
                    tracing::warn!(
                        "background cleanup: {} failed ({e}); retrying in {}s",
                        p.chore.describe(),
                        delay.as_secs()
                    );
                    p.due = Instant::now() + delay;
                    own.put_back(p);
                }
            }
        }
        let pending = own.pending();
        metrics.set_cleanup_pending(pending);
        board.set_cleanup_pending(pending);
        let wait = own.next_due().map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            () = own.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One attempt at `chore`; an error means "try again later".
async fn run_chore(
    creds: &Credentials,
    own: &Leftovers,
    marker: &str,
    chore: &Chore,
) -> Result<(), String> {
    match chore {
        Chore::RevokeToken(t) => match creds.revoke_token(t).await {
            Ok(_) => {
                tracing::info!(
                    "background cleanup: revoked token {} of {}",
                    t.name,
                    t.user.username
                );
                Ok(())
            }
            // The account is gone, and its tokens with it.
            Err(CredentialError::Forgejo(e)) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.to_string()),
        },
        Chore::DeleteRunner { id, name } => match creds.client.delete_runner(*id).await {
            Ok(_) => {
                tracing::info!("background cleanup: deleted runner {name} ({id})");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Chore::FindRunners => {
            let runners = creds.client.runners().await.map_err(|e| e.to_string())?;
            for r in runners {
                if !is_own_runner(&r, marker) || own.runner_is_live(&r.name) || r.status == "active"
                {
                    continue;
                }
                tracing::info!(
                    "background cleanup: runner {} ({}) is this host's and no job holds it; deleting it",
                    r.name,
                    r.id
                );
                if let Err(e) = creds.client.delete_runner(r.id).await {
                    tracing::warn!("background cleanup: cannot delete runner {}: {e}", r.name);
                    own.add(Chore::DeleteRunner {
                        id: r.id,
                        name: r.name,
                    });
                }
            }
            Ok(())
        }
        Chore::FindTokens(user) => {
            let mut user = user.clone();
            let tokens = match creds.list_tokens(&mut user).await {
                Ok(t) => t,
                Err(CredentialError::Forgejo(e)) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            for t in tokens {
                let ours = matches!(token_minter(&t.name), Some(TokenMinter::Host(h)) if h == creds.host_id);
                if !ours || own.token_is_live(&t.name) {
                    continue;
                }
                let token = TokenRef {
                    user: user.clone(),
                    id: t.id,
                    name: t.name,
                };
                tracing::info!(
                    "background cleanup: token {} of {} is this host's and no job holds it; revoking it",
                    token.name,
                    user.username
                );
                if let Err(e) = creds.revoke_token(&token).await {
                    tracing::warn!(
                        "background cleanup: cannot revoke token {}: {e}",
                        token.name
                    );
                    own.add(Chore::RevokeToken(token));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let secs: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn live_names_are_held_until_let_go() {
        let own = Leftovers::default();
        own.hold_runner("fr-00000001");
        own.hold_token("orch-1-a-00000000");
        assert!(own.runner_is_live("fr-00000001") && own.token_is_live("orch-1-a-00000000"));
        own.let_go(Some("fr-00000001"), Some("orch-1-a-00000000"));
        assert!(!own.runner_is_live("fr-00000001") && !own.token_is_live("orch-1-a-00000000"));
    }

    #[test]
    fn due_chores_are_taken_and_the_rest_wait() {
        let own = Leftovers::default();
        own.add(Chore::FindRunners);
        own.add(Chore::FindRunners);
        assert_eq!(own.pending(), 1, "queued once");
        let due = own.take_due(Instant::now());
        assert_eq!((due.len(), own.next_due()), (1, None));
        let mut p = due.into_iter().next().unwrap();
        p.due = Instant::now() + Duration::from_secs(5);
        own.put_back(p);
        assert!(own.take_due(Instant::now()).is_empty());
        assert!(own.next_due().is_some());
        assert_eq!(own.pending(), 1);
    }
}
