//! Launching one VM and supervising it until it is gone.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::accel::{resolve_accel, AccelChoice};
use super::adopt::Process;
use super::argv::{build_argv, DiskFds, QemuPlan};
use super::cgroup::{self, VmCgroup};
use super::confine;
use super::disk::{
    allocated_bytes, check_base_image, create_overlay, reserve_disk, DiskReservation,
};
use super::firmware::discover_firmware;
use super::meta::{JobMeta, VmMeta};
use super::phases::{Milestone, PhaseDetector, Seen};
use super::qmp::{QmpClient, QmpEvent, QmpEvents};
use super::sandbox::{self, UidLease};
use super::serial::{contains, CappedLog, LogWriter, PANIC_MARKER};
use super::sweep::kill_and_wait;
use super::{files, Error, NetDevice, Seed, VmConfig, VmState};
use crate::types::{Accel, VmName};
use qapi::qmp;

/// What to run: one VM of one job.
#[derive(Debug)]
pub struct VmSpec {
    pub name: VmName,
    /// The read-only qcow2 base image.
    pub base_image: PathBuf,
    pub seed: Seed,
    pub net: Option<NetDevice>,
    /// The whole VM's time budget, from spawn; past it the stop ladder runs.
    pub deadline: Duration,
    /// The job the VM runs, recorded in `vm.json` for `fkr-qemu list`.
    pub job: Option<JobMeta>,
    /// The disk space admitted for this VM ([`reserve_disk`]); taken at prepare when absent.
    pub disk: Option<DiskReservation>,
    /// Text the guest prints on its console when it is ready (boot-test's proof, the runner's start
    /// line): its arrival is [`Timings::ready_ms`], the end of the userspace phase.
    pub ready_marker: Option<String>,
    /// Warm pool: give the guest the job agent's virtio-serial port (`agent.rs`), its host end
    /// a socket the daemon binds in the VM's runtime dir (`files::AGENT`).
    pub agent: bool,
}

impl VmSpec {
    pub fn new(
        name: VmName,
        base_image: impl Into<PathBuf>,
        seed: Seed,
        deadline: Duration,
    ) -> Self {
        Self {
            name,
            base_image: base_image.into(),
            seed,
            net: None,
            deadline,
            job: None,
            disk: None,
            ready_marker: None,
            agent: false,
        }
    }
}

/// What a running VM holds on the host, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResources {
    /// QEMU's uid (none when the daemon is not root).
    pub uid: Option<u32>,
    /// The VM's cgroup directory (v1: the memory hierarchy's).
    pub cgroup: Option<PathBuf>,
    /// systemd hosts: the VM's scope unit.
    pub scope: Option<String>,
    pub overlay: PathBuf,
    pub disk_max: u64,
}

/// Which rung of the stop ladder ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopStep {
    /// The guest answered the ACPI power button.
    Powerdown,
    /// QEMU obeyed QMP `quit`.
    Quit,
    /// QEMU had to be killed.
    Kill,
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The guest powered itself off (`SHUTDOWN` reason `guest-shutdown`).
    GuestPoweredOff,
    /// The guest crashed: a reset or panic (`guest-reset`/`guest-panic`, `GUEST_PANICKED`, or
    /// "Kernel panic" on the serial console).
    GuestCrashed { reason: String },
    /// The VM's deadline passed; the ladder stopped it.
    DeadlineExceeded { stopped_by: StopStep },
    /// The host asked it to stop (stop token, handle dropped).
    HostStopped { stopped_by: StopStep },
    /// QEMU exited without the guest shutting down (crash, start-up error, killed from outside).
    QemuExited { status: String, detail: String },
    /// The overlay grew past `disk_max` on the host; the VM was stopped at once.
    DiskLimitExceeded { limit: u64, used: u64 },
    /// The daemon handed the VM over to its successor (`fkr-qemu handover`): QEMU still runs and
    /// every file and resource of the VM stays for the next daemon to take over.
    HandedOver,
    /// QEMU stopped the vCPUs in run state `internal-error`: the accelerator could not run the guest
    /// (e.g. "KVM internal error … emulation failure"). QEMU stays paused then, so the driver ends it
    /// at once. `detail` holds QEMU's last stderr lines.
    InternalError { accel: Accel, detail: String },
}

/// Milliseconds since spawn at which each milestone was reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Timings {
    pub qmp_ready_ms: Option<u64>,
    pub first_serial_ms: Option<u64>,
    /// Boot milestones on the serial console ([`super::phases`]): the kernel's banner (firmware
    /// done), the first userspace process (kernel done), the spec's ready marker (userspace done).
    pub kernel_ms: Option<u64>,
    pub userspace_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    /// The guest kernel's own timestamp of the userspace line: the kernel phase by the guest clock.
    pub userspace_guest_ms: Option<u64>,
    /// The guest's own `SHUTDOWN` event.
    pub shutdown_ms: Option<u64>,
    /// The moment the VM's end was decided: the guest shut down, the host began the stop ladder,
    /// a dead run state was seen, or QEMU exited unasked — whichever came first.
    pub stop_decided_ms: u64,
    pub exited_ms: u64,
    /// Every per-VM resource released (process reaped, files removed).
    pub torn_down_ms: u64,
}

/// The end of a VM: outcome, final state, timings; returned after teardown.
#[derive(Debug, Clone, Serialize)]
pub struct VmExit {
    pub name: VmName,
    pub outcome: Outcome,
    pub state: VmState,
    pub accel: Accel,
    /// QEMU's version from the QMP greeting, if QMP came up.
    pub qemu_version: Option<String>,
    pub timings: Timings,
    /// Set if removing the per-VM directory failed.
    pub teardown_error: Option<String>,
}

/// Everything one VM holds on the host outside QEMU: its runtime dir (pid file, QMP socket,
/// `vm.json`), its disk dir (overlay, seed, VARS copy), serial log, cgroup, uid and disk
/// reservation. Released when dropped — whatever path dropped it: QEMU killed (if one is recorded and
/// still ours), directories removed, cgroup removed, uid and disk reservation given back.
#[derive(Debug)]
struct VmDir {
    dir: PathBuf,
    disk_dir: PathBuf,
    serial_log: PathBuf,
    keep_serial_log: bool,
    pid: Option<u32>,
    cgroup: Option<VmCgroup>,
    uid: Option<UidLease>,
    disk: Option<DiskReservation>,
    done: bool,
}

impl VmDir {
    /// Lets go of the VM without releasing anything (a handover: the next daemon takes it over).
    /// The uid lease and disk reservation are this process's bookkeeping and go with it; the
    /// cgroup and the files stay.
    fn leave(&mut self) {
        self.done = true;
        self.pid = None;
        std::mem::forget(self.cgroup.take());
    }

