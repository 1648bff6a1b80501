//! Taking over a VM that a previous daemon started (it crashed, was killed, or handed over for an
//! upgrade). The VM's `vm.json` says everything needed; nothing secret is. A VM is taken over only
//! when the process it recorded is still that QEMU — same pid, same start time, same command line
//! (a recycled pid never qualifies) — and its QMP socket answers. Then the driver supervises it to
//! its end like a VM it started itself (see `driver::supervise_adopted`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::driver::{supervise_adopted, Adopted};
use super::meta::VmMeta;
use super::qmp::QmpClient;
use super::{cgroup, disk, files, sandbox, Error, VmConfig, VmHandle};
use crate::types::VmName;

/// How long a live QEMU's QMP may take to greet a new client.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an adopted QEMU (not our child: no `waitpid`) is looked for in `/proc`.
const EXIT_POLL: Duration = Duration::from_millis(100);

/// Why a VM was not taken over (it is swept instead).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("its vm.json is missing or unreadable")]
    NoRecord,
    #[error("QEMU was never started")]
    NotSpawned,
    #[error("its record has no process identity (written by an older version)")]
    NoIdentity,
    #[error("QEMU (pid {0}) is gone")]
    Gone(u32),
    #[error("pid {0} is now another process (its start time or command line differ)")]
    Recycled(u32),
    #[error("QMP does not answer: {0}")]
    Qmp(String),
    #[error("its uid {0} is held by another process")]
    UidBusy(u32),
    #[error(transparent)]
    Vm(#[from] Error),
}

/// `/proc/<pid>/stat`: the process state and its start time (field 22, clock ticks since boot).
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields follow its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// When process `pid` started, or `None` if there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// The process's command line, argument by argument.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The process whose command line is exactly `argv`, if one runs.
fn with_cmdline(argv: &[String]) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| cmdline(*pid).as_deref() == Some(argv))
}

/// A QEMU process this daemon did not spawn. Confined VMs (the daemon is root) are known by their
/// cgroup: its processes are the VM, whatever their command line says or which pid they got, and
/// killing the VM kills the cgroup. Unconfined ones (a user's `boot-test`) by pid and start time.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    start: u64,
    cgroup: Option<PathBuf>,
}

impl Process {
    /// The VM `meta` recorded, if it still runs. Confined: the record's cgroup holds a process;
    /// its leader is the recorded pid where that is still in it, else the process of the VM's uid.
    /// Unconfined: the recorded pid with its start time and command line; a record written just
    /// before the spawn (the daemon died before it could add the pid) is matched by its command
    /// line alone: it names the VM's own dir and descriptors, so only that QEMU has it.
    pub fn find(meta: &VmMeta) -> Result<Process, AdoptError> {
        match &meta.cgroup {
            Some(dir) if sandbox::privileged() => Self::in_cgroup(meta, dir),
            _ => Self::by_pid(meta),
        }
    }

    fn in_cgroup(meta: &VmMeta, dir: &Path) -> Result<Process, AdoptError> {
        let procs = cgroup::procs_of(dir);
        let leader = meta
            .pid
            .filter(|p| procs.contains(p))
            .or_else(|| {
                procs
                    .iter()
                    .copied()
                    .find(|p| meta.uid.is_none() || uid_of(*p) == meta.uid)
            })
            .or_else(|| procs.first().copied());
        let Some(pid) = leader else {
            return Err(match meta.pid {
                Some(pid) => AdoptError::Gone(pid),
                None => AdoptError::NotSpawned,
            });
        };
        let start = start_time(pid).ok_or(AdoptError::Gone(pid))?;
        Ok(Process {
            pid,
            start,
            cgroup: Some(dir.to_owned()),
        })
    }

