//! `fkr-qemu boot-test`: boot a base image once in a throw-away VM and check each phase.
//!
//! The seed's user-data makes the guest prove it ran its cloud-config: it prints
//! `fkr-boot-test: proof V` to the console, where `V` is computed by the guest's shell from a random
//! nonce (`nonce * 7 + 3`), so the value never appears in the seed itself. Then it powers off by itself.
//! Phases, one after another: spawn → QMP ready → first serial output → proof → guest shutdown,
//! then teardown (stop decided → every resource released). Each `*_ms` is the duration of its phase,
//! so they add up to at most `total_ms` (the rest is the report itself and process start).
//!
//! SIGINT and SIGTERM are handled alike, at any moment (even while the accelerator probe or the
//! overlay is being made): the VM is stopped, its files removed, and the command exits non-zero
//! naming the signal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ops::signals::Signals;
use crate::types::{Accel, VmName};
use crate::vm::{self, serial, Outcome, Seed, VmConfig, VmSpec};

#[derive(Debug, clap::Args)]
#[command(after_long_help = PHASE_HELP)]
pub struct Args {
    /// The qcow2 base image to boot (never written: the VM runs on an overlay).
    #[arg(long, default_value_os_t = crate::paths::Dirs::default().default_base_image())]
    pub image: PathBuf,
    /// Seconds the whole VM may take before it is stopped (powerdown → quit → kill) and the test fails.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Keep the serial log (its path is printed) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Accelerator: auto probes KVM by running a tiny VM and falls back to TCG.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// qemu-system-x86_64 to run.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    #[arg(long, default_value = "qemu-img")]
    pub qemu_img: PathBuf,
    /// UEFI code file (with --ovmf-vars; default: found through QEMU's firmware descriptors).
    #[arg(long, requires = "ovmf_vars")]
    pub ovmf_code: Option<PathBuf>,
    /// UEFI VARS template (with --ovmf-code).
    #[arg(long, requires = "ovmf_code")]
    pub ovmf_vars: Option<PathBuf>,
    /// Runtime root for the per-VM directory. Default: /run/fkr-qemu when writable (root), else
    /// $XDG_RUNTIME_DIR/fkr-qemu, else a private temporary directory.
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
}

/// What each `*_ms` field measures (also `--help`).
const PHASE_HELP: &str = "\
Report fields (milliseconds; each phase starts where the one before ended, so they add up to at most
total_ms; null for a phase not reached):
  spawn_ms           command start -> QEMU spawned (checks, accelerator probe, overlay, seed, VARS copy)
  qmp_ready_ms       QEMU spawned -> QMP answered
  first_serial_ms    QMP answered -> first byte on the serial console
  proof_ms           first serial byte -> the guest printed the proof line (its cloud-config ran)
  guest_shutdown_ms  proof -> the guest powered itself off (QMP SHUTDOWN, reason guest-shutdown)
  teardown_ms        stop decided (power-off, stop ladder or QEMU exit) -> every resource released
                     (QEMU reaped, per-VM files removed)
  total_ms           command start -> report
Boot phases, from the serial console (null when a marker was not seen, e.g. a `quiet` kernel prints
no banner); they add up to the time from QEMU's spawn to the proof:
  firmware_ms        QEMU spawned -> the kernel's banner (`Linux version`): firmware and UKI stub
  kernel_ms          kernel banner -> first userspace process (`Run /init`, `systemd[1]`)
  userspace_ms       first userspace process -> the proof line
  kernel_guest_ms    the kernel phase by the guest's own clock (the printk timestamp of that line)
accel and accel_reason say which accelerator ran and why (auto: the KVM probe's verdict).
SIGINT and SIGTERM stop the VM, remove its files and exit 1 with failed_phase and error set.";

/// The report, printed as text or (`--json`) as one object. `*_ms` are phase durations, see
/// [`PHASE_HELP`]; `null` for a phase not reached.
#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub image: PathBuf,
    pub vm: Option<String>,
    pub accel: Option<String>,
    pub accel_reason: Option<String>,
    pub qemu_version: Option<String>,
    pub spawn_ms: Option<u64>,
    pub qmp_ready_ms: Option<u64>,
    pub first_serial_ms: Option<u64>,
    pub proof_ms: Option<u64>,
    pub guest_shutdown_ms: Option<u64>,
    pub teardown_ms: Option<u64>,
    pub total_ms: u64,
    /// Boot phases read from the serial console, see [`PHASE_HELP`].
    pub firmware_ms: Option<u64>,
    pub kernel_ms: Option<u64>,
    pub userspace_ms: Option<u64>,
    pub kernel_guest_ms: Option<u64>,
    /// The first phase that did not pass.
    pub failed_phase: Option<String>,
    pub error: Option<String>,
    pub outcome: Option<Outcome>,
    /// Kept serial log (`--keep`).
    pub serial_log: Option<PathBuf>,
    /// Last lines of the serial console when a phase failed.
    pub serial_tail: Option<String>,
}