    fn teardown(&mut self) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        // Whatever still runs in the VM's cgroup is the VM's, whatever its command line says.
        match self.cgroup.as_ref().and_then(|cg| cg.dirs_first()) {
            Some(dir) => {
                if !cgroup::kill_cgroup_and_wait(dir, Duration::from_secs(10)) {
                    tracing::error!(cgroup = %dir.display(), "the VM's processes survived SIGKILL");
                }
            }
            None => {
                if let Some(pid) = self.pid {
                    kill_and_wait(pid, &self.dir, Duration::from_secs(10));
                }
            }
        }
        if !self.keep_serial_log {
            let _ = std::fs::remove_file(&self.serial_log);
        }
        // QEMU is gone: its cgroup can go, and its uid and disk claim are free again.
        self.cgroup.take();
        self.uid.take();
        let mut errors = Vec::new();
        for d in [&self.disk_dir, &self.dir] {
            match std::fs::remove_dir_all(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("removing {}: {e}", d.display())),
            }
        }
        self.disk.take();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(error = %e, "VM teardown failed");
        }
    }
}

/// The files QEMU gets as descriptors (see `sandbox.rs`), open in the daemon until QEMU has its own.
#[derive(Debug)]
struct OpenFiles {
    code: File,
    vars_rw: File,
    vars_ro: File,
    base: File,
    overlay_rw: File,
    overlay_ro: File,
    seed: File,
    qmp: UnixListener,
    serial: UnixListener,
    /// Warm pool: the job agent's port (see `VmSpec::agent`).
    agent: Option<UnixListener>,
}

impl OpenFiles {
    fn fds(&self) -> DiskFds {
        DiskFds {
            code: self.code.as_raw_fd(),
            vars_rw: self.vars_rw.as_raw_fd(),
            vars_ro: self.vars_ro.as_raw_fd(),
            base: self.base.as_raw_fd(),
            overlay_rw: self.overlay_rw.as_raw_fd(),
            overlay_ro: self.overlay_ro.as_raw_fd(),
            seed: self.seed.as_raw_fd(),
        }
    }

    fn raw(&self) -> Vec<RawFd> {
        let f = self.fds();
        vec![
            f.code,
            f.vars_rw,
            f.vars_ro,
            f.base,
            f.overlay_rw,
            f.overlay_ro,
            f.seed,
            self.qmp.as_raw_fd(),
            self.serial.as_raw_fd(),
        ]
        .into_iter()
        .chain(self.agent.as_ref().map(AsRawFd::as_raw_fd))
        .collect()
    }
}

/// A VM whose files exist (state `created`) but whose QEMU has not been started. Dropping it removes
/// the files.
#[derive(Debug)]
pub struct PreparedVm {
    name: VmName,
    dir: VmDir,
    plan: QemuPlan,
    files: OpenFiles,
    /// The daemon's end of the serial console, connected before QEMU runs.
    serial_conn: UnixStream,
    qmp_socket: PathBuf,
    qemu: PathBuf,
    accel: AccelChoice,
    net: Option<NetDevice>,
    deadline: Duration,
    job: Option<JobMeta>,
    powerdown_grace: Duration,
    quit_grace: Duration,
    serial_cap: (u64, u64),
    disk_max: u64,
    ready_marker: Option<String>,
    /// systemd hosts: the scope's slice and `IOWeight=`.
    slice: String,
    io_weight: Option<u64>,
    limits: cgroup::Limits,
}

/// Resolves `qemu` like `execvp` would (a name without `/` is looked up in `PATH`).
fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

