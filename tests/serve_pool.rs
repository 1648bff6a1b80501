//! The warm pool end to end: `fkr-qemu serve` with `[pool] size = 1`. With the TCG test guest: a
//! warm VM's seed holds no job secret, a job bound to it runs and the VM powers off, and SIGTERM
//! stops the warm VM that holds no job at once while the job in flight finishes. With the fake
//! QEMU (no kernel): a warm VM that never acknowledges its payload is discarded and the job still
//! runs, in a VM booted for it; a base image without the agent turns the pool off and jobs boot
//! cold.

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

use std::io::Read;
use std::time::Duration;

use common::daemon::{wait_for, Serve, Settings};
use common::emulator::{FaultKind, JobStatus};
use common::fake_qemu::fake_qemu;
use common::serve::World;
use fkr_qemu::ops::{JobOutcome, PoolState, VmInfo, VmState};
use nix::sys::signal::Signal;

const BOOT: Duration = Duration::from_secs(180);
const LABEL: &str = "external-host";

/// The first warm (ready) VM on the status board.
fn wait_warm(serve: &mut Serve, except: Option<&str>) -> VmInfo {
    serve.wait_status("a warm VM", BOOT, |s| {
        s.vms
            .iter()
            .find(|v| v.state == VmState::Pool(PoolState::Warm) && Some(v.name.as_str()) != except)
            .cloned()
    })
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A file of the FAT seed image.
fn seed_file(seed: &[u8], name: &str) -> Option<String> {
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(seed.to_vec()), fatfs::FsOptions::new())
        .expect("the seed is a FAT image");
    let mut text = String::new();
    fs.root_dir()
        .open_file(name)
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

#[test]
fn serve_vm_pool_binds_a_warm_vm_and_sigterm_stops_the_warm_one_at_once() {
    let w = World::new(Settings {
        pool_size: 1,
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let warm = wait_warm(&mut serve, None);
    assert_eq!(warm.job_id, 0, "{warm:#?}");
    let warm_pid = warm.pid.expect("a warm VM's QEMU runs");

    // Its seed holds no job secret: no token, no runner, no registry credentials.
    let seed = std::fs::read(
        w.state_dir()
            .join("disks")
            .join(&warm.name)
            .join("seed.img"),
    )
    .expect("the warm VM's seed");
    assert_eq!(
        seed_file(&seed, "user-data").as_deref(),
        Some("#cloud-config\n")
    );
    let meta = seed_file(&seed, "meta-data").expect("meta-data");
    assert!(meta.contains(&warm.name), "{meta}");
    assert!(seed_file(&seed, "network-config").is_some());

    // A job binds to it: its VM is the warm VM, and powers off after the job.
    let id = w.emu.add_job("carol/app", &[LABEL], "build").id;
    let bound = serve.wait_vm(id, "bound", Duration::from_secs(30), |v| v.pid.is_some());
    assert_eq!(bound.name, warm.name, "{bound:#?}");
    serve.wait("the job to finish", BOOT, || {
        (w.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(w.emu.job(id).unwrap().status, JobStatus::Success);
    wait_for(
        "the bound VM's QEMU to end",
        Duration::from_secs(30),
        || (!pid_alive(warm_pid)).then_some(()),
    );
    let m = w.metrics();
    assert_eq!(m.get("fkr_qemu_job_starts_total{path=\"warm\"}"), 1.0);
    assert_eq!(m.get("fkr_qemu_job_starts_total{path=\"cold\"}"), 0.0);
    assert_eq!(m.get("fkr_qemu_pool_bind_seconds_count"), 1.0);
    // The runner started within a second of dispatch (the guest's own STARTED stamp).
    let bind = m.get("fkr_qemu_pool_bind_seconds_sum");
    assert!(bind > 0.0 && bind < 5.0, "bind latency {bind}s");

    // The pool refilled. The next job holds its VM a while (one 60 s delay on its log upload,
    // which the runner stand-in gives up on after 30 s and retries): SIGTERM with one job in
    // flight and one warm VM stops the warm VM at once and lets the job finish.
    let warm2 = wait_warm(&mut serve, Some(&warm.name));
    w.emu.inject(
        "POST",
        "/api/actions/runner.v1.RunnerService/UpdateLog",
        FaultKind::Delay { delay_ms: 60_000 },
        Some(1),
    );
    let id2 = w.emu.add_job("carol/app", &[LABEL], "build").id;
    let job_vm = serve.wait_vm(id2, "bound", Duration::from_secs(30), |v| v.pid.is_some());
    assert_eq!(job_vm.name, warm2.name);
    let warm3 = wait_warm(&mut serve, Some(&warm2.name));
    let warm3_pid = warm3.pid.unwrap();
    assert!(
        w.finished(JobOutcome::Completed) == 1,
        "the second job ended before the test could signal"
    );
    serve.signal(Signal::SIGTERM);
    wait_for("the warm VM to stop", Duration::from_secs(15), || {
        (!pid_alive(warm3_pid)).then_some(())
    });
    assert!(
        pid_alive(job_vm.pid.unwrap()),
        "the job's VM stopped with the warm one"
    );
    let st = serve.wait_exit(BOOT);
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    assert_eq!(
        w.emu.job(id2).unwrap().status,
        JobStatus::Success,
        "log:\n{}",
        serve.log_text()
    );
    assert!(!serve.log_text().contains(w.emu.admin_token()));
    w.assert_clean("carol-app-ci");
}

#[test]
fn serve_pool_warm_vm_that_never_acknowledges_is_discarded_and_the_job_still_runs() {
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        pool_size: 1,
        pool_extra: "bind_timeout = \"1s\"",
        qemu: Some(fake_qemu(fake.path(), "runner-noack")),
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    let warm = wait_warm(&mut serve, None);
    let id = w.emu.add_job("dave/lib", &[LABEL], "build").id;
    serve.wait("the job to finish", Duration::from_secs(60), || {
        (w.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(w.emu.job(id).unwrap().status, JobStatus::Success);
    let m = w.metrics();
    assert_eq!(
        m.get("fkr_qemu_pool_discards_total{reason=\"no_ack\"}"),
        1.0
    );
    assert_eq!(m.get("fkr_qemu_job_starts_total{path=\"cold\"}"), 1.0);
    assert_eq!(m.get("fkr_qemu_job_starts_total{path=\"warm\"}"), 0.0);
    assert_eq!(m.sum("fkr_qemu_pool_discards_total"), 1.0, "only the one");
    // The discarded warm VM is gone; the job's runner kept its name.
    wait_for("the discarded VM to go", Duration::from_secs(30), || {
        (!w.vm_dirs().contains(&warm.name)).then_some(())
    });
    serve.signal(Signal::SIGTERM);
    let st = serve.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    assert!(w.status().is_none(), "the control socket outlived serve");
    w.assert_clean("dave-lib-ci");
}

#[test]
fn serve_pool_base_image_without_the_agent_turns_the_pool_off_and_jobs_boot_cold() {
    // The fake QEMU's "image" has no job agent: its warm VM idles and never says READY.
    let fake = tempfile::tempdir().unwrap();
    let w = World::new(Settings {
        pool_size: 1,
        boot_deadline: "3s",
        qemu: Some(fake_qemu(fake.path(), "runner-noagent")),
        ..Settings::default()
    });
    let mut serve = w.serve(0);
    serve.wait_ready();
    wait_for(
        "the pool to turn itself off",
        Duration::from_secs(30),
        || {
            serve
                .log_text()
                .contains("seems to have no job agent")
                .then_some(())
        },
    );
    let m = w.metrics();
    assert_eq!(
        m.get("fkr_qemu_pool_discards_total{reason=\"not_ready\"}"),
        1.0
    );
    // Off: no warm VM is booted again (the failure back-off alone would retry within 2 s).
    std::thread::sleep(Duration::from_secs(5));
    let st = w.status().expect("status");
    assert!(
        st.vms.iter().all(|v| !matches!(v.state, VmState::Pool(_))),
        "a warm VM after the pool turned off: {:#?}",
        st.vms
    );
    assert!(w.vm_dirs().is_empty(), "{:?}", w.vm_dirs());
    assert_eq!(
        w.metrics().sum("fkr_qemu_pool_discards_total"),
        1.0,
        "one warm VM only"
    );
    // Jobs boot cold, as without a pool.
    let id = w.emu.add_job("erin/tool", &[LABEL], "build").id;
    serve.wait("the job to finish", Duration::from_secs(60), || {
        (w.finished(JobOutcome::Completed) == 1).then_some(())
    });
    assert_eq!(w.emu.job(id).unwrap().status, JobStatus::Success);
    let m = w.metrics();
    assert_eq!(m.get("fkr_qemu_job_starts_total{path=\"cold\"}"), 1.0);
    assert_eq!(m.get("fkr_qemu_job_starts_total{path=\"warm\"}"), 0.0);
    serve.signal(Signal::SIGTERM);
    let st = serve.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}; log:\n{}", serve.log_text());
    w.assert_clean("erin-tool-ci");
}
