//! One VM per job across hosts, with Forgejo as the coordinator. Before it boots anything for a job,
//! a host registers the job's ephemeral runner — its claim — with the description
//! `fkr-qemu@<host_id> job <job id> <owner>/<repo>`, then lists the runners and reads every claim
//! on that job. The claim with the lowest runner id wins; the others delete their runner and drop
//! the job. ARCHITECTURE.md ("Several hosts") has the argument for why at most one host proceeds,
//! and what happens when a host dies holding a claim.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::forgejo::Runner;

/// The start of every runner description fkr-qemu writes.
pub const MARKER_PREFIX: &str = "fkr-qemu@";

/// How long a winner waits before listing the claims a second time: a registration with a lower
/// id that was not yet visible at the first listing (databases that hand out ids before commit)
/// shows up by then.
pub const SETTLE: Duration = Duration::from_millis(250);

/// A runner that claims a job for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub runner_id: i64,
    pub host: String,
    /// The runner connected (status `idle` or `active`): its VM booted.
    pub online: bool,
}

/// `fkr-qemu@<host> job <id> …` → (host, job id); `None` for any other description.
pub fn parse_description(description: &str) -> Option<(&str, i64)> {
    let rest = description.strip_prefix(MARKER_PREFIX)?;
    let (host, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix("job ")?;
    let id = rest.split(' ').next()?.parse().ok()?;
    (!host.is_empty()).then_some((host, id))
}

/// The claims among `runners` on job `job_id`.
pub fn claims_on(runners: &[Runner], job_id: i64) -> Vec<Claim> {
    runners
        .iter()
        .filter_map(|r| {
            let (host, id) = parse_description(&r.description)?;
            (id == job_id).then(|| Claim {
                runner_id: r.id,
                host: host.to_owned(),
                online: matches!(r.status.as_str(), "idle" | "active"),
            })
        })
        .collect()
}

/// What a host does with its claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Ours is the lowest live claim: boot. `stale` are older claims to delete (their host is
    /// gone: they never came online within the claim timeout).
    Won { stale: Vec<i64> },
    /// Another host's claim is lower and live: delete ours, drop the job.
    Lost { host: String, runner_id: i64 },
}

/// Decides for claim `mine` given every claim on the job (`mine` included).
pub fn decide(mine: i64, claims: &[Claim], is_stale: impl Fn(&Claim) -> bool) -> Decision {
    let mut stale = Vec::new();
    for c in claims.iter().filter(|c| c.runner_id < mine) {
        if is_stale(c) {
            stale.push(c.runner_id);
        } else {
            return Decision::Lost {
                host: c.host.clone(),
                runner_id: c.runner_id,
            };
        }
    }
    Decision::Won { stale }
}

/// When this host first saw each other host's claim, to tell a dead host's claim from a VM that is
/// still booting: a claim is stale once it has stayed offline for `timeout` after first sight.
#[derive(Debug)]
pub struct ClaimBook {
    timeout: Duration,
    first_seen: Mutex<HashMap<i64, Instant>>,
}

impl ClaimBook {
    /// `timeout` must exceed how long a live host can take from its claim to its runner coming
    /// online or being deleted: its preparation plus its boot deadline.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            first_seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records the claims seen at `now`.
    pub fn saw(&self, claims: &[Claim], now: Instant) {
        let mut seen = self.first_seen.lock().expect("claim book lock");
        for c in claims {
            seen.entry(c.runner_id).or_insert(now);
        }
    }

    /// Forgets the claims that a listing of every runner, asked for at `asked`, no longer has:
    /// their runners were deleted (ids are never reused), so the book does not grow with every
    /// job. Claims first seen after `asked` stay: that listing may predate their registration.
    pub fn forget_unlisted(&self, listed: &[Runner], asked: Instant) {
        let ids: std::collections::HashSet<i64> = listed.iter().map(|r| r.id).collect();
        self.first_seen
            .lock()
            .expect("claim book lock")
            .retain(|id, first| ids.contains(id) || *first > asked);
    }

    /// Whether `c` is a dead host's claim at `now`.
    pub fn is_stale(&self, c: &Claim, now: Instant) -> bool {
        if c.online {
            return false;
        }
        let seen = self.first_seen.lock().expect("claim book lock");
        seen.get(&c.runner_id)
            .is_some_and(|t| now.duration_since(*t) >= self.timeout)
    }

