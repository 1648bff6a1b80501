//! The warm pool: booted VMs that wait for a job, so a job's runner starts in well under a second.
//!
//! A warm VM is booted from the base image with a seed that holds no job secret (hostname,
//! network-config, an empty `#cloud-config`) and the job agent's virtio-serial port
//! (`vm::agent`). Once its agent says READY it waits here; a dispatched job takes it
//! ([`Pool::take`]), registers its runner under the VM's name and, after the claim, delivers the
//! payload over the port (`job.rs`). One job per VM, then power-off: a warm VM is never reused.
//!
//! The [`Pool`] belongs to the scheduler alone (no locks): it boots warm VMs in its `warming` set,
//! keeps the ready ones, and stops the ones it no longer wants in its `retiring` set, whose tasks
//! each own one VM until it is gone. Every warm VM counts in `max_vms` from launch to gone
//! ([`Pool::occupied`]). Replaced: older than `pool.max_age`, or booted from a base image file
//! that has since changed (device, inode, mtime: publishing is a rename). A base image whose first
//! warm VM never says READY within `boot_deadline` has no agent: the pool is off (with a warning)
//! until that file changes, and jobs boot cold as before.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::config::PoolConfig;
use super::job::JobEnv;
use super::ports::{Forge, Network, RunningVm, Vms};
use super::userdata::WARM_USER_DATA;
use crate::ops::{DiscardReason, PoolState, VmInfo, VmState};
use crate::types::VmName;
use crate::vm::agent::{AgentConn, AgentError};
use crate::vm::{self, Seed, VmSpec};

/// Which base image file a warm VM was booted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImageId {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
}