const PHASES: [&str; 6] = [
    "spawn",
    "qmp_ready",
    "first_serial",
    "proof",
    "guest_shutdown",
    "teardown",
];

impl Report {
    fn new(image: &Path) -> Self {
        Self {
            ok: false,
            image: image.to_owned(),
            vm: None,
            accel: None,
            accel_reason: None,
            qemu_version: None,
            spawn_ms: None,
            qmp_ready_ms: None,
            first_serial_ms: None,
            proof_ms: None,
            guest_shutdown_ms: None,
            teardown_ms: None,
            total_ms: 0,
            firmware_ms: None,
            kernel_ms: None,
            userspace_ms: None,
            kernel_guest_ms: None,
            failed_phase: None,
            error: None,
            outcome: None,
            serial_log: None,
            serial_tail: None,
        }
    }

    fn phase_ms(&self, phase: &str) -> Option<u64> {
        match phase {
            "spawn" => self.spawn_ms,
            "qmp_ready" => self.qmp_ready_ms,
            "first_serial" => self.first_serial_ms,
            "proof" => self.proof_ms,
            "guest_shutdown" => self.guest_shutdown_ms,
            _ => self.teardown_ms,
        }
    }

    fn print_text(&self) {
        println!(
            "boot-test {} (vm {}, accel {}{}, QEMU {})",
            self.image.display(),
            self.vm.as_deref().unwrap_or("-"),
            self.accel.as_deref().unwrap_or("-"),
            self.accel_reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            self.qemu_version.as_deref().unwrap_or("-"),
        );
        let mut failed = false;
        for p in PHASES {
            let status = if self.failed_phase.as_deref() == Some(p) {
                failed = true;
                "FAILED"
            } else if failed {
                "not reached"
            } else {
                "ok"
            };
            match self.phase_ms(p) {
                Some(ms) => println!("  {p:<15} {ms:>7} ms  {status}"),
                None => println!("  {p:<15} {:>7}     {status}", "-"),
            }
        }
        println!("  {:<15} {:>7} ms", "total", self.total_ms);
        println!("  boot phases (serial console):");
        let ms =
            |v: Option<u64>| v.map_or_else(|| format!("{:>7}   ", "-"), |v| format!("{v:>7} ms"));
        println!(
            "    {:<13} {}  QEMU spawned -> kernel banner",
            "firmware",
            ms(self.firmware_ms)
        );
        println!(
            "    {:<13} {}  -> first userspace process{}",
            "kernel",
            ms(self.kernel_ms),
            self.kernel_guest_ms
                .map(|g| format!(" (guest clock {g} ms)"))
                .unwrap_or_default()
        );
        println!(
            "    {:<13} {}  -> proof",
            "userspace",
            ms(self.userspace_ms)
        );
        if let Some(log) = &self.serial_log {
            println!("  serial log: {}", log.display());
        }
        if self.ok {
            println!("boot-test: PASS");
        } else {
            println!(
                "boot-test: FAIL at {}: {}",
                self.failed_phase.as_deref().unwrap_or("?"),
                self.error.as_deref().unwrap_or("")
            );
            if let Some(tail) = &self.serial_tail {
                println!("--- serial console (last lines) ---\n{tail}\n---");
            }
        }
    }
}

