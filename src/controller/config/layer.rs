//! The layers of `serve`'s configuration: one partial struct per section of the file, each field
//! optional. The same structs are read from the TOML file (unknown keys rejected), built from the
//! environment, and parsed from the flags (clap; only the fields marked `#[arg(long)]` are flags),
//! then merged in that order ([`Merge`]) and resolved into [`Config`](super::Config).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use url::Url;

use super::{ForkAccess, PoolConfig, TokenPolicy};
use crate::controller::duration;
use crate::forgejo::{ClientConfig, Level, Visibility};
use crate::layer::layer;
use crate::net::{AllowedDestination, Ipv4Cidr, NetConfig};
use crate::ops::MetricsConfig;
use crate::paths::DirsLayer;
use crate::types::{Accel, MacAddr};
use crate::vm::VmConfig;

layer! {
    /// The whole file; also `serve`'s flags.
    #[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, clap::Args)]
    #[serde(default, deny_unknown_fields)]
    pub struct ConfigLayer {
        /// The runs-on label to serve [default: external-host].
        #[arg(long)]
        pub label: Option<String>,
        /// This host's name among the hosts serving one Forgejo: it marks the runners and tokens
        /// this host creates, so each host cleans up only its own [default: the hostname].
        #[arg(long, value_name = "ID")]
        pub host_id: Option<String>,
        /// How often to poll Forgejo, e.g. 15s or 500ms [default: 15s].
        #[arg(long, value_parser = duration::parse)]
        #[serde(with = "duration::option")]
        pub poll_interval: Option<Duration>,
        /// How often to poll while jobs wait or were seen recently; also the least time between two
        /// job-list requests of this host [default: 1s, or poll-interval if that is shorter].
        #[arg(long, value_parser = duration::parse)]
        #[serde(with = "duration::option")]
        pub poll_interval_min: Option<Duration>,
        /// At most this many VMs at once [default: 3].
        #[arg(long)]
        pub max_vms: Option<usize>,
        /// The read-only base image [default: <state-dir>/images/runner-base.qcow2].
        #[arg(long, value_name = "PATH")]
        pub base_image: Option<PathBuf>,
        /// Stop a VM whose runner has not picked its job up after this long [default: 10m].
        #[arg(long, value_parser = duration::parse)]
        #[serde(with = "duration::option")]
        pub boot_deadline: Option<Duration>,
        /// Stop a VM that runs longer than this [default: 3h].
        #[arg(long, value_parser = duration::parse)]
        #[serde(with = "duration::option")]
        pub job_deadline: Option<Duration>,
        /// State directory: ci-users.json, images, serial logs [default: /var/lib/fkr-qemu].
        #[arg(long, value_name = "PATH")]
        pub state_dir: Option<PathBuf>,
        /// Runtime directory: per-VM directories, control socket [default: /run/fkr-qemu].
        #[arg(long, value_name = "PATH")]
        pub runtime_dir: Option<PathBuf>,
        #[command(flatten)]
        pub forgejo: ForgejoLayer,
        #[command(flatten)]
        pub vm: VmLayer,
        #[arg(skip)]
        pub net: NetLayer,
        #[arg(skip)]
        pub metrics: MetricsLayer,
        #[arg(skip)]
        pub tokens: TokensLayer,
        #[arg(skip)]
        pub pool: PoolLayer,
    }
}

impl ConfigLayer {
    /// The directory keys, resolved by [`crate::paths`] for `serve` and the operator commands alike.
    pub fn dirs(&self) -> DirsLayer {
        DirsLayer {
            runtime_dir: self.runtime_dir.clone(),
            state_dir: self.state_dir.clone(),
            log_dir: self.vm.log_dir.clone(),
        }
    }
}

