//! Harness for `serve` tests on one host: the emulator as a process in an `upstream` namespace,
//! `fkr-qemu serve` (the real binary, see `daemon.rs`) as a child process in a `host` namespace
//! routed to it, a config in a temp dir, and helpers to see what `serve` is doing and what it left
//! behind. Everything dies with the namespaces on Drop.

use std::path::PathBuf;

use fkr_qemu::forgejo::TOKEN_PREFIX;
use fkr_qemu::ops::{DaemonStatus, JobOutcome};
use fkr_qemu::types::VmName;

use super::daemon::{self, emulator_bin, Serve, Settings};
use super::emulator::Emulator;
use super::links::vm_links;
use super::prometheus::Exposition;
use super::topology::Topology;
use super::uplink::Uplink;

/// Topology + emulator + config: everything a `serve` run needs.
pub struct World {
    /// Dropped first: the emulator process lives in `topo`'s upstream namespace.
    pub emu: Emulator,
    /// A fake QEMU's way to the emulator (see `uplink.rs`).
    _uplink: Option<Uplink>,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl World {
    pub const EMU_ADDR: &'static str = "203.0.113.1";

    pub fn new(settings: Settings) -> World {
        let topo = Topology::new();
        let net = format!("--net=/run/netns/{}", topo.upstream.name());
        let emu = Emulator::spawn(
            &emulator_bin(),
            &format!("{}:0", Self::EMU_ADDR),
            &["nsenter", &net, "--"],
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        daemon::write_config(&config, dir.path(), &settings, emu.url(), Self::EMU_ADDR);
        let uplink = settings
            .qemu
            .as_deref()
            .and_then(|q| Uplink::for_fake_qemu(q, &topo.upstream, emu.url()));
        World {
            emu,
            _uplink: uplink,
            topo,
            dir,
            config,
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts `fkr-qemu serve` in the host namespace; its log goes to `<dir>/serve-<n>.log`.
    pub fn serve(&self, n: u32) -> Serve {
        daemon::start_serve(
            &self.topo.host,
            &self.config,
            self.dir.path().join(format!("serve-{n}.log")),
            self.runtime_dir(),
            self.emu.admin_token(),
            &[],
        )
    }

    /// The answer to `status` on the daemon's control socket; `None` while none answers.
    pub fn status(&self) -> Option<DaemonStatus> {
        daemon::status_of(&self.runtime_dir())
    }

    /// The daemon's metrics (its `/metrics` endpoint, scraped from the host namespace), checked to
    /// be valid OpenMetrics text.
    pub fn metrics(&self) -> Exposition {
        daemon::metrics_in(&self.topo.host)
    }

    /// How many dispatched jobs ended with `outcome` (`fkr_qemu_jobs_finished_total`).
    pub fn finished(&self, outcome: JobOutcome) -> u64 {
        self.metrics().get(&format!(
            "fkr_qemu_jobs_finished_total{{outcome=\"{}\"}}",
            outcome.as_str()
        )) as u64
    }

    /// VM directories under the runtime dir.
    pub fn vm_dirs(&self) -> Vec<String> {
        daemon::vm_dirs_in(&self.runtime_dir())
    }

    /// Our interfaces (named like VMs) in the host namespace.
    pub fn taps(&self) -> Vec<String> {
        vm_links(&self.topo.host)
    }

    /// Pids of QEMUs started for this world (their command line names our runtime dir).
    pub fn qemus(&self) -> Vec<u32> {
        daemon::qemus_in(&self.runtime_dir())
    }

    /// Job tokens (named with the crate's token prefix) of `login` in Forgejo.
    pub fn job_tokens(&self, login: &str) -> Vec<String> {
        self.emu
            .token_names(login)
            .into_iter()
            .filter(|t| t.starts_with(TOKEN_PREFIX))
            .collect()
    }

    /// Asserts that no VM, file, tap, token or runner of ours is left.
    pub fn assert_clean(&self, ci_user: &str) {
        assert!(
            self.vm_dirs().is_empty(),
            "per-VM dirs left: {:?}",
            self.vm_dirs()
        );
        assert!(self.taps().is_empty(), "taps left: {:?}", self.taps());
        assert!(self.qemus().is_empty(), "qemu left: {:?}", self.qemus());
        self.assert_no_job_credentials(ci_user);
    }

    /// Asserts that no job token of `ci_user` and no runner of ours is left.
    pub fn assert_no_job_credentials(&self, ci_user: &str) {
        let tokens = self.job_tokens(ci_user);
        assert!(tokens.is_empty(), "tokens left: {tokens:?}");
        let runners = self.emu.runner_names();
        assert!(
            !runners.iter().any(|r| r.starts_with(VmName::PREFIX)),
            "runners left: {runners:?}"
        );
    }
}
