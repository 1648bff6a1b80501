//! `serve`'s configuration: the TOML file, then the environment, then command-line flags, each
//! overriding the one before, key by key. All three are a [`ConfigLayer`] (`config/layer.rs`): one
//! partial struct per section of the file, every key optional, also derived as clap flags. The
//! merged layer is resolved into [`Config`]: defaults filled in (the directories' by
//! [`crate::paths`], shared with the operator commands), then the values checked.
//!
//! The admin token never comes from argv or from the TOML file itself: only from
//! `FORGEJO_ADMIN_TOKEN`, a file named by `FORGEJO_ADMIN_TOKEN_FILE` / `--admin-token-file` /
//! `forgejo.admin_token_file`, or systemd's `$CREDENTIALS_DIRECTORY/forgejo-admin-token`.
//!
//! The file's sections resolve into the modules' own config types: `[forgejo]` into
//! [`crate::forgejo::ClientConfig`] (plus `runner_url` and `admin_token_file`), `[vm]` into
//! [`crate::vm::VmConfig`] (its `runtime_root` is the top-level `runtime_dir`; its `log_dir`
//! defaults to `<state_dir>/logs`), `[net]` into [`crate::net::NetConfig`], `[metrics]` into
//! [`crate::ops::MetricsConfig`]. Every section rejects unknown keys.
//!
//! `--check-config` prints the resolved [`Config`] through its `Serialize`, which writes it as a
//! layer with every key set: no key can be left out, and the output is a config file `serve`
//! accepts.

mod layer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{duration, Error};
use crate::forgejo::ClientConfig;
use crate::layer::Merge;
use crate::net::NetConfig;
use crate::ops::MetricsConfig;
use crate::paths::{ConfigFile, Dirs, FileError};
use crate::secret::Secret;
use crate::vm::VmConfig;

pub use layer::{
    ConfigLayer, ForgejoLayer, MetricsLayer, NetLayer, PoolLayer, TokensLayer, VmLayer,
};

/// The systemd credential name (`LoadCredential=forgejo-admin-token:…`).
pub const CREDENTIAL_NAME: &str = "forgejo-admin-token";

/// `label`'s default.
pub const DEFAULT_LABEL: &str = "external-host";
/// `poll_interval`'s default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(15);
/// `poll_interval_min`'s default (or `poll_interval`, if that is shorter): at most one job-list
/// request per second from a host.
pub const DEFAULT_POLL_INTERVAL_MIN: Duration = Duration::from_secs(1);
/// `max_vms`'s default.
pub const DEFAULT_MAX_VMS: usize = 3;
/// `boot_deadline`'s default.
pub const DEFAULT_BOOT_DEADLINE: Duration = Duration::from_secs(600);
/// `job_deadline`'s default.
pub const DEFAULT_JOB_DEADLINE: Duration = Duration::from_secs(3 * 3600);

/// What a job whose run is a pull request from a fork gets instead of a `write:package` token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkAccess {
    /// A `read:package` token: the job can pull the CI user's images, not push.
    #[default]
    Read,
    /// No token and no registry credentials in the VM.
    None,
}

/// `[tokens]`: how far the registry token of a job is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenPolicy {
    /// Jobs of runs that Forgejo itself treats as untrusted (`is_fork_pull_request`, except
    /// `pull_request_target`) get this.
    pub fork_pull_requests: ForkAccess,
    /// `owner/repo` (case-insensitive) whose fork pull requests get `write:package` anyway.
    pub fork_write_repos: Vec<String>,
}

impl TokenPolicy {
    /// Whether `full_name` (`owner/repo`) is on the allow-list.
    pub fn fork_write_allowed(&self, full_name: &str) -> bool {
        self.fork_write_repos
            .iter()
            .any(|r| r.eq_ignore_ascii_case(full_name))
    }
}

/// `[pool]`: the warm pool (ARCHITECTURE.md, "Warm pool").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Booted VMs kept ready for the next job, counted in `max_vms`; 0 turns the pool off.
    pub size: usize,
    /// A warm VM older than this is replaced (so a base-image update reaches the pool).
    pub max_age: Duration,
    /// How long a warm VM may take to acknowledge its job (STARTED) before it is discarded.
    pub bind_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 1,
            max_age: Duration::from_secs(3600),
            bind_timeout: Duration::from_secs(5),
        }
    }
}

