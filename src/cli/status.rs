//! `fkr-qemu status`: asks the running daemon whether it is healthy.
//!
//! Exit code 0 when the daemon answers and is ready, 1 when it answers but is not ready yet (the
//! startup sweep still runs), 6 when no daemon answers.

use std::io::Write;

use time::OffsetDateTime;

use crate::ops::paths::DirArgs;
use crate::ops::{Client, DaemonStatus};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the daemon's status as JSON (the `DaemonStatus` object, see ARCHITECTURE.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dirs: DirArgs,
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    let dirs = args.dirs.resolve()?;
    let status = Client::connect(&dirs.runtime_dir).await?.status().await?;
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&status).expect("serializing the status");
        s.push('\n');
        s
    } else {
        render(&status, OffsetDateTime::now_utc())
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(crate::ops::Error::Output)?;
    if status.ready {
        Ok(())
    } else {
        Err(crate::ops::Error::NotReady.into())
    }
}

fn render(s: &DaemonStatus, now: OffsetDateTime) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let up = (now - s.started_at).whole_seconds().max(0);
    let last_error = match &s.last_forgejo_error {
        Some(e) => format!(
            "{} ({}s ago)",
            e.message,
            (now - e.at).whole_seconds().max(0)
        ),
        None => "none".to_owned(),
    };
    format!(
        "daemon:              pid {}, version {}, up {}s\n\
         ready:               {}\n\
         draining:            {}\n\
         queued jobs:         {}\n\
         running VMs:         {}\n\
         last Forgejo error:  {}\n\
         Forgejo cleanup:     {} pending\n",
        s.pid,
        s.version,
        up,
        yes_no(s.ready),
        yes_no(s.draining),
        s.queued,
        s.running,
        last_error,
        s.forgejo_cleanup_pending
    ) + &vm_lines(s)
        + &fleet_lines(s, now)
}

/// The fleet as Forgejo listed it: per host, its runners (job id, VM name, Forgejo's status).
fn fleet_lines(s: &DaemonStatus, now: OffsetDateTime) -> String {
    let Some(at) = s.fleet_at else {
        return String::new();
    };
    let mut hosts: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for r in &s.fleet {
        hosts
            .entry(r.host.as_str())
            .or_default()
            .push(format!("job {} on {} ({})", r.job_id, r.name, r.status));
    }
    let mut out = format!(
        "fleet (Forgejo, {}s ago): {} host(s) with runners\n",
        (now - at).whole_seconds().max(0),
        hosts.len()
    );
    for (host, runners) in hosts {
        out += &format!("  {host}: {}\n", runners.join(", "));
    }
    out
}

/// One line per VM: who its QEMU runs as, and its memory and disk against their limits.
fn vm_lines(s: &DaemonStatus) -> String {
    let mib = |b: Option<u64>| b.map_or("?".to_owned(), |b| (b >> 20).to_string());
    s.vms
        .iter()
        .map(|v| match &v.limits {
            Some(l) => format!(
                "  {} ({}): uid {}, memory {}/{} MiB, disk {}/{} MiB, {}\n",
                v.name,
                v.state,
                l.uid.map_or("-".to_owned(), |u| u.to_string()),
                mib(l.memory_used),
                mib(l.memory_max),
                mib(l.disk_used),
                l.disk_max >> 20,
                match (&l.scope, &l.cgroup) {
                    (Some(scope), _) => format!("scope {scope}"),
                    (None, Some(c)) => format!("cgroup {}", c.display()),
                    (None, None) => "cgroup -".to_owned(),
                },
            ),
            None => format!("  {} ({})\n", v.name, v.state),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::LastError;

    #[test]
    fn renders_every_field() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1);
        let mut s = DaemonStatus::new();
        s.pid = 99;
        s.started_at = OffsetDateTime::UNIX_EPOCH;
        s.ready = true;
        s.queued = 3;
        s.running = 2;
        s.last_forgejo_error = Some(LastError {
            at: now - time::Duration::seconds(30),
            message: "GET /api/v1/version: HTTP 502".into(),
        });
        let t = render(&s, now);
        assert!(t.contains("pid 99"), "{t}");
        assert!(t.contains("up 3600s"), "{t}");
        assert!(t.contains("ready:               yes"), "{t}");
        assert!(t.contains("queued jobs:         3"), "{t}");
        assert!(t.contains("running VMs:         2"), "{t}");
        assert!(t.contains("HTTP 502 (30s ago)"), "{t}");
        assert!(
            !t.contains("fleet"),
            "no fleet line before the first listing: {t}"
        );
        s.fleet_at = Some(now - time::Duration::seconds(5));
        s.fleet = vec![
            crate::ops::FleetRunner {
                host: "b".into(),
                job_id: 7,
                name: "fr-0000000b".into(),
                status: "active".into(),
            },
            crate::ops::FleetRunner {
                host: "a".into(),
                job_id: 8,
                name: "fr-0000000a".into(),
                status: "offline".into(),
            },
        ];
        let t = render(&s, now);
        assert!(t.contains("fleet (Forgejo, 5s ago): 2 host(s)"), "{t}");
        assert!(
            t.contains("  a: job 8 on fr-0000000a (offline)\n  b: job 7 on fr-0000000b (active)"),
            "{t}"
        );
    }
}
