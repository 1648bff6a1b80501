//! The VM driver against real QEMU (TCG) and the test guest. Tests that boot a VM have `vm_` in their
//! names (nextest runs at most two at once). Each test works in its own temporary directory and ends by
//! checking that no QEMU of its own runs and its runtime root is empty.

mod common {
    pub mod cloud_init;
    pub mod fake_qemu;
    pub mod guest;
    pub mod http_server;
    pub mod netns;
    pub mod netns_run;
    pub mod sandbox;
    pub mod vm_config;
}

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cloud_init::{reported_files, user_data, WriteFile};
use common::fake_qemu::fake_qemu;
use common::guest::{assert_nothing_left, fake_internal_error_at, test_guest_image};
use common::sandbox::assert_sandboxed;
use common::vm_config::config;
use fkr_qemu::types::{Accel, VmName};
use fkr_qemu::vm::{self, serial, Error, Outcome, Seed, StopStep, VmSpec, VmState};

fn seed(name: &VmName, user_data: String) -> Seed {
    Seed {
        instance_id: name.to_string(),
        hostname: name.to_string(),
        user_data,
        network_config: None,
    }
}

fn spec(user_data: String, deadline: Duration) -> VmSpec {
    let name = VmName::generate();
    let s = seed(&name, user_data);
    VmSpec::new(name, test_guest_image(), s, deadline)
}

/// Waits until the serial log contains `marker` (or panics after `timeout`).
async fn wait_for_serial(log: &Path, marker: &str, timeout: Duration) {
    let mut w = serial::SerialWatch::new(log);
    let until = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < until {
        if serial::contains(&w.poll(), marker) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "`{marker}` not on the serial console within {timeout:?}:\n{}",
        serial::serial_tail(log, 40)
    );
}

#[test]
fn seed_is_seen_by_linux_as_cidata_vfat_and_round_trips_through_mtools() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("seed.img");
    // Larger than a few KiB, and not a multiple of any cluster size.
    let big: String = (0..40_000)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let s = Seed {
        instance_id: "fr-0123abcd".into(),
        hostname: "fr-0123abcd".into(),
        user_data: format!("#cloud-config\n# {big}\n"),
        network_config: Some("version: 2\nethernets: {}\n".into()),
    };
    vm::write_seed(&s, &img).unwrap();
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&img)
        .output()
        .unwrap();
    let blkid = String::from_utf8_lossy(&out.stdout);
    assert!(blkid.contains("LABEL=CIDATA\n"), "{blkid}");
    assert!(blkid.contains("TYPE=vfat\n"), "{blkid}");
    // The classic blkid output line, as the issue states it.
    let out = Command::new("blkid").arg(&img).output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains(r#"LABEL="CIDATA""#) && line.contains(r#"TYPE="vfat""#),
        "{line}"
    );
    for (name, want) in [
        ("user-data", s.user_data.as_bytes().to_vec()),
        ("meta-data", s.meta_data().into_bytes()),
        (
            "network-config",
            s.network_config.clone().unwrap().into_bytes(),
        ),
    ] {
        let out = Command::new("mcopy")
            .arg("-i")
            .arg(&img)
            .arg(format!("::{name}"))
            .arg("-")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mcopy {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, want, "{name}");
    }
    let fsck = Command::new("fsck.vfat")
        .arg("-n")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_guest_applies_the_seed_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let token = b"very-secret-runner-token-1234";
    let big: Vec<u8> = (0..24_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let ud = user_data(
        &[
            WriteFile {
                path: "/etc/fkr/runner-token",
                permissions: "0600",
                content: token,
            },
            WriteFile {
                path: "/var/big/blob",
                permissions: "0644",
                content: &big,
            },
        ],
        &[
            "echo \"it's-quoted\"; stat -c '%a %u' /etc/fkr/runner-token > /tmp/mode",
            "fkr-report /var/big/blob /tmp/mode /mnt/seed/meta-data",
        ],
        true,
    );
    assert!(ud.len() > 16 * 1024, "user-data of {} bytes", ud.len());
    let handle = vm::launch(&cfg, spec(ud, Duration::from_secs(240)))
        .await
        .unwrap();
    let log = handle.serial_log().to_owned();
    // No secret in QEMU's command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", handle.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("very-secret"));
    let run_dir = handle.dir().to_owned();
    let disk_dir = dir.path().join("disks").join(exit_name(&run_dir));
    assert!(disk_dir.join("seed.img").exists() && run_dir.join("qemu.pid").exists());
    assert_sandboxed(handle.pid(), &run_dir, &disk_dir);
    let exit = handle.wait().await.unwrap();
    let text = serial::strip_ansi(&String::from_utf8_lossy(&std::fs::read(&log).unwrap()));
    assert_eq!(exit.outcome, Outcome::GuestPoweredOff, "{text}");
    assert_eq!(exit.state, VmState::Stopped);
    let t = &exit.timings;
    assert!(t.qmp_ready_ms.unwrap() <= t.first_serial_ms.unwrap());
    assert!(t.first_serial_ms.unwrap() <= t.shutdown_ms.unwrap());
    assert!(text.contains("it's-quoted"), "{text}");
    assert!(text.contains("fkr-guest: wrote /etc/fkr/runner-token"));
    let files = reported_files(&text);
    assert_eq!(files.get("/var/big/blob"), Some(&big), "{text}");
    assert_eq!(files["/tmp/mode"], b"600 0\n");
    let meta = String::from_utf8_lossy(&files["/mnt/seed/meta-data"]).into_owned();
    assert!(
        meta.contains(&format!("instance-id: {}", exit.name)),
        "{meta}"
    );
    assert!(!run_dir.exists() && !disk_dir.exists());
    assert_nothing_left(dir.path());
}