fn mkdir_0700(path: &Path, all: bool) -> Result<(), Error> {
    let mut b = std::fs::DirBuilder::new();
    b.mode(0o700).recursive(all);
    b.create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

fn write_private(path: &Path, content: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(content))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn open_ro(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

fn open_rw(path: &Path) -> Result<File, Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// Everything before QEMU runs: checks (qemu, firmware, base image, disk space), the VM's uid and
/// cgroup, the accelerator (probed under that uid), then the runtime dir (0700) and the disk dir
/// (0700) with overlay, seed (0600) and VARS copy, all opened for QEMU. On error nothing is left.
pub async fn prepare(config: &VmConfig, spec: VmSpec) -> Result<PreparedVm, Error> {
    let qemu = find_program(&config.qemu).ok_or_else(|| Error::QemuNotFound {
        path: config.qemu.clone(),
    })?;
    let firmware = discover_firmware(config)?;
    let base = check_base_image(&config.qemu_img, &spec.base_image).await?;
    let disk = match spec.disk {
        Some(d) => d,
        None => reserve_disk(config)?,
    };
    let vms = config.vms_dir();
    mkdir_0700(&vms, true)?;
    mkdir_0700(&config.disk_dir, true)?;
    mkdir_0700(&config.log_dir, true)?;
    let uid = if sandbox::privileged() {
        Some(sandbox::acquire_uid(
            &config.runtime_root,
            config.uid_base,
            config.uid_count,
        )?)
    } else {
        None
    };
    let identity = uid.as_ref().map(UidLease::identity);
    let accel = resolve_accel(&qemu, &firmware, config.accel, identity.as_ref()).await?;

    let dir_path = vms.join(spec.name.as_str());
    let disk_path = config.disk_dir.join(spec.name.as_str());
    mkdir_0700(&dir_path, false)?;
    let serial_log = config.log_dir.join(format!("{}.serial.log", spec.name));
    // From here on, the guard removes whatever was created if a later step fails.
    let mut dir = VmDir {
        dir: dir_path.clone(),
        disk_dir: disk_path.clone(),
        serial_log: serial_log.clone(),
        keep_serial_log: config.keep_serial_log,
        pid: None,
        cgroup: None,
        uid,
        disk: None,
        done: false,
    };
    mkdir_0700(&disk_path, false)?;
    dir.cgroup = confine::host(config)
        .await?
        .vm_cgroup(spec.name.as_str(), limits(config))?;
    let overlay = disk_path.join(files::OVERLAY);
    create_overlay(&config.qemu_img, &base, &overlay).await?;
    disk.set_overlay(&overlay);
    dir.disk = Some(disk);
    let seed = disk_path.join(files::SEED);
    super::write_seed(&spec.seed, &seed)?;
    let vars = disk_path.join(files::VARS);
    let template = std::fs::read(&firmware.vars_template).map_err(|e| {
        Error::io(
            format!("reading VARS template {}", firmware.vars_template.display()),
            e,
        )
    })?;
    write_private(&vars, &template)?;
    let pruned = super::serial::prune_logs(
        &config.log_dir,
        config.serial_logs_keep,
        Duration::from_secs(config.serial_logs_max_age_days * 86_400),
    );
    if pruned > 0 {
        tracing::info!(pruned, dir = %config.log_dir.display(), "removed old serial logs");
    }
    let qmp_socket = dir_path.join(files::QMP);
    let qmp = UnixListener::bind(&qmp_socket)
        .map_err(|e| Error::io(format!("binding {}", qmp_socket.display()), e))?;
    let serial_socket = dir_path.join(files::SERIAL);
    let serial = UnixListener::bind(&serial_socket)
        .map_err(|e| Error::io(format!("binding {}", serial_socket.display()), e))?;
    // Connected now, before QEMU exists: the connection waits in the listener's backlog, and
    // QEMU (`wait=on`) accepts it before the guest runs, so the firmware's first byte is logged.
    let serial_conn = UnixStream::connect(&serial_socket)
        .map_err(|e| Error::io(format!("connecting to {}", serial_socket.display()), e))?;
    // Warm pool: like QMP, the agent's socket is bound here (0700 dir: root only) and passed.
    let agent = if spec.agent {
        let path = dir_path.join(files::AGENT);
        Some(
            UnixListener::bind(&path)
                .map_err(|e| Error::io(format!("binding {}", path.display()), e))?,
        )
    } else {
        None
    };
    let files = OpenFiles {
        code: open_ro(&firmware.code)?,
        vars_rw: open_rw(&vars)?,
        vars_ro: open_ro(&vars)?,
        base: open_ro(&base)?,
        overlay_rw: open_rw(&overlay)?,
        overlay_ro: open_ro(&overlay)?,
        seed: open_ro(&seed)?,
        qmp,
        serial,
        agent,
    };

    crate::failpoint::crash_point("after-disks");
    let plan = QemuPlan {
        name: spec.name.clone(),
        accel: accel.accel,
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        tcg_tb_size_mib: config.tcg_tb_size_mib,
        firmware,
        vm_dir: dir_path,
        fds: files.fds(),
        qmp_fd: files.qmp.as_raw_fd(),
        serial_fd: files.serial.as_raw_fd(),
        agent_fd: files.agent.as_ref().map(AsRawFd::as_raw_fd),
        net: spec.net.as_ref().map(|n| (n.tap.as_raw_fd(), n.mac)),
    };
    Ok(PreparedVm {
        name: spec.name,
        dir,
        plan,
        files,
        serial_conn,
        qmp_socket,
        qemu,
        accel,
        net: spec.net,
        deadline: spec.deadline,
        job: spec.job,
        ready_marker: spec.ready_marker,
        powerdown_grace: config.powerdown_grace(),
        quit_grace: config.quit_grace(),
        serial_cap: (config.serial_head_kib << 10, config.serial_tail_kib << 10),
        disk_max: config.disk_max(),
        slice: config.slice.clone(),
        io_weight: config.io_weight,
        limits: limits(config),
    })
}

/// The limits of each VM's cgroup or scope.
fn limits(config: &VmConfig) -> cgroup::Limits {
    cgroup::Limits {
        memory_bytes: config.memory_max(),
        pids: config.pids_max,
        cpus: config.vcpus,
    }
}

/// Prepares and starts a VM.
pub async fn launch(config: &VmConfig, spec: VmSpec) -> Result<VmHandle, Error> {
    prepare(config, spec).await?.start().await
}

impl PreparedVm {
    pub fn name(&self) -> &VmName {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir.dir
    }

    /// The VM's disk directory (overlay, seed, VARS copy).
    pub fn disk_dir(&self) -> &Path {
        &self.dir.disk_dir
    }

    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// QEMU's arguments (without the program name).
    pub fn argv(&self) -> Vec<String> {
        build_argv(&self.plan)
    }

    /// Removes the VM's files now (also what dropping it does), reporting failure.
    pub fn teardown(mut self) -> Result<(), Error> {
        self.dir.teardown().map_err(|e| Error::Tool {
            command: "teardown".into(),
            detail: e,
        })
    }

    /// Spawns QEMU, confined (`confine.rs`), and the supervisor task that owns it from now on.
    /// Must run inside a tokio runtime.
    pub async fn start(mut self) -> Result<VmHandle, Error> {
        let argv = self.argv();
        let mut cmd = Command::new(&self.qemu);
        cmd.args(&argv)
            .stdin(Stdio::null())
            // The serial console has its own socket; nothing else of QEMU's goes to stdout.
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl+C reaches the daemon, which stops VMs in order,
            // instead of killing every QEMU at once.
            .process_group(0)
            .kill_on_drop(true);
        let mut keep_fds = self.files.raw();
        keep_fds.extend(self.net.as_ref().map(|n| n.tap.as_raw_fd()));
        let uid = self.dir.uid.as_ref().map(UidLease::uid);
        let setup = sandbox::ChildSetup {
            cgroup_procs: self
                .dir
                .cgroup
                .as_ref()
                .filter(|cg| cg.joined_by_child())
                .map(VmCgroup::procs_files)
                .unwrap_or_default(),
            keep_fds,
            identity: self.dir.uid.as_ref().map(UidLease::identity),
            ..Default::default()
        };
        let serial = CappedLog::create(&self.dir.serial_log, self.serial_cap.0, self.serial_cap.1)
            .map_err(|e| {
                Error::io(
                    format!("creating serial log {}", self.dir.serial_log.display()),
                    e,
                )
            })?;
        let now = time::OffsetDateTime::now_utc();
        let mut meta = VmMeta {
            name: self.name.clone(),
            created_at: now,
            pid: None,
            pid_start: None,
            argv: std::iter::once(self.qemu.to_string_lossy().into_owned())
                .chain(argv)
                .collect(),
            deadline_at: Some(now + self.deadline),
            accel: Some(self.accel.accel),
            serial_log: self.dir.serial_log.clone(),
            disk_dir: self.dir.disk_dir.clone(),
            disk_max: self.disk_max,
            uid,
            cgroup: self
                .dir
                .cgroup
                .as_ref()
                .map(|cg| cg.memory_dir().to_owned()),
            scope: self
                .dir
                .cgroup
                .as_ref()
                .and_then(|cg| cg.scope().map(str::to_owned)),
            job: self.job.take(),
        };
        // Recorded before QEMU exists: whatever happens to the daemon from here on, the record
        // names the VM, its cgroup, its job and everything the job holds.
        meta.write(&self.dir.dir)?;
        let mut state = VmState::Created;
        let host = match confine::decided() {
            Some(h) => h,
            None => &confine::Host::Unconfined,
        };
        let description = confine::describe_vm(self.name.as_str(), meta.job.as_ref());
        let ifindex = self
            .net
            .as_ref()
            .and_then(|_| nix::net::if_::if_nametoindex(self.name.as_str()).ok())
            .and_then(|i| i32::try_from(i).ok());
        let scope = self
            .dir
            .cgroup
            .as_ref()
            .and_then(|cg| cg.scope())
            .map(|unit| super::scope::ScopeSpec {
                unit: unit.to_owned(),
                machine: Some(&self.name),
                slice: &self.slice,
                limits: self.limits,
                io_weight: self.io_weight,
                description,
                ifindex,
            });
        let spawned = host
            .spawn(cmd, setup, self.dir.cgroup.as_mut(), scope)
            .await;
        let mut child = match spawned {
            Ok(c) => c,
            Err(confine::SpawnError::Confine(e)) => {
                let _ = state.transition(VmState::Failed);
                return Err(e);
            }
            Err(confine::SpawnError::Io(e)) => {
                let _ = state.transition(VmState::Failed);
                // The child's setup (joining the VM's cgroup) fails the spawn the same way as a
                // missing binary: name the binary only when it really is gone.
                return Err(
                    if e.kind() == std::io::ErrorKind::NotFound && !self.qemu.exists() {
                        Error::QemuNotFound {
                            path: self.qemu.clone(),
                        }
                    } else {
                        Error::io(
                            format!(
                                "starting {} (in the VM's cgroup, as the VM's uid)",
                                self.qemu.display()
                            ),
                            e,
                        )
                    },
                );
            }
        };
        // systemd may have put the scope elsewhere than planned: record where it is.
        meta.cgroup = self
            .dir
            .cgroup
            .as_ref()
            .map(|cg| cg.memory_dir().to_owned());
        let spawned = Instant::now();
        crate::failpoint::crash_point("after-spawn");
        state.transition(VmState::Starting)?;
        // QEMU holds its own copies of the tap, the disks and the sockets now.
        drop(self.net.take());
        let pid = child.id().unwrap_or(0);
        self.dir.pid = Some(pid);
        write_private(
            &self.dir.dir.join(files::PID),
            format!("{pid}\n").as_bytes(),
        )?;
        // `spawn` returned after the exec: the process's start time and command line are QEMU's.
        meta.pid = Some(pid);
        meta.pid_start = super::adopt::start_time(pid);
        meta.write(&self.dir.dir)?;
        crate::failpoint::crash_point("before-qmp");
        tracing::info!(vm = %self.name, pid, accel = %self.accel.accel, uid, "QEMU started");

        let stderr = super::accel::keep_stderr(&mut child);
        let (serial_tx, serial_rx) = mpsc::unbounded_channel();
        let pump = self
            .serial_conn
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(self.serial_conn))
            .map_err(|e| Error::io("watching the serial console", e))?;
        let phases = PhaseDetector::new(self.ready_marker.take());
        let pump = Some(tokio::spawn(pump_serial(pump, serial, phases, serial_tx)));
        let overlay = self.dir.disk_dir.join(files::OVERLAY);
        let sup = Supervisor {
            name: self.name,
            state,
            state_tx: watch::channel(state).0,
            process: Qemu::Child(child),
            dir: self.dir,
            qmp_socket: self.qmp_socket,
            pump,
            stderr,
            spawned,
            deadline: spawned + self.deadline,
            powerdown_grace: self.powerdown_grace,
            quit_grace: self.quit_grace,
            accel: self.accel.accel,
            qemu_bin: self.qemu.clone(),
            overlay,
            disk_max: self.disk_max,
            stop: CancellationToken::new(),
            detach: CancellationToken::new(),
            timings: Timings::default(),
            stop_decided: None,
            shutdown_reason: None,
            crashed: None,
            internal_error: None,
            disk_exceeded: None,
            qemu_version: None,
        };
        // The daemon's copies of QEMU's descriptors are not needed any more.
        drop(self.files);
        Ok(sup.into_handle(self.accel, serial_rx, None))
    }
}

/// A VM a previous daemon started, checked by `adopt.rs` (the process is that QEMU, QMP answers)
/// with the resources it holds taken over.
pub(super) struct Adopted {
    pub name: VmName,
    pub meta: VmMeta,
    pub dir: PathBuf,
    pub process: Process,
    pub qmp: (QmpClient, QmpEvents),
    pub serial: Option<tokio::net::UnixStream>,
    pub uid: Option<UidLease>,
    pub cgroup: Option<VmCgroup>,
    pub disk: DiskReservation,
    pub qemu_bin: PathBuf,
}

/// Supervises an adopted VM to its end exactly like one this daemon started: deadline, stop
/// ladder, disk cap, teardown. `spawned` and the deadline count from the original start.
pub(super) fn supervise_adopted(config: &VmConfig, a: Adopted) -> Result<VmHandle, Error> {
    let now_wall = time::OffsetDateTime::now_utc();
    let age = Duration::try_from(now_wall - a.meta.created_at).unwrap_or_default();
    let now = Instant::now();
    let spawned = now.checked_sub(age).unwrap_or(now);
    let left = a
        .meta
        .deadline_at
        .and_then(|d| Duration::try_from(d - now_wall).ok())
        .unwrap_or_default();
    let mut log = CappedLog::resume(
        &a.meta.serial_log,
        config.serial_head_kib << 10,
        config.serial_tail_kib << 10,
    )
    .map_err(|e| {
        Error::io(
            format!("opening serial log {}", a.meta.serial_log.display()),
            e,
        )
    })?;
    let (serial_tx, serial_rx) = mpsc::unbounded_channel();
    let pump = match a.serial {
        Some(conn) => {
            let _ = log.write(b"\r\n[fkr-qemu: the daemon restarted and took this VM over; output in between is lost]\r\n");
            // The boot is long past: no milestone is looked for.
            Some(tokio::spawn(pump_serial(
                conn,
                log,
                PhaseDetector::new(None),
                serial_tx,
            )))
        }
        None => None,
    };
    let mut state = VmState::Created;
    state.transition(VmState::Starting)?;
    let pid = a.process.pid();
    let dir = VmDir {
        dir: a.dir,
        disk_dir: a.meta.disk_dir.clone(),
        serial_log: a.meta.serial_log.clone(),
        keep_serial_log: config.keep_serial_log,
        pid: Some(pid),
        cgroup: a.cgroup,
        uid: a.uid,
        disk: Some(a.disk),
        done: false,
    };
    let sup = Supervisor {
        name: a.name,
        state,
        state_tx: watch::channel(state).0,
        process: Qemu::Adopted(a.process),
        qmp_socket: dir.dir.join(files::QMP),
        overlay: dir.disk_dir.join(files::OVERLAY),
        dir,
        pump,
        // Its stderr went to the previous daemon.
        stderr: Arc::default(),
        spawned,
        deadline: now + left,
        powerdown_grace: config.powerdown_grace(),
        quit_grace: config.quit_grace(),
        accel: a.meta.accel.unwrap_or(Accel::Tcg),
        qemu_bin: a.qemu_bin,
        disk_max: a.meta.disk_max,
        stop: CancellationToken::new(),
        detach: CancellationToken::new(),
        timings: Timings::default(),
        stop_decided: None,
        shutdown_reason: None,
        crashed: None,
        internal_error: None,
        disk_exceeded: None,
        qemu_version: None,
    };
    let accel = AccelChoice {
        accel: sup.accel,
        reason: "taken over from the previous daemon".into(),
    };
    Ok(sup.into_handle(accel, serial_rx, Some(a.qmp)))
}

/// A running VM. Dropping the handle asks the VM to stop (the supervisor keeps running until QEMU is
/// gone and the files are removed); if the runtime itself goes away, the supervisor's own `Drop`
/// kills QEMU and removes the files.
#[derive(Debug)]
pub struct VmHandle {
    name: VmName,
    pid: u32,
    serial_log: PathBuf,
    dir: PathBuf,
    accel: AccelChoice,
    resources: VmResources,
    /// When QEMU was spawned: `VmExit::timings` count from here.
    spawned: Instant,
    state: watch::Receiver<VmState>,
    stop: CancellationToken,
    detach: CancellationToken,
    task: Option<JoinHandle<VmExit>>,
}

impl VmHandle {
    pub fn name(&self) -> &VmName {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// The per-VM directory (`<runtime_root>/vms/<name>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// When QEMU was spawned (the origin of `VmExit::timings`).
    pub fn spawned(&self) -> Instant {
        self.spawned
    }

    /// Its uid, cgroup and overlay, for `status`.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    pub fn state(&self) -> VmState {
        *self.state.borrow()
    }

    /// Follows state changes.
    pub fn watch_state(&self) -> watch::Receiver<VmState> {
        self.state.clone()
    }

    /// A token that stops the VM (powerdown → grace → quit → kill) when cancelled, e.g. on Ctrl+C.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Asks the VM to stop; `wait` then returns `HostStopped`.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Records `job` in the VM's `vm.json` (a warm VM bound to a job), atomically.
    pub fn record_job(&self, job: JobMeta) -> Result<(), Error> {
        let mut meta = VmMeta::read(&self.dir).ok_or_else(|| {
            Error::io(
                format!("reading {}", self.dir.join(files::META).display()),
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
        meta.job = Some(job);
        meta.write(&self.dir)
    }

    /// A token that, when cancelled, makes the supervisor let go of the VM without stopping it
    /// (`wait` then returns `HandedOver`): for a daemon that hands its VMs over to its successor.
    pub fn detach_token(&self) -> CancellationToken {
        self.detach.clone()
    }

    /// Waits until QEMU is gone and the VM's files are removed.
    pub async fn wait(mut self) -> Result<VmExit, Error> {
        let task = self
            .task
            .take()
            .expect("the supervisor task is set at start");
        // A panicking supervisor has still torn the VM down (its guards' Drop).
        task.await.map_err(|e| Error::Supervisor {
            name: self.name.to_string(),
            detail: e.to_string(),
        })
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.task.as_ref().is_some_and(|t| !t.is_finished()) && !self.detach.is_cancelled() {
            tracing::info!(vm = %self.name, "VM handle dropped: stopping the VM");
            self.stop.cancel();
        }
    }
}

/// Why the supervisor is stopping the VM.
#[derive(Debug, Clone, Copy)]
enum StopCause {
    Deadline,
    Host,
    GuestPanic,
    /// Run state `internal-error`: the accelerator gave up on the guest.
    InternalError,
    /// The overlay passed `disk_max`.
    DiskLimit,
}

struct Supervisor {
    name: VmName,
    state: VmState,
    state_tx: watch::Sender<VmState>,
    /// Declared before `dir`: dropped first, so `kill_on_drop` has signalled QEMU by the time the
    /// directory guard waits for it.
    process: Qemu,
    dir: VmDir,
    qmp_socket: PathBuf,
    /// The serial pump (it reports first output and kernel panics on a channel given to `run`).
    pump: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    spawned: Instant,
    deadline: Instant,
    powerdown_grace: Duration,
    quit_grace: Duration,
    accel: Accel,
    /// The QEMU binary, to mark its KVM broken after an internal error.
    qemu_bin: PathBuf,
    /// The overlay and how far it may grow on the host.
    overlay: PathBuf,
    disk_max: u64,
    stop: CancellationToken,
    detach: CancellationToken,
    timings: Timings,
    stop_decided: Option<u64>,
    shutdown_reason: Option<(bool, String)>,
    crashed: Option<String>,
    /// QEMU's stderr when the run state became `internal-error`.
    internal_error: Option<String>,
    /// The overlay's size when it passed `disk_max`.
    disk_exceeded: Option<u64>,
    qemu_version: Option<String>,
}

/// How often the overlay's size is checked (besides QEMU's write-threshold event).
const DISK_CHECK: Duration = Duration::from_secs(2);
/// How long QEMU may take to answer on QMP (generous: a loaded 2-core host).
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl Supervisor {
    fn ms(&self) -> u64 {
        self.spawned.elapsed().as_millis() as u64
    }

    fn set_state(&mut self, to: VmState) {
        match self.state.transition(to) {
            Ok(()) => {
                tracing::debug!(vm = %self.name, state = %to, "VM state");
                let _ = self.state_tx.send(to);
            }
            Err(e) => tracing::error!(vm = %self.name, error = %e, "bug: refused VM state change"),
        }
    }

    fn stderr_tail(&self) -> String {
        let b = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&b).trim().to_owned()
    }

    /// Records the first moment the VM's end was decided.
    fn decide_stop(&mut self) {
        if self.stop_decided.is_none() {
            self.stop_decided = Some(self.ms());
        }
    }

    /// Whether the overlay passed `disk_max` (QEMU's threshold event says by how much; otherwise
    /// its allocated size tells).
    fn over_disk_max(&mut self, exceeded_by: Option<u64>) -> bool {
        let used = allocated_bytes(&self.overlay);
        let over = exceeded_by.is_some() || used > self.disk_max;
        if over {
            let used = used.max(self.disk_max + exceeded_by.unwrap_or(0));
            tracing::warn!(vm = %self.name, used, limit = self.disk_max, "the VM's disk passed disk_max: stopping it");
            self.disk_exceeded = Some(used);
        }
        over
    }

    /// After a `STOP` event (or at connect): a run state that no vCPU recovers from ends the VM.
    async fn dead_run_state(&mut self, qmp: &QmpClient) -> Option<StopCause> {
        let status = match tokio::time::timeout(Duration::from_secs(2), qmp.query_status()).await {
            Ok(Ok(s)) => s,
            _ => return None,
        };
        match status.as_str() {
            "internal-error" => {
                // QEMU prints the KVM register dump a moment after pausing; give it that moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let detail = super::accel::error_lines(&self.stderr_tail(), 3);
                tracing::error!(vm = %self.name, accel = %self.accel, stderr = %detail, "QEMU stopped in run state internal-error: the accelerator cannot run this guest");
                if self.accel == Accel::Kvm {
                    super::accel::mark_kvm_broken(
                        &self.qemu_bin,
                        &format!("run state internal-error ({detail})"),
                    );
                }
                self.internal_error = Some(detail);
                Some(StopCause::InternalError)
            }
            "guest-panicked" => {
                self.crashed
                    .get_or_insert("run state guest-panicked".into());
                Some(StopCause::GuestPanic)
            }
            _ => None,
        }
    }

    fn on_event(&mut self, e: &QmpEvent) {
        match e {
            QmpEvent::Shutdown { guest, reason } => {
                tracing::info!(vm = %self.name, guest, reason, "guest shutdown");
                self.timings.shutdown_ms.get_or_insert(self.ms());
                self.decide_stop();
                self.shutdown_reason.get_or_insert((*guest, reason.clone()));
                if reason == "guest-reset" || reason == "guest-panic" {
                    self.crashed
                        .get_or_insert(format!("SHUTDOWN reason {reason}"));
                }
            }
            QmpEvent::GuestPanicked { action } => {
                self.crashed
                    .get_or_insert(format!("GUEST_PANICKED (action {action})"));
            }
            _ => {}
        }
    }

    /// Starts the supervisor task; returns the handle that follows it.
    fn into_handle(
        self,
        accel: AccelChoice,
        serial_rx: mpsc::UnboundedReceiver<SerialNote>,
        qmp: Option<(QmpClient, QmpEvents)>,
    ) -> VmHandle {
        VmHandle {
            name: self.name.clone(),
            pid: self.dir.pid.unwrap_or(0),
            serial_log: self.dir.serial_log.clone(),
            dir: self.dir.dir.clone(),
            accel,
            resources: VmResources {
                uid: self.dir.uid.as_ref().map(UidLease::uid),
                cgroup: self.dir.cgroup.as_ref().map(|c| c.memory_dir().to_owned()),
                scope: self
                    .dir
                    .cgroup
                    .as_ref()
                    .and_then(|c| c.scope().map(str::to_owned)),
                overlay: self.overlay.clone(),
                disk_max: self.disk_max,
            },
            spawned: self.spawned,
            state: self.state_tx.subscribe(),
            stop: self.stop.clone(),
            detach: self.detach.clone(),
            task: Some(tokio::spawn(self.run(serial_rx, qmp))),
        }
    }

    async fn run(
        mut self,
        mut serial_rx: mpsc::UnboundedReceiver<SerialNote>,
        qmp: Option<(QmpClient, QmpEvents)>,
    ) -> VmExit {
        let result = self.supervise(&mut serial_rx, qmp).await;
        if result.0 == Outcome::HandedOver {
            tracing::info!(vm = %self.name, "VM handed over: left running for the next daemon");
            self.dir.leave();
            // No kill on drop: the process is the next daemon's now.
            if let Qemu::Child(c) = std::mem::replace(&mut self.process, Qemu::Gone) {
                std::mem::forget(c);
            }
            return VmExit {
                name: self.name.clone(),
                outcome: Outcome::HandedOver,
                state: self.state,
                accel: self.accel,
                qemu_version: self.qemu_version.clone(),
                timings: self.timings.clone(),
                teardown_error: None,
            };
        }
        // QEMU has exited: its stdout ends, and the pump writes the last bytes (a guest's final
        // words before power-off) before the log is read or removed.
        if let Some(pump) = self.pump.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
        }
        let exited_ms = self.ms();
        let (outcome, final_state) = result;
        self.timings.stop_decided_ms = self.stop_decided.unwrap_or(exited_ms);
        if !self.state.is_final() {
            self.set_state(final_state);
        }
        self.timings.exited_ms = exited_ms;
        // QEMU has exited and was reaped: nothing to kill any more.
        self.dir.pid = None;
        let teardown_error = self.dir.teardown().err();
        self.timings.torn_down_ms = self.ms();
        tracing::info!(vm = %self.name, outcome = ?outcome, state = %self.state, "VM gone");
        VmExit {
            name: self.name.clone(),
            outcome,
            state: self.state,
            accel: self.accel,
            qemu_version: self.qemu_version.clone(),
            timings: self.timings.clone(),
            teardown_error,
        }
    }

    /// Runs until QEMU has exited (and was reaped); returns the outcome and the final state.
    async fn supervise(
        &mut self,
        serial: &mut mpsc::UnboundedReceiver<SerialNote>,
        adopted_qmp: Option<(QmpClient, QmpEvents)>,
    ) -> (Outcome, VmState) {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let stop = self.stop.clone();
        let detach = self.detach.clone();
        let (qmp, mut events) = match adopted_qmp {
            Some(pair) => pair,
            None => match self.start_up(serial).await {
                Ok(pair) => pair,
                Err(end) => return end,
            },
        };
        self.timings.qmp_ready_ms = Some(self.ms());
        self.qemu_version = Some(qmp.greeting().to_string());
        // The overlay's host file may grow to disk_max: QEMU tells us the moment it passes.
        let threshold = qmp::block_set_write_threshold {
            node_name: "disk0-file".into(),
            write_threshold: self.disk_max,
        };
        if let Err(e) = qmp.execute(threshold).await {
            tracing::warn!(vm = %self.name, error = %e, "cannot set the disk write threshold; checking the overlay's size instead");
        }
        // A vCPU may have died before QMP was up (its STOP event went to nobody): ask once now.
        if let Some(cause) = self.dead_run_state(&qmp).await {
            self.set_state(VmState::Running);
            return self
                .stop_ladder(Some(&qmp), Some(&mut events), cause, None)
                .await;
        }
        tracing::debug!(vm = %self.name, qemu = %qmp.greeting(), "QMP ready");
        self.set_state(VmState::Running);
        // Phase 2: running until QEMU exits or we stop it.
        let mut events_open = true;
        let mut disk_check = tokio::time::interval(DISK_CHECK);
        loop {
            tokio::select! {
                _ = disk_check.tick() => {
                    if self.over_disk_max(None) {
                        return self.stop_ladder(Some(&qmp), Some(&mut events), StopCause::DiskLimit, None).await;
                    }
                }
                ev = events.recv(), if events_open => match ev {
                    Some(QmpEvent::WriteThreshold { amount_exceeded }) => {
                        if self.over_disk_max(Some(amount_exceeded)) {
                            return self.stop_ladder(Some(&qmp), Some(&mut events), StopCause::DiskLimit, None).await;
                        }
                    }
                    Some(QmpEvent::Stop) => {
                        if let Some(cause) = self.dead_run_state(&qmp).await {
                            return self.stop_ladder(Some(&qmp), Some(&mut events), cause, None).await;
                        }
                    }
                    Some(e) => self.on_event(&e),
                    None => {
                        // Dropped for flooding the daemon: no QEMU of ours does that; kill it.
                        if let Some(m) = qmp.dropped_for() {
                            tracing::warn!(vm = %self.name, error = %m, "stopping a VM whose QEMU floods QMP");
                            return self.stop_ladder(None, None, StopCause::Host, Some(Error::QmpPeerDropped(m).to_string())).await;
                        }
                        events_open = false
                    }
                },
                status = self.process.wait() => {
                    // QEMU's last events (its SHUTDOWN) may still be on their way: read them to the
                    // end of the socket before classifying the exit.
                    if events_open {
                        let drain = async {
                            while let Some(e) = events.recv().await {
                                self.on_event(&e);
                            }
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
                    }
                    return self.exited(status);
                }
                Some(note) = serial.recv() => {
                    if self.on_serial(note) {
                        return self.stop_ladder(Some(&qmp), Some(&mut events), StopCause::GuestPanic, None).await;
                    }
                }
                _ = stop.cancelled() => {
                    return self.stop_ladder(Some(&qmp), Some(&mut events), StopCause::Host, None).await
                }
                _ = detach.cancelled() => return (Outcome::HandedOver, self.state),
                _ = tokio::time::sleep_until(deadline) => {
                    return self.stop_ladder(Some(&qmp), Some(&mut events), StopCause::Deadline, None).await
                }
            }
        }
    }

    /// Phase 1: QEMU spawned, QMP not up yet. Ends with the QMP connection, or with the VM's end
    /// when it died or had to be stopped before QMP answered.
    async fn start_up(
        &mut self,
        serial: &mut mpsc::UnboundedReceiver<SerialNote>,
    ) -> Result<(QmpClient, QmpEvents), (Outcome, VmState)> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let stop = self.stop.clone();
        let detach = self.detach.clone();
        let socket = self.qmp_socket.clone();
        let connect = QmpClient::connect(&socket, QMP_CONNECT_TIMEOUT);
        tokio::pin!(connect);
        // Phase 1: QEMU spawned, QMP not up yet.
        let early: Result<_, StopCause> = 'early: loop {
            tokio::select! {
                r = &mut connect => match r {
                    Ok(pair) => break 'early Ok(pair),
                    Err(e) => {
                        // QEMU died (its end closed the socket): report its exit, not the socket.
                        if let Ok(status) = tokio::time::timeout(Duration::from_millis(500), self.process.wait()).await {
                            return Err(self.exited_early(status));
                        }
                        tracing::warn!(vm = %self.name, error = %e, "QMP did not come up");
                        return Err(self.stop_ladder(None, None, StopCause::Host, Some(e.to_string())).await);
                    }
                },
                status = self.process.wait() => return Err(self.exited_early(status)),
                Some(note) = serial.recv() => {
                    if self.on_serial(note) {
                        return Err(self.stop_ladder(None, None, StopCause::GuestPanic, None).await);
                    }
                }
                _ = stop.cancelled() => break 'early Err(StopCause::Host),
                // QMP is a moment away: the next daemon connects to it.
                _ = detach.cancelled() => return Err((Outcome::HandedOver, self.state)),
                _ = tokio::time::sleep_until(deadline) => break 'early Err(StopCause::Deadline),
            }
        };
        match early {
            Ok(pair) => Ok(pair),
            Err(cause) => {
                // Asked to stop while QEMU was still starting (a loaded host): QMP is usually a
                // moment away, and `quit` is kinder than SIGKILL. Wait for it, briefly.
                self.decide_stop();
                Err(
                    match tokio::time::timeout(self.quit_grace, &mut connect).await {
                        Ok(Ok((qmp, mut events))) => {
                            self.stop_ladder(Some(&qmp), Some(&mut events), cause, None)
                                .await
                        }
                        _ => self.stop_ladder(None, None, cause, None).await,
                    },
                )
            }
        }
    }

    /// Returns true if the guest panicked.
    fn on_serial(&mut self, note: SerialNote) -> bool {
        match note {
            SerialNote::FirstOutput(at) => {
                self.timings.first_serial_ms =
                    Some(at.saturating_duration_since(self.spawned).as_millis() as u64);
                false
            }
            SerialNote::Milestone(seen) => {
                let ms = Some(seen.at.saturating_duration_since(self.spawned).as_millis() as u64);
                match seen.milestone {
                    Milestone::Kernel => self.timings.kernel_ms = ms,
                    Milestone::Userspace => {
                        self.timings.userspace_ms = ms;
                        self.timings.userspace_guest_ms = seen.guest.map(|g| g.as_millis() as u64);
                    }
                    Milestone::Ready => self.timings.ready_ms = ms,
                }
                false
            }
            SerialNote::Panic => {
                tracing::warn!(vm = %self.name, "kernel panic on the serial console");
                self.crashed
                    .get_or_insert("Kernel panic on the serial console".into());
                true
            }
        }
    }

    fn exited_early(&mut self, status: String) -> (Outcome, VmState) {
        let detail = self.oom_note() + &self.stderr_tail();
        tracing::warn!(vm = %self.name, %status, %detail, "QEMU exited during start-up");
        (Outcome::QemuExited { status, detail }, VmState::Failed)
    }

    /// Says so when the VM's cgroup OOM-killed QEMU (it used more than `memory.max`).
    fn oom_note(&self) -> String {
        match self.dir.cgroup.as_ref().and_then(VmCgroup::oom_kills) {
            Some(n) if n > 0 => format!(
                "out of memory: the VM's cgroup hit its memory limit and the kernel killed QEMU \
                 ({n} OOM kill(s)); "
            ),
            _ => String::new(),
        }
    }

    /// QEMU exited on its own while running: classify by the SHUTDOWN reason, not the exit code.
    fn exited(&mut self, status: String) -> (Outcome, VmState) {
        if let Some(reason) = self.crashed.clone() {
            return (Outcome::GuestCrashed { reason }, VmState::Failed);
        }
        match &self.shutdown_reason {
            Some((true, r)) if r == "guest-shutdown" => {
                (Outcome::GuestPoweredOff, VmState::Stopped)
            }
            other => {
                let mut detail = self.oom_note() + &self.stderr_tail();
                if let Some((guest, r)) = other {
                    detail = format!("SHUTDOWN guest={guest} reason={r}; {detail}");
                }
                (Outcome::QemuExited { status, detail }, VmState::Failed)
            }
        }
    }

    /// Waits up to `d` for QEMU to exit, recording events meanwhile. True if it exited.
    async fn wait_exit(&mut self, d: Duration, events: &mut Option<&mut QmpEvents>) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            let ev = async {
                match events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // An exit that raced the deadline still counts (after a stalled runtime both are ready).
                biased;
                _ = self.process.wait() => return true,
                e = ev => match e {
                    Some(e) => self.on_event(&e),
                    None => *events = None,
                },
                _ = tokio::time::sleep_until(until) => return false,
            }
        }
    }

    /// powerdown → grace → quit → grace → SIGKILL. A panicked guest skips the power button (nobody
    /// listens), and without QMP only the kill is left.
    async fn stop_ladder(
        &mut self,
        qmp: Option<&QmpClient>,
        mut events: Option<&mut QmpEvents>,
        cause: StopCause,
        detail: Option<String>,
    ) -> (Outcome, VmState) {
        tracing::info!(vm = %self.name, ?cause, "stopping the VM");
        self.decide_stop();
        self.set_state(VmState::Stopping);
        let mut step = StopStep::Kill;
        let mut done = false;
        if let Some(qmp) = qmp {
            // Nobody listens to the power button of a panicked or paused guest.
            // A guest over its disk cap must not write on while it shuts down.
            if !matches!(
                cause,
                StopCause::GuestPanic | StopCause::InternalError | StopCause::DiskLimit
            ) {
                // A stopped or wedged QEMU does not answer: bound every command by its rung's grace.
                match tokio::time::timeout(self.powerdown_grace, qmp.system_powerdown())
                    .await
                    .unwrap_or_else(|_| Err(Error::Qmp("system_powerdown timed out".into())))
                {
                    Ok(()) => {
                        if self.wait_exit(self.powerdown_grace, &mut events).await {
                            step = StopStep::Powerdown;
                            done = true;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(vm = %self.name, error = %e, "system_powerdown failed")
                    }
                }
            }
            if !done {
                match tokio::time::timeout(self.quit_grace, qmp.quit())
                    .await
                    .unwrap_or_else(|_| Err(Error::Qmp("quit timed out".into())))
                {
                    Ok(()) => {
                        if self.wait_exit(self.quit_grace, &mut events).await {
                            step = StopStep::Quit;
                            done = true;
                        }
                    }
                    Err(e) => tracing::debug!(vm = %self.name, error = %e, "quit failed"),
                }
            }
        }
        if !done {
            tracing::warn!(vm = %self.name, "killing QEMU");
            self.process.start_kill();
            // And everything else in its cgroup: the VM is its cgroup, not one pid.
            if let Some(cg) = &self.dir.cgroup {
                cg.kill();
            }
            let _ = self.process.wait().await;
        }
        tracing::info!(vm = %self.name, ?step, "VM stopped");
        match cause {
            StopCause::Deadline => (
                Outcome::DeadlineExceeded { stopped_by: step },
                VmState::Stopped,
            ),
            StopCause::Host => match detail {
                // QMP never came up: that is a failed start, not an orderly stop.
                Some(d) => (
                    Outcome::QemuExited {
                        status: "killed".into(),
                        detail: format!("{d}; {}", self.stderr_tail()),
                    },
                    VmState::Failed,
                ),
                None => (Outcome::HostStopped { stopped_by: step }, VmState::Stopped),
            },
            StopCause::GuestPanic => (
                Outcome::GuestCrashed {
                    reason: self.crashed.clone().unwrap_or_else(|| "panic".into()),
                },
                VmState::Failed,
            ),
            StopCause::DiskLimit => (
                Outcome::DiskLimitExceeded {
                    limit: self.disk_max,
                    used: self.disk_exceeded.unwrap_or_default(),
                },
                VmState::Failed,
            ),
            StopCause::InternalError => (
                Outcome::InternalError {
                    accel: self.accel,
                    detail: self.internal_error.clone().unwrap_or_default(),
                },
                VmState::Failed,
            ),
        }
    }
}