layer! {
    /// `[forgejo]`: the client's keys ([`ClientConfig`]) and two of `serve`'s own.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, clap::Args)]
    #[serde(default, deny_unknown_fields)]
    pub struct ForgejoLayer {
        /// Forgejo's base URL (overrides FORGEJO_URL and forgejo.url).
        #[arg(long = "forgejo-url", value_name = "URL")]
        pub url: Option<Url>,
        #[arg(skip)]
        pub level: Option<Level>,
        #[arg(skip)]
        pub request_timeout_ms: Option<u64>,
        #[arg(skip)]
        pub connect_timeout_ms: Option<u64>,
        #[arg(skip)]
        pub retries: Option<u32>,
        #[arg(skip)]
        pub retry_backoff_ms: Option<u64>,
        #[arg(skip)]
        pub ci_user_visibility: Option<Visibility>,
        #[arg(skip)]
        pub ci_user_email_domain: Option<String>,
        /// The Forgejo URL the VMs use [default: the Forgejo URL].
        #[arg(long, value_name = "URL")]
        pub runner_url: Option<Url>,
        /// A file holding the admin token (the token itself is never accepted on the command line).
        #[arg(long, value_name = "PATH")]
        pub admin_token_file: Option<PathBuf>,
        /// A key file the hosts serving one Forgejo share: CI-user passwords are derived from it,
        /// so no host resets a password another host uses (README.md, "Several hosts").
        #[arg(skip)]
        pub ci_password_key_file: Option<PathBuf>,
    }
}

impl ForgejoLayer {
    /// The client's settings; `None` without a URL (the one key without a default).
    pub fn client(&self) -> Option<ClientConfig> {
        let ForgejoLayer {
            url,
            level,
            request_timeout_ms,
            connect_timeout_ms,
            retries,
            retry_backoff_ms,
            ci_user_visibility,
            ci_user_email_domain,
            runner_url: _,
            admin_token_file: _,
            ci_password_key_file: _,
        } = self.clone();
        let d = ClientConfig::new(url?);
        Some(ClientConfig {
            url: d.url,
            level: level.unwrap_or(d.level),
            request_timeout_ms: request_timeout_ms.unwrap_or(d.request_timeout_ms),
            connect_timeout_ms: connect_timeout_ms.unwrap_or(d.connect_timeout_ms),
            retries: retries.unwrap_or(d.retries),
            retry_backoff_ms: retry_backoff_ms.unwrap_or(d.retry_backoff_ms),
            ci_user_visibility: ci_user_visibility.unwrap_or(d.ci_user_visibility),
            ci_user_email_domain: ci_user_email_domain.unwrap_or(d.ci_user_email_domain),
        })
    }

    /// The resolved section as a layer (every key set).
    pub fn from_parts(
        client: ClientConfig,
        runner_url: Option<Url>,
        admin_token_file: Option<PathBuf>,
        ci_password_key_file: Option<PathBuf>,
    ) -> Self {
        let ClientConfig {
            url,
            level,
            request_timeout_ms,
            connect_timeout_ms,
            retries,
            retry_backoff_ms,
            ci_user_visibility,
            ci_user_email_domain,
        } = client;
        ForgejoLayer {
            url: Some(url),
            level: Some(level),
            request_timeout_ms: Some(request_timeout_ms),
            connect_timeout_ms: Some(connect_timeout_ms),
            retries: Some(retries),
            retry_backoff_ms: Some(retry_backoff_ms),
            ci_user_visibility: Some(ci_user_visibility),
            ci_user_email_domain: Some(ci_user_email_domain),
            runner_url,
            admin_token_file,
            ci_password_key_file,
        }
    }
}