/// Whether `[vm] uid_base .. uid_base + uid_count` gives each QEMU an identity of its own: not
/// root, not 4294967295 (`setresuid(-1)` means "unchanged", QEMU would stay root), and no uid or
/// gid (gid = uid) of an existing user or group (`passwd`, `group`: the files' text) — QEMU would
/// share its files and processes.
fn check_vm_uids(base: u32, count: u32, passwd: &str, group: &str) -> Result<(), ConfigError> {
    let invalid = |key: &'static str, value: u32, why: String| {
        Err(ConfigError::Invalid {
            key,
            value: value.to_string(),
            why,
        })
    };
    if base == 0 {
        return invalid(
            "vm.uid_base",
            base,
            "must not be 0: QEMU would run as root".into(),
        );
    }
    if count == 0 {
        return invalid("vm.uid_count", count, "must be at least 1".into());
    }
    let last = u64::from(base) + u64::from(count) - 1;
    if last >= u64::from(u32::MAX) {
        return invalid(
            "vm.uid_count",
            count,
            format!(
                "uids {base}..={last} reach 4294967295, which setresuid takes as \"unchanged\" \
                 (QEMU would keep root's uid): lower vm.uid_base or vm.uid_count"
            ),
        );
    }
    for (file, text) in [("/etc/passwd", passwd), ("/etc/group", group)] {
        for line in text.lines() {
            let mut fields = line.split(':');
            let (Some(name), Some(id)) = (fields.next(), fields.nth(1)) else {
                continue;
            };
            if let Ok(id) = id.trim().parse::<u64>() {
                if (u64::from(base)..=last).contains(&id) {
                    return invalid(
                        "vm.uid_base",
                        base,
                        format!(
                            "uids {base}..={last} (gid = uid) include {id}, {name:?} in {file}: \
                             QEMU would share its identity; pick a range no user or group uses"
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// What is wrong with the configuration: each variant names the file, key or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read, or a key in it is unknown or has a value of the wrong type.
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{var} {value:?} is not a URL: {error}")]
    EnvUrl {
        var: &'static str,
        value: String,
        error: url::ParseError,
    },
    #[error("no Forgejo URL: set forgejo.url, FORGEJO_URL or --forgejo-url")]
    NoForgejoUrl,
    #[error(
        "no admin token: set FORGEJO_ADMIN_TOKEN, FORGEJO_ADMIN_TOKEN_FILE, \
         forgejo.admin_token_file, or the systemd credential {CREDENTIAL_NAME}"
    )]
    NoAdminToken,
    /// `from` is the setting that named the file.
    #[error("cannot read the admin token file {} (from {from}): {error}", path.display())]
    AdminTokenFile {
        path: PathBuf,
        from: &'static str,
        error: std::io::Error,
    },
    #[error("the admin token from {from} is empty")]
    AdminTokenEmpty { from: String },
    /// A value of the right type that is not allowed.
    #[error("invalid configuration: {key} = {value}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: String,
    },
    /// `[net]` (its messages name the key).
    #[error(transparent)]
    Net(crate::net::Error),
    /// `[metrics]` (its messages name the key).
    #[error(transparent)]
    Metrics(crate::ops::Error),
}

/// The effective configuration of `serve`.
///
/// `Serialize` writes it as a [`ConfigLayer`]: the config file that gives exactly this
/// configuration. The admin token has no key there (it is never in the file).
#[derive(Debug, Clone, Serialize)]
#[serde(into = "ConfigLayer")]
pub struct Config {
    /// The `runs-on` label this host serves.
    pub label: String,
    /// This host among the hosts serving one Forgejo (default: the hostname, made valid).
    pub host_id: String,
    /// How often Forgejo is asked for waiting jobs when the host is idle.
    pub poll_interval: Duration,
    /// How often while jobs wait or were seen recently; also the least time between two job-list
    /// requests (polls, dispatch's fresh look, claims' checks).
    pub poll_interval_min: Duration,
    /// At most this many VMs at once.
    pub max_vms: usize,
    /// The read-only base image (default `<state_dir>/images/runner-base.qcow2`).
    pub base_image: PathBuf,
    /// A VM whose runner has not picked its job up this long after QEMU started is stopped.
    pub boot_deadline: Duration,
    /// A VM still running this long after QEMU started is stopped (the driver's deadline).
    pub job_deadline: Duration,
    /// `ci-users.json`, images, serial logs.
    pub state_dir: PathBuf,
    /// Per-VM directories (`<runtime_dir>/vms/<name>/`) and the control socket.
    pub runtime_dir: PathBuf,
    pub forgejo: ClientConfig,
    /// The URL the VMs use for the runner and the registry (default: `forgejo.url`). Set it when this
    /// host reaches Forgejo through an address the guests cannot use.
    pub runner_url: Option<Url>,
    pub admin_token_file: Option<PathBuf>,
    /// The key file the hosts share for CI-user passwords (see `Credentials`).
    pub ci_password_key_file: Option<PathBuf>,
    /// Never printed (`Secret`), never serialised.
    pub admin_token: Secret,
    /// Where the admin token came from (for `--check-config`), never the token itself.
    pub admin_token_source: String,
    pub vm: VmConfig,
    pub net: NetConfig,
    pub metrics: MetricsConfig,
    pub tokens: TokenPolicy,
    pub pool: PoolConfig,
}

/// Where the configuration comes from; `env` is a lookup so tests need not touch the process env.
pub struct Sources<'a> {
    /// `--config`; `None` = the default path, which may be missing.
    pub file: Option<&'a Path>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The flags (clap fills the keys that are flags; the rest stay unset).
    pub flags: &'a ConfigLayer,
}

impl Config {
    /// Reads the file, applies the environment and the flags, reads the admin token and checks the
    /// values (no network; `serve --check-config` does the rest).
    pub fn load(src: &Sources<'_>) -> Result<Config, Error> {
        let file = ConfigFile::read(src.file).map_err(ConfigError::from)?;
        Ok(Self::from_file(&file, src.env, src.flags)?)
    }

    /// [`Config::load`] on a file's text.
    pub fn from_parts(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &ConfigLayer,
    ) -> Result<Config, Error> {
        let file = ConfigFile {
            path: path.to_owned(),
            text: text.to_owned(),
        };
        Ok(Self::from_file(&file, env, flags)?)
    }

    fn from_file(
        file: &ConfigFile,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &ConfigLayer,
    ) -> Result<Config, ConfigError> {
        let from_file: ConfigLayer = file.parse()?;
        // The token chain tells the file's token file from the flag's (the environment sits
        // between them), so it reads both before the merge.
        let token_file_in_config = from_file.forgejo.admin_token_file.clone();
        let layer = from_file.merge(env_layer(env)?).merge(flags.clone());
        let forgejo = layer.forgejo.client().ok_or(ConfigError::NoForgejoUrl)?;
        let (admin_token, admin_token_source) = read_admin_token(
            env,
            token_file_in_config.as_deref(),
            flags.forgejo.admin_token_file.as_deref(),
        )?;
        let cfg = Self::resolve(layer, forgejo, admin_token, admin_token_source);
        cfg.validate()?;
        Ok(cfg)
    }

    /// The merged layer with every default filled in.
    fn resolve(
        layer: ConfigLayer,
        forgejo: ClientConfig,
        admin_token: Secret,
        admin_token_source: String,
    ) -> Config {
        let dirs = layer.dirs().resolve();
        let ConfigLayer {
            label,
            host_id,
            poll_interval,
            poll_interval_min,
            max_vms,
            base_image,
            boot_deadline,
            job_deadline,
            state_dir: _,
            runtime_dir: _,
            forgejo: forgejo_layer,
            vm,
            net,
            metrics,
            tokens,
            pool,
        } = layer;
        // The driver's runtime root is always the daemon's runtime dir.
        let vm = VmLayer {
            runtime_root: None,
            ..vm
        }
        .resolve(VmConfig {
            runtime_root: dirs.runtime_dir.clone(),
            log_dir: dirs.log_dir.clone(),
            disk_dir: dirs.default_disk_dir(),
            ..VmConfig::default()
        });
        Config {
            label: label.unwrap_or_else(|| DEFAULT_LABEL.to_owned()),
            host_id: host_id.unwrap_or_else(default_host_id),
            poll_interval: poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL),
            poll_interval_min: poll_interval_min.unwrap_or_else(|| {
                DEFAULT_POLL_INTERVAL_MIN.min(poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL))
            }),
            max_vms: max_vms.unwrap_or(DEFAULT_MAX_VMS),
            base_image: base_image.unwrap_or_else(|| dirs.default_base_image()),
            boot_deadline: boot_deadline.unwrap_or(DEFAULT_BOOT_DEADLINE),
            job_deadline: job_deadline.unwrap_or(DEFAULT_JOB_DEADLINE),
            state_dir: dirs.state_dir,
            runtime_dir: dirs.runtime_dir,
            forgejo,
            runner_url: forgejo_layer.runner_url,
            admin_token_file: forgejo_layer.admin_token_file,
            ci_password_key_file: forgejo_layer.ci_password_key_file,
            admin_token,
            admin_token_source,
            vm,
            net: net.resolve(NetConfig::default()),
            metrics: metrics.resolve(MetricsConfig::default()),
            tokens: tokens.resolve(TokenPolicy::default()),
            pool: pool.resolve(PoolConfig::default()),
        }
    }

    /// Checks the values themselves (no network, no file existence: see `serve --check-config`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, value: String, why: &str| {
            Err(ConfigError::Invalid {
                key,
                value,
                why: why.to_owned(),
            })
        };
        for (key, u) in [
            ("forgejo.url", Some(&self.forgejo.url)),
            ("forgejo.runner_url", self.runner_url.as_ref()),
        ] {
            if let Some(u) = u {
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return invalid(
                        key,
                        u.to_string(),
                        "must be an http:// or https:// URL with a host",
                    );
                }
            }
        }
        if self.label.is_empty()
            || !self
                .label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid(
                "label",
                format!("{:?}", self.label),
                "must be non-empty and contain only letters, digits, '-', '_', '.'",
            );
        }
        if !is_valid_host_id(&self.host_id) {
            return invalid(
                "host_id",
                format!("{:?}", self.host_id),
                "must be 1-32 of lowercase letters, digits and '-', starting with a letter or digit",
            );
        }
        if self.max_vms == 0 {
            return invalid("max_vms", "0".into(), "must be at least 1");
        }
        for (key, d) in [
            ("poll_interval", self.poll_interval),
            ("poll_interval_min", self.poll_interval_min),
            ("boot_deadline", self.boot_deadline),
            ("job_deadline", self.job_deadline),
            ("pool.max_age", self.pool.max_age),
            ("pool.bind_timeout", self.pool.bind_timeout),
        ] {
            if d.is_zero() {
                return invalid(key, duration::format(d), "must be positive");
            }
        }
        if self.poll_interval_min > self.poll_interval {
            return invalid(
                "poll_interval_min",
                duration::format(self.poll_interval_min),
                &format!(
                    "is longer than poll_interval ({})",
                    duration::format(self.poll_interval)
                ),
            );
        }
        if self.boot_deadline > self.job_deadline {
            return invalid(
                "boot_deadline",
                duration::format(self.boot_deadline),
                &format!(
                    "is longer than job_deadline ({})",
                    duration::format(self.job_deadline)
                ),
            );
        }
        if self.vm.vcpus == 0 {
            return invalid("vm.vcpus", "0".into(), "must be at least 1");
        }
        if self.vm.memory_mib < 256 {
            return invalid(
                "vm.memory_mib",
                self.vm.memory_mib.to_string(),
                "must be at least 256",
            );
        }
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        check_vm_uids(
            self.vm.uid_base,
            self.vm.uid_count,
            &read("/etc/passwd"),
            &read("/etc/group"),
        )?;
        self.net.validate().map_err(ConfigError::Net)?;
        self.metrics.validate().map_err(ConfigError::Metrics)?;
        for r in &self.tokens.fork_write_repos {
            if r.split('/').count() != 2 || r.split('/').any(str::is_empty) {
                return invalid(
                    "tokens.fork_write_repos",
                    format!("[{r:?}]"),
                    &format!("{r:?} is not owner/repo"),
                );
            }
        }
        Ok(())
    }

    /// Warnings for plain-http URLs that may cross an untrusted network: the admin token (Forgejo
    /// URL) and each job's runner and registry tokens (`runner_url`) travel in clear text. Only an
    /// IP literal can be known to stay local (loopback, private, link-local, CGNAT, unique local);
    /// a host name is warned about unless it is `localhost` (it is not resolved here).
    pub fn plain_http_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut urls = vec![("forgejo.url", &self.forgejo.url)];
        if let Some(u) = &self.runner_url {
            urls.push(("forgejo.runner_url", u));
        }
        for (key, u) in urls {
            if u.scheme() != "http" {
                continue;
            }
            let local = match u.host() {
                Some(url::Host::Ipv4(a)) => {
                    a.is_loopback()
                        || a.is_private()
                        || a.is_link_local()
                        || (a.octets()[0] == 100 && a.octets()[1] & 0xc0 == 64)
                }
                Some(url::Host::Ipv6(a)) => {
                    a.is_loopback()
                        || (a.segments()[0] & 0xfe00) == 0xfc00
                        || (a.segments()[0] & 0xffc0) == 0xfe80
                }
                Some(url::Host::Domain(d)) => {
                    let d = d.trim_end_matches('.').to_ascii_lowercase();
                    d == "localhost" || d.ends_with(".localhost")
                }
                None => true,
            };
            if !local {
                out.push(format!(
                    "{key} {u} is plain http to an address that is not loopback or private: \
                     tokens cross the network unencrypted; use https (ignore this if the host \
                     is only reachable on a private network)"
                ));
            }
        }
        out
    }

    /// The URL the guests use for the runner and the registry.
    pub fn runner_url(&self) -> &Url {
        self.runner_url.as_ref().unwrap_or(&self.forgejo.url)
    }

    pub fn ci_users_path(&self) -> PathBuf {
        self.dirs().ci_users_file()
    }

    /// The directories, as the operator commands resolve them.
    pub fn dirs(&self) -> Dirs {
        Dirs {
            runtime_dir: self.runtime_dir.clone(),
            state_dir: self.state_dir.clone(),
            log_dir: self.vm.log_dir.clone(),
        }
    }

    /// The configuration as a config file (what `--check-config` prints): every key, defaults
    /// filled in. The admin token has no key; a comment says where it came from.
    pub fn to_toml(&self) -> String {
        let mut text = toml::to_string_pretty(self).expect("every config value has a TOML form");
        text.push_str(&format!(
            "# admin token: [redacted], from {}\n",
            self.admin_token_source
        ));
        text
    }
}

