//! Several hosts serving one Forgejo (ARCHITECTURE.md, "Several hosts"): `fkr-qemu serve` as
//! `host-a` and `host-b`, each in a network namespace of its own with its own state and runtime
//! dirs, against one emulator, both with the same `ci_password_key_file`. Forgejo is the only
//! coordinator: every job runs once, on one host, and no host boots a VM for a job another host
//! claimed; CI users are shared without password resets; a restarted host sweeps only its own
//! tokens and runners; a dead host's claim is taken over within the documented bound. The race
//! test starts both hosts on bursts of jobs many times, with a fake QEMU whose "guest" runs its
//! job at once (no kernel boots).
//!
//! "Launched" is seen three ways, each of which a double boot would show: each host's status
//! (VMs with a QEMU pid, per job), the emulator (a claim's runner that declared itself: its VM
//! booted), and each host's metrics (VMs removed = VMs launched, summed over the hosts).

mod common {
    pub mod daemon;
    pub mod emulator;
    pub mod fake_qemu;
    pub mod fleet;
    pub mod links;
    pub mod netns;
    pub mod netns_exec;
    pub mod prometheus;
    pub mod uplink;
}

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::daemon::{wait_for, Serve, Settings};
use common::emulator::{FaultKind, JobStatus, LoggedRequest};
use common::fake_qemu::fake_qemu;
use common::fleet::{claims, Claim, Fleet, Host};
use fkr_qemu::forgejo::{token_minter, TokenMinter};
use fkr_qemu::ops::{JobOutcome, SweepKind};
use nix::sys::signal::Signal;
use rand::Rng;

const LABEL: &str = "external-host";
const BOOT: Duration = Duration::from_secs(180);

/// A host's settings: small disks (no test guest needs 21 GiB, and two hosts reserve them on one
/// file system).
fn settings(max_vms: usize) -> Settings {
    Settings {
        max_vms,
        vm_extra: "disk_max_mib = 4096",
        ..Settings::default()
    }
}

fn add_job(f: &Fleet, repo: &str) -> i64 {
    f.emu.add_job(repo, &[LABEL], "build").id
}

/// The CI user of `owner/repo` (rule 1 of README's "CI users").
fn ci_user(repo: &str) -> String {
    format!("{}-ci", repo.replace('/', "-"))
}

/// A host's counter of dispatched jobs that ended with `outcome`, from one scrape.
fn outcome(m: &common::prometheus::Exposition, o: JobOutcome) -> u64 {
    m.get(&format!(
        "fkr_qemu_jobs_finished_total{{outcome=\"{}\"}}",
        o.as_str()
    )) as u64
}

/// What one host did, from its metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    dispatched: u64,
    completed: u64,
    claimed_elsewhere: u64,
    /// VMs launched and removed since, whatever the reason.
    vms: u64,
}

impl Tally {
    fn of(h: &Host) -> Tally {
        let m = h.metrics();
        Tally {
            dispatched: m.get("fkr_qemu_jobs_dispatched_total") as u64,
            completed: outcome(&m, JobOutcome::Completed),
            claimed_elsewhere: outcome(&m, JobOutcome::ClaimedElsewhere),
            vms: m.sum("fkr_qemu_vm_removals_total") as u64,
        }
    }

    /// Every dispatch ended completed or claimed elsewhere (none failed, none is in flight).
    fn all_clean(&self) -> bool {
        self.dispatched == self.completed + self.claimed_elsewhere
    }
}

/// Which hosts had a QEMU running for each job, and the most VMs each host had at once, as their
/// status boards showed them.
#[derive(Debug, Default)]
struct Seen {
    launched: BTreeMap<i64, BTreeSet<String>>,
    most_vms: BTreeMap<String, usize>,
}

impl Seen {
    fn look(&mut self, f: &Fleet) {
        for h in &f.hosts {
            let Some(s) = h.status() else { continue };
            let most = self.most_vms.entry(h.id.clone()).or_default();
            *most = (*most).max(s.vms.len());
            for v in s.vms.iter().filter(|v| v.pid.is_some()) {
                self.launched
                    .entry(v.job_id)
                    .or_default()
                    .insert(h.id.clone());
            }
        }
    }
}