layer! {
    /// `[vm]`: [`VmConfig`]. Its `runtime_root` is the top-level `runtime_dir`, never set here.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, clap::Args)]
    #[serde(default, deny_unknown_fields)]
    pub struct VmLayer for VmConfig {
        #[arg(skip)]
        pub qemu: Option<PathBuf>,
        #[arg(skip)]
        pub qemu_img: Option<PathBuf>,
        /// The accelerator [default: auto].
        #[arg(long, value_enum)]
        pub accel: Option<Accel>,
        #[arg(skip)]
        pub firmware_code: Option<Option<PathBuf>>,
        #[arg(skip)]
        pub firmware_vars: Option<Option<PathBuf>>,
        #[arg(skip)]
        pub firmware_descriptor_dirs: Option<Vec<PathBuf>>,
        #[arg(skip)]
        pub vcpus: Option<u32>,
        #[arg(skip)]
        pub memory_mib: Option<u32>,
        #[arg(skip)]
        #[serde(deserialize_with = "refuse_runtime_root")]
        pub runtime_root: Option<PathBuf>,
        #[arg(skip)]
        pub log_dir: Option<PathBuf>,
        #[arg(skip)]
        pub keep_serial_log: Option<bool>,
        #[arg(skip)]
        pub powerdown_grace_secs: Option<u64>,
        #[arg(skip)]
        pub quit_grace_secs: Option<u64>,
        #[arg(skip)]
        pub disk_dir: Option<PathBuf>,
        #[arg(skip)]
        pub disk_max_mib: Option<u64>,
        #[arg(skip)]
        pub disk_budget_mib: Option<Option<u64>>,
        #[arg(skip)]
        pub uid_base: Option<u32>,
        #[arg(skip)]
        pub uid_count: Option<u32>,
        #[arg(skip)]
        pub memory_overhead_mib: Option<u32>,
        #[arg(skip)]
        pub tcg_tb_size_mib: Option<u32>,
        #[arg(skip)]
        pub pids_max: Option<u64>,
        #[arg(skip)]
        pub serial_head_kib: Option<u64>,
        #[arg(skip)]
        pub serial_tail_kib: Option<u64>,
        #[arg(skip)]
        pub serial_logs_keep: Option<usize>,
        #[arg(skip)]
        pub serial_logs_max_age_days: Option<u64>,
        #[arg(skip)]
        pub slice: Option<String>,
        #[arg(skip)]
        pub io_weight: Option<Option<u64>>,
    }
}

/// `vm.runtime_root` in the file: one runtime directory for the daemon and the driver.
fn refuse_runtime_root<'de, D: Deserializer<'de>>(_: D) -> Result<Option<PathBuf>, D::Error> {
    Err(serde::de::Error::custom(
        "set the top-level runtime_dir instead",
    ))
}

layer! {
    /// `[net]`: [`NetConfig`].
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct NetLayer for NetConfig {
        pub bridge: Option<String>,
        pub subnet: Option<Ipv4Cidr>,
        pub bridge_mac: Option<Option<MacAddr>>,
        pub dns_servers: Option<Option<Vec<Ipv4Addr>>>,
        pub allow: Option<Vec<AllowedDestination>>,
        pub host_ports: Option<Vec<u16>>,
        pub uplink: Option<Option<String>>,
        pub conn_rate_per_sec: Option<u32>,
        pub max_conns_per_vm: Option<u32>,
    }
}

layer! {
    /// `[metrics]`: [`MetricsConfig`].
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct MetricsLayer for MetricsConfig {
        pub listen: Option<Option<SocketAddr>>,
        pub allow_all_interfaces: Option<bool>,
    }
}

layer! {
    /// `[tokens]`: [`TokenPolicy`].
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct TokensLayer for TokenPolicy {
        pub fork_pull_requests: Option<ForkAccess>,
        pub fork_write_repos: Option<Vec<String>>,
    }
}

layer! {
    /// `[pool]`: [`PoolConfig`] (the warm pool).
    #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct PoolLayer {
        pub size: Option<usize>,
        #[serde(with = "duration::option")]
        pub max_age: Option<Duration>,
        #[serde(with = "duration::option")]
        pub bind_timeout: Option<Duration>,
    }
}

impl PoolLayer {
    /// `base` with each field this layer sets replaced.
    pub fn resolve(self, base: PoolConfig) -> PoolConfig {
        PoolConfig {
            size: self.size.unwrap_or(base.size),
            max_age: self.max_age.unwrap_or(base.max_age),
            bind_timeout: self.bind_timeout.unwrap_or(base.bind_timeout),
        }
    }
}

impl From<PoolConfig> for PoolLayer {
    fn from(p: PoolConfig) -> Self {
        let PoolConfig {
            size,
            max_age,
            bind_timeout,
        } = p;
        PoolLayer {
            size: Some(size),
            max_age: Some(max_age),
            bind_timeout: Some(bind_timeout),
        }
    }
}
