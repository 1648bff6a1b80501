//! `serve`'s configuration: a TOML file, then the environment, then command-line flags (each overrides
//! the one before). The admin token never comes from argv or from the TOML file itself: only from
//! `FORGEJO_ADMIN_TOKEN`, a file named by `FORGEJO_ADMIN_TOKEN_FILE` / `--admin-token-file` /
//! `forgejo.admin_token_file`, or systemd's `$CREDENTIALS_DIRECTORY/forgejo-admin-token`.
//!
//! The file's sections are the modules' own config types: `[forgejo]` is [`forgejo::ClientConfig`]
//! (plus `runner_url` and `admin_token_file`), `[vm]` is [`vm::VmConfig`] (its `runtime_root` is the
//! top-level `runtime_dir`; its `log_dir` defaults to `<state_dir>/logs`), `[net]` is
//! [`net::NetConfig`], `[metrics]` is [`ops::MetricsConfig`]. Every section rejects unknown keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::{duration, Error};
use crate::forgejo::ClientConfig;
use crate::net::NetConfig;
use crate::ops::MetricsConfig;
use crate::secret::Secret;
use crate::types::Accel;
use crate::vm::VmConfig;

/// Where `serve` looks for its config file when `--config` is not given (a missing file there is fine).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fkr-qemu/config.toml";
/// The systemd credential name (`LoadCredential=forgejo-admin-token:…`).
pub const CREDENTIAL_NAME: &str = "forgejo-admin-token";

/// The file's top-level keys (the sections `[forgejo]` and `[vm]` are read in a second step).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileTop {
    label: String,
    #[serde(with = "duration")]
    poll_interval: Duration,
    max_vms: usize,
    base_image: Option<PathBuf>,
    #[serde(with = "duration")]
    boot_deadline: Duration,
    #[serde(with = "duration")]
    job_deadline: Duration,
    state_dir: PathBuf,
    runtime_dir: PathBuf,
    net: NetConfig,
    metrics: MetricsConfig,
    tokens: TokenPolicy,
}

/// What a job whose run is a pull request from a fork gets instead of a `write:package` token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkAccess {
    /// A `read:package` token: the job can pull the CI user's images, not push.
    #[default]
    Read,
    /// No token and no registry credentials in the VM.
    None,
}

/// `[tokens]`: how far the registry token of a job is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
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

impl Default for FileTop {
    fn default() -> Self {
        Self {
            label: "external-host".into(),
            poll_interval: Duration::from_secs(15),
            max_vms: 3,
            base_image: None,
            boot_deadline: Duration::from_secs(600),
            job_deadline: Duration::from_secs(3 * 3600),
            state_dir: PathBuf::from("/var/lib/fkr-qemu"),
            runtime_dir: PathBuf::from("/run/fkr-qemu"),
            net: NetConfig::default(),
            metrics: MetricsConfig::default(),
            tokens: TokenPolicy::default(),
        }
    }
}

/// The effective configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `runs-on` label this host serves.
    pub label: String,
    /// How often Forgejo is asked for waiting jobs.
    pub poll_interval: Duration,
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
    /// Never printed (`Secret`).
    pub admin_token: Secret,
    /// Where the admin token came from (for `--check-config`), never the token itself.
    pub admin_token_source: String,
    pub vm: VmConfig,
    pub net: NetConfig,
    pub metrics: MetricsConfig,
    pub tokens: TokenPolicy,
}

/// Values given as command-line flags (highest precedence). Never carries the token itself.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub forgejo_url: Option<Url>,
    pub runner_url: Option<Url>,
    pub admin_token_file: Option<PathBuf>,
    pub label: Option<String>,
    pub poll_interval: Option<Duration>,
    pub max_vms: Option<usize>,
    pub base_image: Option<PathBuf>,
    pub job_deadline: Option<Duration>,
    pub boot_deadline: Option<Duration>,
    pub state_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub accel: Option<Accel>,
}

/// Where the configuration comes from; `env` is a lookup so tests need not touch the process env.
pub struct Sources<'a> {
    /// `--config`; `None` = the default path, which may be missing.
    pub file: Option<&'a Path>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub flags: &'a Overrides,
}

