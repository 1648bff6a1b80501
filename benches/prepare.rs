//! Host-side cost of one VM, without booting it: `cargo bench --bench prepare`.
//!
//! Prints medians (and min/max) over N iterations of: the whole `vm::prepare` (base-image check with
//! `qemu-img info`, per-VM dir, `qemu-img create` overlay, FAT seed, VARS copy, serial log, argv plan), its
//! parts measured on their own, the teardown of a prepared VM, and spawn → QMP answering → `quit` →
//! files removed for a started VM. No criterion: plain `Instant` timing, `harness = false`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fkr_qemu::types::{Accel, VmName};
use fkr_qemu::vm::{self, Seed, VmConfig, VmSpec, VmState};

const N: usize = 30;
const N_SPAWN: usize = 10;

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<34} median {:>8.2} ms   min {:>8.2}   max {:>8.2}   (n={})",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[v.len() - 1]),
        v.len()
    );
}

fn seed(name: &VmName) -> Seed {
    Seed {
        instance_id: name.to_string(),
        hostname: name.to_string(),
        // About the size of the daemon's user-data (token + runner command + power_state).
        user_data: format!(
            "#cloud-config\n{}",
            "# padding line of a realistic user-data\n".repeat(60)
        ),
        network_config: Some(
            "version: 2\nethernets:\n  eth0:\n    addresses:\n    - 10.88.0.5/24\n".into(),
        ),
    }
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("10G")
        .status()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(st.success());
    let config = VmConfig {
        accel: Accel::Tcg,
        memory_mib: 256,
        vcpus: 1,
        runtime_root: dir.path().join("run"),
        log_dir: dir.path().join("logs"),
        disk_dir: dir.path().join("disks"),
        keep_serial_log: false,
        powerdown_grace_secs: 0,
        quit_grace_secs: 5,
        ..VmConfig::default()
    };
    let fw = vm::discover_firmware(&config).expect("OVMF");
    println!("firmware: {} ({})", fw.code.display(), fw.source);

    let mut overlay = Vec::new();
    let mut seed_t = Vec::new();
    let mut vars = Vec::new();
    let mut prepare = Vec::new();
    let mut argv = Vec::new();
    let mut teardown = Vec::new();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    rt.block_on(async {
        for i in 0..N {
            let o = scratch.join(format!("o{i}.qcow2"));
            let t = Instant::now();
            vm::create_overlay(Path::new("qemu-img"), &base, &o)
                .await
                .unwrap();
            overlay.push(t.elapsed());

            let name = VmName::generate();
            let t = Instant::now();
            vm::write_seed(&seed(&name), &scratch.join(format!("s{i}.img"))).unwrap();
            seed_t.push(t.elapsed());

            let t = Instant::now();
            std::fs::copy(&fw.vars_template, scratch.join(format!("v{i}.fd"))).unwrap();
            vars.push(t.elapsed());

            let t = Instant::now();
            let p = vm::prepare(
                &config,
                VmSpec::new(name.clone(), &base, seed(&name), Duration::from_secs(60)),
            )
            .await
            .unwrap();
            prepare.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(p.argv());
            argv.push(t.elapsed());
            let t = Instant::now();
            p.teardown().unwrap();
            teardown.push(t.elapsed());
        }
    });
    stats("qemu-img create overlay", overlay);
    stats("seed (FAT, 1 MiB)", seed_t);
    stats("VARS copy", vars);
    stats("prepare (all of the above + info)", prepare);
    stats("argv", argv);
    stats("teardown (prepared, no process)", teardown);

    // A started VM: spawn → QMP answers → quit → reaped and files removed.
    let mut qmp = Vec::new();
    let mut stop = Vec::new();
    rt.block_on(async {
        for _ in 0..N_SPAWN {
            let name = VmName::generate();
            let p = vm::prepare(
                &config,
                VmSpec::new(name.clone(), &base, seed(&name), Duration::from_secs(60)),
            )
            .await
            .unwrap();
            let t = Instant::now();
            let h = p.start().await.unwrap();
            let mut st = h.watch_state();
            st.wait_for(|s| *s != VmState::Starting).await.unwrap();
            qmp.push(t.elapsed());
            let t = Instant::now();
            h.stop();
            let exit = h.wait().await.unwrap();
            stop.push(t.elapsed());
            assert!(exit.teardown_error.is_none());
        }
    });
    stats("spawn -> QMP ready (running)", qmp);
    stats("stop (quit) + teardown", stop);
}
