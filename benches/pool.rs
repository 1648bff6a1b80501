//! Warm pool benchmarks (TCG test guests; as root, like the serve tests; ~15 min on 2 cores):
//!
//! ```sh
//! cargo build --release --examples && FKR_SERVE_BIN=target/release/fkr-qemu cargo bench --bench pool
//! ```
//! - bind latency, pool size 1: job dispatched → runner process started in the guest (the guest's
//!   own STARTED stamp put on the host's clock, as serve logs it), over `FKR_BENCH_JOBS` (20) jobs;
//! - job waiting → runner started (Forgejo shows the job running: the runner fetched its task),
//!   one job at a time, with the pool and cold (`size = 0`), `poll_interval` 1 s, in the same run;
//! - throughput: 20 jobs added at once, `max_vms` 2, pool size 2 vs cold: time until all completed.

// The serve tests' harness; the bench uses part of it.
#[allow(dead_code)]
#[path = "../tests/common"]
mod common {
    pub mod daemon;
    pub mod emulator;
    pub mod links;
    pub mod netns;
    pub mod netns_exec;
    pub mod prometheus;
    pub mod serve;
    pub mod topology;
    pub mod uplink;
}

use std::time::{Duration, Instant};

use common::daemon::{wait_for, Serve, Settings};
use common::emulator::JobStatus;
use common::serve::World;
use fkr_qemu::ops::{JobOutcome, PoolState, VmState};
use nix::sys::signal::Signal;

fn jobs() -> usize {
    std::env::var("FKR_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn summary(what: &str, v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    eprintln!(
        "{what}: n={} median {:.3}s (p10 {:.3}s, p90 {:.3}s, min {:.3}s, max {:.3}s)",
        v.len(),
        q(0.5),
        q(0.1),
        q(0.9),
        v[0],
        v[v.len() - 1]
    );
}

fn world(pool: usize, max_vms: usize) -> World {
    World::new(Settings {
        max_vms,
        poll_interval: "1s",
        pool_size: pool,
        boot_deadline: "120s",
        job_deadline: "300s",
        ..Settings::default()
    })
}

fn warm_ready(serve: &mut Serve) {
    serve.wait_status("a warm VM", Duration::from_secs(300), |s| {
        s.vms
            .iter()
            .any(|v| v.state == VmState::Pool(PoolState::Warm))
            .then_some(())
    });
}

/// One job at a time; returns (waiting → runner started) per job, and the bind latencies serve
/// logged (pool only).
fn one_at_a_time(pool: usize) -> (Vec<f64>, Vec<f64>) {
    let w = world(pool, 2);
    let mut serve = w.serve(0);
    serve.wait_ready();
    let (mut waiting, mut bind) = (Vec::new(), Vec::new());
    for i in 0..jobs() {
        if pool > 0 {
            warm_ready(&mut serve);
        }
        // A random phase against the poll tick.
        std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1000));
        let added = Instant::now();
        let id = w.emu.add_job("bench/pool", &["external-host"], "build").id;
        wait_for("the runner to start", Duration::from_secs(300), || {
            (w.emu
                .job(id)
                .is_some_and(|j| j.status != JobStatus::Waiting))
            .then_some(())
        });
        waiting.push(added.elapsed().as_secs_f64());
        wait_for("the job to end", Duration::from_secs(300), || {
            (w.finished(JobOutcome::Completed) > i as u64).then_some(())
        });
        if pool > 0 {
            let log = serve.log_text();
            let ms = log
                .lines()
                .filter(|l| l.contains(&format!("job {id}: bound to warm VM")))
                .find_map(|l| {
                    l.split("its runner started ")
                        .nth(1)?
                        .split(' ')
                        .next()?
                        .parse::<f64>()
                        .ok()
                });
            match ms {
                Some(ms) => bind.push(ms / 1000.0),
                None => eprintln!("job {id} was not bound to a warm VM"),
            }
        }
    }
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(300)).success());
    (waiting, bind)
}

/// 20 jobs at once; seconds until all completed.
fn burst(pool: usize) -> f64 {
    const N: u64 = 20;
    let w = world(pool, 2);
    let mut serve = w.serve(0);
    serve.wait_ready();
    if pool > 0 {
        // The pool is what a host has ready when a burst arrives.
        serve.wait_status("the pool to fill", Duration::from_secs(300), |s| {
            (s.vms
                .iter()
                .filter(|v| v.state == VmState::Pool(PoolState::Warm))
                .count()
                == pool)
                .then_some(())
        });
    }
    let start = Instant::now();
    for i in 0..N {
        w.emu.add_job(
            &format!("bench/burst{}", i % 4),
            &["external-host"],
            "build",
        );
    }
    wait_for("the burst to complete", Duration::from_secs(1800), || {
        (w.finished(JobOutcome::Completed) == N).then_some(())
    });
    let total = start.elapsed().as_secs_f64();
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(300)).success());
    total
}

fn main() {
    let (mut warm_wait, mut bind) = one_at_a_time(1);
    let (mut cold_wait, _) = one_at_a_time(0);
    summary(
        "bind latency (dispatch -> runner started, guest stamp), pool 1",
        &mut bind,
    );
    summary("job waiting -> runner started, pool 1", &mut warm_wait);
    summary("job waiting -> runner started, cold", &mut cold_wait);
    let warm = burst(2);
    let cold = burst(0);
    eprintln!("throughput: 20 jobs at once, max_vms 2: pool 2 {warm:.1}s, cold {cold:.1}s");
}