/// A runtime root we may write: the system one when we can create it, else a per-user one, else a
/// private temporary directory (kept alive by the returned guard).
fn pick_runtime_root(
    explicit: Option<PathBuf>,
) -> Result<(PathBuf, Option<tempfile::TempDir>), crate::Error> {
    use std::os::unix::fs::DirBuilderExt;
    let usable = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .is_ok()
            && tempfile::tempfile_in(p).is_ok()
    };
    if let Some(p) = explicit {
        return if usable(&p) {
            Ok((p, None))
        } else {
            Err(crate::Error::Usage(format!(
                "--runtime-dir {} is not writable",
                p.display()
            )))
        };
    }
    let mut candidates = vec![PathBuf::from(crate::paths::DEFAULT_RUNTIME_DIR)];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        candidates.push(PathBuf::from(x).join("fkr-qemu"));
    }
    for c in candidates {
        if usable(&c) {
            return Ok((c, None));
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("fkr-qemu-")
        .tempdir()
        .map_err(|e| vm::Error::Io {
            context: "creating a private runtime directory".into(),
            source: e,
        })?;
    Ok((tmp.path().to_owned(), Some(tmp)))
}

/// The user-data of the proof: valid for the test guest and for real cloud-init.
pub fn proof_user_data(nonce: u32) -> String {
    format!(
        "#cloud-config\n\
         runcmd:\n\
         - 'echo \"fkr-boot-test: proof $(({nonce} * 7 + 3))\" > /dev/console'\n\
         power_state:\n  mode: poweroff\n  timeout: 30\n  condition: true\n"
    )
}

pub fn proof_line(nonce: u32) -> String {
    format!("fkr-boot-test: proof {}", u64::from(nonce) * 7 + 3)
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    let start = Instant::now();
    // Installed before anything is created, so no signal can leave a VM or its files behind.
    let mut signals = Signals::new().map_err(|e| vm::Error::io("installing signal handlers", e))?;
    let ms = || start.elapsed().as_millis() as u64;
    let mut report = Report::new(&args.image);
    let (runtime_root, _tmp_root) = pick_runtime_root(args.runtime_dir.clone())?;
    let name = VmName::generate();
    report.vm = Some(name.to_string());
    // The serial log lives in a private directory of its own: kept with --keep, removed otherwise.
    let log_dir = std::env::temp_dir().join(format!("fkr-qemu-boot-test-{name}"));
    let config = VmConfig {
        qemu: args.qemu.clone(),
        qemu_img: args.qemu_img.clone(),
        accel: args.accel,
        firmware_code: args.ovmf_code.clone(),
        firmware_vars: args.ovmf_vars.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory,
        runtime_root,
        log_dir: log_dir.clone(),
        // Private to this run, beside the log: a daemon's sweep never takes it for its own.
        disk_dir: log_dir.join("disks"),
        keep_serial_log: true,
        ..VmConfig::default()
    };
    let nonce = rand::random::<u32>() >> 1;
    let seed = Seed {
        instance_id: name.to_string(),
        hostname: name.to_string(),
        user_data: proof_user_data(nonce),
        network_config: None,
    };
    let mut spec = VmSpec::new(
        name.clone(),
        &args.image,
        seed,
        Duration::from_secs(args.timeout),
    );
    spec.ready_marker = Some(proof_line(nonce));

    let result = drive(&config, spec, nonce, &mut report, &ms, start, &mut signals).await;
    if args.keep {
        report.serial_log = Some(crate::paths::serial_log(&log_dir, name.as_str()));
    }
    if let Err(e) = &result {
        report.failed_phase.get_or_insert_with(|| "spawn".into());
        report.error = Some(e.to_string());
    }
    if report.failed_phase.is_some() && report.serial_tail.is_none() {
        let tail = serial::serial_tail(&crate::paths::serial_log(&log_dir, name.as_str()), 30);
        if !tail.is_empty() {
            report.serial_tail = Some(tail);
        }
    }
    if args.keep {
        let _ = std::fs::remove_dir_all(log_dir.join("disks"));
    } else {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    report.ok = report.failed_phase.is_none();
    report.total_ms = ms();
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serialises")
        );
    } else {
        report.print_text();
    }
    result?;
    match &report.failed_phase {
        None => Ok(()),
        Some(phase) => Err(vm::Error::BootTestFailed {
            phase: phase.clone(),
            detail: report.error.clone().unwrap_or_default(),
        }
        .into()),
    }
}

/// Milestones in milliseconds since the command started, made monotonic, turned into the report's
/// phase durations.
fn fill_phases(report: &mut Report, at: [Option<u64>; 5], teardown: Option<u64>) {
    let mut prev = 0;
    let mut durations = [None; 5];
    for (d, t) in durations.iter_mut().zip(at) {
        let Some(t) = t else { break };
        // A milestone noticed before the previous one (serial output before QMP answered) took
        // no time of its own.
        let t = t.max(prev);
        *d = Some(t - prev);
        prev = t;
    }
    [
        report.spawn_ms,
        report.qmp_ready_ms,
        report.first_serial_ms,
        report.proof_ms,
        report.guest_shutdown_ms,
    ] = durations;
    report.teardown_ms = teardown;
}

