//! The seams of the job pipeline: what one job needs from Forgejo ([`Forge`]), from the host
//! network ([`Network`]) and from the VM driver ([`Vms`], [`RunningVm`]). The pipeline
//! (`job.rs`) only talks to these traits, so its decisions — boot deadline, pick-up, the
//! accelerator retry, release on every failure path — are unit-tested with doubles in
//! milliseconds, without root or QEMU. The live implementations are thin: [`Credentials`] (CI users
//! and tokens over `forgejo::Client`), `net::HostNetwork`, and [`LiveVms`] over `vm::launch`.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::credentials::{CiUserRef, CredentialError, Credentials, TokenRef};
use crate::forgejo::{self, Job, JobStatus, RegisteredRunner, Repository, Runner};
use crate::net::{self, HostNetwork};
use crate::ops::TokenAccess;
use crate::secret::Secret;
use crate::types::{Accel, VmName};
use crate::vm::{self, NetDevice, VmConfig, VmExit, VmHandle, VmResources, VmSpec};

/// What a job needs from Forgejo.
pub(crate) trait Forge: Send + Sync + 'static {
    /// The job's repository (by id: names change, ids do not).
    fn repository(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Repository, forgejo::Error>> + Send;
    /// How far the job's registry token is trusted (`tokens` policy, fork pull requests).
    fn token_access(
        &self,
        job: &Job,
        repo: &Repository,
    ) -> impl Future<Output = TokenAccess> + Send;
    /// The repository's CI user, created on first use.
    fn ci_user(
        &self,
        repo: &Repository,
    ) -> impl Future<Output = Result<CiUserRef, CredentialError>> + Send;
    /// A fresh token of `user` named `name` (`orch-<job>-<host_id>-…`) with `scopes`.
    fn mint_token(
        &self,
        user: &CiUserRef,
        name: &str,
        scopes: &'static [&'static str],
    ) -> impl Future<Output = Result<(TokenRef, Secret), CredentialError>> + Send;
    /// Revokes a token; `false` when it was already gone.
    fn revoke_token(
        &self,
        token: &TokenRef,
    ) -> impl Future<Output = Result<bool, CredentialError>> + Send;
    /// Registers the job's ephemeral runner.
    fn register_runner(
        &self,
        name: &VmName,
        description: &str,
    ) -> impl Future<Output = Result<RegisteredRunner, forgejo::Error>> + Send;
    /// Deletes a runner; `false` when it was already gone.
    fn delete_runner(&self, id: i64) -> impl Future<Output = Result<bool, forgejo::Error>> + Send;
    /// Every runner at the configured level (every host's claims among them).
    fn runners(&self) -> impl Future<Output = Result<Vec<Runner>, forgejo::Error>> + Send;
    /// Whether Forgejo still lists `job` (its handle) as waiting among the jobs of `label`.
    fn still_waiting(
        &self,
        job: &Job,
        label: &str,
    ) -> impl Future<Output = Result<bool, forgejo::Error>> + Send;
}

impl Forge for Credentials {
    async fn repository(&self, id: i64) -> Result<Repository, forgejo::Error> {
        self.client.repository(id).await
    }

    async fn token_access(&self, job: &Job, repo: &Repository) -> TokenAccess {
        Credentials::token_access(self, job, repo).await
    }

    async fn ci_user(&self, repo: &Repository) -> Result<CiUserRef, CredentialError> {
        self.ensure_ci_user(repo).await
    }

    async fn mint_token(
        &self,
        user: &CiUserRef,
        name: &str,
        scopes: &'static [&'static str],
    ) -> Result<(TokenRef, Secret), CredentialError> {
        Credentials::mint_token(self, user, name, scopes).await
    }

    async fn revoke_token(&self, token: &TokenRef) -> Result<bool, CredentialError> {
        Credentials::revoke_token(self, token).await
    }

    async fn register_runner(
        &self,
        name: &VmName,
        description: &str,
    ) -> Result<RegisteredRunner, forgejo::Error> {
        self.client
            .register_runner(name.as_str(), description)
            .await
    }

    async fn delete_runner(&self, id: i64) -> Result<bool, forgejo::Error> {
        self.client.delete_runner(id).await
    }

    async fn runners(&self) -> Result<Vec<Runner>, forgejo::Error> {
        self.client.runners().await
    }

    async fn still_waiting(&self, job: &Job, label: &str) -> Result<bool, forgejo::Error> {
        // Asked after the claim's listing, so only a list requested from now on answers it (shared
        // with discovery and other claims, within the host's job-list rate).
        let labels = [label];
        let jobs = self
            .job_lists
            .list_since(label, tokio::time::Instant::now(), || {
                self.client.jobs(&labels)
            })
            .await?;
        Ok(jobs
            .iter()
            .any(|j| j.status == JobStatus::Waiting && j.handle == job.handle))
    }
}