fn file_error(path: &Path, message: impl Into<String>) -> Error {
    Error::ConfigFile {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Removes `key` from a section table and returns it as a string, if present.
fn take_string(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    path: &Path,
) -> Result<Option<String>, Error> {
    match table.remove(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(file_error(
            path,
            format!("{section}.{key} must be a string, not {}", other.type_str()),
        )),
    }
}

fn take_section(table: &mut toml::Table, name: &str, path: &Path) -> Result<toml::Table, Error> {
    match table.remove(name) {
        None => Ok(toml::Table::new()),
        Some(toml::Value::Table(t)) => Ok(t),
        Some(other) => Err(file_error(
            path,
            format!(
                "{name} must be a table ([{name}]), not {}",
                other.type_str()
            ),
        )),
    }
}

impl Config {
    /// Reads the file, applies the environment and the flags, reads the admin token and checks the
    /// values (no network; `serve --check-config` does the rest).
    pub fn load(src: &Sources<'_>) -> Result<Config, Error> {
        let (text, path) = match src.file {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| file_error(path, format!("cannot read: {e}")))?,
                path.to_owned(),
            ),
            None => {
                let path = PathBuf::from(DEFAULT_CONFIG_PATH);
                match std::fs::read_to_string(&path) {
                    Ok(text) => (text, path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), path),
                    Err(e) => return Err(file_error(&path, format!("cannot read: {e}"))),
                }
            }
        };
        Self::from_parts(&text, &path, src.env, src.flags)
    }

    /// [`Config::load`] on a file's text.
    pub fn from_parts(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Config, Error> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| file_error(path, e.message().to_owned() + &span_hint(text, e.span())))?;
        let mut forgejo = take_section(&mut table, "forgejo", path)?;
        let mut vm = take_section(&mut table, "vm", path)?;
        let mut top = FileTop::deserialize(toml::Value::Table(table))
            .map_err(|e| file_error(path, e.message()))?;

        // [forgejo]: our own keys out, URL precedence applied, the rest is the client's.
        let runner_url = take_string(&mut forgejo, "forgejo", "runner_url", path)?
            .map(|u| {
                Url::parse(&u)
                    .map_err(|e| file_error(path, format!("forgejo.runner_url {u:?}: {e}")))
            })
            .transpose()?;
        let mut admin_token_file =
            take_string(&mut forgejo, "forgejo", "admin_token_file", path)?.map(PathBuf::from);
        if let Some(url) = env("FORGEJO_URL").filter(|s| !s.is_empty()) {
            Url::parse(&url)
                .map_err(|e| Error::Config(format!("FORGEJO_URL {url:?} is not a URL: {e}")))?;
            forgejo.insert("url".into(), url.into());
        }
        if let Some(url) = &flags.forgejo_url {
            forgejo.insert("url".into(), url.as_str().into());
        }
        if !forgejo.contains_key("url") {
            return Err(Error::Config(
                "no Forgejo URL: set forgejo.url, FORGEJO_URL or --forgejo-url".into(),
            ));
        }
        let forgejo = ClientConfig::deserialize(toml::Value::Table(forgejo))
            .map_err(|e| file_error(path, format!("[forgejo]: {}", e.message())))?;

        // Top-level flags.
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        if flags.base_image.is_some() {
            top.base_image.clone_from(&flags.base_image);
        }
        set(&mut top.label, &flags.label);
        set(&mut top.poll_interval, &flags.poll_interval);
        set(&mut top.max_vms, &flags.max_vms);
        set(&mut top.job_deadline, &flags.job_deadline);
        set(&mut top.boot_deadline, &flags.boot_deadline);
        set(&mut top.state_dir, &flags.state_dir);
        set(&mut top.runtime_dir, &flags.runtime_dir);

        // [vm]: the runtime dir is the top-level one; serial logs default under the state dir.
        if vm.contains_key("runtime_root") {
            return Err(file_error(
                path,
                "vm.runtime_root: set the top-level runtime_dir instead",
            ));
        }
        let log_dir_given = vm.contains_key("log_dir");
        let disk_dir_given = vm.contains_key("disk_dir");
        if let Some(accel) = flags.accel {
            vm.insert("accel".into(), accel.to_string().into());
        }
        let mut vm = VmConfig::deserialize(toml::Value::Table(vm))
            .map_err(|e| file_error(path, format!("[vm]: {}", e.message())))?;
        vm.runtime_root = top.runtime_dir.clone();
        if !log_dir_given {
            vm.log_dir = top.state_dir.join("logs");
        }
        // Overlays live on disk under the state dir, never in the runtime dir (tmpfs, i.e. RAM).
        if !disk_dir_given {
            vm.disk_dir = top.state_dir.join("disks");
        }

        if flags.admin_token_file.is_some() {
            admin_token_file.clone_from(&flags.admin_token_file);
        }
        let (admin_token, admin_token_source) =
            read_admin_token(env, admin_token_file.as_deref(), flags)?;

        let cfg = Config {
            base_image: top
                .base_image
                .clone()
                .unwrap_or_else(|| top.state_dir.join("images/runner-base.qcow2")),
            label: top.label,
            poll_interval: top.poll_interval,
            max_vms: top.max_vms,
            boot_deadline: top.boot_deadline,
            job_deadline: top.job_deadline,
            state_dir: top.state_dir,
            runtime_dir: top.runtime_dir,
            forgejo,
            runner_url,
            admin_token_file,
            admin_token,
            admin_token_source,
            vm,
            net: top.net,
            metrics: top.metrics,
            tokens: top.tokens,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the values themselves (no network, no file existence: see `serve --check-config`).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        for (key, u) in [
            ("forgejo.url", Some(&self.forgejo.url)),
            ("forgejo.runner_url", self.runner_url.as_ref()),
        ] {
            if let Some(u) = u {
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return bad(format!(
                        "{key} {u} must be an http:// or https:// URL with a host"
                    ));
                }
            }
        }
        if self.label.is_empty()
            || !self
                .label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad(format!(
                "label {:?} must be non-empty and contain only letters, digits, '-', '_', '.'",
                self.label
            ));
        }
        if self.max_vms == 0 {
            return bad("max_vms must be at least 1".into());
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be positive".into());
        }
        if self.boot_deadline.is_zero() || self.job_deadline.is_zero() {
            return bad("boot_deadline and job_deadline must be positive".into());
        }
        if self.boot_deadline > self.job_deadline {
            return bad(format!(
                "boot_deadline ({}) is longer than job_deadline ({})",
                duration::format(self.boot_deadline),
                duration::format(self.job_deadline)
            ));
        }
        if self.vm.vcpus == 0 || self.vm.memory_mib < 256 {
            return bad("vm.vcpus must be at least 1 and vm.memory_mib at least 256".into());
        }
        self.net
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        self.metrics
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        for r in &self.tokens.fork_write_repos {
            if r.split('/').count() != 2 || r.split('/').any(str::is_empty) {
                return bad(format!("tokens.fork_write_repos: {r:?} is not owner/repo"));
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
        self.state_dir.join("ci-users.json")
    }

    /// The effective configuration as TOML, every default filled in, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut top = toml::Table::new();
        let mut put = |k: &str, v: toml::Value| {
            top.insert(k.to_owned(), v);
        };
        put("label", self.label.clone().into());
        put("poll_interval", duration::format(self.poll_interval).into());
        put("max_vms", (self.max_vms as i64).into());
        put("base_image", self.base_image.display().to_string().into());
        put("boot_deadline", duration::format(self.boot_deadline).into());
        put("job_deadline", duration::format(self.job_deadline).into());
        put("state_dir", self.state_dir.display().to_string().into());
        put("runtime_dir", self.runtime_dir.display().to_string().into());
        let mut forgejo = toml::Table::try_from(&self.forgejo).unwrap_or_default();
        if let Some(u) = &self.runner_url {
            forgejo.insert("runner_url".into(), u.as_str().into());
        }
        if let Some(p) = &self.admin_token_file {
            forgejo.insert("admin_token_file".into(), p.display().to_string().into());
        }
        top.insert("forgejo".into(), forgejo.into());
        let mut vm = toml::Table::try_from(&self.vm).unwrap_or_default();
        vm.remove("runtime_root");
        top.insert("vm".into(), vm.into());
        top.insert(
            "metrics".into(),
            toml::Table::try_from(&self.metrics)
                .unwrap_or_default()
                .into(),
        );
        top.insert(
            "net".into(),
            toml::Table::try_from(&self.net).unwrap_or_default().into(),
        );
        top.insert(
            "tokens".into(),
            toml::Table::try_from(&self.tokens)
                .unwrap_or_default()
                .into(),
        );
        let mut text =
            toml::to_string_pretty(&top).unwrap_or_else(|e| format!("# unprintable: {e}\n"));
        text.push_str(&format!(
            "# admin token: [redacted], from {}\n",
            self.admin_token_source
        ));
        text
    }
}