/// The QEMU process a supervisor watches: spawned by this daemon, or taken over from a previous
/// one (then not our child: its exit status is unknown, its end is seen in `/proc`).
enum Qemu {
    Child(Child),
    Adopted(Process),
    /// Handed over to the next daemon: no longer watched here.
    Gone,
}

impl Qemu {
    /// Waits until the process has exited (cancel-safe); says how, as far as is known.
    async fn wait(&mut self) -> String {
        match self {
            Qemu::Child(c) => c
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string()),
            Qemu::Adopted(p) => {
                p.exited().await;
                "exited (taken over after a restart: exit status unknown)".into()
            }
            Qemu::Gone => "handed over".into(),
        }
    }

    fn start_kill(&mut self) {
        match self {
            Qemu::Child(c) => {
                let _ = c.start_kill();
            }
            Qemu::Adopted(p) => p.kill(),
            Qemu::Gone => {}
        }
    }
}

enum SerialNote {
    FirstOutput(Instant),
    Milestone(Seen),
    Panic,
}

/// Copies the serial console (QEMU's socket) into the capped log, reporting the first byte once,
/// each boot milestone once and a kernel panic once.
async fn pump_serial(
    mut out: tokio::net::UnixStream,
    log: CappedLog,
    mut phases: PhaseDetector,
    tx: mpsc::UnboundedSender<SerialNote>,
) {
    let log = LogWriter::spawn(log);
    let mut buf = vec![0u8; 16 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let (mut seen, mut panicked) = (false, false);
    loop {
        let n = match out.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let now = Instant::now();
        if !seen {
            seen = true;
            let _ = tx.send(SerialNote::FirstOutput(now));
        }
        for m in phases.feed(chunk, now) {
            let _ = tx.send(SerialNote::Milestone(m));
        }
        log.write(chunk).await;
        if !panicked {
            // A marker split across two reads is still found.
            carry.extend_from_slice(chunk);
            if contains(&carry, PANIC_MARKER) {
                panicked = true;
                let _ = tx.send(SerialNote::Panic);
            }
            let keep = carry.len().saturating_sub(PANIC_MARKER.len());
            carry.drain(..keep);
        }
    }
    log.finish().await;
}
