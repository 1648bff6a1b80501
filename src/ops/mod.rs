//! What operators use on a running host: metrics, the daemon's status and control socket,
//! systemd notifications, and the support behind `list`, `console`, `status` and `ci-users`.
//!
//! The daemon (`serve`) uses:
//! - [`metrics::Metrics`]: typed counters/histograms the controller calls at each job step, and
//!   the Forgejo client's observer hook ([`metrics::Metrics::forgejo_observer`]);
//! - [`status::StatusBoard`]: the live [`status::DaemonStatus`] (ready, queue, VMs, last Forgejo
//!   error) that the control socket serves;
//! - [`Services::start`]: binds the control socket and (if configured) the metrics endpoint;
//! - [`systemd`]: READY/STOPPING/STATUS notifications.
//!
//! The operator commands use [`control::Client`] and, when no daemon answers, [`runtime`] (the
//! per-VM dirs on disk).

pub mod console;
pub mod control;
pub mod http;
pub mod journal;
pub mod metrics;
pub mod paths;
pub mod runtime;
pub mod signals;
pub mod status;
pub mod systemd;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use control::{Client, ControlServer};
pub use http::{MetricsConfig, MetricsServer};
pub use metrics::{
    DiscardReason, JobOutcome, Metrics, RemovalReason, RestartResult, StartPath, SweepKind,
    TokenAccess,
};
pub use status::{
    DaemonStatus, FleetRunner, LastError, LeftState, PoolState, StatusBoard, StatusSource, VmInfo,
    VmLimits, VmState,
};

/// Errors of the `ops` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve metrics on all interfaces ({0}); use a specific address such as \
         127.0.0.1:9464, or set `allow_all_interfaces = true` in [metrics] if that is intended"
    )]
    MetricsOnAllInterfaces(SocketAddr),
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{0} must be a directory owned by this user that no one else can write to \
         (the control socket lives there)"
    )]
    UnsafeRuntimeDir(PathBuf),
    #[error("another fkr-qemu daemon already answers on {}", .0.display())]
    ControlSocketInUse(PathBuf),
    #[error("no fkr-qemu daemon is running (nothing answers on {})", .0.display())]
    DaemonNotRunning(PathBuf),
    #[error("control socket {}: {message}", path.display())]
    ControlSocket { path: PathBuf, message: String },
    #[error("{0:?} is not a VM name (expected fr- and 8 lowercase hex digits, e.g. fr-0123abcd)")]
    InvalidVmName(String),
    #[error(
        "no serial log for {name} at {}: no such VM, or it ended and its log was removed \
         (set keep_serial_log to keep logs)",
        log.display()
    )]
    UnknownVm { name: String, log: PathBuf },
    #[error(transparent)]
    ConfigFile(#[from] crate::paths::FileError),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    #[error("the daemon is not ready yet (its startup sweep is still running)")]
    NotReady,
    #[error("handover: {0}")]
    Handover(String),
}

impl Error {
    /// What kind of failure this is.
    pub fn class(&self) -> crate::types::ErrorClass {
        use crate::types::ErrorClass;
        match self {
            Error::MetricsOnAllInterfaces(_)
            | Error::InvalidVmName(_)
            | Error::UnknownVm { .. }
            | Error::ConfigFile(_)
            | Error::UnsafeRuntimeDir(_) => ErrorClass::Config,
            Error::Io { .. }
            | Error::MetricsBind { .. }
            | Error::ControlSocketInUse(_)
            | Error::DaemonNotRunning(_)
            | Error::ControlSocket { .. }
            | Error::Output(_)
            | Error::Handover(_) => ErrorClass::Runtime,
            Error::NotReady => ErrorClass::CheckFailed,
        }
    }
}

/// The daemon's operator-facing servers: the control socket and the optional metrics endpoint,
/// each on its own task. Dropping (or [`stop`](Self::stop)ping) it ends both and removes the
/// socket file.
#[derive(Debug)]
pub struct Services {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    control_socket: PathBuf,
    metrics_addr: Option<SocketAddr>,
}

impl Services {
    /// Binds `<runtime_dir>/control.sock` (serving `status`) and, if `metrics_config.listen` is
    /// set, the `/metrics` endpoint. Fails (before anything runs) when either cannot be bound.
    pub async fn start(
        runtime_dir: &Path,
        metrics_config: &MetricsConfig,
        metrics: &Metrics,
        status: impl StatusSource,
    ) -> Result<Self, Error> {
        let metrics_server = MetricsServer::bind(metrics_config, metrics.clone()).await?;
        let control = ControlServer::bind(runtime_dir, status).await?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                // Err: the sender is gone, which also means stop.
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let control_socket = control.path().to_owned();
        let metrics_addr = metrics_server.as_ref().and_then(MetricsServer::local_addr);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(control.run(stopped()));
        if let Some(server) = metrics_server {
            tasks.spawn(server.run(stopped()));
        }
        Ok(Services {
            stop,
            tasks,
            control_socket,
            metrics_addr,
        })
    }

    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// The metrics endpoint's address, when it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops both servers and waits for them (the socket file is gone afterwards).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Aborting drops each server, whose Drop removes the socket file.
        self.tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn services_start_answer_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let metrics = Metrics::new();
        let board = StatusBoard::new(Some(metrics.clone()));
        board.set_ready(true);
        let config = MetricsConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            allow_all_interfaces: false,
        };
        let services = Services::start(dir.path(), &config, &metrics, board.clone())
            .await
            .unwrap();
        assert!(services.metrics_addr().is_some());
        let status = Client::connect(dir.path())
            .await
            .unwrap()
            .status()
            .await
            .unwrap();
        assert!(status.ready);
        let socket = services.control_socket().to_owned();
        services.stop().await;
        assert!(!socket.exists());

        // Dropping instead of stopping also ends the servers.
        let services = Services::start(dir.path(), &MetricsConfig::default(), &metrics, board)
            .await
            .unwrap();
        assert!(services.metrics_addr().is_none());
        drop(services);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!socket.exists());
    }
}