/// For each of `ids`: its claims (every host's runner registrations for it) — exactly one of
/// them booted (its runner declared itself), and that one got the job's task. Returns the claims
/// by job.
fn assert_one_boot_per_job(f: &Fleet, ids: &[i64]) -> BTreeMap<i64, Vec<Claim>> {
    let all = claims(&f.emu.runners_ever());
    let jobs = f.emu.jobs();
    let mut by_job = BTreeMap::new();
    for id in ids {
        let on: Vec<Claim> = all.iter().filter(|c| c.job_id == *id).cloned().collect();
        let booted: Vec<&Claim> = on.iter().filter(|c| c.booted()).collect();
        assert_eq!(
            booted.len(),
            1,
            "job {id}: the VMs of {} claims booted; claims: {on:#?}",
            booted.len()
        );
        let job = jobs.iter().find(|j| j.id == *id).expect("the job exists");
        assert_eq!(job.status, JobStatus::Success, "job {id}: {job:?}");
        assert_eq!(
            job.runner_id,
            Some(booted[0].runner.id),
            "job {id} ran on another runner than the booted claim's: {on:#?}"
        );
        by_job.insert(*id, on);
    }
    by_job
}

/// Milliseconds from each claim (runner registration) to the host's decision, from the emulator's
/// request log: a lost claim's decision is the deletion of its runner; a won claim has none to
/// see, so its first token request for the job stands in (an upper bound: it includes the settle
/// and the CI-user lookup). (lost, won).
fn claim_timings(log: &[LoggedRequest]) -> (Vec<u64>, Vec<u64>) {
    let (mut lost, mut won) = (Vec::new(), Vec::new());
    for (i, r) in log.iter().enumerate() {
        if !(r.method == "POST" && r.route == "/admin/actions/runners" && r.status == 201) {
            continue;
        }
        let description = r.request_body.as_ref().unwrap()["description"]
            .as_str()
            .unwrap_or_default();
        let Some(rest) = description.strip_prefix("fkr-qemu@") else {
            continue;
        };
        let Some((host, rest)) = rest.split_once(" job ") else {
            continue;
        };
        let job = rest.split(' ').next().unwrap_or_default();
        let id = r.response_body.as_ref().unwrap()["id"].as_i64().unwrap();
        let later = &log[i + 1..];
        let token =
            later.iter().find(|t| {
                t.method == "POST"
                && t.route.ends_with("/tokens")
                && t.request_body.as_ref().and_then(|b| b["name"].as_str()).is_some_and(|n| {
                    n.strip_prefix(&format!("orch-{job}-")).is_some()
                        && matches!(token_minter(n), Some(TokenMinter::Host(h)) if h == host)
                })
            });
        let deleted = later.iter().find(|d| {
            d.method == "DELETE" && d.path.ends_with(&format!("/admin/actions/runners/{id}"))
        });
        match (token, deleted) {
            (Some(t), _) => won.push(t.at_ms.saturating_sub(r.at_ms)),
            (None, Some(d)) => lost.push(d.at_ms.saturating_sub(r.at_ms)),
            (None, None) => {}
        }
    }
    (lost, won)
}

