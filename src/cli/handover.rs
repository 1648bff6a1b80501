//! `fkr-qemu handover`: an upgrade without draining (ARCHITECTURE.md, "Restarts: taking VMs
//! over"). Sends the running daemon SIGUSR2: it stops discovery, lets go of every VM without
//! stopping it, and re-executes its binary (after a package upgrade, the new version), which
//! takes the VMs over at start. Waits until that daemon answers ready again.
//!
//! Exit code 0 once the new daemon is ready; 1 when the daemon is still starting (not ready to
//! hand over); 6 when no daemon answers, it is draining, or no new daemon answers in time.

use std::io::Write;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::ops::paths::DirArgs;
use crate::ops::{Client, DaemonStatus, Error};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to wait, in seconds, for the new daemon to answer ready (its start includes
    /// taking the VMs over and asking Forgejo about their jobs).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub dirs: DirArgs,
}

async fn status(runtime_dir: &std::path::Path) -> Result<DaemonStatus, crate::Error> {
    Ok(Client::connect(runtime_dir).await?.status().await?)
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    let dirs = args.dirs.resolve()?;
    let before = status(&dirs.runtime_dir).await?;
    if !before.handover {
        // SIGUSR2 would kill a daemon that does not handle it, and its VMs with it.
        return Err(Error::Handover(format!(
            "the running daemon (version {}) cannot hand over; restart it instead (it drains first)",
            before.version
        ))
        .into());
    }
    if before.draining {
        return Err(Error::Handover(
            "the daemon is draining (stopping); nothing to hand over".into(),
        )
        .into());
    }
    if !before.ready {
        return Err(Error::NotReady.into());
    }
    let pid = i32::try_from(before.pid)
        .map_err(|_| Error::Handover(format!("the daemon reports pid {}", before.pid)))?;
    kill(Pid::from_raw(pid), Signal::SIGUSR2)
        .map_err(|e| Error::Handover(format!("cannot signal the daemon (pid {pid}): {e}")))?;
    let asked = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    // The same process (re-executed) or, under a service manager that restarted it, another one:
    // either way a daemon that started after the request and is ready.
    let after = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(s) = status(&dirs.runtime_dir).await {
            if s.ready && s.started_at > before.started_at {
                break s;
            }
        }
        if asked.elapsed() > timeout {
            return Err(Error::Handover(format!(
                "no new daemon answered ready within {}s (see the daemon's log)",
                timeout.as_secs()
            ))
            .into());
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "handed over in {:.1}s: pid {}, version {} -> {}, {} VM(s) running",
        asked.elapsed().as_secs_f64(),
        after.pid,
        before.version,
        after.version,
        after.vms.len()
    )
    .and_then(|()| out.flush())
    .map_err(Error::Output)?;
    Ok(())
}