impl ImageId {
    pub(crate) fn of(path: &Path) -> Option<ImageId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(ImageId {
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// A booted VM whose agent said READY, holding no job yet.
pub(crate) struct WarmVm<Vm> {
    pub name: VmName,
    pub vm: Vm,
    pub agent: AgentConn,
    /// Tap and address lease (dropping them releases them).
    pub hold: Box<dyn Send>,
    pub address: Ipv4Addr,
    /// When the agent said READY.
    pub ready_at: Instant,
    /// Host clock minus guest clock (ms), measured at READY.
    pub clock_offset_ms: i64,
    image: Option<ImageId>,
    /// While a job binds to this VM: dropped when the bind is over (either way), which lets the
    /// pool refill (`Pool::binding`).
    binding: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<Vm: RunningVm> WarmVm<Vm> {
    /// A VM whose agent just said READY (`clock_offset_ms`: see [`crate::vm::agent::Ready`]).
    pub(crate) fn ready(
        name: VmName,
        vm: Vm,
        agent: AgentConn,
        hold: Box<dyn Send>,
        address: Ipv4Addr,
        clock_offset_ms: i64,
        image: Option<ImageId>,
    ) -> Self {
        Self {
            name,
            vm,
            agent,
            hold,
            address,
            ready_at: Instant::now(),
            clock_offset_ms,
            image,
            binding: None,
        }
    }

    /// The bind is over (the payload was acknowledged, or the VM is being discarded).
    pub(crate) fn bind_over(&mut self) {
        self.binding = None;
    }

    fn is_dead(&self) -> bool {
        let state = *self.vm.watch_state().borrow();
        state.is_final() || state == vm::VmState::Stopping
    }
}

/// How a warming VM ended up.
pub(crate) enum Warmed<Vm> {
    Ready(WarmVm<Vm>),
    /// Stopped and released already.
    Failed {
        name: VmName,
        reason: DiscardReason,
        detail: String,
        image: Option<ImageId>,
        /// It ran until `boot_deadline` without a READY (what an image without the agent does),
        /// as opposed to failing to launch or dying.
        silent: bool,
    },
}

/// Stops `vm`, waits until it is gone, then releases its tap and lease.
async fn stop_and_release<Vm: RunningVm>(vm: Vm, hold: Box<dyn Send>) {
    vm.stop_token().cancel();
    if let Err(e) = vm.wait().await {
        tracing::warn!("stopping a warm VM: {e}");
    }
    drop(hold);
}

/// Stops a warm VM that will run no job (the owner of the returned future owns the VM until gone).
pub(crate) fn discard<F: Forge, N: Network, V: Vms>(
    env: &Arc<JobEnv<F, N, V>>,
    mut warm: WarmVm<V::Vm>,
    reason: DiscardReason,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    env.metrics.pool_discarded(reason);
    let board = env.board.clone();
    // Over at once, not when the VM is gone: the pool may refill meanwhile.
    warm.bind_over();
    async move {
        let WarmVm { name, vm, hold, .. } = warm;
        stop_and_release(vm, hold).await;
        board.vm_removed(name.as_str());
    }
}

/// The pool. See the module docs.
pub(crate) struct Pool<Vm> {
    cfg: PoolConfig,
    ready: VecDeque<WarmVm<Vm>>,
    warming: JoinSet<Warmed<Vm>>,
    retiring: JoinSet<()>,
    /// Binds in progress (taken warm VMs whose job has not yet delivered its payload): no refill
    /// until they are over, so that a booting VM does not compete for the CPU with the guest that
    /// is starting the job's runner (under TCG a boot takes a whole core).
    binding: JoinSet<()>,
    /// Cancelled at shutdown: warming VMs stop.
    cancel: CancellationToken,
    /// The base image that showed it has no agent: no warm VMs from it.
    no_agent: Option<ImageId>,
    /// A base image one of whose VMs said READY.
    agent_seen: Option<ImageId>,
    /// Failed warm boots in a row, and when to try again.
    failures: u32,
    retry_at: Option<Instant>,
    shut: bool,
}

impl<Vm: RunningVm> Pool<Vm> {
    pub(crate) fn new(cfg: PoolConfig) -> Self {
        Self {
            cfg,
            ready: VecDeque::new(),
            warming: JoinSet::new(),
            retiring: JoinSet::new(),
            binding: JoinSet::new(),
            cancel: CancellationToken::new(),
            no_agent: None,
            agent_seen: None,
            failures: 0,
            retry_at: None,
            shut: false,
        }
    }

    /// VM slots the pool holds: ready, warming and stopping warm VMs.
    pub(crate) fn occupied(&self) -> usize {
        self.ready.len() + self.warming.len() + self.retiring.len()
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Nothing left: no warm VM exists any more.
    pub(crate) fn is_empty(&self) -> bool {
        self.occupied() == 0
    }

    /// The oldest ready warm VM that is still alive, for a job.
    pub(crate) fn take<F: Forge, N: Network, V: Vms<Vm = Vm>>(
        &mut self,
        env: &Arc<JobEnv<F, N, V>>,
    ) -> Option<WarmVm<Vm>> {
        while let Some(mut w) = self.ready.pop_front() {
            if w.is_dead() {
                self.retiring.spawn(discard(env, w, DiscardReason::Died));
                continue;
            }
            env.metrics.set_pool_warm(self.ready.len());
            let (tx, rx) = tokio::sync::oneshot::channel();
            w.binding = Some(tx);
            self.binding.spawn(async move {
                let _ = rx.await;
            });
            return Some(w);
        }
        env.metrics.set_pool_warm(0);
        None
    }

    /// A job did not use the warm VM it took (its claim was lost, or a step before the bind
    /// failed): it waits for the next job.
    pub(crate) fn give_back<F: Forge, N: Network, V: Vms<Vm = Vm>>(
        &mut self,
        env: &Arc<JobEnv<F, N, V>>,
        mut warm: WarmVm<Vm>,
    ) {
        warm.bind_over();
        if self.shut {
            self.retiring
                .spawn(discard(env, warm, DiscardReason::Shutdown));
            return;
        }
        show(
            env,
            &warm.name,
            PoolState::Warm,
            Some(warm.address),
            &warm.vm,
        );
        self.ready.push_front(warm);
        env.metrics.set_pool_warm(self.ready.len());
    }

    /// Replaces ready warm VMs that are too old, booted from a base image that changed, or dead.
    pub(crate) fn maintain<F: Forge, N: Network, V: Vms<Vm = Vm>>(
        &mut self,
        env: &Arc<JobEnv<F, N, V>>,
    ) {
        let current = ImageId::of(&env.settings.base_image);
        let mut keep = VecDeque::new();
        while let Some(w) = self.ready.pop_front() {
            let reason = if w.is_dead() {
                Some(DiscardReason::Died)
            } else if w.image != current {
                Some(DiscardReason::ImageChanged)
            } else if w.ready_at.elapsed() > self.cfg.max_age {
                Some(DiscardReason::Aged)
            } else {
                None
            };
            match reason {
                Some(r) => {
                    tracing::info!(vm = %w.name, "pool: replacing warm VM {} ({})", w.name, r.as_str());
                    self.retiring.spawn(discard(env, w, r));
                }
                None => keep.push_back(w),
            }
        }
        self.ready = keep;
        env.metrics.set_pool_warm(self.ready.len());
    }

    /// Boots warm VMs while the pool is below its size, `free` VM slots allow and `reserve_disk`
    /// finds disk for one (the admission a cold job passes; `None`: no room now, try later).
    pub(crate) fn refill<F: Forge, N: Network, V: Vms<Vm = Vm>>(
        &mut self,
        env: &Arc<JobEnv<F, N, V>>,
        mut free: usize,
        mut reserve_disk: impl FnMut() -> Option<vm::DiskReservation>,
    ) {
        if self.shut || self.cfg.size == 0 || !self.binding.is_empty() {
            return;
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let image = ImageId::of(&env.settings.base_image);
        if image.is_some() && image == self.no_agent {
            return;
        }
        while free > 0 && self.ready.len() + self.warming.len() < self.cfg.size {
            let Some(disk) = reserve_disk() else {
                break;
            };
            free -= 1;
            let name = VmName::generate();
            show_warming(env, &name);
            let (env, cancel) = (env.clone(), self.cancel.child_token());
            let max_age = self.cfg.max_age;
            self.warming
                .spawn(async move { warm_up(env, name, image, disk, max_age, cancel).await });
        }
    }

    /// A warming VM is ready or failed.
    fn warmed<F: Forge, N: Network, V: Vms<Vm = Vm>>(
        &mut self,
        env: &Arc<JobEnv<F, N, V>>,
        joined: Result<Warmed<Vm>, tokio::task::JoinError>,
    ) {
        let warmed = match joined {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("pool: a warming task failed: {e}");
                self.backoff();
                return;
            }
        };
        match warmed {
            Warmed::Ready(w) => {
                self.agent_seen = w.image;
                self.failures = 0;
                self.retry_at = None;
                if self.shut {
                    self.retiring
                        .spawn(discard(env, w, DiscardReason::Shutdown));
                    return;
                }
                tracing::info!(vm = %w.name, "pool: warm VM {} ready", w.name);
                show(env, &w.name, PoolState::Warm, Some(w.address), &w.vm);
                self.ready.push_back(w);
                env.metrics.set_pool_warm(self.ready.len());
            }
            Warmed::Failed {
                name,
                reason,
                detail,
                image,
                silent,
            } => {
                env.metrics.pool_discarded(reason);
                env.board.vm_removed(name.as_str());
                if self.shut {
                    return;
                }
                if silent && image.is_some() && self.agent_seen != image {
                    tracing::warn!(
                        vm = %name,
                        "pool: warm VM {name} never said READY ({detail}): the base image {} seems to have no job agent \
                         (image-builder/ adds it); the warm pool is off until the base image changes, jobs boot cold",
                        env.settings.base_image.display()
                    );
                    self.no_agent = image;
                    return;
                }
                tracing::warn!(vm = %name, "pool: warm VM {name} failed: {detail}");
                self.backoff();
            }
        }
    }

    fn backoff(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let secs = 1u64 << self.failures.min(8);
        self.retry_at = Some(Instant::now() + Duration::from_secs(secs.min(300)));
    }

    /// The first signal: warm VMs holding no job stop at once (warming ones too).
    pub(crate) fn shutdown<F: Forge, N: Network, V: Vms<Vm = Vm>>(
        &mut self,
        env: &Arc<JobEnv<F, N, V>>,
    ) {
        self.shut = true;
        self.cancel.cancel();
        while let Some(w) = self.ready.pop_front() {
            tracing::info!(vm = %w.name, "pool: stopping warm VM {}", w.name);
            self.retiring
                .spawn(discard(env, w, DiscardReason::Shutdown));
        }
        env.metrics.set_pool_warm(0);
    }

    /// The next warming VM that is ready or failed (`Some`), or a retired VM that is gone or a
    /// bind that is over (`None`); pending forever while the pool has none of them.
    pub(crate) async fn next_event(
        &mut self,
    ) -> Option<Result<Warmed<Vm>, tokio::task::JoinError>> {
        tokio::select! {
            Some(w) = self.warming.join_next() => Some(w),
            Some(_) = self.retiring.join_next() => None,
            Some(_) = self.binding.join_next() => None,
            else => std::future::pending().await,
        }
    }

    /// Handles what [`Pool::next_event`] returned.
    pub(crate) fn on_event<F: Forge, N: Network, V: Vms<Vm = Vm>>(
        &mut self,
        env: &Arc<JobEnv<F, N, V>>,
        event: Option<Result<Warmed<Vm>, tokio::task::JoinError>>,
    ) {
        if let Some(w) = event {
            self.warmed(env, w);
        }
    }
}

/// Shows a warming VM on the status board (and thus in `list`).
fn show_warming<F: Forge, N: Network, V: Vms>(env: &Arc<JobEnv<F, N, V>>, name: &VmName) {
    env.board.vm_added(VmInfo::new(
        name.as_str(),
        0,
        "",
        "",
        VmState::Pool(PoolState::Warming),
    ));
}

/// Shows a launched warm VM on the status board.
fn show<F: Forge, N: Network, V: Vms>(
    env: &Arc<JobEnv<F, N, V>>,
    name: &VmName,
    state: PoolState,
    address: Option<Ipv4Addr>,
    vm: &V::Vm,
) {
    let started = vm.started();
    let updated = env.board.vm_update(name.as_str(), |v| {
        v.state = VmState::Pool(state);
        v.address = address.map(|a| a.to_string());
        started.show(v);
    });
    if !updated {
        // Given back after a job had it (the job removed its entry).
        show_warming(env, name);
        show(env, name, state, address, vm);
    }
}

/// Boots one warm VM and waits for its agent's READY (at most `boot_deadline`). On any failure
/// the VM is stopped and released before this returns.
async fn warm_up<F: Forge, N: Network, V: Vms>(
    env: Arc<JobEnv<F, N, V>>,
    name: VmName,
    image: Option<ImageId>,
    disk: vm::DiskReservation,
    max_age: Duration,
    cancel: CancellationToken,
) -> Warmed<V::Vm> {
    let failed = |reason, detail: String, silent| Warmed::Failed {
        name: name.clone(),
        reason,
        detail,
        image,
        silent,
    };
    let attachment = match env.net.attach(&name) {
        Ok(a) => a,
        Err(e) => return failed(DiscardReason::NotReady, format!("network: {e}"), false),
    };
    let s = &env.settings;
    let seed = Seed {
        instance_id: name.to_string(),
        hostname: name.to_string(),
        user_data: WARM_USER_DATA.to_owned(),
        network_config: Some(attachment.network_config),
    };
    // Its whole life: waiting (up to max_age, checked at each tick), booting, then one job.
    let deadline = s.boot_deadline + max_age + s.job_deadline;
    let mut spec = VmSpec::new(name.clone(), s.base_image.clone(), seed, deadline);
    spec.net = Some(attachment.device);
    spec.disk = Some(disk);
    spec.agent = true;
    let hold = attachment.hold;
    let address = attachment.address;
    let vm = match env.vms.launch(spec).await {
        Ok(vm) => vm,
        Err(e) => {
            drop(hold);
            return failed(DiscardReason::NotReady, format!("launch: {e}"), false);
        }
    };
    show(&env, &name, PoolState::Warming, Some(address), &vm);
    let socket = vm.agent_socket();
    let mut state = vm.watch_state();
    let ready = async {
        let mut agent = AgentConn::connect(&socket).await?;
        let ready = agent.ready().await?;
        Ok::<_, AgentError>((agent, ready))
    };
    let died = async {
        // Ends when the VM stops by itself (a guest without agent may power off).
        while !state.borrow().is_final() {
            if state.changed().await.is_err() {
                break;
            }
        }
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(s.boot_deadline, ready) => match r {
            Ok(Ok(ok)) => Ok(ok),
            Ok(Err(e)) => Err((DiscardReason::NotReady, format!("agent: {e}"), false)),
            Err(_) => Err((DiscardReason::NotReady, format!("no READY within {}s", s.boot_deadline.as_secs()), true)),
        },
        () = died => Err((DiscardReason::Died, "the VM ended before it said READY".to_owned(), false)),
        () = cancel.cancelled() => Err((DiscardReason::Shutdown, "the daemon is shutting down".to_owned(), false)),
    };
    match outcome {
        Ok((agent, ready)) => Warmed::Ready(WarmVm::ready(
            name,
            vm,
            agent,
            hold,
            address,
            ready.clock_offset_ms,
            image,
        )),
        Err((reason, detail, silent)) => {
            stop_and_release(vm, hold).await;
            failed(reason, detail, silent)
        }
    }
}