/// The guest's last words survive a host that stops reading the console just before power-off (as a
/// busy CI disk once made it): QEMU holds the UART while the socket is full, and `poweroff -f` drops
/// what the UART still holds unless the guest drains it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn vm_guest_output_before_power_off_survives_a_stalled_console_reader() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // Under the UART's 4 KiB buffer once base64-encoded: all of it is queued at once, none of it
    // blocks the guest, so without a drain it powers off with the report still queued.
    let small: Vec<u8> = (0..2_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let ud = user_data(
        &[WriteFile {
            path: "/var/small",
            permissions: "0644",
            content: &small,
        }],
        &["echo fkr-stall-now; sleep 1; fkr-report /var/small"],
        true,
    );
    let handle = vm::launch(&cfg, spec(ud, Duration::from_secs(240)))
        .await
        .unwrap();
    let log = handle.serial_log().to_owned();
    wait_for_serial(&log, "fkr-stall-now", Duration::from_secs(200)).await;
    // The runtime's only worker, which runs the serial pump, is held for 5 s: nobody reads the
    // console while the guest reports and powers off.
    tokio::spawn(async { std::thread::sleep(Duration::from_secs(5)) });
    let exit = handle.wait().await.unwrap();
    let text = serial::strip_ansi(&String::from_utf8_lossy(&std::fs::read(&log).unwrap()));
    assert_eq!(exit.outcome, Outcome::GuestPoweredOff, "{text}");
    let files = reported_files(&text);
    assert_eq!(files.get("/var/small"), Some(&small), "{text}");
    assert!(text.contains("fkr-guest: poweroff (power_state)"), "{text}");
    assert_nothing_left(dir.path());
}