/// Whether `id` can name a host in runner descriptions and token names: 1-32 of `[a-z0-9-]`, not
/// starting with `-` (token names are parsed back by the sweep, so no `.` or `_`).
pub fn is_valid_host_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The hostname's first label, lowercased, with anything else replaced by `-` and cut to 32.
fn default_host_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    host_id_from_hostname(&host)
}

fn host_id_from_hostname(host: &str) -> String {
    let label = host.split('.').next().unwrap_or_default();
    let id: String = label
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(32)
        .collect();
    let id = id.trim_start_matches('-').to_owned();
    if id.is_empty() {
        "localhost".to_owned()
    } else {
        id
    }
}

impl From<Config> for ConfigLayer {
    /// The layer that resolves to `c`: every key set.
    fn from(c: Config) -> Self {
        let Config {
            label,
            host_id,
            poll_interval,
            poll_interval_min,
            max_vms,
            base_image,
            boot_deadline,
            job_deadline,
            state_dir,
            runtime_dir,
            forgejo,
            runner_url,
            admin_token_file,
            ci_password_key_file,
            // Never in the file.
            admin_token: _,
            admin_token_source: _,
            vm,
            net,
            metrics,
            tokens,
            pool,
        } = c;
        ConfigLayer {
            label: Some(label),
            host_id: Some(host_id),
            poll_interval: Some(poll_interval),
            poll_interval_min: Some(poll_interval_min),
            max_vms: Some(max_vms),
            base_image: Some(base_image),
            boot_deadline: Some(boot_deadline),
            job_deadline: Some(job_deadline),
            state_dir: Some(state_dir),
            runtime_dir: Some(runtime_dir),
            forgejo: ForgejoLayer::from_parts(
                forgejo,
                runner_url,
                admin_token_file,
                ci_password_key_file,
            ),
            // The top-level runtime_dir stands for the driver's runtime root.
            vm: VmLayer {
                runtime_root: None,
                ..vm.into()
            },
            net: net.into(),
            metrics: metrics.into(),
            tokens: tokens.into(),
            pool: pool.into(),
        }
    }
}

