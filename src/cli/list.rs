//! `fkr-qemu list`: this host's VMs, from the daemon or, when none answers, from the runtime dir.

use std::io::Write;

use serde::Serialize;
use time::OffsetDateTime;

use crate::ops::paths::DirArgs;
use crate::ops::{runtime, Client, VmInfo};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON (`{"daemon_running": bool, "vms": [VmInfo, …]}`, see ARCHITECTURE.md) instead of
    /// a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: DirArgs,
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct Listing {
    /// false: no daemon answered and `vms` was read from the runtime dir.
    daemon_running: bool,
    vms: Vec<VmInfo>,
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    let dirs = args.dirs.resolve()?;
    let listing = match Client::connect(&dirs.runtime_dir).await {
        Ok(mut client) => Listing {
            daemon_running: true,
            vms: client.list().await?,
        },
        Err(crate::ops::Error::DaemonNotRunning(socket)) => {
            eprintln!(
                "note: no fkr-qemu daemon answers on {}; listing what {} holds \
                 (the next `fkr-qemu serve` start sweeps these)",
                socket.display(),
                dirs.vms_dir().display()
            );
            Listing {
                daemon_running: false,
                vms: runtime::scan(&dirs)?,
            }
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&listing).expect("serializing the VM list");
        s.push('\n');
        s
    } else {
        table(&listing.vms, OffsetDateTime::now_utc())
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| crate::ops::Error::Output(e).into())
}

/// Width of the repository column; the whole table stays within 100 columns.
const REPO_WIDTH: usize = 28;

fn table(vms: &[VmInfo], now: OffsetDateTime) -> String {
    let mut s = format!(
        "{:<11} {:>9} {:<REPO_WIDTH$} {:<9} {:<15} {:>7} {:<5} {:>8}\n",
        "NAME", "JOB", "REPOSITORY", "STATE", "ADDRESS", "UPTIME", "ACCEL", "PID"
    );
    for vm in vms {
        let repo = if vm.owner.is_empty() && vm.repo.is_empty() {
            "-".to_owned()
        } else {
            format!("{}/{}", vm.owner, vm.repo)
        };
        let job = if vm.job_id == 0 {
            "-".to_owned()
        } else {
            vm.job_id.to_string()
        };
        s.push_str(&format!(
            "{:<11} {:>9} {:<REPO_WIDTH$} {:<9} {:<15} {:>7} {:<5} {:>8}\n",
            vm.name,
            job,
            ellipsize(&repo, REPO_WIDTH),
            vm.state.as_str(),
            vm.address.as_deref().unwrap_or("-"),
            uptime(now - vm.started_at),
            vm.accel.map_or("-", |a| a.as_str()),
            vm.pid.map_or("-".to_owned(), |p| p.to_string()),
        ));
    }
    if vms.is_empty() {
        s.push_str("(no VMs)\n");
    }
    s
}

fn ellipsize(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(width - 1).collect();
        t.push('…');
        t
    }
}

/// A compact duration: `42s`, `5m03s`, `2h07m`, `3d04h`.
fn uptime(d: time::Duration) -> String {
    let secs = d.whole_seconds().max(0);
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::JobState;

    #[test]
    fn table_fits_100_columns() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(3);
        let vm = VmInfo {
            name: "fr-0123abcd".into(),
            job_id: 123_456_789,
            owner: "a-rather-long-organisation".into(),
            repo: "and-a-long-repository-name".into(),
            state: JobState::Preparing.into(),
            address: Some("100.100.100.100".into()),
            started_at: now - time::Duration::seconds(3 * 3600 + 7 * 60),
            accel: Some(crate::types::Accel::Kvm),
            pid: Some(4_194_304),
            serial_log: None,
            limits: None,
        };
        let t = table(&[vm], now);
        for line in t.lines() {
            assert!(line.chars().count() <= 100, "{line}");
        }
        let row = t.lines().nth(1).unwrap();
        assert!(
            row.starts_with("fr-0123abcd 123456789 a-rather-long-organisation/…"),
            "{row}"
        );
        assert!(row.contains(" 3h07m "), "{row}");
        assert!(row.ends_with(" kvm    4194304"), "{row}");
        assert!(table(&[], now).contains("(no VMs)"));
    }

    #[test]
    fn uptimes() {
        let s = time::Duration::seconds;
        assert_eq!(uptime(s(0)), "0s");
        assert_eq!(uptime(s(65)), "1m05s");
        assert_eq!(uptime(s(7260)), "2h01m");
        assert_eq!(uptime(s(90000)), "1d01h");
        assert_eq!(uptime(s(-5)), "0s");
    }
}