fn exit_name(run_dir: &Path) -> String {
    run_dir.file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_deadline_during_boot_goes_through_powerdown_then_quit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.powerdown_grace_secs = 2;
    // The power button pressed while OVMF runs is lost: the ladder must go on to `quit`.
    let handle = vm::launch(
        &cfg,
        spec(user_data(&[], &[], false), Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let exit = handle.wait().await.unwrap();
    assert_eq!(
        exit.outcome,
        Outcome::DeadlineExceeded {
            stopped_by: StopStep::Quit
        }
    );
    assert_eq!(exit.state, VmState::Stopped);
    assert_nothing_left(dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_hanging_guest_is_stopped_by_its_power_button_on_host_stop() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // A guest that never powers off by itself; the host stops it once it hangs in runcmd.
    let handle = vm::launch(
        &cfg,
        spec(
            user_data(&[], &["sleep 100000"], true),
            Duration::from_secs(300),
        ),
    )
    .await
    .unwrap();
    wait_for_serial(
        handle.serial_log(),
        "fkr-guest: runcmd 1 start",
        Duration::from_secs(200),
    )
    .await;
    let log = handle.serial_log().to_owned();
    handle.stop();
    let exit = handle.wait().await.unwrap();
    assert_eq!(
        exit.outcome,
        Outcome::HostStopped {
            stopped_by: StopStep::Powerdown
        }
    );
    assert!(serial::serial_tail(&log, 5).contains("fkr-guest: power button pressed"));
    assert_nothing_left(dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_wedged_qemu_is_killed_at_the_end_of_the_ladder() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.powerdown_grace_secs = 1;
    cfg.quit_grace_secs = 1;
    let handle = vm::launch(
        &cfg,
        spec(user_data(&[], &[], false), Duration::from_secs(4)),
    )
    .await
    .unwrap();
    let mut state = handle.watch_state();
    state.wait_for(|s| *s == VmState::Running).await.unwrap();
    // A stopped QEMU answers neither the power button nor `quit`.
    kill(Pid::from_raw(handle.pid() as i32), Signal::SIGSTOP).unwrap();
    let exit = handle.wait().await.unwrap();
    assert_eq!(
        exit.outcome,
        Outcome::DeadlineExceeded {
            stopped_by: StopStep::Kill
        }
    );
    assert_nothing_left(dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_kernel_panic_is_a_crash_not_a_power_off() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let handle = vm::launch(
        &cfg,
        spec(
            user_data(&[], &["echo c > /proc/sysrq-trigger"], true),
            Duration::from_secs(240),
        ),
    )
    .await
    .unwrap();
    let exit = handle.wait().await.unwrap();
    assert!(
        matches!(exit.outcome, Outcome::GuestCrashed { .. }),
        "{:?}",
        exit.outcome
    );
    assert_eq!(exit.state, VmState::Failed);
    assert_nothing_left(dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_dropping_the_handle_stops_the_vm_and_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.powerdown_grace_secs = 1;
    let handle = vm::launch(
        &cfg,
        spec(user_data(&[], &[], false), Duration::from_secs(300)),
    )
    .await
    .unwrap();
    let (pid, vm_dir) = (handle.pid(), handle.dir().to_owned());
    // Like a job task that panicked or was cancelled while owning the VM.
    let task = tokio::spawn(async move {
        let _owned = handle;
        panic!("the owner of the VM panicked");
    });
    assert!(task.await.unwrap_err().is_panic());
    for _ in 0..300 {
        if !vm_dir.exists() && !Path::new(&format!("/proc/{pid}/cmdline")).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!vm_dir.exists(), "the VM directory outlived its owner");
    assert_nothing_left(dir.path());
}

#[test]
fn vm_dropped_runtime_kills_qemu_and_removes_the_vm_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pid, vm_dir) = rt.block_on(async {
        let handle = vm::launch(
            &cfg,
            spec(user_data(&[], &[], false), Duration::from_secs(300)),
        )
        .await
        .unwrap();
        let info = (handle.pid(), handle.dir().to_owned());
        // Leak the handle: only the runtime going away can end the supervisor now.
        std::mem::forget(handle);
        info
    });
    assert!(vm_dir.exists());
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    // Like a daemon whose main task panicked and unwound: every task is dropped mid-flight.
    drop(rt);
    assert!(!vm_dir.exists(), "the VM directory outlived its owner");
    assert_nothing_left(dir.path());
}

#[test]
fn vm_sweep_kills_only_our_qemu_and_removes_only_our_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("run");
    let vms = root.join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    // A leftover VM: a QEMU whose command line names its VM dir (as the driver's does).
    let ours = vms.join(VmName::generate().as_str());
    std::fs::create_dir(&ours).unwrap();
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-m",
            "64M",
        ])
        .arg("-pidfile")
        .arg(ours.join("qemu.pid"))
        .spawn()
        .unwrap();
    let qemu_pid = qemu.id();
    // Our pid file is written by QEMU here; wait for it.
    for _ in 0..100 {
        if ours.join("qemu.pid").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A recycled pid: the pid file names a process that is not a QEMU of that dir.
    let decoy_dir = vms.join(VmName::generate().as_str());
    std::fs::create_dir(&decoy_dir).unwrap();
    let mut sleeper = Command::new("sleep").arg("100").spawn().unwrap();
    std::fs::write(decoy_dir.join("qemu.pid"), format!("{}\n", sleeper.id())).unwrap();
    // Not ours at all.
    let foreign = vms.join("something-else");
    std::fs::create_dir(&foreign).unwrap();

    // A leftover disk dir, and a disk dir entry that is not a VM's.
    let disks = dir.path().join("disks");
    let left_disk = disks.join(VmName::generate().as_str());
    std::fs::create_dir_all(&left_disk).unwrap();
    std::fs::write(left_disk.join("overlay.qcow2"), "x").unwrap();
    std::fs::create_dir_all(disks.join("keep-me")).unwrap();
    let cfg = vm::VmConfig {
        runtime_root: root.clone(),
        disk_dir: disks.clone(),
        ..vm::VmConfig::default()
    };
    let report = vm::sweep(&cfg, &[]).unwrap();
    assert!(!left_disk.exists());
    assert!(disks.join("keep-me").exists());
    // The QEMU was our child: reap it so /proc forgets it.
    let mut qemu = qemu;
    let _ = qemu.wait();
    assert_eq!(report.killed.len(), 1, "{report:?}");
    assert_eq!(report.killed[0].1, qemu_pid);
    assert_eq!(report.removed.len(), 3, "{report:?}");
    assert!(!ours.exists() && !decoy_dir.exists());
    assert!(
        foreign.exists(),
        "the sweep touched a directory that is not a VM's"
    );
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the sweep killed a process that is not our QEMU"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    std::fs::remove_dir(&foreign).unwrap();
    std::fs::remove_dir(disks.join("keep-me")).unwrap();
    assert_nothing_left(dir.path());
}

#[tokio::test]
async fn corrupt_base_image_is_named_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    for (name, bytes) in [
        (
            "garbage.qcow2",
            b"this is not a disk image at all".repeat(100),
        ),
        // A qcow2 magic with a nonsense header.
        (
            "truncated.qcow2",
            [b"QFI\xfb\x00\x00\x00\x03".as_slice(), &[0xff; 100]].concat(),
        ),
    ] {
        let base = dir.path().join(name);
        std::fs::write(&base, bytes).unwrap();
        let name = VmName::generate();
        let s = seed(&name, user_data(&[], &[], true));
        let err = vm::launch(&cfg, VmSpec::new(name, &base, s, Duration::from_secs(60)))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::BaseImageInvalid { .. }), "{msg}");
        assert!(
            msg.contains(base.to_str().unwrap()) && msg.contains("qcow2"),
            "{msg}"
        );
    }
    let name = VmName::generate();
    let s = seed(&name, String::new());
    let err = vm::launch(
        &cfg,
        VmSpec::new(
            name,
            dir.path().join("missing.qcow2"),
            s,
            Duration::from_secs(60),
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::BaseImageMissing { .. }), "{err}");
    assert_nothing_left(dir.path());
}

