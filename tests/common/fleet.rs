//! Several hosts serving one Forgejo: the emulator as a process in an `upstream` namespace, and each
//! host in a namespace of its own with its own link to upstream (and, once `serve` runs, its own
//! `fkr0` bridge, nftables tables and taps), its own state and runtime dirs, config and `host_id`
//! (`host-a`, `host-b`, …). Every host has the same `ci_password_key_file`. Everything dies with the
//! namespaces on Drop.
//!
//! Each host's link is a veth pair (`up0` in the host, `eth<i>` in upstream) on a /27 of
//! 203.0.113.0/24 (TEST-NET-3, a "public" range the firewall lets through); upstream has the
//! emulator's address, 203.0.113.1, on `eth0`, and each host routes everything to upstream.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use fkr_qemu::forgejo::{token_minter, TokenMinter};
use fkr_qemu::ops::{DaemonStatus, JobOutcome};

use super::daemon::{self, emulator_bin, Serve, Settings};
use super::emulator::{Emulator, RunnerView};
use super::links::vm_links;
use super::netns::NetNs;
use super::prometheus::Exposition;
use super::uplink::Uplink;

/// The emulator's address, in upstream.
pub const EMU_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// The hosts and the emulator they serve.
pub struct Fleet {
    /// Dropped first: the emulator process lives in `upstream`.
    pub emu: Emulator,
    pub hosts: Vec<Host>,
    /// The fake guests' ways out (see [`Uplink`]); dropped before the namespaces.
    _uplinks: Vec<Uplink>,
    /// Held for its Drop (after the hosts', whose links end in it).
    _upstream: NetNs,
    /// Holds the hosts' dirs and the key file; removed on Drop.
    _dir: tempfile::TempDir,
}

/// One host: its namespace, files and config.
pub struct Host {
    /// `host_id` (`host-a`, `host-b`, … unless its settings say otherwise).
    pub id: String,
    pub ns: NetNs,
    /// Holds its config, logs, `state/` and `run/`.
    pub dir: PathBuf,
    pub config: PathBuf,
    admin_token: String,
}

/// `a`, `b`, … for host `i`.
fn letter(i: usize) -> char {
    (b'a' + i as u8) as char
}

impl Fleet {
    /// One host per entry of `settings`, each routed to upstream, all sharing a password key.
    pub fn new(settings: Vec<Settings>) -> Fleet {
        assert!((1..=7).contains(&settings.len()), "1 to 7 hosts");
        let upstream = NetNs::create("fkrt-up");
        let net = format!("--net=/run/netns/{}", upstream.name());
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("ci-password-key");
        std::fs::write(&key_file, format!("{:032x}\n", rand_u128())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut namespaces = Vec::new();
        for i in 0..settings.len() {
            let ns = NetNs::create(&format!("fkrt-h{}", letter(i)));
            link_to_upstream(&ns, &upstream, i);
            namespaces.push(ns);
        }
        let emu = Emulator::spawn(
            &emulator_bin(),
            &format!("{EMU_ADDR}:0"),
            &["nsenter", &net, "--"],
        );
        // A fake QEMU whose "guest" runs its job (`runner*`) speaks to Forgejo itself; in the
        // sandbox's network namespace it reaches nothing, so it goes through an uplink.
        // Several hosts may share one fake.
        let mut fakes: Vec<&std::path::Path> =
            settings.iter().filter_map(|s| s.qemu.as_deref()).collect();
        fakes.sort();
        fakes.dedup();
        let uplinks: Vec<Uplink> = fakes
            .into_iter()
            .filter_map(|q| Uplink::for_fake_qemu(q, &upstream, emu.url()))
            .collect();
        let hosts = settings
            .into_iter()
            .zip(namespaces)
            .enumerate()
            .map(|(i, (mut s, ns))| {
                let id = s
                    .host_id
                    .get_or_insert_with(|| format!("host-{}", letter(i)))
                    .clone();
                s.ci_password_key_file = Some(key_file.clone());
                let hdir = dir.path().join(&id);
                std::fs::create_dir(&hdir).unwrap();
                let config = hdir.join("config.toml");
                daemon::write_config(&config, &hdir, &s, emu.url(), &EMU_ADDR.to_string());
                Host {
                    id,
                    ns,
                    dir: hdir,
                    config,
                    admin_token: emu.admin_token().to_owned(),
                }
            })
            .collect();
        Fleet {
            emu,
            hosts,
            _uplinks: uplinks,
            _upstream: upstream,
            _dir: dir,
        }
    }

    /// Every runner registered so far (live or deleted) that claims job `job_id`, in id order.
    pub fn claims_on(&self, job_id: i64) -> Vec<Claim> {
        claims(&self.emu.runners_ever())
            .into_iter()
            .filter(|c| c.job_id == job_id)
            .collect()
    }
}

/// A runner registered by some host for a job, as Forgejo shows it.
#[derive(Debug, Clone)]
pub struct Claim {
    pub host: String,
    pub job_id: i64,
    pub runner: RunnerView,
}

impl Claim {
    /// Its VM booted and the runner in it spoke to Forgejo (`Declare`).
    pub fn booted(&self) -> bool {
        !self.runner.version.is_empty()
    }
}

/// The claims among `runners`: runners whose description is `fkr-qemu@<host> job <id> …`.
pub fn claims(runners: &[RunnerView]) -> Vec<Claim> {
    runners
        .iter()
        .filter_map(|r| {
            let rest = r.description.strip_prefix("fkr-qemu@")?;
            let (host, rest) = rest.split_once(" job ")?;
            let job_id = rest.split(' ').next()?.parse().ok()?;
            Some(Claim {
                host: host.to_owned(),
                job_id,
                runner: r.clone(),
            })
        })
        .collect()
}

fn rand_u128() -> u128 {
    use rand::Rng;
    rand::thread_rng().gen()
}

/// Host `i`'s veth pair to upstream, on 203.0.113.<32 i>/27: upstream `.32i+1`, host `.32i+2`
/// (host 0's upstream side is the emulator's address).
fn link_to_upstream(host: &NetNs, upstream: &NetNs, i: usize) {
    let base = 32 * i as u8;
    let up = Ipv4Addr::new(203, 0, 113, base + 1);
    let me = Ipv4Addr::new(203, 0, 113, base + 2);
    let peer = format!("eth{i}");
    host.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        upstream.name(),
    ]);
    host.ip(&["addr", "add", &format!("{me}/27"), "dev", "up0"]);
    host.ip(&["link", "set", "up0", "up"]);
    upstream.ip(&["addr", "add", &format!("{up}/27"), "dev", &peer]);
    upstream.ip(&["link", "set", &peer, "up"]);
    host.ip(&["route", "add", "default", "via", &up.to_string()]);
}

