//! `serve` benchmarks (a few minutes; as root, like the serve tests):
//!
//! ```sh
//! cargo build --release --examples && cargo bench --bench serve_dispatch
//! ```
//! - dispatch latency: from a job being added to the emulator to QEMU being spawned for it (serve's
//!   "VM … started" line), median and spread over 24 jobs, with `poll_interval` 1 s (the latency is
//!   about half the poll interval plus the host-side preparation, which is printed on its own);
//! - serve's resident memory (VmRSS, VmHWM) while `max_vms` VMs run.

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

use std::time::{Duration, SystemTime};

use common::daemon::{wait_for, Settings};
use common::serve::World;
use fkr_qemu::ops::JobOutcome;
use nix::sys::signal::Signal;

/// `2026-11-28T01:54:15.733672Z` at the start of a log line → system time.
fn stamp(line: &str) -> SystemTime {
    let ts = line.split_whitespace().next().unwrap();
    let t =
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos() as u64)
}

/// The first line of serve's log that contains `needle` (its time stamp is what the bench measures).
fn wait_log(serve: &mut common::daemon::Serve, needle: &str, timeout: Duration) -> String {
    let log = serve.log.clone();
    serve.wait(needle, timeout, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(needle))
            .map(str::to_owned)
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    const JOBS: usize = 24;
    const MAX_VMS: usize = 3;
    let w = World::new(Settings {
        max_vms: MAX_VMS,
        poll_interval: "1s",
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let (idle_rss, _) = rss_kib(serve.pid());

    let mut latency = Vec::new();
    let mut prepare = Vec::new();
    let mut rss_full = Vec::new();
    for i in 0..JOBS {
        // One job at a time with a slot free, so the figure is dispatch, not queueing behind max_vms.
        wait_for("a free VM slot", Duration::from_secs(300), || {
            (w.qemus().len() < MAX_VMS).then_some(())
        });
        // A random phase against the poll tick (adding right after the last dispatch would always
        // land just after a tick and measure a whole interval).
        std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 1000));
        let added = SystemTime::now();
        let id = w
            .emu
            .add_job(&format!("bench/repo{}", i % 4), &["external-host"], "build")
            .id;
        let started = wait_log(
            &mut serve,
            &format!("started for job {id}"),
            Duration::from_secs(120),
        );
        let dispatched = wait_log(
            &mut serve,
            &format!("queue: dispatching job {id} "),
            Duration::from_secs(1),
        );
        latency.push(
            stamp(&started)
                .duration_since(added)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        prepare.push(
            stamp(&started)
                .duration_since(stamp(&dispatched))
                .unwrap_or_default()
                .as_secs_f64(),
        );
        if w.qemus().len() == MAX_VMS {
            rss_full.push(rss_kib(serve.pid()));
        }
    }
    wait_for("all jobs done", Duration::from_secs(600), || {
        (w.finished(JobOutcome::Completed) == JOBS as u64).then_some(())
    });
    let (_, hwm) = rss_kib(serve.pid());
    let lat = median(&mut latency.clone());
    let prep = median(&mut prepare.clone());
    latency.sort_by(f64::total_cmp);
    eprintln!(
        "dispatch latency (job added -> QEMU spawned), {JOBS} jobs, poll 1s: median {lat:.3}s, min {:.3}s, max {:.3}s",
        latency[0],
        latency[JOBS - 1]
    );
    eprintln!("host-side preparation (dispatch -> QEMU spawned): median {prep:.3}s");
    eprintln!(
        "serve RSS: idle {idle_rss} KiB; with {MAX_VMS} VMs running: {:?} KiB (VmRSS, VmHWM samples); peak VmHWM {hwm} KiB",
        rss_full
    );
    serve.signal(Signal::SIGTERM);
    assert!(serve.wait_exit(Duration::from_secs(120)).success());
    w.assert_clean("bench-repo0-ci");
}