/// The boot phases from the driver's serial milestones (ms since spawn) and the proof: each runs
/// from the milestone before it to its own, and is `None` when either end was not seen.
fn fill_boot_phases(report: &mut Report, t: &vm::Timings, proof: Option<u64>) {
    let span = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
    report.firmware_ms = t.kernel_ms;
    report.kernel_ms = span(t.kernel_ms, t.userspace_ms);
    report.userspace_ms = span(t.userspace_ms, proof);
    report.kernel_guest_ms = t.userspace_guest_ms;
}

/// Launches the VM and fills `report`. Errors before the VM runs are returned (they name a missing
/// dependency or a broken image); failures after that are recorded as the failed phase.
async fn drive(
    config: &VmConfig,
    spec: VmSpec,
    nonce: u32,
    report: &mut Report,
    ms: &impl Fn() -> u64,
    start: Instant,
    signals: &mut Signals,
) -> Result<(), vm::Error> {
    // Dropping the launch future on a signal removes whatever it made (probe VM, per-VM dir).
    let handle = tokio::select! {
        r = vm::launch(config, spec) => r?,
        sig = signals.recv() => {
            tracing::warn!("interrupted by {sig} before the VM started");
            report.failed_phase = Some("spawn".into());
            report.error = Some(format!("interrupted by {sig} before the VM started"));
            return Ok(());
        }
    };
    // The driver's timings count from the spawn itself, not from when launch returned.
    let spawn_at = handle
        .spawned()
        .saturating_duration_since(start)
        .as_millis() as u64;
    report.accel = Some(handle.accel().accel.to_string());
    report.accel_reason = Some(handle.accel().reason.clone());
    let stop = handle.stop_token();
    let mut watch = serial::SerialWatch::new(handle.serial_log());
    let expected = proof_line(nonce);
    let mut proof_at = None;
    let mut interrupted = None;
    let wait = handle.wait();
    tokio::pin!(wait);
    let exit = loop {
        tokio::select! {
            r = &mut wait => break r?,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                if proof_at.is_none() && serial::contains(&watch.poll(), &expected) {
                    proof_at = Some(ms());
                }
            }
            sig = signals.recv(), if interrupted.is_none() => {
                tracing::warn!("interrupted by {sig}: stopping the VM");
                interrupted = Some(sig);
                stop.cancel();
            }
        }
    };
    let t = &exit.timings;
    let since_start = |v: u64| spawn_at + v;
    // The serial pump saw the proof the moment it arrived; the 10 ms poll a moment later.
    if let Some(ready) = t.ready_ms {
        proof_at = Some(since_start(ready));
    }
    if proof_at.is_none() && serial::contains(&watch.poll(), &expected) {
        // Found in the last bytes written before QEMU exited; the exact moment is not known.
        proof_at = t.shutdown_ms.map(since_start);
    }
    let shutdown_at = match exit.outcome {
        Outcome::GuestPoweredOff => t.shutdown_ms.map(since_start),
        _ => None,
    };
    // The guest printed the proof before it shut down; polling may notice it a moment later.
    if let (Some(p), Some(s)) = (proof_at, shutdown_at) {
        proof_at = Some(p.min(s));
    }
    report.qemu_version = exit.qemu_version.clone();
    fill_phases(
        report,
        [
            Some(spawn_at),
            t.qmp_ready_ms.map(since_start),
            t.first_serial_ms.map(since_start),
            proof_at,
            shutdown_at,
        ],
        exit.teardown_error
            .is_none()
            .then(|| t.torn_down_ms.saturating_sub(t.stop_decided_ms)),
    );
    let proof_since_spawn = proof_at.map(|p| p.saturating_sub(spawn_at));
    fill_boot_phases(report, t, proof_since_spawn);
    report.outcome = Some(exit.outcome.clone());
    let why = match (&exit.outcome, interrupted) {
        (_, Some(sig)) => format!("interrupted by {sig}: the VM was stopped and its files removed"),
        (Outcome::GuestPoweredOff, _) => String::new(),
        (Outcome::GuestCrashed { reason }, _) => format!("the guest crashed: {reason}"),
        (Outcome::DeadlineExceeded { stopped_by }, _) => {
            format!("the VM did not finish within the timeout (stopped by {stopped_by:?})")
        }
        (Outcome::HostStopped { .. }, _) => "stopped by the host".into(),
        // boot-test never hands a VM over; said for completeness.
        (Outcome::HandedOver, _) => "handed over to another daemon".into(),
        (Outcome::QemuExited { status, detail }, _) => format!("QEMU exited ({status}): {detail}"),
        (Outcome::DiskLimitExceeded { limit, used }, _) => {
            format!("the VM's disk grew to {used} bytes on the host, past disk_max ({limit} bytes)")
        }
        (Outcome::InternalError { accel, detail }, _) => format!(
            "QEMU stopped the guest in run state internal-error under {accel} (the accelerator \
             cannot run this guest; `--accel tcg` avoids it): {detail}"
        ),
    };
    let failed = PHASES.into_iter().find(|p| report.phase_ms(p).is_none());
    if let Some(phase) = failed {
        report.failed_phase = Some(phase.into());
        report.error = Some(match (phase, &exit.teardown_error) {
            ("proof", _) if why.is_empty() => {
                "the guest powered off without printing the proof (did cloud-init run the seed's runcmd?)".into()
            }
            ("teardown", Some(e)) => e.clone(),
            ("qmp_ready", _) if why.is_empty() => "QMP never answered".into(),
            ("first_serial", _) if why.is_empty() => "nothing on the serial console".into(),
            _ => why,
        });
    } else if !why.is_empty() {
        // Every phase passed, yet the run was interrupted (a signal right at the end).
        report.failed_phase = Some("teardown".into());
        report.error = Some(why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_is_computed_by_the_guest_not_copied_from_the_seed() {
        let ud = proof_user_data(12345);
        assert!(!ud.contains(&(12345u64 * 7 + 3).to_string()));
        assert_eq!(proof_line(12345), "fkr-boot-test: proof 86418");
        assert!(ud.starts_with("#cloud-config\nruncmd:\n- '"));
        assert!(ud.contains("power_state:\n  mode: poweroff\n"));
    }

    #[test]
    fn phases_are_durations_that_add_up() {
        let mut r = Report::new(Path::new("x.qcow2"));
        // Serial output noticed before QMP answered counts as taking no time of its own.
        fill_phases(
            &mut r,
            [Some(100), Some(400), Some(300), Some(2000), Some(2500)],
            Some(40),
        );
        assert_eq!(r.spawn_ms, Some(100));
        assert_eq!(r.qmp_ready_ms, Some(300));
        assert_eq!(r.first_serial_ms, Some(0));
        assert_eq!(r.proof_ms, Some(1600));
        assert_eq!(r.guest_shutdown_ms, Some(500));
        assert_eq!(r.teardown_ms, Some(40));
        // A phase not reached ends the chain: later ones are not reached either.
        let mut r = Report::new(Path::new("x.qcow2"));
        fill_phases(&mut r, [Some(100), None, Some(300), None, None], None);
        assert_eq!(
            (r.spawn_ms, r.qmp_ready_ms, r.first_serial_ms),
            (Some(100), None, None)
        );
    }

    #[test]
    fn boot_phases_span_from_one_milestone_to_the_next() {
        let mut r = Report::new(Path::new("x.qcow2"));
        let t = vm::Timings {
            kernel_ms: Some(3_000),
            userspace_ms: Some(9_500),
            userspace_guest_ms: Some(6_100),
            ..vm::Timings::default()
        };
        fill_boot_phases(&mut r, &t, Some(40_000));
        assert_eq!(
            (
                r.firmware_ms,
                r.kernel_ms,
                r.userspace_ms,
                r.kernel_guest_ms
            ),
            (Some(3_000), Some(6_500), Some(30_500), Some(6_100))
        );
        // A quiet kernel: no banner, so neither firmware nor kernel phase, but userspace still.
        let t = vm::Timings {
            userspace_ms: Some(5_000),
            ..vm::Timings::default()
        };
        fill_boot_phases(&mut r, &t, Some(5_400));
        assert_eq!(
            (r.firmware_ms, r.kernel_ms, r.userspace_ms),
            (None, None, Some(400))
        );
        // No proof: the userspace phase did not end.
        fill_boot_phases(&mut r, &t, None);
        assert_eq!(r.userspace_ms, None);
    }
}
