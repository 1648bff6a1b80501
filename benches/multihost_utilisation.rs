//! Two hosts, one burst (issue 14's utilisation benchmark; as root, like the serve tests, ~1 min):
//!
//! ```sh
//! cargo build --release --examples && cargo bench --bench multihost_utilisation
//! ```
//! `host-a` and `host-b` (`max_vms` 2 each, `poll_interval` 1 s) serve one emulator; 12 jobs arrive
//! at once. The fake QEMU's `runner-4s` "guest" runs each job for 4 s (no kernel: these machines
//! are CPU-bound under TCG, so this measures slots, not wall-clock throughput). Every 100 ms the
//! bench reads both hosts' status and the emulator's jobs, and charges each waiting job the time
//! during which some host had a free slot. Printed: that time per job (median, max) against the
//! poll interval, how the jobs spread over the hosts, and the makespan.

#[allow(dead_code)]
#[path = "../tests/common"]
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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::daemon::Settings;
use common::emulator::JobStatus;
use common::fake_qemu::fake_qemu;
use common::fleet::Fleet;
use fkr_qemu::ops::JobOutcome;

const JOBS: usize = 12;
const MAX_VMS: usize = 2;
const POLL: Duration = Duration::from_secs(1);

fn main() {
    let fake = tempfile::tempdir().unwrap();
    let host = || Settings {
        max_vms: MAX_VMS,
        qemu: Some(fake_qemu(fake.path(), "runner-4s")),
        poll_interval: "1s",
        boot_deadline: "60s",
        job_deadline: "120s",
        vm_extra: "disk_max_mib = 4096",
        ..Settings::default()
    };
    let f = Fleet::new(vec![host(), host()]);
    let mut serves: Vec<_> = f.hosts.iter().map(|h| h.serve(0)).collect();
    for s in &mut serves {
        s.wait_ready();
    }
    let ids: Vec<i64> = (0..JOBS)
        .map(|i| {
            let repo = ["bench/one", "bench/two", "bench/three"][i % 3];
            f.emu.add_job(repo, &["external-host"], "build").id
        })
        .collect();
    let started = Instant::now();
    let mut charged: BTreeMap<i64, Duration> = ids.iter().map(|id| (*id, Duration::ZERO)).collect();
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let dt = now - last;
        last = now;
        let jobs = f.emu.jobs();
        let waiting: Vec<i64> = jobs
            .iter()
            .filter(|j| ids.contains(&j.id) && j.status == JobStatus::Waiting)
            .map(|j| j.id)
            .collect();
        let done = jobs
            .iter()
            .filter(|j| ids.contains(&j.id) && j.status == JobStatus::Success)
            .count();
        if done == JOBS {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the burst never finished"
        );
        let free: usize = f
            .hosts
            .iter()
            .map(|h| {
                h.status()
                    .map_or(0, |s| MAX_VMS.saturating_sub(s.vms.len()))
            })
            .sum();
        if free > 0 {
            for id in waiting {
                *charged.get_mut(&id).unwrap() += dt;
            }
        }
    }
    let makespan = started.elapsed();
    // Each host counts a job once its release is done, a moment after Forgejo shows it done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while f
        .hosts
        .iter()
        .map(|h| h.finished(JobOutcome::Completed))
        .sum::<u64>()
        < JOBS as u64
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut waits: Vec<Duration> = charged.values().copied().collect();
    waits.sort();
    let per_host: Vec<(String, u64)> = f
        .hosts
        .iter()
        .map(|h| (h.id.clone(), h.finished(JobOutcome::Completed)))
        .collect();
    println!("multihost utilisation: {JOBS} jobs of 4 s, 2 hosts × max_vms {MAX_VMS}, poll 1 s");
    println!(
        "  waiting while some host had a free slot, per job: median {:.2} s, max {:.2} s (poll interval {:.0} s)",
        waits[waits.len() / 2].as_secs_f64(),
        waits[waits.len() - 1].as_secs_f64(),
        POLL.as_secs_f64()
    );
    println!("  jobs completed per host: {per_host:?}");
    println!(
        "  makespan {:.1} s (ideal with 4 slots: {} waves of 4 s = {} s plus boots)",
        makespan.as_secs_f64(),
        JOBS / (2 * MAX_VMS),
        4 * JOBS / (2 * MAX_VMS)
    );
    for s in &mut serves {
        s.signal(nix::sys::signal::Signal::SIGTERM);
        s.wait_exit(Duration::from_secs(60));
    }
}