#[tokio::test]
async fn missing_qemu_and_firmware_are_named_with_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.qemu = "/nonexistent/qemu-system-x86_64".into();
    let name = VmName::generate();
    let s = seed(&name, String::new());
    let err = vm::launch(
        &cfg,
        VmSpec::new(name, test_guest_image(), s, Duration::from_secs(60)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::QemuNotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("apt-get install qemu-system-x86"),
        "{err}"
    );

    let mut cfg = config(dir.path());
    cfg.firmware_code = Some(dir.path().join("OVMF_CODE.fd"));
    cfg.firmware_vars = Some(dir.path().join("OVMF_VARS.fd"));
    let name = VmName::generate();
    let s = seed(&name, String::new());
    let err = vm::launch(
        &cfg,
        VmSpec::new(name, test_guest_image(), s, Duration::from_secs(60)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::FirmwareFileMissing { .. }), "{err}");
    assert!(err.to_string().contains("apt-get install ovmf"), "{err}");
    assert_nothing_left(dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_guest_takes_its_static_address_by_mac_and_reaches_the_bridge() {
    use common::http_server::HttpServer;
    use common::netns::NetNs;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // A bridge of our own in a namespace of our own; the guest's traffic never leaves it.
    let ns = NetNs::create("fkrvm");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let name = VmName::generate();
    let tap = ns.run(|| fkr_qemu::net::Tap::create(&name, "br0")).unwrap();
    let dev = vm::NetDevice {
        tap: tap.fd_for_qemu().unwrap(),
        mac: tap.mac(),
    };
    // The namespace is the test's own: any port is free.
    let addr: std::net::SocketAddr = "10.99.0.1:8080".parse().unwrap();
    let server = HttpServer::start(&ns, addr, || "hello-from-the-bridge".to_owned());
    // Exactly the shape of ARCHITECTURE.md's "Seed contract".
    let network_config = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: '{}'\n    set-name: eth0\n    addresses:\n    - 10.99.0.5/24\n    routes:\n    - to: 0.0.0.0/0\n      via: 10.99.0.1\n    nameservers:\n      addresses:\n      - 10.99.0.1\n",
        dev.mac
    );
    let get =
        format!("timeout 20 wget -q -O - http://{addr}/; echo; cat /etc/resolv.conf; ip route");
    let mut s = seed(&name, user_data(&[], &[&get], true));
    s.network_config = Some(network_config);
    let mut spec = VmSpec::new(name, test_guest_image(), s, Duration::from_secs(240));
    spec.net = Some(dev);
    let handle = vm::launch(&cfg, spec).await.unwrap();
    let log = handle.serial_log().to_owned();
    let exit = handle.wait().await.unwrap();
    let text = serial::strip_ansi(&String::from_utf8_lossy(&std::fs::read(&log).unwrap()));
    assert_eq!(exit.outcome, Outcome::GuestPoweredOff, "{text}");
    assert!(text.contains("fkr-guest: network eth0"), "{text}");
    assert!(text.contains("hello-from-the-bridge"), "{text}");
    assert!(text.contains("nameserver 10.99.0.1"), "{text}");
    assert!(text.contains("default via 10.99.0.1"), "{text}");
    let clients = server.clients();
    assert!(
        clients.iter().any(|c| c.ip().to_string() == "10.99.0.5"),
        "{clients:?}"
    );
    drop(server);
    drop(tap);
    drop(ns);
    assert_nothing_left(dir.path());
}

/// A KVM that passes the firmware probe but fails the guest (run state `internal-error`, QEMU
/// paused and alive) ends the VM within a second, with QEMU's error in the outcome; `auto` then
/// takes TCG for that QEMU, and the next VM boots.
#[tokio::test]
async fn vm_internal_error_ends_the_vm_within_a_second_and_auto_then_picks_tcg() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = vm::VmConfig {
        qemu: fake_qemu(dir.path(), "kvm-internal-error"),
        accel: Accel::Auto,
        // Long graces: the ladder must skip the power button of a paused guest, not wait it out.
        powerdown_grace_secs: 30,
        ..config(dir.path())
    };
    let ud = user_data(&[], &["echo fkr-test: second VM ran"], true);
    let handle = vm::launch(&cfg, spec(ud.clone(), Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(handle.accel().accel, Accel::Kvm, "{:?}", handle.accel());
    let exit = handle.wait().await.unwrap();
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let Outcome::InternalError { accel, detail } = &exit.outcome else {
        panic!("{exit:?}");
    };
    assert_eq!(*accel, Accel::Kvm);
    assert!(detail.contains("KVM internal error"), "{detail}");
    let failed_at = fake_internal_error_at(detail);
    assert!(
        ended.saturating_sub(failed_at) < 1000,
        "the VM ended {} ms after its vCPU stopped",
        ended - failed_at
    );
    assert_eq!(exit.state, VmState::Failed);
    assert!(exit.timings.torn_down_ms >= exit.timings.stop_decided_ms);
    assert_nothing_left(dir.path());

    let handle = vm::launch(&cfg, spec(ud, Duration::from_secs(240)))
        .await
        .unwrap();
    assert_eq!(handle.accel().accel, Accel::Tcg);
    assert!(
        handle.accel().reason.contains("internal-error"),
        "{:?}",
        handle.accel()
    );
    let log = handle.serial_log().to_owned();
    let exit = handle.wait().await.unwrap();
    assert_eq!(exit.outcome, Outcome::GuestPoweredOff, "{exit:?}");
    assert!(std::fs::read_to_string(log)
        .unwrap()
        .contains("fkr-test: second VM ran"));
    // A forced kvm is now refused with the reason.
    let forced = vm::VmConfig {
        accel: Accel::Kvm,
        ..cfg.clone()
    };
    match vm::launch(&forced, spec(String::new(), Duration::from_secs(10))).await {
        Err(Error::KvmUnavailable { reason }) => assert!(reason.contains("internal-error")),
        other => panic!("{other:?}"),
    }
    assert_nothing_left(dir.path());
}

/// A warm VM's job inherits no descriptor of the agent's port: it cannot write a line in the
/// agent's name (a forged STARTED) nor read the channel.
#[tokio::test]
async fn vm_warm_job_cannot_use_the_agent_port() {
    use fkr_qemu::secret::Secret;
    use fkr_qemu::vm::agent::{AgentConn, Payload};
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut s = spec(String::new(), Duration::from_secs(240));
    s.agent = true;
    let handle = vm::launch(&cfg, s).await.unwrap();
    let log = handle.serial_log().to_owned();
    let mut agent = AgentConn::connect(&handle.dir().join(vm::files::AGENT))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(200), agent.ready())
        .await
        .expect("READY")
        .unwrap();
    let attack = "if (echo 'STARTED 1' >&3) 2>/dev/null; then \
                  echo 'fkr-test: the job wrote to the agent port'; \
                  else echo 'fkr-test: the job has no agent port'; fi";
    let payload = Payload {
        files: Vec::new(),
        command: Secret::new(attack.to_owned()),
    };
    agent
        .deliver(&payload, Duration::from_secs(30))
        .await
        .unwrap();
    let exit = handle.wait().await.unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert_eq!(exit.outcome, Outcome::GuestPoweredOff, "{text}");
    assert!(!text.contains("fkr-test: the job wrote"), "{text}");
    assert!(
        text.contains("fkr-test: the job has no agent port"),
        "{text}"
    );
    assert_nothing_left(dir.path());
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// An escaped QEMU streams a gigabyte without a newline on QMP: the driver holds at most one
/// capped line of it (this process's memory stays bounded), drops the peer and kills QEMU.
#[tokio::test]
async fn qmp_flood_from_qemu_stops_the_vm_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = vm::VmConfig {
        qemu: fake_qemu(dir.path(), "qmp-flood"),
        accel: Accel::Tcg,
        ..config(dir.path())
    };
    let before = peak_rss();
    let started = std::time::Instant::now();
    let handle = vm::launch(&cfg, spec(String::new(), Duration::from_secs(300)))
        .await
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), handle.wait())
        .await
        .expect("the VM ends well before its deadline")
        .unwrap();
    let Outcome::QemuExited { status, detail } = &exit.outcome else {
        panic!("{exit:?}");
    };
    assert_eq!(status, "killed");
    assert!(detail.contains("QMP peer dropped"), "{detail}");
    assert_eq!(exit.state, VmState::Failed);
    assert!(started.elapsed() < Duration::from_secs(60));
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 64 << 20, "peak memory grew by {} MiB", grown >> 20);
    assert_nothing_left(dir.path());
}