/// A VM's place on the host network: its address, its network-config for the seed, the tap for
/// QEMU, and the guard that holds tap and lease.
pub(crate) struct Attachment {
    pub address: Ipv4Addr,
    /// cloud-init network-config (version 2) for the guest.
    pub network_config: String,
    /// A duplicate of the tap fd and the guest's MAC, for QEMU.
    pub device: NetDevice,
    /// Holds the tap and the address lease; dropping it deletes the tap and frees the address.
    pub hold: Box<dyn Send>,
}

/// What a job needs from the host network.
pub(crate) trait Network: Send + Sync + 'static {
    /// Leases an address and creates the VM's tap, bound to it.
    fn attach(&self, name: &VmName) -> Result<Attachment, net::Error>;
    /// Takes over the tap and address of a VM that survived a restart; the guard releases them
    /// like [`Attachment::hold`].
    fn adopt(&self, name: &VmName, address: Ipv4Addr) -> Result<Box<dyn Send>, net::Error>;
}

impl Network for HostNetwork {
    fn attach(&self, name: &VmName) -> Result<Attachment, net::Error> {
        let lease = self.allocate_address()?;
        let tap = self.create_tap(name, &lease)?;
        let mac = tap.mac();
        let device = NetDevice {
            tap: tap.fd_for_qemu()?,
            mac,
        };
        Ok(Attachment {
            address: lease.address(),
            network_config: self.network_config(&lease, mac),
            device,
            // The tap goes first (it unregisters the lease's address from the bridge), then the lease.
            hold: Box::new((tap, lease)),
        })
    }

    fn adopt(&self, name: &VmName, address: Ipv4Addr) -> Result<Box<dyn Send>, net::Error> {
        let (tap, lease) = self.adopt_tap(name, address)?;
        Ok(Box::new((tap, lease)))
    }
}

/// What the host learns when a VM's QEMU is up.
#[derive(Debug, Clone)]
pub(crate) struct Started {
    pub pid: u32,
    pub accel: Accel,
    pub serial_log: PathBuf,
    pub resources: VmResources,
}

impl Started {
    /// Puts the running QEMU on a VM's board entry: pid, accelerator, serial log, limits.
    pub fn show(&self, v: &mut crate::ops::VmInfo) {
        v.pid = Some(self.pid);
        v.accel = Some(self.accel);
        v.serial_log = Some(self.serial_log.clone());
        let r = &self.resources;
        v.limits = Some(crate::ops::VmLimits {
            uid: r.uid,
            cgroup: r.cgroup.clone(),
            scope: r.scope.clone(),
            memory_used: None,
            memory_max: None,
            disk_used: None,
            disk_max: r.disk_max,
            overlay: r.overlay.clone(),
        });
    }
}

/// A launched VM, as the pipeline drives it.
pub(crate) trait RunningVm: Send + 'static {
    fn started(&self) -> Started;
    /// Cancelling it runs the stop ladder.
    fn stop_token(&self) -> CancellationToken;
    /// Cancelling it lets go of the VM, running (a handover to the next daemon).
    fn detach_token(&self) -> CancellationToken;
    /// Records the job a warm VM was bound to in its `vm.json` (for a restart to take it over).
    fn record_job(&self, job: vm::JobMeta) -> Result<(), vm::Error>;
    /// The driver's view: `running` once QMP answered.
    fn watch_state(&self) -> watch::Receiver<vm::VmState>;
    /// Waits for the end (teardown included).
    fn wait(self) -> impl Future<Output = Result<VmExit, vm::Error>> + Send;
    /// Warm pool: the host end of the job agent's port (`VmSpec::agent`).
    fn agent_socket(&self) -> PathBuf;
}

impl RunningVm for VmHandle {
    fn started(&self) -> Started {
        Started {
            pid: self.pid(),
            accel: self.accel().accel,
            serial_log: self.serial_log().to_owned(),
            resources: self.resources().clone(),
        }
    }

    fn stop_token(&self) -> CancellationToken {
        VmHandle::stop_token(self)
    }

    fn detach_token(&self) -> CancellationToken {
        VmHandle::detach_token(self)
    }

    fn record_job(&self, job: vm::JobMeta) -> Result<(), vm::Error> {
        VmHandle::record_job(self, job)
    }

    fn watch_state(&self) -> watch::Receiver<vm::VmState> {
        VmHandle::watch_state(self)
    }

    async fn wait(self) -> Result<VmExit, vm::Error> {
        VmHandle::wait(self).await
    }

    fn agent_socket(&self) -> PathBuf {
        self.dir().join(vm::files::AGENT)
    }
}

/// What a job needs from the VM driver.
pub(crate) trait Vms: Send + Sync + 'static {
    type Vm: RunningVm;
    /// Prepares (overlay, seed, VARS copy) and starts a VM.
    fn launch(&self, spec: VmSpec) -> impl Future<Output = Result<Self::Vm, vm::Error>> + Send;
}

/// The VM driver with the host's `[vm]` settings.
pub(crate) struct LiveVms(pub VmConfig);

impl Vms for LiveVms {
    type Vm = VmHandle;

    async fn launch(&self, spec: VmSpec) -> Result<VmHandle, vm::Error> {
        vm::launch(&self.0, spec).await
    }
}
