//! The `/metrics` HTTP endpoint (off unless configured).

use std::future::Future;
use std::net::SocketAddr;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use super::Error;

/// The `[metrics]` table of the daemon's config.
///
/// ```toml
/// [metrics]
/// listen = "127.0.0.1:9464"      # absent: no endpoint
/// allow_all_interfaces = false   # must be true for 0.0.0.0 / [::]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` listens. Absent: the endpoint is off.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Permit an unspecified address (`0.0.0.0`, `[::]`), which listens on every interface.
    /// Off by default so a copied example cannot expose the endpoint to the network by accident.
    #[serde(default)]
    pub allow_all_interfaces: bool,
}

impl MetricsConfig {
    /// Checks the listen address against `allow_all_interfaces`.
    pub fn validate(&self) -> Result<(), Error> {
        match self.listen {
            Some(addr) if addr.ip().is_unspecified() && !self.allow_all_interfaces => {
                Err(Error::MetricsOnAllInterfaces(addr))
            }
            _ => Ok(()),
        }
    }
}

/// The OpenMetrics text content type (Prometheus negotiates and parses it natively).
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
    metrics: Metrics,
}

impl MetricsServer {
    /// Binds the endpoint if `config.listen` is set (`Ok(None)` when metrics are off). Binding
    /// here, not in [`run`](Self::run), makes a taken port a startup error.
    pub async fn bind(config: &MetricsConfig, metrics: Metrics) -> Result<Option<Self>, Error> {
        config.validate()?;
        let Some(addr) = config.listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::MetricsBind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        tracing::info!("metrics endpoint at http://{local}/metrics");
        Ok(Some(MetricsServer { listener, metrics }))
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves scrapes until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let metrics = self.metrics;
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let body = metrics.encode();
                async move { ([(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)], body).into_response() }
            }),
        );
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn all_interfaces_need_an_explicit_yes() {
        let parse = |s: &str| toml::from_str::<MetricsConfig>(s).unwrap();
        assert!(parse("").listen.is_none());
        assert!(parse("listen = \"127.0.0.1:9464\"").validate().is_ok());
        assert!(parse("listen = \"[::1]:9464\"").validate().is_ok());
        assert!(matches!(
            parse("listen = \"0.0.0.0:9464\"").validate(),
            Err(Error::MetricsOnAllInterfaces(_))
        ));
        assert!(matches!(
            parse("listen = \"[::]:9464\"").validate(),
            Err(Error::MetricsOnAllInterfaces(_))
        ));
        assert!(
            parse("listen = \"0.0.0.0:9464\"\nallow_all_interfaces = true")
                .validate()
                .is_ok()
        );
        assert!(toml::from_str::<MetricsConfig>("listne = \"127.0.0.1:1\"").is_err());
    }

    #[tokio::test]
    async fn off_by_default() {
        let server = MetricsServer::bind(&MetricsConfig::default(), Metrics::new())
            .await
            .unwrap();
        assert!(server.is_none());
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let metrics = Metrics::new();
        metrics.job_seen();
        let config = MetricsConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            allow_all_interfaces: false,
        };
        let server = MetricsServer::bind(&config, metrics.clone())
            .await
            .unwrap()
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stop_rx.await;
        }));

        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("application/openmetrics-text"));
        assert!(reply.contains("fkr_qemu_jobs_seen_total 1\n"));

        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }
}