/// The environment's layer: `FORGEJO_URL` (empty counts as unset). The token variables are read by
/// [`read_admin_token`].
fn env_layer(env: &dyn Fn(&str) -> Option<String>) -> Result<ConfigLayer, ConfigError> {
    let mut layer = ConfigLayer::default();
    if let Some(value) = env("FORGEJO_URL").filter(|s| !s.is_empty()) {
        match Url::parse(&value) {
            Ok(url) => layer.forgejo.url = Some(url),
            Err(error) => {
                return Err(ConfigError::EnvUrl {
                    var: "FORGEJO_URL",
                    value,
                    error,
                })
            }
        }
    }
    Ok(layer)
}

/// Token sources, lowest precedence first: `forgejo.admin_token_file` (`in_config`),
/// `$CREDENTIALS_DIRECTORY/forgejo-admin-token`, `FORGEJO_ADMIN_TOKEN_FILE`, `FORGEJO_ADMIN_TOKEN`,
/// `--admin-token-file` (`flag`). Returns the token and where it came from.
fn read_admin_token(
    env: &dyn Fn(&str) -> Option<String>,
    in_config: Option<&Path>,
    flag: Option<&Path>,
) -> Result<(Secret, String), ConfigError> {
    enum Source {
        File(PathBuf),
        Value(Secret),
    }
    let mut chosen: Option<(&'static str, Source)> = None;
    if let Some(p) = in_config {
        chosen = Some(("forgejo.admin_token_file", Source::File(p.to_owned())));
    }
    if let Some(dir) = env("CREDENTIALS_DIRECTORY").filter(|s| !s.is_empty()) {
        let p = Path::new(&dir).join(CREDENTIAL_NAME);
        if p.exists() {
            chosen = Some(("systemd credential", Source::File(p)));
        }
    }
    if let Some(p) = env("FORGEJO_ADMIN_TOKEN_FILE").filter(|s| !s.is_empty()) {
        chosen = Some(("FORGEJO_ADMIN_TOKEN_FILE", Source::File(p.into())));
    }
    if let Some(t) = env("FORGEJO_ADMIN_TOKEN").filter(|s| !s.is_empty()) {
        chosen = Some(("FORGEJO_ADMIN_TOKEN", Source::Value(Secret::new(t))));
    }
    if let Some(p) = flag {
        chosen = Some(("--admin-token-file", Source::File(p.to_owned())));
    }
    let Some((from, source)) = chosen else {
        return Err(ConfigError::NoAdminToken);
    };
    let (token, source) = match source {
        Source::Value(s) => (s, from.to_owned()),
        Source::File(path) => match std::fs::read_to_string(&path) {
            Ok(text) => (
                Secret::new(text.trim()),
                format!("{from} ({})", path.display()),
            ),
            Err(error) => return Err(ConfigError::AdminTokenFile { path, from, error }),
        },
    };
    if token.is_empty() {
        return Err(ConfigError::AdminTokenEmpty { from: source });
    }
    Ok((token, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Accel;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A config from `text` with a URL and a token from the environment.
    fn parse(text: &str) -> Result<Config, Error> {
        let env = env_of(&[
            ("FORGEJO_URL", "http://f.example/"),
            ("FORGEJO_ADMIN_TOKEN", "tok"),
        ]);
        Config::from_parts(text, Path::new("c.toml"), &env, &ConfigLayer::default())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse("").unwrap();
        assert_eq!(c.label, "external-host");
        assert_eq!(c.poll_interval, Duration::from_secs(15));
        assert_eq!(c.poll_interval_min, Duration::from_secs(1));
        assert_eq!(c.max_vms, 3);
        assert_eq!(c.state_dir, Path::new("/var/lib/fkr-qemu"));
        assert_eq!(c.runtime_dir, Path::new("/run/fkr-qemu"));
        assert_eq!(c.vm.runtime_root, Path::new("/run/fkr-qemu"));
        assert_eq!(c.vm.log_dir, Path::new("/var/lib/fkr-qemu/logs"));
        assert_eq!(
            c.base_image,
            Path::new("/var/lib/fkr-qemu/images/runner-base.qcow2")
        );
        assert_eq!(
            c.ci_users_path(),
            Path::new("/var/lib/fkr-qemu/ci-users.json")
        );
        assert_eq!(c.runner_url().as_str(), "http://f.example/");
        assert_eq!(c.tokens.fork_pull_requests, ForkAccess::Read);
        assert!(c.tokens.fork_write_repos.is_empty());
        assert_eq!(
            c.forgejo.ci_user_visibility,
            crate::forgejo::Visibility::Private
        );
    }

    #[test]
    fn token_policy_section() {
        let c =
            parse("[tokens]\nfork_pull_requests = \"none\"\nfork_write_repos = [\"Acme/Web\"]\n")
                .unwrap();
        assert_eq!(c.tokens.fork_pull_requests, ForkAccess::None);
        assert!(c.tokens.fork_write_allowed("acme/web"));
        assert!(!c.tokens.fork_write_allowed("acme/web2"));
        assert!(!c.tokens.fork_write_allowed("acme"));
        let text = c.to_toml();
        assert!(text.contains("fork_pull_requests = \"none\""), "{text}");
        for bad in [
            "[tokens]\nfork_pull_requests = \"write\"\n",
            "[tokens]\nfork_write_repos = [\"acme\"]\n",
            "[tokens]\nfork_write_repos = [\"a/b/c\"]\n",
            "[tokens]\nbogus = 1\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dirs_follow_state_and_runtime_dir() {
        let c = parse("state_dir = \"/srv/st\"\nruntime_dir = \"/run/x\"\n").unwrap();
        assert_eq!(c.vm.runtime_root, Path::new("/run/x"));
        assert_eq!(c.vm.log_dir, Path::new("/srv/st/logs"));
        assert_eq!(c.base_image, Path::new("/srv/st/images/runner-base.qcow2"));
        let c = parse("state_dir = \"/srv/st\"\n[vm]\nlog_dir = \"/var/log/fkr\"\n").unwrap();
        assert_eq!(c.vm.log_dir, Path::new("/var/log/fkr"));
        let e = parse("[vm]\nruntime_root = \"/x\"\n").unwrap_err();
        assert!(e.to_string().contains("runtime_dir"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors_in_every_section() {
        for (text, key) in [
            ("label = \"x\"\nmax_vm = 3\n", "max_vm"),
            ("[vm]\ncpus = 2\n", "vm.cpus"),
            ("[forgejo]\nadmin_token = \"x\"\n", "forgejo.admin_token"),
            ("[net]\nbrigde = \"x\"\n", "net.brigde"),
            ("[metrics]\nlisten_addr = \"x\"\n", "metrics.listen_addr"),
            ("[tokens]\nbogus = 1\n", "tokens.bogus"),
            ("[bogus]\n", "bogus"),
        ] {
            let e = parse(text).unwrap_err();
            let Error::Config(ConfigError::File(FileError::Invalid { key: Some(k), .. })) = &e
            else {
                panic!("{text}: {e:?}")
            };
            assert_eq!(k, key, "{text}");
            assert!(e.to_string().contains(key), "{text}: {e}");
            assert_eq!(e.class(), crate::types::ErrorClass::Config);
        }
        let e = parse("label = \n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        // A value of the wrong type names its key and line too.
        let e = parse("label = \"x\"\n\n[vm]\nvcpus = \"two\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file c.toml, line 4, vm.vcpus: "),
            "{e}"
        );
    }

    /// The three layers merge key by key: a layer that sets one key of a section leaves the
    /// section's other keys to the layers below.
    #[test]
    fn each_key_comes_from_the_last_layer_that_sets_it() {
        let file = "label = \"file\"\nmax_vms = 5\nstate_dir = \"/srv/file\"\n\
                    [forgejo]\nurl = \"http://file.example/\"\nretries = 7\n\
                    [vm]\naccel = \"kvm\"\nvcpus = 4\n";
        let env = env_of(&[
            ("FORGEJO_URL", "http://env.example/"),
            ("FORGEJO_ADMIN_TOKEN", "t"),
        ]);
        let flags = ConfigLayer {
            label: Some("flag".into()),
            state_dir: Some("/srv/flag".into()),
            vm: VmLayer {
                accel: Some(Accel::Tcg),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Config::from_parts(file, Path::new("c.toml"), &env, &flags).unwrap();
        assert_eq!(c.label, "flag");
        assert_eq!(c.max_vms, 5);
        assert_eq!(c.poll_interval, DEFAULT_POLL_INTERVAL);
        assert_eq!(c.state_dir, Path::new("/srv/flag"));
        assert_eq!(c.vm.log_dir, Path::new("/srv/flag/logs"));
        assert_eq!(c.vm.disk_dir, Path::new("/srv/flag/disks"));
        assert_eq!(c.forgejo.url.as_str(), "http://env.example/");
        assert_eq!(c.forgejo.retries, 7);
        assert_eq!(c.vm.accel, Accel::Tcg);
        assert_eq!(c.vm.vcpus, 4);

        let flags = ConfigLayer {
            forgejo: ForgejoLayer {
                url: Some(Url::parse("http://flag.example/").unwrap()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Config::from_parts(file, Path::new("c.toml"), &env, &flags).unwrap();
        assert_eq!(c.forgejo.url.as_str(), "http://flag.example/");
        assert_eq!(c.forgejo.retries, 7);
        assert_eq!(c.label, "file");

        let e = Config::from_parts(
            file,
            Path::new("c.toml"),
            &env_of(&[("FORGEJO_URL", "not a url"), ("FORGEJO_ADMIN_TOKEN", "t")]),
            &ConfigLayer::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                Error::Config(ConfigError::EnvUrl {
                    var: "FORGEJO_URL",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    /// Flags are the same layer as the file: clap sets only the keys given on the command line.
    #[test]
    fn flags_parse_into_a_layer_with_only_their_keys() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            flags: ConfigLayer,
        }
        let cli = Cli::try_parse_from([
            "serve",
            "--label",
            "l",
            "--poll-interval",
            "2s",
            "--max-vms",
            "4",
            "--base-image",
            "/b.qcow2",
            "--boot-deadline",
            "1m",
            "--job-deadline",
            "1h",
            "--state-dir",
            "/s",
            "--runtime-dir",
            "/r",
            "--forgejo-url",
            "http://f.example/",
            "--runner-url",
            "http://r.example/",
            "--admin-token-file",
            "/tok",
            "--accel",
            "tcg",
        ])
        .unwrap();
        let expected = ConfigLayer {
            label: Some("l".into()),
            poll_interval: Some(Duration::from_secs(2)),
            max_vms: Some(4),
            base_image: Some("/b.qcow2".into()),
            boot_deadline: Some(Duration::from_secs(60)),
            job_deadline: Some(Duration::from_secs(3600)),
            state_dir: Some("/s".into()),
            runtime_dir: Some("/r".into()),
            forgejo: ForgejoLayer {
                url: Some(Url::parse("http://f.example/").unwrap()),
                runner_url: Some(Url::parse("http://r.example/").unwrap()),
                admin_token_file: Some("/tok".into()),
                ..Default::default()
            },
            vm: VmLayer {
                accel: Some(Accel::Tcg),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(cli.flags, expected);
        let none = Cli::try_parse_from(["serve"]).unwrap();
        assert_eq!(none.flags, ConfigLayer::default());
        // The token itself is never a flag.
        assert!(Cli::try_parse_from(["serve", "--admin-token", "x"]).is_err());
    }

    #[test]
    fn sections_are_the_modules_configs() {
        let c = parse(
            "[forgejo]\nlevel = { org = \"acme\" }\nci_user_visibility = \"public\"\n\
             runner_url = \"http://10.0.0.2:3000/\"\n[vm]\naccel = \"tcg\"\nmemory_mib = 512\n\
             [net]\nbridge = \"br-ci\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
        )
        .unwrap();
        assert_eq!(c.forgejo.level, crate::forgejo::Level::Org("acme".into()));
        assert_eq!(
            c.forgejo.ci_user_visibility,
            crate::forgejo::Visibility::Public
        );
        assert_eq!(c.runner_url().as_str(), "http://10.0.0.2:3000/");
        assert_eq!(c.vm.accel, Accel::Tcg);
        assert_eq!(c.vm.memory_mib, 512);
        assert_eq!(c.net.bridge, "br-ci");
        assert!(c.metrics.listen.is_some());
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "label = \"from-file\"\nmax_vms = 5\npoll_interval = \"2s\"\n[forgejo]\nurl = \"http://file.example:3000/\"\n",
        );
        let tok = write(dir.path(), "tok", "file-token\n");
        let env = env_of(&[
            ("FORGEJO_URL", "http://env.example/"),
            ("FORGEJO_ADMIN_TOKEN_FILE", tok.to_str().unwrap()),
        ]);
        let flags = ConfigLayer {
            label: Some("from-flag".into()),
            vm: VmLayer {
                accel: Some(Accel::Tcg),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Config::load(&Sources {
            file: Some(&file),
            env: &env,
            flags: &flags,
        })
        .unwrap();
        assert_eq!(c.label, "from-flag");
        assert_eq!(c.max_vms, 5);
        assert_eq!(c.vm.accel, Accel::Tcg);
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.forgejo.url.as_str(), "http://env.example/");
        assert_eq!(c.admin_token.expose(), "file-token");

        let flags = ConfigLayer {
            forgejo: ForgejoLayer {
                url: Some(Url::parse("http://flag.example/").unwrap()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Config::load(&Sources {
            file: Some(&file),
            env: &env,
            flags: &flags,
        })
        .unwrap();
        assert_eq!(c.forgejo.url.as_str(), "http://flag.example/");
        let none = env_of(&[("FORGEJO_ADMIN_TOKEN", "t")]);
        let c = Config::load(&Sources {
            file: Some(&file),
            env: &none,
            flags: &ConfigLayer::default(),
        })
        .unwrap();
        assert_eq!(c.forgejo.url.as_str(), "http://file.example:3000/");
    }

    #[test]
    fn token_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        write(&creds, CREDENTIAL_NAME, "cred-token");
        let from_cfg = write(dir.path(), "cfgtok", "cfg-token");
        let from_envfile = write(dir.path(), "envtok", "envfile-token");
        let file = write(
            dir.path(),
            "c.toml",
            &format!(
                "[forgejo]\nurl = \"http://f/\"\nadmin_token_file = {:?}\n",
                from_cfg
            ),
        );
        let none = ConfigLayer::default();
        let load = |env: &[(&str, &str)], flags: &ConfigLayer| {
            let env = env_of(env);
            Config::load(&Sources {
                file: Some(&file),
                env: &env,
                flags,
            })
            .unwrap()
        };
        let creds_s = creds.to_str().unwrap();
        let envfile_s = from_envfile.to_str().unwrap();
        assert_eq!(load(&[], &none).admin_token.expose(), "cfg-token");
        assert_eq!(
            load(&[("CREDENTIALS_DIRECTORY", creds_s)], &none)
                .admin_token
                .expose(),
            "cred-token"
        );
        let c = load(
            &[
                ("CREDENTIALS_DIRECTORY", creds_s),
                ("FORGEJO_ADMIN_TOKEN_FILE", envfile_s),
            ],
            &none,
        );
        assert_eq!(c.admin_token.expose(), "envfile-token");
        let c = load(
            &[
                ("FORGEJO_ADMIN_TOKEN_FILE", envfile_s),
                ("FORGEJO_ADMIN_TOKEN", "env-token"),
            ],
            &none,
        );
        assert_eq!(c.admin_token.expose(), "env-token");
        assert_eq!(c.admin_token_source, "FORGEJO_ADMIN_TOKEN");
        let flags = ConfigLayer {
            forgejo: ForgejoLayer {
                admin_token_file: Some(from_envfile.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            load(&[("FORGEJO_ADMIN_TOKEN", "env-token")], &flags)
                .admin_token
                .expose(),
            "envfile-token"
        );
    }

    #[test]
    fn missing_pieces_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "c.toml", "");
        let none = ConfigLayer::default();
        let env = env_of(&[]);
        let e = Config::load(&Sources {
            file: Some(&file),
            env: &env,
            flags: &none,
        })
        .unwrap_err();
        assert!(e.to_string().contains("Forgejo URL"), "{e}");
        let env = env_of(&[("FORGEJO_URL", "http://f/")]);
        let e = Config::load(&Sources {
            file: Some(&file),
            env: &env,
            flags: &none,
        })
        .unwrap_err();
        assert!(e.to_string().contains("admin token"), "{e}");
        let missing = dir.path().join("nope.toml");
        let e = Config::load(&Sources {
            file: Some(&missing),
            env: &env,
            flags: &none,
        })
        .unwrap_err();
        assert!(e.to_string().contains("nope.toml"), "{e}");
        assert_eq!(e.class(), crate::types::ErrorClass::Config);
        let env = env_of(&[
            ("FORGEJO_URL", "http://f/"),
            ("FORGEJO_ADMIN_TOKEN_FILE", "/nonexistent/tok"),
        ]);
        let e = Config::load(&Sources {
            file: Some(&file),
            env: &env,
            flags: &none,
        })
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tok"), "{e}");
    }

    #[test]
    fn poll_interval_min_defaults_to_one_second_or_a_shorter_poll_interval() {
        let c = parse("poll_interval = \"300ms\"").unwrap();
        assert_eq!(c.poll_interval_min, Duration::from_millis(300));
        c.validate().unwrap();
        let c = parse("poll_interval = \"1m\"\npoll_interval_min = \"2s\"").unwrap();
        assert_eq!(c.poll_interval_min, Duration::from_secs(2));
        let e = parse("poll_interval = \"1s\"\npoll_interval_min = \"2s\"").unwrap_err();
        assert!(
            e.to_string().contains("poll_interval_min")
                && e.to_string().contains("poll_interval (1s)"),
            "{e}"
        );
    }

    #[test]
    fn validation_rejects_bad_values() {
        let c = parse("").unwrap();
        c.validate().unwrap();
        for f in [
            |c: &mut Config| c.max_vms = 0,
            |c: &mut Config| c.label = "a,b".into(),
            |c: &mut Config| c.label = String::new(),
            |c: &mut Config| c.poll_interval = Duration::ZERO,
            |c: &mut Config| c.poll_interval_min = Duration::ZERO,
            |c: &mut Config| c.poll_interval_min = Duration::from_secs(16),
            |c: &mut Config| c.boot_deadline = Duration::from_secs(10 * 3600),
            |c: &mut Config| c.vm.vcpus = 0,
            |c: &mut Config| c.forgejo.url = Url::parse("ftp://f/").unwrap(),
            |c: &mut Config| c.net.bridge = "fr-bad".into(),
            |c: &mut Config| c.metrics.listen = Some("0.0.0.0:9464".parse().unwrap()),
        ] {
            let mut bad = c.clone();
            f(&mut bad);
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    /// A range that leaves QEMU root, shares an identity or wraps to `-1` is refused, naming the
    /// key; through `Config` (what `serve` and `--check-config` load) as well.
    #[test]
    fn vm_uid_ranges_that_leave_qemu_privileged_or_shared_are_refused() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/usr/sbin/nologin\n\
                      alice:x:1000:1000::/home/alice:/bin/sh\n";
        let group = "root:x:0:\nkvm:x:104:\nstaff:x:50000:alice\n";
        let refused = |base: u32, count: u32| -> String {
            match check_vm_uids(base, count, passwd, group) {
                Err(ConfigError::Invalid { key, why, .. }) => format!("{key}: {why}"),
                other => panic!("{base}+{count}: {other:?}"),
            }
        };
        assert!(refused(0, 256).starts_with("vm.uid_base: must not be 0"));
        assert!(refused(5000, 0).starts_with("vm.uid_count"));
        assert!(refused(u32::MAX - 255, 256).contains("4294967295"));
        assert!(refused(u32::MAX, 1).contains("4294967295"));
        assert!(refused(u32::MAX - 10, 100).starts_with("vm.uid_count"));
        assert!(refused(65000, 1000).contains("\"nobody\" in /etc/passwd"));
        assert!(refused(900, 101).contains("\"alice\" in /etc/passwd"));
        assert!(refused(49999, 2).contains("\"staff\" in /etc/group"));
        assert!(refused(104, 1).contains("\"kvm\" in /etc/group"));
        for (base, count) in [(1_960_000_000, 256), (u32::MAX - 256, 256), (1001, 100)] {
            check_vm_uids(base, count, passwd, group).unwrap();
        }
        // This host's files, through the loaded config: root's uid is in them.
        let e = parse("[vm]\nuid_base = 0\n").unwrap_err();
        assert!(e.to_string().contains("vm.uid_base"), "{e}");
        let e = parse("[vm]\nuid_base = 4294967040\nuid_count = 256\n").unwrap_err();
        assert!(e.to_string().contains("vm.uid_count"), "{e}");
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
        let e = parse(&format!(
            "[vm]\nuid_base = {}\nuid_count = 2\n",
            nobody.as_raw() - 1
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("vm.uid_base") && e.to_string().contains("nobody"),
            "{e}"
        );
    }

    #[test]
    fn plain_http_to_public_addresses_is_warned_about() {
        let mut c = parse("").unwrap();
        let warned = |c: &Config| c.plain_http_warnings();
        for (url, warn) in [
            ("http://127.0.0.1:3000/", false),
            ("http://localhost/", false),
            ("http://192.168.1.10:3000/", false),
            ("http://10.0.0.2/", false),
            ("http://100.64.1.1/", false),
            ("http://[::1]/", false),
            ("http://[fd00::1]/", false),
            ("https://203.0.113.5/", false),
            ("https://forgejo.example/", false),
            ("http://203.0.113.5/", true),
            ("http://100.128.0.1/", true),
            ("http://forgejo.example/", true),
            ("http://[2001:db8::1]/", true),
        ] {
            c.forgejo.url = Url::parse(url).unwrap();
            c.runner_url = None;
            let w = warned(&c);
            assert_eq!(w.len(), usize::from(warn), "{url}: {w:?}");
            if warn {
                assert!(w[0].starts_with("forgejo.url "), "{w:?}");
            }
            // The same URL as runner_url (behind an https Forgejo URL).
            c.forgejo.url = Url::parse("https://f.example/").unwrap();
            c.runner_url = Some(Url::parse(url).unwrap());
            let w = warned(&c);
            assert_eq!(w.len(), usize::from(warn), "runner_url {url}: {w:?}");
            if warn {
                assert!(
                    w[0].contains("forgejo.runner_url") && w[0].contains("https"),
                    "{w:?}"
                );
            }
        }
    }

    #[test]
    fn printed_config_hides_the_token_and_reads_back_the_same() {
        let env = env_of(&[
            ("FORGEJO_URL", "http://f/"),
            ("FORGEJO_ADMIN_TOKEN", "super-secret-token-123"),
        ]);
        let round_trip = |text: &str| {
            let c =
                Config::from_parts(text, Path::new("c"), &env, &ConfigLayer::default()).unwrap();
            let printed = c.to_toml();
            assert!(!printed.contains("super-secret-token-123"), "{printed}");
            assert!(
                printed.contains("# admin token: [redacted], from FORGEJO_ADMIN_TOKEN"),
                "{printed}"
            );
            assert!(!format!("{c:?}").contains("super-secret-token-123"));
            // What --check-config prints is itself a config file, for exactly this config.
            let back = Config::from_parts(
                &printed,
                Path::new("printed"),
                &env_of(&[("FORGEJO_ADMIN_TOKEN", "other")]),
                &ConfigLayer::default(),
            )
            .unwrap_or_else(|e| panic!("{e}\n{printed}"));
            assert_eq!(ConfigLayer::from(back), ConfigLayer::from(c), "{printed}");
            printed
        };
        let printed = round_trip("");
        for key in [
            "label = ",
            "poll_interval = \"15s\"",
            "poll_interval_min = \"1s\"",
            "[forgejo]",
            "[vm]",
            "[tokens]",
        ] {
            assert!(printed.contains(key), "{key}: {printed}");
        }
        assert!(!printed.contains("runtime_root"), "{printed}");
        // Every optional key set, so that each one is printed.
        round_trip(
            "label = \"l\"\npoll_interval = \"500ms\"\npoll_interval_min = \"200ms\"\nmax_vms = 7\nbase_image = \"/b.qcow2\"\n\
             boot_deadline = \"2m\"\njob_deadline = 9000\nstate_dir = \"/s\"\nruntime_dir = \"/r\"\n\
             [forgejo]\nurl = \"https://f.example/\"\nlevel = { repo = { owner = \"o\", repo = \"r\" } }\n\
             request_timeout_ms = 1\nconnect_timeout_ms = 2\nretries = 0\nretry_backoff_ms = 3\n\
             ci_user_visibility = \"limited\"\nci_user_email_domain = \"ci.invalid\"\n\
             runner_url = \"http://10.0.0.2:3000/\"\nadmin_token_file = \"/tok\"\n\
             [vm]\nqemu = \"/q\"\nqemu_img = \"/qi\"\naccel = \"tcg\"\nfirmware_code = \"/c.fd\"\n\
             firmware_vars = \"/v.fd\"\nfirmware_descriptor_dirs = [\"/fw\"]\nvcpus = 1\nmemory_mib = 512\n\
             log_dir = \"/l\"\nkeep_serial_log = false\npowerdown_grace_secs = 1\nquit_grace_secs = 2\n\
             disk_dir = \"/d\"\ndisk_max_mib = 100\ndisk_budget_mib = 1000\nuid_base = 5000\n\
             uid_count = 2\nmemory_overhead_mib = 64\ntcg_tb_size_mib = 32\npids_max = 64\n\
             serial_head_kib = 1\nserial_tail_kib = 2\nserial_logs_keep = 3\nserial_logs_max_age_days = 4\n\
             [net]\nbridge = \"br-ci\"\nsubnet = \"10.9.0.1/16\"\nbridge_mac = \"02:00:00:00:00:01\"\n\
             dns_servers = [\"192.0.2.53\"]\nallow = [\"192.168.1.10:3000\", \"10.1.0.0/16\"]\n\
             host_ports = [3128]\nuplink = \"eth1\"\nconn_rate_per_sec = 10\nmax_conns_per_vm = 20\n\
             [metrics]\nlisten = \"127.0.0.1:9464\"\nallow_all_interfaces = true\n\
             [tokens]\nfork_pull_requests = \"none\"\nfork_write_repos = [\"acme/web\"]\n",
        );
    }

    /// The operator commands find the same dirs `serve` uses, for every combination of settings.
    #[test]
    fn agrees_with_the_operator_commands() {
        let env = env_of(&[("FORGEJO_ADMIN_TOKEN", "t0ken")]);
        // (top-level keys, [vm] keys); [forgejo] goes in between so each key lands in its table.
        for (top, vm) in [
            ("", ""),
            ("state_dir = \"/srv/st\"", ""),
            (
                "runtime_dir = \"/run/x\"\nstate_dir = \"/srv/st\"",
                "log_dir = \"/var/log/f\"",
            ),
            ("", "log_dir = \"/var/log/f\""),
        ] {
            let text = format!("{top}\n[forgejo]\nurl = \"https://forgejo.example\"\n[vm]\n{vm}\n");
            let serve =
                Config::from_parts(&text, Path::new("c"), &env, &ConfigLayer::default()).unwrap();
            let file = ConfigFile {
                path: "c".into(),
                text: text.clone(),
            };
            let ops = crate::paths::DirsLayer::from_file(&file).unwrap();
            assert_eq!(ops, file.parse::<ConfigLayer>().unwrap().dirs(), "{text}");
            assert_eq!(ops.resolve(), serve.dirs(), "{text}");
        }
    }
}