/// Boots the test guest with `runcmd` (then power-off) under `cfg`; returns how it ended and its
/// serial log.
async fn run_guest(
    cfg: &vm::VmConfig,
    runcmd: &[&str],
    deadline: Duration,
) -> (vm::VmExit, String) {
    let handle = vm::launch(cfg, spec(user_data(&[], runcmd, true), deadline))
        .await
        .unwrap();
    let log = handle.serial_log().to_owned();
    let exit = handle.wait().await.unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    (exit, text)
}

/// A guest that writes past `disk_max` is stopped at once (no power button: it would write on
/// while shutting down), and its overlay never grew much past the cap on the host.
#[tokio::test(flavor = "multi_thread")]
async fn vm_guest_writing_past_disk_max_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = vm::VmConfig {
        disk_max_mib: 4,
        ..config(dir.path())
    };
    // The test guest runs from its initramfs: its disk can be overwritten (30 MiB of 36).
    let (exit, text) = run_guest(
        &cfg,
        &[
            "echo fkr-test: writing",
            "dd if=/dev/zero of=/dev/vda bs=1M count=30 conv=fsync",
            "echo fkr-test: wrote it all",
        ],
        Duration::from_secs(240),
    )
    .await;
    let Outcome::DiskLimitExceeded { limit, used } = exit.outcome else {
        panic!("{exit:?}\n{text}");
    };
    assert_eq!(limit, 4 << 20);
    // QEMU reports the moment the overlay passes the cap; the VM is gone within moments.
    assert!(
        used < limit + (16 << 20),
        "the overlay grew to {used} bytes"
    );
    assert!(text.contains("fkr-test: writing"), "{text}");
    assert!(!text.contains("fkr-test: wrote it all"), "{text}");
    assert_eq!(exit.state, VmState::Failed);
    assert_nothing_left(dir.path());
}