/// `n median (min … max) ms`.
fn spread(mut v: Vec<u64>) -> String {
    if v.is_empty() {
        return "none".to_owned();
    }
    v.sort_unstable();
    format!(
        "{} claims, median {} ms ({} … {} ms)",
        v.len(),
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

/// Asserts that the CI user `login` was created once and its password never reset (no `PATCH
/// /admin/users/<login>` after the `POST` that created it); returns the hosts that minted tokens
/// for it.
fn assert_created_once_never_reset(log: &[LoggedRequest], login: &str) -> BTreeSet<String> {
    let created: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.method == "POST"
                && r.route == "/admin/users"
                && r.status == 201
                && r.request_body.as_ref().and_then(|b| b["username"].as_str()) == Some(login)
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(created.len(), 1, "{login} created {} times", created.len());
    let path = format!("/api/v1/admin/users/{login}");
    let resets: Vec<&LoggedRequest> = log[created[0]..]
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == path)
        .collect();
    assert!(resets.is_empty(), "{login} was changed: {resets:#?}");
    log.iter()
        .filter(|r| r.method == "POST" && r.status == 201 && r.route.ends_with("/tokens"))
        .filter(|r| r.path.ends_with(&format!("/users/{login}/tokens")))
        .filter_map(
            |r| match token_minter(r.request_body.as_ref()?["name"].as_str()?) {
                Some(TokenMinter::Host(h)) => Some(h.to_owned()),
                _ => None,
            },
        )
        .collect()
}

/// Stops both daemons (SIGTERM) and checks that each exited cleanly and left nothing on its host.
fn stop_all(f: &Fleet, serves: &mut [Serve]) {
    for s in serves.iter() {
        s.signal(Signal::SIGTERM);
    }
    for s in serves.iter_mut() {
        let st = s.wait_exit(Duration::from_secs(60));
        assert!(st.success(), "{st}; log:\n{}", s.log_text());
    }
    for h in &f.hosts {
        h.assert_clean();
    }
}

/// 12 jobs of three repositories, two hosts with `max_vms = 2`: every job runs exactly once, on
/// one host (no VM is ever booted for a job another host claimed), both hosts run jobs, neither
/// exceeds its slots, and the CI users, created by whichever host came first, are used by both
/// hosts without a password reset.
#[test]
fn serve_multihost_vm_twelve_jobs_two_hosts_each_job_runs_once() {
    let f = Fleet::new(vec![settings(2), settings(2)]);
    let mut serves: Vec<Serve> = f.hosts.iter().map(|h| h.serve(0)).collect();
    for s in &mut serves {
        s.wait_ready();
    }
    let repos = ["alice/web", "bob/api", "carol/lib"];
    let ids: Vec<i64> = (0..12).map(|i| add_job(&f, repos[i % 3])).collect();

    let mut seen = Seen::default();
    let total = |f: &Fleet| -> Tally {
        f.hosts
            .iter()
            .map(Tally::of)
            .fold(Tally::default(), |a, t| Tally {
                dispatched: a.dispatched + t.dispatched,
                completed: a.completed + t.completed,
                claimed_elsewhere: a.claimed_elsewhere + t.claimed_elsewhere,
                vms: a.vms + t.vms,
            })
    };
    // Until every job has succeeded and every VM is gone from both hosts (a second VM of some
    // job would still be booting, or waiting for its boot deadline).
    serves[0].wait("12 jobs done and every VM gone", 3 * BOOT, || {
        std::thread::sleep(Duration::from_millis(200));
        seen.look(&f);
        let done = f.emu.jobs().iter().all(|j| j.status == JobStatus::Success);
        let idle = f
            .hosts
            .iter()
            .all(|h| h.status().is_some_and(|s| s.vms.is_empty()));
        (done && idle && total(&f).completed >= 12).then_some(())
    });

    // Each job: one host had a QEMU for it, one claim booted and got the task.
    for id in &ids {
        let hosts = seen.launched.get(id).cloned().unwrap_or_default();
        assert_eq!(hosts.len(), 1, "job {id} had QEMUs on {hosts:?}");
    }
    let by_job = assert_one_boot_per_job(&f, &ids);
    let tallies: Vec<Tally> = f.hosts.iter().map(Tally::of).collect();
    let sum = total(&f);
    // Twelve VMs in all, each completed its job; every other dispatch lost its claim.
    assert_eq!((sum.vms, sum.completed), (12, 12), "{tallies:?}");
    for (h, t) in f.hosts.iter().zip(&tallies) {
        assert!(t.all_clean(), "{}: {t:?}", h.id);
        assert!(t.completed >= 1, "{} ran no job: {tallies:?}", h.id);
        assert!(
            seen.most_vms[&h.id] <= 2,
            "{} had {} VMs at once",
            h.id,
            seen.most_vms[&h.id]
        );
    }
    let losing: usize = by_job.values().map(|c| c.len() - 1).sum();
    assert_eq!(sum.claimed_elsewhere, losing as u64, "{by_job:#?}");

    // The CI users: created once each, used by both hosts, never reset.
    let log = f.emu.requests();
    let mut shared = 0;
    for repo in repos {
        let login = ci_user(repo);
        let minters = assert_created_once_never_reset(&log, &login);
        if minters.len() == 2 {
            shared += 1;
        }
    }
    assert!(shared >= 1, "no CI user was used by both hosts");
    let (lost, won) = claim_timings(&log);
    eprintln!(
        "12 jobs on two hosts: {:?} completed; claims lost {} (registration → deletion); claims won {} (registration → token request)",
        tallies.iter().map(|t| t.completed).collect::<Vec<_>>(),
        spread(lost),
        spread(won)
    );

    stop_all(&f, &mut serves);
    for repo in repos {
        let left: Vec<String> = f
            .emu
            .token_names(&ci_user(repo))
            .into_iter()
            .filter(|t| token_minter(t).is_some())
            .collect();
        assert!(left.is_empty(), "tokens left: {left:?}");
    }
    let runners = claims(&f.emu.runners_ever());
    let live: Vec<&Claim> = runners
        .iter()
        .filter(|c| c.runner.deleted_because.is_none())
        .collect();
    assert!(live.is_empty(), "runners left: {live:#?}");
}

/// Host A is restarted (killed, then started again) while host B runs a job of the same
/// repository, and A's VM cannot be taken over (its `vm.json` is unreadable): A's startup sweep
/// kills that VM, revokes A's token and deletes A's runner, and leaves B's token
/// (`orch-<job>-host-b-…`) and B's runner alone; B's job finishes, and A runs its job again.
#[test]
fn serve_multihost_vm_restarted_host_sweeps_only_its_own() {
    let f = Fleet::new(vec![settings(1), settings(1)]);
    let (a, b) = (&f.hosts[0], &f.hosts[1]);
    let login = ci_user("alice/web");
    // No runner gets a task until the restart is over: both VMs stay up, holding what they hold.
    let fetch = "/api/actions/runner.v1.RunnerService/FetchSingleTask";
    f.emu
        .inject("POST", fetch, FaultKind::Status { status: 500 }, None);

    let mut serve_b = b.serve(0);
    serve_b.wait_ready();
    let job_b = add_job(&f, "alice/web");
    let vm_b = serve_b.wait_vm(job_b, "QEMU running", BOOT, |v| v.pid.is_some());
    // B's slot is taken: A's job goes to A.
    let mut serve_a = a.serve(0);
    serve_a.wait_ready();
    let job_a = add_job(&f, "alice/web");
    let vm_a = serve_a.wait_vm(job_a, "QEMU running", BOOT, |v| v.pid.is_some());
    let tokens_a = a.tokens(&f.emu, &login);
    let tokens_b = b.tokens(&f.emu, &login);
    assert_eq!(
        (tokens_a.len(), tokens_b.len()),
        (1, 1),
        "{tokens_a:?} {tokens_b:?}"
    );
    assert!(f.emu.runner_names().contains(&vm_a.name));
    assert!(f.emu.runner_names().contains(&vm_b.name));

    serve_a.signal(Signal::SIGKILL);
    serve_a.wait_exit(Duration::from_secs(10));
    // Unreadable metadata: nothing says what the VM holds, so it is swept, not taken over.
    let meta = a.runtime_dir().join("vms").join(&vm_a.name).join("vm.json");
    std::fs::write(&meta, "{\"name\": \"fr-").unwrap();
    let mut serve_a = a.serve(1);
    serve_a.wait_ready();
    assert_eq!(
        a.metrics()
            .get("fkr_qemu_restart_vms_total{result=\"swept\"}") as u64,
        1
    );
    let said = format!(
        "restart: VM {}: swept: its vm.json is missing or unreadable",
        vm_a.name
    );
    assert!(serve_a.log_text().contains(&said), "{said:?} not logged");
    let found = |kind: SweepKind| {
        a.metrics().get(&format!(
            "fkr_qemu_sweep_findings_total{{kind=\"{}\"}}",
            kind.as_str()
        )) as u64
    };
    // A's own: its VM (QEMU and files), its token, its runner.
    assert_eq!(
        [
            found(SweepKind::Process),
            found(SweepKind::VmDir),
            found(SweepKind::Token),
            found(SweepKind::Runner)
        ],
        [1, 1, 1, 1],
        "process, vm_dir, token, runner"
    );
    // (A already works on its job again, maybe with a new token: the old one is gone.)
    let now_a = a.tokens(&f.emu, &login);
    assert!(
        tokens_a.iter().all(|t| !now_a.contains(t)),
        "{tokens_a:?} still in {now_a:?}"
    );
    assert!(f.emu.deleted_runner_names().contains(&vm_a.name));
    // B's survive, and its VM runs on.
    assert_eq!(b.tokens(&f.emu, &login), tokens_b);
    assert!(f.emu.runner_names().contains(&vm_b.name));
    let still = b.status().expect("B answers");
    assert!(
        still
            .vms
            .iter()
            .any(|v| v.name == vm_b.name && v.pid == vm_b.pid),
        "{still:#?}"
    );
    // A's status shows the fleet: B's runner on B's job.
    serve_a.wait_status("A's view of the fleet", Duration::from_secs(30), |s| {
        s.fleet
            .iter()
            .any(|r| r.host == b.id && r.job_id == job_b && r.name == vm_b.name)
            .then_some(())
    });

    f.emu.clear_faults();
    serve_b.wait("B's job to complete", BOOT, || {
        (b.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(f.emu.job(job_b).unwrap().status, JobStatus::Success);
    wait_for("A's job to run again and complete", BOOT, || {
        (f.emu.job(job_a).unwrap().status == JobStatus::Success).then_some(())
    });
    serve_a.wait("A's job's VM to end", BOOT, || {
        (a.finished(JobOutcome::Completed) + b.finished(JobOutcome::Completed) == 2).then_some(())
    });
    let log = f.emu.requests();
    assert_eq!(
        assert_created_once_never_reset(&log, &login),
        BTreeSet::from([a.id.clone(), b.id.clone()])
    );
    stop_all(&f, &mut [serve_a, serve_b]);
}

/// Host A dies (SIGKILL, its QEMU too) holding the claim on a job whose VM never picked it up:
/// host B, started afterwards, first leaves the job to A's claim, then — once the claim has stayed
/// offline for B's `boot_deadline` + 120 s after B first saw it — deletes the stale claim and runs
/// the job, within that bound plus a poll.
#[test]
fn serve_multihost_vm_dead_hosts_claim_is_taken_over() {
    // Enough for B's test guest to boot under TCG while the other VM tests load the machine (30 s
    // was not, now and then: each of B's VMs was stopped before its runner started).
    const B_BOOT_DEADLINE: u64 = 60;
    let f = Fleet::new(vec![
        settings(1),
        Settings {
            boot_deadline: "60s",
            ..settings(1)
        },
    ]);
    let (a, b) = (&f.hosts[0], &f.hosts[1]);
    let mut serve_a = a.serve(0);
    serve_a.wait_ready();
    let job = add_job(&f, "dave/app");
    let claim = serve_a.wait("A's claim", Duration::from_secs(30), || {
        f.claims_on(job).into_iter().find(|c| c.host == a.id)
    });
    serve_a.signal(Signal::SIGKILL);
    serve_a.wait_exit(Duration::from_secs(10));
    // A's QEMU (if it got that far) would boot and bring A's claim online: it dies with A.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for pid in a.qemus() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.qemus().is_empty());
    let claim = f
        .claims_on(job)
        .into_iter()
        .find(|c| c.runner.id == claim.runner.id)
        .expect("A's claim is still there");
    assert!(
        !claim.booted() && claim.runner.status == "offline",
        "{claim:#?}"
    );

    let mut serve_b = b.serve(0);
    serve_b.wait_ready();
    let started = Instant::now();
    // B tries, sees A's claim first, and leaves the job to it for now.
    serve_b.wait("B to leave the job to A", Duration::from_secs(30), || {
        (b.finished(JobOutcome::ClaimedElsewhere) == 1).then_some(())
    });
    serve_b.wait_status("B's view of A's claim", Duration::from_secs(30), |s| {
        s.fleet
            .iter()
            .any(|r| r.host == a.id && r.job_id == job && r.status == "offline")
            .then_some(())
    });
    let timeout = Duration::from_secs(B_BOOT_DEADLINE + 120);
    let bound = timeout + Duration::from_secs(10);
    serve_b.wait(
        "B to take the job over",
        bound + Duration::from_secs(30),
        || {
            f.emu
                .deleted_runner_names()
                .contains(&claim.runner.name)
                .then_some(())
        },
    );
    let took = started.elapsed();
    assert!(
        took >= timeout,
        "A's claim was taken over after {took:?}, before it was stale ({timeout:?})"
    );
    assert!(
        took <= bound,
        "A's claim was taken over after {took:?}, later than {bound:?}"
    );
    let log = serve_b.log_text();
    let said = format!(
        "job {job}: taking it over from host {}: its claim (runner {}) stayed offline for {}s",
        a.id,
        claim.runner.id,
        timeout.as_secs()
    );
    assert!(log.contains(&said), "{said:?} not logged; log:\n{log}");
    serve_b.wait("B to run the job", 2 * BOOT, || {
        (b.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(f.emu.job(job).unwrap().status, JobStatus::Success);
    // The job ran in B's VM: B's claim got the task.
    let ran = f.emu.job(job).unwrap().runner_id;
    let on = f.claims_on(job);
    assert!(
        on.iter()
            .any(|c| c.host == b.id && Some(c.runner.id) == ran && c.booted()),
        "{on:#?}"
    );
    eprintln!("host B took the dead host's claim over after {took:?} (bound {bound:?})");
    stop_all(&f, &mut [serve_b]);
}

/// The claim race, many times: each round adds a burst of jobs, then starts both hosts in random
/// order a random moment apart (the jobs are waiting when they start, so both go for them at
/// once), and checks that every job ran once and that no job had VMs on two hosts. The VMs'
/// QEMU is the fake whose guest runs its job at once, so rounds take seconds.
#[test]
fn serve_multihost_race_no_job_is_booted_twice() {
    let rounds: u32 = std::env::var("FKR_RACE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    let fake = tempfile::tempdir().unwrap();
    let host = || Settings {
        qemu: Some(fake_qemu(fake.path(), "runner")),
        poll_interval: "100ms",
        boot_deadline: "20s",
        job_deadline: "60s",
        ..settings(2)
    };
    let f = Fleet::new(vec![host(), host()]);
    let repos = ["erin/one", "frank/two"];
    let mut rng = rand::thread_rng();
    let mut totals = vec![Tally::default(); f.hosts.len()];
    let (mut lost, mut won) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for round in 0..rounds {
        let k = rng.gen_range(3..=6);
        let mut ids = Vec::new();
        for _ in 0..k {
            ids.push(add_job(&f, repos[rng.gen_range(0..repos.len())]));
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
        }
        let first = rng.gen_range(0..2);
        let mut serves: Vec<(usize, Serve)> = Vec::new();
        for i in [first, 1 - first] {
            serves.push((i, f.hosts[i].serve(round)));
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
        }
        serves.sort_by_key(|(i, _)| *i);
        let mut serves: Vec<Serve> = serves.into_iter().map(|(_, s)| s).collect();
        for s in &mut serves {
            s.wait_ready();
        }
        serves[0].wait(
            &format!("round {round}: {k} jobs done, every VM gone"),
            Duration::from_secs(60),
            || {
                std::thread::sleep(Duration::from_millis(100));
                let done = f
                    .emu
                    .jobs()
                    .iter()
                    .filter(|j| ids.contains(&j.id))
                    .all(|j| j.status == JobStatus::Success);
                let tallies: Vec<Tally> = f.hosts.iter().map(Tally::of).collect();
                let idle = tallies.iter().all(Tally::all_clean);
                let completed: u64 = tallies.iter().map(|t| t.completed).sum();
                (done && idle && completed >= k).then_some(())
            },
        );
        let by_job = assert_one_boot_per_job(&f, &ids);
        let tallies: Vec<Tally> = f.hosts.iter().map(Tally::of).collect();
        let vms: u64 = tallies.iter().map(|t| t.vms).sum();
        let completed: u64 = tallies.iter().map(|t| t.completed).sum();
        assert_eq!((vms, completed), (k, k), "round {round}: {tallies:?}");
        let losing: usize = by_job.values().map(|c| c.len() - 1).sum();
        let elsewhere: u64 = tallies.iter().map(|t| t.claimed_elsewhere).sum();
        assert_eq!(elsewhere, losing as u64, "round {round}: {by_job:#?}");
        for (i, t) in tallies.iter().enumerate() {
            let s = &mut totals[i];
            s.dispatched += t.dispatched;
            s.completed += t.completed;
            s.claimed_elsewhere += t.claimed_elsewhere;
            s.vms += t.vms;
        }
        let (l, w) = claim_timings(&f.emu.requests());
        lost.extend(l);
        won.extend(w);
        f.emu.clear_requests();
        stop_all(&f, &mut serves);
    }
    eprintln!(
        "{rounds} rounds in {:?}: per host {totals:?}; claims lost {} (registration → deletion); claims won {} (registration → token request)",
        started.elapsed(),
        spread(lost),
        spread(won)
    );
    // The race was run: claims met, and both hosts won some.
    let contested: u64 = totals.iter().map(|t| t.claimed_elsewhere).sum();
    assert!(contested > 0, "no claim ever met another: {totals:?}");
    for (h, t) in f.hosts.iter().zip(&totals) {
        assert!(t.completed > 0, "{} never won a claim: {totals:?}", h.id);
    }
}