    fn by_pid(meta: &VmMeta) -> Result<Process, AdoptError> {
        if meta.argv.is_empty() {
            return Err(AdoptError::NoIdentity);
        }
        let (pid, start) = match (meta.pid, meta.pid_start) {
            (Some(pid), Some(start)) => (pid, start),
            (Some(_), None) => return Err(AdoptError::NoIdentity),
            (None, _) => {
                let pid = with_cmdline(&meta.argv).ok_or(AdoptError::NotSpawned)?;
                let start = start_time(pid).ok_or(AdoptError::Gone(pid))?;
                (pid, start)
            }
        };
        match stat(pid) {
            None | Some(('Z' | 'X', _)) => return Err(AdoptError::Gone(pid)),
            Some((_, s)) if s != start => return Err(AdoptError::Recycled(pid)),
            Some(_) => {}
        }
        if cmdline(pid).as_ref() != Some(&meta.argv) {
            return Err(AdoptError::Recycled(pid));
        }
        Ok(Process {
            pid,
            start,
            cgroup: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Still running: its cgroup holds a process (confined), or the pid is still this process (a
    /// zombie waiting for init to reap it counts as gone).
    pub fn alive(&self) -> bool {
        match &self.cgroup {
            Some(dir) => cgroup::procs_of(dir)
                .into_iter()
                .any(|p| !matches!(stat(p), None | Some(('Z' | 'X', _)))),
            None => {
                matches!(stat(self.pid), Some((state, start)) if start == self.start && state != 'Z' && state != 'X')
            }
        }
    }

    /// Returns once the process is gone.
    pub async fn exited(&self) {
        while self.alive() {
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    /// SIGKILL to the whole cgroup, or to the pid while it is still this process.
    pub fn kill(&self) {
        if let Some(dir) = &self.cgroup {
            cgroup::kill_cgroup(dir);
        } else if self.alive() {
            if let Ok(pid) = i32::try_from(self.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// The real uid of process `pid` (`Uid:` of `/proc/<pid>/status`).
pub(crate) fn uid_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether the process `meta` recorded is still that QEMU (no side effect: a cheap first check).
pub fn check_process(meta: &VmMeta) -> Result<(), AdoptError> {
    Process::find(meta).map(|_| ())
}

/// Takes over VM `name`: checks the process, re-takes its uid lease, cgroup and disk reservation,
/// connects to its QMP and serial sockets, and hands it to a supervisor.
pub async fn adopt(config: &VmConfig, name: &VmName) -> Result<VmHandle, AdoptError> {
    let dir = config.vms_dir().join(name.as_str());
    let meta = VmMeta::read(&dir).ok_or(AdoptError::NoRecord)?;
    let process = Process::find(&meta)?;
    let privileged = sandbox::privileged();
    let uid = match meta.uid {
        Some(uid) if privileged => {
            Some(sandbox::lease_uid(&config.runtime_root, uid)?.ok_or(AdoptError::UidBusy(uid))?)
        }
        _ => None,
    };
    let cgroup = match &meta.cgroup {
        Some(recorded) if privileged => {
            let host = super::confine::host(config).await?;
            cgroup::VmCgroup::existing(
                host.layout(),
                meta.scope.as_deref(),
                recorded,
                name.as_str(),
            )
        }
        _ => None,
    };
    let disk = disk::adopt_reservation(meta.disk_max, &meta.disk_dir.join(files::OVERLAY));
    let qmp = QmpClient::connect(&dir.join(files::QMP), QMP_TIMEOUT)
        .await
        .map_err(|e| AdoptError::Qmp(e.to_string()))?;
    let serial = match tokio::net::UnixStream::connect(dir.join(files::SERIAL)).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(vm = %name, "cannot reconnect to the serial console ({e}); its log ends here");
            None
        }
    };
    let qemu_bin = PathBuf::from(&meta.argv[0]);
    Ok(supervise_adopted(
        config,
        Adopted {
            name: name.clone(),
            meta,
            dir,
            process,
            qmp,
            serial,
            uid,
            cgroup,
            disk,
            qemu_bin,
        },
    )?)
}

/// The VM dirs under `<runtime_root>/vms` (names only; what each holds is for [`adopt`] to judge).
pub fn vm_dirs(config: &VmConfig) -> Vec<VmName> {
    let Ok(entries) = std::fs::read_dir(config.vms_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<VmName> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| VmName::parse(&e.file_name().to_string_lossy()).ok())
        .collect();
    names.sort();
    names
}

/// The VM dir's record, if any (for the caller's own checks before adopting).
pub fn record(config: &VmConfig, name: &VmName) -> Option<VmMeta> {
    VmMeta::read(&config.vms_dir().join(name.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of(pid: u32, start: Option<u64>, argv: Vec<String>) -> VmMeta {
        VmMeta {
            name: VmName::parse("fr-0123abcd").unwrap(),
            created_at: time::OffsetDateTime::now_utc(),
            pid: Some(pid),
            pid_start: start,
            argv,
            deadline_at: None,
            accel: None,
            serial_log: "/nonexistent".into(),
            disk_dir: "/nonexistent".into(),
            disk_max: 0,
            uid: None,
            cgroup: None,
            scope: None,
            job: None,
        }
    }

    #[test]
    fn a_process_is_found_only_with_its_pid_start_time_and_command_line() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = start_time(pid).expect("a running child has a start time");
        // The parent may return from spawn before the kernel has published the new command line.
        let mut argv = Vec::new();
        for _ in 0..200 {
            argv = cmdline(pid).unwrap();
            if !argv.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(argv, ["sleep", "30"]);
        let p = Process::find(&meta_of(pid, Some(start), argv.clone())).unwrap();
        assert!(p.alive());
        // The same pid with another start time: a recycled pid.
        assert!(matches!(
            Process::find(&meta_of(pid, Some(start + 1), argv.clone())),
            Err(AdoptError::Recycled(_))
        ));
        // Another command line.
        assert!(matches!(
            Process::find(&meta_of(
                pid,
                Some(start),
                vec!["qemu-system-x86_64".into()]
            )),
            Err(AdoptError::Recycled(_))
        ));
        assert!(matches!(
            Process::find(&meta_of(pid, None, argv.clone())),
            Err(AdoptError::NoIdentity)
        ));
        // A record without the pid (the daemon died right after the spawn): found by argv.
        let mut unrecorded = meta_of(pid, None, argv.clone());
        unrecorded.pid = None;
        assert_eq!(Process::find(&unrecorded).unwrap().pid(), pid);
        unrecorded.argv = vec!["sleep".into(), "31".into()];
        assert!(matches!(
            Process::find(&unrecorded),
            Err(AdoptError::NotSpawned)
        ));
        p.kill();
        child.wait().unwrap();
        assert!(!p.alive());
        assert!(matches!(
            Process::find(&meta_of(pid, Some(start), argv)),
            Err(AdoptError::Gone(_))
        ));
    }

    #[test]
    fn stat_survives_a_command_name_with_parentheses_and_spaces() {
        // Our own process: its start time is stable and its state is running.
        let me = std::process::id();
        let (state, start) = stat(me).unwrap();
        assert_ne!(state, 'Z');
        assert_eq!(start_time(me), Some(start));
    }
}