/// Token sources, lowest precedence first: `forgejo.admin_token_file`,
/// `$CREDENTIALS_DIRECTORY/forgejo-admin-token`, `FORGEJO_ADMIN_TOKEN_FILE`, `FORGEJO_ADMIN_TOKEN`,
/// `--admin-token-file`.
fn read_admin_token(
    env: &dyn Fn(&str) -> Option<String>,
    config_file: Option<&Path>,
    flags: &Overrides,
) -> Result<(Secret, String), Error> {
    enum Source {
        File(PathBuf),
        Value(Secret),
    }
    let mut chosen: Option<(&str, Source)> = None;
    if let (Some(p), None) = (config_file, &flags.admin_token_file) {
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
    if let Some(p) = &flags.admin_token_file {
        chosen = Some(("--admin-token-file", Source::File(p.clone())));
    }
    let Some((label, source)) = chosen else {
        return Err(Error::Config(format!(
            "no admin token: set FORGEJO_ADMIN_TOKEN, FORGEJO_ADMIN_TOKEN_FILE, forgejo.admin_token_file, \
             or the systemd credential {CREDENTIAL_NAME}"
        )));
    };
    let (token, source) = match source {
        Source::Value(s) => (s, label.to_owned()),
        Source::File(p) => {
            let text = std::fs::read_to_string(&p).map_err(|e| {
                Error::Config(format!(
                    "cannot read the admin token file {} (from {label}): {e}",
                    p.display()
                ))
            })?;
            (
                Secret::new(text.trim()),
                format!("{label} ({})", p.display()),
            )
        }
    };
    if token.is_empty() {
        return Err(Error::Config(format!(
            "the admin token from {source} is empty"
        )));
    }
    Ok((token, source))
}

/// ` (line N)` for a TOML error span, so the message points at the offending key.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        Config::from_parts(text, Path::new("c.toml"), &env, &Overrides::default())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse("").unwrap();
        assert_eq!(c.label, "external-host");
        assert_eq!(c.poll_interval, Duration::from_secs(15));
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
        let text = c.to_redacted_toml();
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
            ("[vm]\ncpus = 2\n", "cpus"),
            ("[forgejo]\nadmin_token = \"x\"\n", "admin_token"),
            ("[net]\nbrigde = \"x\"\n", "brigde"),
            ("[metrics]\nlisten_addr = \"x\"\n", "listen_addr"),
            ("[bogus]\n", "bogus"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
            assert_eq!(e.class(), crate::types::ErrorClass::Config);
        }
        let e = parse("label = \n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
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
        let flags = Overrides {
            label: Some("from-flag".into()),
            accel: Some(Accel::Tcg),
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

        let flags = Overrides {
            forgejo_url: Some(Url::parse("http://flag.example/").unwrap()),
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
            flags: &Overrides::default(),
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
        let none = Overrides::default();
        let load = |env: &[(&str, &str)], flags: &Overrides| {
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
        let flags = Overrides {
            admin_token_file: Some(from_envfile.clone()),
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
        let none = Overrides::default();
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
    fn validation_rejects_bad_values() {
        let c = parse("").unwrap();
        c.validate().unwrap();
        for f in [
            |c: &mut Config| c.max_vms = 0,
            |c: &mut Config| c.label = "a,b".into(),
            |c: &mut Config| c.label = String::new(),
            |c: &mut Config| c.poll_interval = Duration::ZERO,
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
    fn redacted_toml_hides_token_and_round_trips() {
        let env = env_of(&[
            ("FORGEJO_URL", "http://f/"),
            ("FORGEJO_ADMIN_TOKEN", "super-secret-token-123"),
        ]);
        let c = Config::from_parts(
            "max_vms = 7\n[vm]\naccel = \"tcg\"\n[net]\nallow = [\"192.168.1.10:3000\"]\n\
             bridge_mac = \"02:00:00:00:00:01\"\ndns_servers = [\"192.0.2.53\"]\n",
            Path::new("c"),
            &env,
            &Overrides::default(),
        )
        .unwrap();
        let text = c.to_redacted_toml();
        assert!(!text.contains("super-secret-token-123"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        assert!(!format!("{c:?}").contains("super-secret-token-123"));
        // What --check-config prints is itself a valid config file.
        let back =
            Config::from_parts(&text, Path::new("printed"), &env, &Overrides::default()).unwrap();
        assert_eq!(back.max_vms, 7);
        assert_eq!(back.base_image, c.base_image);
        assert_eq!(back.vm, c.vm);
        assert_eq!(back.forgejo, c.forgejo);
        assert_eq!(back.net, c.net);
    }
}