/// A guest that floods its serial console leaves a log no larger than the cap: its first bytes,
/// a line saying how much was dropped, and its last words.
#[tokio::test(flavor = "multi_thread")]
async fn vm_serial_flood_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = vm::VmConfig {
        serial_head_kib: 32,
        serial_tail_kib: 64,
        ..config(dir.path())
    };
    let (exit, _) = run_guest(
        &cfg,
        &[
            "i=0; while [ $i -lt 4000 ]; do echo \"fkr-flood $i ...............................................\"; i=$((i+1)); done > /dev/console",
            "echo fkr-test: last words > /dev/console",
        ],
        Duration::from_secs(300),
    )
    .await;
    let log = dir
        .path()
        .join("logs")
        .join(format!("{}.serial.log", exit.name));
    assert_eq!(exit.outcome, Outcome::GuestPoweredOff, "{exit:?}");
    let bytes = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        bytes.len() <= (32 + 64) * 1024 + 100,
        "serial log of {} bytes",
        bytes.len()
    );
    assert!(text.contains("bytes dropped so far"), "no cut marker");
    assert!(text.contains("fkr-flood 3999"), "the latest output is kept");
    assert!(text.contains("fkr-test: last words"));
    assert!(!text.contains("fkr-flood 2000 "), "the middle was dropped");
    assert!(text.contains("BdsDxe"), "the head (firmware) is kept");
    assert_nothing_left(dir.path());
}

/// A guest that uses more memory than its cgroup allows takes only its own QEMU down (the OOM
/// killer acts inside the VM's cgroup); this process and its files are fine, and the outcome says
/// QEMU was killed.
#[tokio::test(flavor = "multi_thread")]
async fn vm_guest_over_its_memory_limit_dies_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = vm::VmConfig {
        // memory.max = guest RAM exactly: QEMU's own overhead has no room once the guest fills up.
        memory_overhead_mib: 0,
        ..config(dir.path())
    };
    let (exit, text) = run_guest(
        &cfg,
        &[
            "echo fkr-test: filling memory",
            "dd if=/dev/zero of=/tmp/fill bs=1M count=170",
            "echo fkr-test: still alive",
        ],
        Duration::from_secs(240),
    )
    .await;
    match &exit.outcome {
        Outcome::QemuExited { status, .. } => assert!(status.contains("SIGKILL"), "{exit:?}"),
        other => panic!("{other:?}\n{text}"),
    }
    assert!(!text.contains("fkr-test: still alive"), "{text}");
    assert_nothing_left(dir.path());
}