    /// Forgets a claim (deleted).
    pub fn forget(&self, runner_id: i64) {
        self.first_seen
            .lock()
            .expect("claim book lock")
            .remove(&runner_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: i64, host: &str, online: bool) -> Claim {
        Claim {
            runner_id: id,
            host: host.into(),
            online,
        }
    }

    #[test]
    fn descriptions_parse_back() {
        assert_eq!(
            parse_description("fkr-qemu@a job 42 alice/web"),
            Some(("a", 42))
        );
        assert_eq!(parse_description("fkr-qemu@b-2 job 7"), Some(("b-2", 7)));
        for other in [
            "",
            "fkr-qemu@ job 1 x/y",
            "fkr-qemu@a job x y/z",
            "someone else's runner",
            "fkr-qemu@a build 1",
        ] {
            assert_eq!(parse_description(other), None, "{other}");
        }
    }

    #[test]
    fn the_lowest_live_claim_wins_in_any_order() {
        let claims = [
            claim(5, "a", false),
            claim(9, "b", false),
            claim(7, "c", false),
        ];
        let fresh = |_: &Claim| false;
        assert_eq!(decide(5, &claims, fresh), Decision::Won { stale: vec![] });
        for mine in [7, 9] {
            assert_eq!(
                decide(mine, &claims, fresh),
                Decision::Lost {
                    host: "a".into(),
                    runner_id: 5
                }
            );
        }
        // Every permutation of the listing gives the same decision to each claimant.
        let mut perms = vec![claims.to_vec()];
        perms.push(vec![
            claims[2].clone(),
            claims[0].clone(),
            claims[1].clone(),
        ]);
        perms.push(vec![
            claims[1].clone(),
            claims[2].clone(),
            claims[0].clone(),
        ]);
        for p in perms {
            let winners: Vec<i64> = [5, 7, 9]
                .into_iter()
                .filter(|m| matches!(decide(*m, &p, fresh), Decision::Won { .. }))
                .collect();
            assert_eq!(winners, [5]);
        }
    }

    #[test]
    fn a_stale_lower_claim_is_taken_over_and_a_live_one_never() {
        let claims = [claim(3, "dead", false), claim(8, "me", false)];
        assert_eq!(
            decide(8, &claims, |c| c.runner_id == 3),
            Decision::Won { stale: vec![3] }
        );
        // Online means its VM booted: never stale, whatever the book says.
        let book = ClaimBook::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let online = claim(3, "slow", true);
        book.saw(std::slice::from_ref(&online), t0);
        assert!(!book.is_stale(&online, t0 + Duration::from_secs(3600)));
        let offline = claim(4, "dead", false);
        book.saw(std::slice::from_ref(&offline), t0);
        assert!(!book.is_stale(&offline, t0 + Duration::from_secs(9)));
        assert!(book.is_stale(&offline, t0 + Duration::from_secs(10)));
        // First sight counts: seeing it again does not restart the clock.
        book.saw(std::slice::from_ref(&offline), t0 + Duration::from_secs(5));
        assert!(book.is_stale(&offline, t0 + Duration::from_secs(10)));
        book.forget(4);
        assert!(!book.is_stale(&offline, t0 + Duration::from_secs(10)));
    }

    fn runner(id: i64) -> Runner {
        Runner {
            id,
            uuid: String::new(),
            name: format!("fr-{id:08x}"),
            description: "fkr-qemu@h job 1 a/b".into(),
            owner_id: 0,
            repo_id: 0,
            version: String::new(),
            labels: Vec::new(),
            ephemeral: true,
            status: "offline".into(),
        }
    }

    #[test]
    fn deleted_claims_are_forgotten_and_newer_ones_kept() {
        let book = ClaimBook::new(Duration::from_secs(10));
        let t0 = Instant::now();
        book.saw(&[claim(1, "a", false), claim(2, "b", false)], t0);
        // A listing asked for later has runner 2 only: runner 1 was deleted.
        let asked = t0 + Duration::from_secs(1);
        // Meanwhile another job's listing, newer than that one, saw runner 3.
        book.saw(&[claim(3, "c", false)], asked + Duration::from_millis(5));
        book.forget_unlisted(&[runner(2)], asked);
        let seen = book.first_seen.lock().unwrap();
        let mut ids: Vec<i64> = seen.keys().copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, [2, 3]);
        assert_eq!(seen[&2], t0, "first sight stays");
    }
}
