//! A confined VM is its cgroup, not its command line: a QEMU that escapes the guest and rewrites
//! its own command line (so that nothing of `/proc/<pid>/cmdline` names QEMU or its VM) is still
//! found, taken over and stopped after a daemon restart, swept when it is not taken over, and its
//! uid is not handed to another VM while it lives.
//!
//! Runs as root (the sandbox drops QEMU to a uid of its own and puts it in a cgroup) with the fake
//! QEMU in `runner-noagent-disguised` mode: it serves QMP and idles, like a booted guest, and
//! overwrites its command line right away. The "daemon restart" is the driver letting go of the
//! VM exactly as a handover or crash leaves it (record, cgroup and files stay; the uid lock goes).

mod common {
    pub mod fake_qemu;
    pub mod vm_config;
}

use std::path::Path;
use std::time::Duration;

use fkr_qemu::types::VmName;
use fkr_qemu::vm::{self, Seed, VmSpec};

use common::fake_qemu::fake_qemu;

const UID_BASE: u32 = 1_961_000_000;

fn base_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("base.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    path
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z ") && !s.contains(") X "))
        .unwrap_or(false)
}

/// Launches a disguised VM and lets go of it as a crashing daemon would; returns its name, pid,
/// uid and cgroup once its command line no longer names it.
async fn launch_and_let_go(
    cfg: &vm::VmConfig,
    base: &Path,
    name: &str,
) -> (VmName, u32, u32, std::path::PathBuf) {
    let name = VmName::parse(name).unwrap();
    let mut spec = VmSpec::new(
        name.clone(),
        base,
        Seed {
            instance_id: name.to_string(),
            hostname: name.to_string(),
            user_data: "#cloud-config\n".into(),
            network_config: None,
        },
        Duration::from_secs(600),
    );
    spec.agent = true;
    let handle = vm::launch(cfg, spec).await.expect("launch");
    let pid = handle.pid();
    let uid = handle
        .resources()
        .uid
        .expect("root runs QEMU under a VM uid");
    let cgroup = handle
        .resources()
        .cgroup
        .clone()
        .expect("root confines QEMU in a cgroup");
    let vm_dir = handle.dir().to_owned();
    for _ in 0..200 {
        if !cmdline(pid).contains("qemu") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let disguised = cmdline(pid);
    assert!(
        !disguised.contains("qemu") && !disguised.contains(name.as_str()),
        "the stand-in did not rewrite its command line: {disguised}"
    );
    // The old rule (argv0 and the VM dir in the command line) no longer recognises it.
    assert!(!vm::is_our_qemu(pid, &vm_dir));
    handle.detach_token().cancel();
    handle.wait().await.expect("the supervisor lets go");
    assert!(alive(pid), "letting go must not stop the VM");
    (name, pid, uid, cgroup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_rewrites_its_command_line_is_still_found_stopped_and_keeps_its_uid() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks the sandbox: run it as root (CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::vm_config::config(dir.path());
    cfg.qemu = fake_qemu(dir.path(), "runner-noagent-disguised");
    // One uid: a second VM can only get it if the first one's is (wrongly) thought free.
    cfg.uid_base = UID_BASE;
    cfg.uid_count = 1;
    let base = base_image(dir.path());

    // 1. A restarted daemon that does not take the VM over sweeps it: found by its cgroup.
    let (name, pid, uid, cgroup) = launch_and_let_go(&cfg, &base, "fr-5a5a0001").await;
    assert_eq!(uid, UID_BASE);
    match vm::sandbox::acquire_uid(&cfg.runtime_root, cfg.uid_base, cfg.uid_count) {
        Err(vm::Error::UidsExhausted { .. }) => {}
        Ok(lease) => panic!(
            "uid {} handed out again while VM {name}'s QEMU (pid {pid}) still runs under it",
            lease.uid()
        ),
        Err(e) => panic!("{e}"),
    }
    let report = vm::sweep(&cfg, &[]).expect("sweep");
    assert!(
        report.killed.iter().any(|(n, p)| *n == name && *p == pid),
        "the sweep did not kill the disguised QEMU: {report:?}"
    );
    assert!(!alive(pid), "pid {pid} survived the sweep");
    assert!(vm::cgroup::procs_of(&cgroup).is_empty());
    assert!(report.removed.contains(&name));
    // Its uid is free again now that nothing runs under it.
    let lease = vm::sandbox::acquire_uid(&cfg.runtime_root, cfg.uid_base, cfg.uid_count)
        .expect("the uid is free once its QEMU is gone");
    drop(lease);

    // 2. A restarted daemon takes the VM over by its cgroup and stops it for good.
    let (name, pid, _, cgroup) = launch_and_let_go(&cfg, &base, "fr-5a5a0002").await;
    let adopted = vm::adopt(&cfg, &name)
        .await
        .expect("a disguised QEMU is still taken over: its cgroup says it is the VM");
    assert_eq!(adopted.pid(), pid);
    adopted.stop();
    let exit = tokio::time::timeout(Duration::from_secs(60), adopted.wait())
        .await
        .expect("the taken-over VM stops within its graces")
        .expect("supervisor");
    assert!(!alive(pid), "pid {pid} survived the stop: {exit:?}");
    assert!(vm::cgroup::procs_of(&cgroup).is_empty());
}