impl Host {
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Starts `fkr-qemu serve` in this host's namespace; its log goes to `<dir>/serve-<n>.log`.
    pub fn serve(&self, n: u32) -> Serve {
        self.serve_env(n, &[])
    }

    /// [`Host::serve`] with more environment variables.
    pub fn serve_env(&self, n: u32, env: &[(&str, &str)]) -> Serve {
        daemon::start_serve(
            &self.ns,
            &self.config,
            self.dir.join(format!("serve-{n}.log")),
            self.runtime_dir(),
            &self.admin_token,
            env,
        )
    }

    /// The answer to `status` on this host's control socket; `None` while none answers.
    pub fn status(&self) -> Option<DaemonStatus> {
        daemon::status_of(&self.runtime_dir())
    }

    pub fn metrics(&self) -> Exposition {
        daemon::metrics_in(&self.ns)
    }

    /// How many dispatched jobs ended with `outcome` on this host.
    pub fn finished(&self, outcome: JobOutcome) -> u64 {
        self.metrics().get(&format!(
            "fkr_qemu_jobs_finished_total{{outcome=\"{}\"}}",
            outcome.as_str()
        )) as u64
    }

    /// Names of the job tokens (`orch-<job>-<host id>-<hex>`) this host minted for `login` that
    /// exist in Forgejo.
    pub fn tokens(&self, emu: &Emulator, login: &str) -> Vec<String> {
        emu.token_names(login)
            .into_iter()
            .filter(|t| matches!(token_minter(t), Some(TokenMinter::Host(h)) if h == self.id))
            .collect()
    }

    /// This host's VM taps (`fr-…`) that exist now.
    #[allow(dead_code)] // not every test binary with a fleet waits for taps
    pub fn taps(&self) -> Vec<String> {
        vm_links(&self.ns)
    }

    /// Asserts that this host left no VM directory, tap or QEMU.
    pub fn assert_clean(&self) {
        let dirs = daemon::vm_dirs_in(&self.runtime_dir());
        assert!(dirs.is_empty(), "{}: per-VM dirs left: {dirs:?}", self.id);
        let taps = vm_links(&self.ns);
        assert!(taps.is_empty(), "{}: taps left: {taps:?}", self.id);
        let qemus = self.qemus();
        assert!(qemus.is_empty(), "{}: QEMUs left: {qemus:?}", self.id);
    }

    /// Pids of this host's QEMUs (their command line names its runtime dir).
    pub fn qemus(&self) -> Vec<u32> {
        daemon::qemus_in(&self.runtime_dir())
    }
}
