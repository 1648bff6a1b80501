//! Forgejo's load from one host, idle and busy (issue 13; as root, like the serve tests, ~3 min):
//!
//! ```sh
//! cargo build --release --examples && cargo bench --bench forgejo_request_rate
//! ```
//! One `serve` with the defaults that matter here (`poll_interval` 15 s, `poll_interval_min` 1 s,
//! `max_vms` 2) and the fake QEMU's `runner-4s` guest. Every 50 ms the bench reads the emulator's
//! request log and notes when each job-list request (`…/actions/runners/jobs`: polls, dispatch's
//! look, claims' still-waiting checks) and each request at all arrived. Printed, per phase — the
//! first 30 s after start (fast: a fresh daemon catches up), idle after that (backing off to
//! 15 s), and busy (12 jobs at once until all ran) —: job-list requests per second, all requests per
//! second, and the most job-list requests seen in any 1 s window (the cap is one).
//! `FKR_BENCH_POOL` sets `[pool] size` (default 1, serve's default; 0 as before the pool).

#[allow(dead_code)]
#[path = "../tests/common"]
mod common {
    pub mod daemon;
    pub mod emulator;
    pub mod fake_qemu;
    pub mod links;
    pub mod netns;
    pub mod netns_exec;
    pub mod prometheus;
    pub mod serve;
    pub mod topology;
    pub mod uplink;
}

use std::time::{Duration, Instant};

use common::daemon::Settings;

/// `[pool] size` for the bench (`FKR_BENCH_POOL`, default 1 like serve's).
fn pool_size() -> usize {
    std::env::var("FKR_BENCH_POOL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}
use common::fake_qemu::fake_qemu;
use common::serve::World;
use fkr_qemu::ops::JobOutcome;
use nix::sys::signal::Signal;

const JOBS: usize = 12;

/// Arrival times (to the 50 ms sample) of job-list requests and of all requests.
#[derive(Default)]
struct Seen {
    job_lists: Vec<Instant>,
    all: Vec<Instant>,
    counted: usize,
}

impl Seen {
    fn sample(&mut self, w: &World) {
        let log = w.emu.requests();
        let now = Instant::now();
        for r in &log[self.counted.min(log.len())..] {
            self.all.push(now);
            if r.route.ends_with("/actions/runners/jobs") {
                self.job_lists.push(now);
            }
        }
        self.counted = log.len();
    }

    /// Samples for `d` (or until `done` says so), returning the phase's start and end.
    fn watch(&mut self, w: &World, d: Duration, done: impl Fn() -> bool) -> (Instant, Instant) {
        let start = Instant::now();
        while start.elapsed() < d && !done() {
            std::thread::sleep(Duration::from_millis(50));
            self.sample(w);
        }
        (start, Instant::now())
    }

    fn report(&self, phase: &str, (from, to): (Instant, Instant)) {
        let within = |v: &[Instant]| v.iter().filter(|t| **t >= from && **t <= to).count();
        let secs = (to - from).as_secs_f64();
        let lists: Vec<Instant> = self
            .job_lists
            .iter()
            .copied()
            .filter(|t| *t >= from && *t <= to)
            .collect();
        // The most job-list requests in any window of one second (sampled every 50 ms, so a pair
        // 0.95 s apart may land 1.0 s apart and vice versa).
        let peak = lists
            .iter()
            .map(|a| {
                lists
                    .iter()
                    .filter(|b| **b >= *a && **b - *a < Duration::from_millis(950))
                    .count()
            })
            .max()
            .unwrap_or(0);
        eprintln!(
            "{phase:<28} {secs:>6.1} s: job lists {:>3} ({:.2}/s, peak {peak} in 1 s), all requests {:>4} ({:.2}/s)",
            lists.len(),
            lists.len() as f64 / secs,
            within(&self.all),
            within(&self.all) as f64 / secs,
        );
    }
}

fn main() {
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        max_vms: 2,
        qemu: Some(fake_qemu(fake.path(), "runner-4s")),
        poll_interval: "15s",
        boot_deadline: "60s",
        job_deadline: "120s",
        vm_extra: "disk_max_mib = 4096",
        pool_size: pool_size(),
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let mut seen = Seen::default();
    let startup = seen.watch(&w, Duration::from_secs(30), || false);
    let idle = seen.watch(&w, Duration::from_secs(90), || false);
    for i in 0..JOBS {
        let repo = ["bench/one", "bench/two", "bench/three"][i % 3];
        w.emu.add_job(repo, &["external-host"], "build");
    }
    let busy = seen.watch(&w, Duration::from_secs(300), || {
        w.finished(JobOutcome::Completed) == JOBS as u64
    });
    // After the last job: fast for a while (a workflow's next job may come), then backing off.
    let after = seen.watch(&w, Duration::from_secs(60), || false);
    eprintln!(
        "one host, poll_interval 15s, poll_interval_min 1s, max_vms 2, pool {}, {JOBS} jobs of 4 s:",
        pool_size()
    );
    seen.report("first 30 s after start", startup);
    seen.report("idle (30–120 s)", idle);
    seen.report("busy (12 jobs, until done)", busy);
    seen.report("60 s after the last job", after);
    assert_eq!(w.finished(JobOutcome::Completed), JOBS as u64);
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(120)).success());
}
