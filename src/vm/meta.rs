//! `vm.json`: the typed record of one VM in its runtime dir. The driver writes it (atomically, so a
//! reader never sees half a file); `list`, `console` and `status` read it when the daemon cannot
//! answer. The one contract between the driver and `ops` for what is on disk.

use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{files, Error};
use crate::types::{Accel, VmName};

/// What the owner of a VM records about the job it runs (written with the VM's own fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMeta {
    /// The Forgejo job id.
    pub job_id: i64,
    pub owner: String,
    pub repo: String,
    /// The guest's address on the host bridge.
    pub address: Option<Ipv4Addr>,
    /// The job attempt's handle (what the runner was bound to).
    #[serde(default)]
    pub handle: String,
    #[serde(default)]
    pub repo_id: i64,
    /// The job's ephemeral runner (named like the VM).
    #[serde(default)]
    pub runner_id: Option<i64>,
    /// The job's registry token: enough to revoke it, never the secret.
    #[serde(default)]
    pub token: Option<TokenMeta>,
    /// Until when the runner may take to pick the job up (wall clock: it survives a restart).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub boot_deadline_at: Option<OffsetDateTime>,
}

/// A minted token as recorded for a restarted daemon: its owner and its id and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMeta {
    pub username: String,
    /// The repository the CI user belongs to.
    pub user_repo_id: i64,
    pub id: i64,
    pub name: String,
}

/// The content of `<runtime_root>/vms/<name>/vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMeta {
    pub name: VmName,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// QEMU's pid, once spawned.
    pub pid: Option<u32>,
    /// When that process started (`/proc/<pid>/stat` field 22, clock ticks since boot): with
    /// `argv`, what tells our QEMU from a process that got the same pid later.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// QEMU's command line as spawned (program first); no secret is ever in it.
    #[serde(default)]
    pub argv: Vec<String>,
    /// The VM's whole time budget ends here (wall clock: it survives a restart).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub deadline_at: Option<OffsetDateTime>,
    /// The accelerator QEMU runs under: `kvm` or `tcg`.
    pub accel: Option<Accel>,
    pub serial_log: PathBuf,
    /// `<disk_dir>/<name>`: overlay, seed, VARS copy.
    pub disk_dir: PathBuf,
    /// How far the overlay may grow, in bytes.
    pub disk_max: u64,
    /// The uid QEMU runs as (when the driver drops privileges).
    pub uid: Option<u32>,
    /// The VM's cgroup directory (cgroup v1: the memory hierarchy's): its processes are the VM's.
    pub cgroup: Option<PathBuf>,
    /// systemd hosts: the VM's transient scope (`machine-<name>.scope`).
    #[serde(default)]
    pub scope: Option<String>,
    /// The job, when the VM runs one (flattened: the keys sit beside the VM's own).
    #[serde(flatten)]
    pub job: Option<JobMeta>,
}

impl VmMeta {
    /// Reads `vm.json` from a VM dir; `None` when it is missing or not a valid record (a VM whose
    /// QEMU was not spawned yet, or a file from an incompatible version).
    pub fn read(vm_dir: &Path) -> Option<VmMeta> {
        let bytes = std::fs::read(vm_dir.join(files::META)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes `vm.json` into a VM dir (0600) through a temporary file and a rename, so the record
    /// is either the old one or the new one, never a torn write.
    pub fn write(&self, vm_dir: &Path) -> Result<(), Error> {
        use std::io::Write;
        let path = vm_dir.join(files::META);
        let tmp = vm_dir.join(format!(".{}.tmp", files::META));
        let json = serde_json::to_vec_pretty(self).map_err(|e| {
            Error::io(
                format!("encoding {}", path.display()),
                std::io::Error::other(e),
            )
        })?;
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&json)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(job: Option<JobMeta>) -> VmMeta {
        VmMeta {
            name: VmName::parse("fr-0123abcd").unwrap(),
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            pid: Some(42),
            pid_start: Some(1234),
            argv: vec!["qemu-system-x86_64".into(), "-name".into()],
            deadline_at: Some(OffsetDateTime::from_unix_timestamp(1_700_003_600).unwrap()),
            accel: Some(Accel::Tcg),
            serial_log: "/var/lib/fkr-qemu/logs/fr-0123abcd.serial.log".into(),
            disk_dir: "/var/lib/fkr-qemu/disks/fr-0123abcd".into(),
            disk_max: 1 << 30,
            uid: Some(1_960_000_001),
            cgroup: None,
            scope: None,
            job,
        }
    }

    #[test]
    fn round_trips_with_and_without_a_job_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(VmMeta::read(dir.path()), None);
        let bare = meta(None);
        bare.write(dir.path()).unwrap();
        assert_eq!(VmMeta::read(dir.path()), Some(bare));
        let with_job = meta(Some(JobMeta {
            job_id: 7,
            owner: "alice".into(),
            repo: "web".into(),
            address: Some(Ipv4Addr::new(10, 88, 0, 2)),
            handle: "h-1".into(),
            repo_id: 3,
            runner_id: Some(11),
            token: Some(TokenMeta {
                username: "alice-web-ci".into(),
                user_repo_id: 3,
                id: 5,
                name: "orch-7-host-00ff".into(),
            }),
            boot_deadline_at: Some(OffsetDateTime::from_unix_timestamp(1_700_000_900).unwrap()),
        }));
        with_job.write(dir.path()).unwrap();
        assert_eq!(VmMeta::read(dir.path()), Some(with_job));
        let text = std::fs::read_to_string(dir.path().join(files::META)).unwrap();
        // The job's keys sit beside the VM's (the format `list` has always read).
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["job_id"], 7);
        assert_eq!(v["accel"], "tcg");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [files::META], "no temporary file is left");
    }

    #[test]
    fn a_foreign_or_torn_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(files::META), b"{\"name\": \"fr-01").unwrap();
        assert_eq!(VmMeta::read(dir.path()), None);
        std::fs::write(dir.path().join(files::META), b"{\"name\": \"../etc\"}").unwrap();
        assert_eq!(VmMeta::read(dir.path()), None);
    }
}
