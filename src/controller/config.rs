//! `serve`'s configuration: a TOML file, then the environment, then command-line flags (each overrides
//! the one before). The admin token never comes from argv or from the TOML file itself: only from
//! `FORGEJO_ADMIN_TOKEN`, a file named by `FORGEJO_ADMIN_TOKEN_FILE` / `--admin-token-file` /
//! `forgejo.admin_token_file`, or systemd's `$CREDENTIALS_DIRECTORY/forgejo-admin-token`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{duration, Error};
use crate::secret::Secret;

/// Where `serve` looks for its config file when `--config` is not given (a missing file there is fine).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fkr-qemu/config.toml";
/// The systemd credential name (`LoadCredential=forgejo-admin-token:…`).
pub const CREDENTIAL_NAME: &str = "forgejo-admin-token";

/// At which level ephemeral runners are registered (decides the admin token's `write:` scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RunnerLevel {
    /// `/admin/actions/runners`: needs `write:admin` only.
    #[default]
    Instance,
    /// `/orgs/{owner}/actions/runners` of the job's owner (needs `write:organization`).
    #[serde(alias = "org")]
    Organization,
    /// `/repos/{owner}/{repo}/actions/runners` of the job's repository (needs `write:repository`).
    #[serde(alias = "repo")]
    Repository,
}

/// Visibility of the CI users (decides who may pull the images they push).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    /// Signed-in users of the instance: images are shared inside the instance, not with the world.
    #[default]
    Limited,
    Private,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Limited => "limited",
            Visibility::Private => "private",
        }
    }
}

/// The `[forgejo]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForgejoConfig {
    /// Forgejo's base URL as this host reaches it (`FORGEJO_URL`, `--forgejo-url`).
    pub url: Option<Url>,
    /// The URL the VMs use (runner and registry); defaults to `url`. Set it when the host reaches
    /// Forgejo through an address the guests cannot use (for example `127.0.0.1`).
    pub runner_url: Option<Url>,
    /// A file holding the admin token (mode 0600 recommended).
    pub admin_token_file: Option<PathBuf>,
    /// Per-request timeout of Forgejo API calls.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// The admin token (never read from the TOML file, never printed).
    #[serde(skip)]
    pub admin_token: Option<Secret>,
    /// Where the admin token came from, for `--check-config` (never the token itself).
    #[serde(skip)]
    pub admin_token_source: Option<String>,
}

impl Default for ForgejoConfig {
    fn default() -> Self {
        Self {
            url: None,
            runner_url: None,
            admin_token_file: None,
            request_timeout: Duration::from_secs(30),
            admin_token: None,
            admin_token_source: None,
        }
    }
}

/// The whole configuration file. Every key is optional; unknown keys are errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The `runs-on` label this host serves.
    pub label: String,
    /// How often Forgejo is asked for waiting jobs.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// At most this many VMs at once.
    pub max_vms: usize,
    /// The read-only base image (default `<state_dir>/images/runner-base.qcow2`).
    pub base_image: Option<PathBuf>,
    /// A VM whose runner has not picked its job up by then is stopped.
    #[serde(with = "duration")]
    pub boot_deadline: Duration,
    /// A VM still running after this (from launch) is stopped.
    #[serde(with = "duration")]
    pub job_deadline: Duration,
    pub runner_level: RunnerLevel,
    pub ci_user_visibility: Visibility,
    /// `ci-users.json`, images, serial logs.
    pub state_dir: PathBuf,
    /// Per-VM directories (`<runtime_dir>/vms/<name>/`) and the control socket.
    pub runtime_dir: PathBuf,
    pub forgejo: ForgejoConfig,
    pub vm: VmSection,
}

/// The `[vm]` section: the VM shape `serve` asks the driver for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSection {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// `auto` (KVM when it really works, else TCG), `kvm` or `tcg`.
    pub accel: String,
}

impl Default for VmSection {
    fn default() -> Self {
        Self {
            vcpus: 2,
            memory_mib: 2048,
            accel: "auto".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            label: "external-host".into(),
            poll_interval: Duration::from_secs(15),
            max_vms: 3,
            base_image: None,
            boot_deadline: Duration::from_secs(300),
            job_deadline: Duration::from_secs(3 * 3600),
            runner_level: RunnerLevel::Instance,
            ci_user_visibility: Visibility::Limited,
            state_dir: PathBuf::from("/var/lib/fkr-qemu"),
            runtime_dir: PathBuf::from("/run/fkr-qemu"),
            forgejo: ForgejoConfig::default(),
            vm: VmSection::default(),
        }
    }
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
    pub accel: Option<String>,
}

/// Where the configuration comes from; `env` is a lookup so tests need not touch the process env.
pub struct Sources<'a> {
    /// `--config`; `None` = the default path, which may be missing.
    pub file: Option<&'a Path>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub flags: &'a Overrides,
}

impl Config {
    /// Reads the file, applies the environment and the flags, reads the admin token and checks the
    /// values that need no I/O beyond that (see [`Config::validate`]).
    pub fn load(src: &Sources<'_>) -> Result<Config, Error> {
        let mut cfg = match src.file {
            Some(path) => Self::from_file(path)?,
            None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
                Ok(text) => Self::from_toml(&text, Path::new(DEFAULT_CONFIG_PATH))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
                Err(e) => return Err(Error::io("cannot read config file", DEFAULT_CONFIG_PATH, e)),
            },
        };
        cfg.apply_env(src.env)?;
        cfg.apply_flags(src.flags);
        cfg.read_admin_token(src.env, src.flags)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Config, Error> {
        toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: path.to_owned(),
            message: e.message().to_owned() + &span_hint(text, e.span()),
        })
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
        if let Some(url) = env("FORGEJO_URL").filter(|s| !s.is_empty()) {
            self.forgejo.url =
                Some(Url::parse(&url).map_err(|e| {
                    Error::Config(format!("FORGEJO_URL {url:?} is not a URL: {e}"))
                })?);
        }
        Ok(())
    }

    fn apply_flags(&mut self, f: &Overrides) {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        if f.forgejo_url.is_some() {
            self.forgejo.url.clone_from(&f.forgejo_url);
        }
        if f.runner_url.is_some() {
            self.forgejo.runner_url.clone_from(&f.runner_url);
        }
        if f.base_image.is_some() {
            self.base_image.clone_from(&f.base_image);
        }
        set(&mut self.label, &f.label);
        set(&mut self.poll_interval, &f.poll_interval);
        set(&mut self.max_vms, &f.max_vms);
        set(&mut self.job_deadline, &f.job_deadline);
        set(&mut self.boot_deadline, &f.boot_deadline);
        set(&mut self.state_dir, &f.state_dir);
        set(&mut self.runtime_dir, &f.runtime_dir);
        set(&mut self.vm.accel, &f.accel);
    }

    /// Token sources, lowest precedence first: `forgejo.admin_token_file`,
    /// `$CREDENTIALS_DIRECTORY/forgejo-admin-token`, `FORGEJO_ADMIN_TOKEN_FILE`,
    /// `FORGEJO_ADMIN_TOKEN`, `--admin-token-file`.
    fn read_admin_token(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<(), Error> {
        let mut chosen: Option<(String, TokenSource)> = None;
        if let Some(p) = &self.forgejo.admin_token_file {
            chosen = Some((
                "config forgejo.admin_token_file".into(),
                TokenSource::File(p.clone()),
            ));
        }
        if let Some(dir) = env("CREDENTIALS_DIRECTORY").filter(|s| !s.is_empty()) {
            let p = Path::new(&dir).join(CREDENTIAL_NAME);
            if p.exists() {
                chosen = Some(("systemd credential".into(), TokenSource::File(p)));
            }
        }
        if let Some(p) = env("FORGEJO_ADMIN_TOKEN_FILE").filter(|s| !s.is_empty()) {
            chosen = Some((
                "FORGEJO_ADMIN_TOKEN_FILE".into(),
                TokenSource::File(p.into()),
            ));
        }
        if let Some(t) = env("FORGEJO_ADMIN_TOKEN").filter(|s| !s.is_empty()) {
            chosen = Some((
                "FORGEJO_ADMIN_TOKEN".into(),
                TokenSource::Value(Secret::new(t)),
            ));
        }
        if let Some(p) = &flags.admin_token_file {
            chosen = Some(("--admin-token-file".into(), TokenSource::File(p.clone())));
        }
        let Some((label, source)) = chosen else {
            return Ok(());
        };
        let token = match source {
            TokenSource::Value(s) => s,
            TokenSource::File(p) => {
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| Error::io("cannot read the admin token file", &p, e))?;
                self.forgejo.admin_token_source = Some(format!("{label} ({})", p.display()));
                Secret::new(text.trim())
            }
        };
        if token.is_empty() {
            return Err(Error::Config(format!(
                "the admin token from {label} is empty"
            )));
        }
        if self.forgejo.admin_token_source.is_none() {
            self.forgejo.admin_token_source = Some(label);
        }
        self.forgejo.admin_token = Some(token);
        Ok(())
    }

    /// Checks the values themselves (no network, no file existence: see `serve --check-config`).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        let Some(url) = &self.forgejo.url else {
            return bad("no Forgejo URL: set forgejo.url, FORGEJO_URL or --forgejo-url".into());
        };
        for (key, u) in [
            ("forgejo.url", Some(url)),
            ("forgejo.runner_url", self.forgejo.runner_url.as_ref()),
        ] {
            if let Some(u) = u {
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return bad(format!(
                        "{key} {u} must be an http:// or https:// URL with a host"
                    ));
                }
            }
        }
        if self.forgejo.admin_token.is_none() {
            return bad(format!(
                "no admin token: set FORGEJO_ADMIN_TOKEN, FORGEJO_ADMIN_TOKEN_FILE, \
                 forgejo.admin_token_file, or the systemd credential {CREDENTIAL_NAME}"
            ));
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
        if !matches!(self.vm.accel.as_str(), "auto" | "kvm" | "tcg") {
            return bad(format!(
                "vm.accel {:?} must be auto, kvm or tcg",
                self.vm.accel
            ));
        }
        if self.vm.vcpus == 0 || self.vm.memory_mib < 256 {
            return bad("vm.vcpus must be at least 1 and vm.memory_mib at least 256".into());
        }
        Ok(())
    }

    /// The Forgejo URL (validated to exist by [`Config::validate`]).
    pub fn forgejo_url(&self) -> &Url {
        self.forgejo
            .url
            .as_ref()
            .expect("validated: forgejo.url is set")
    }

    /// The URL the guests use for the runner and the registry.
    pub fn runner_url(&self) -> &Url {
        self.forgejo
            .runner_url
            .as_ref()
            .unwrap_or_else(|| self.forgejo_url())
    }

    pub fn admin_token(&self) -> &Secret {
        self.forgejo
            .admin_token
            .as_ref()
            .expect("validated: admin token is set")
    }

    pub fn base_image(&self) -> PathBuf {
        self.base_image
            .clone()
            .unwrap_or_else(|| self.state_dir.join("images/runner-base.qcow2"))
    }

    pub fn ci_users_path(&self) -> PathBuf {
        self.state_dir.join("ci-users.json")
    }

    /// The effective configuration as TOML, every default filled in, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.base_image = Some(self.base_image());
        let mut text =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# unprintable: {e}\n"));
        let token_line = match &self.forgejo.admin_token_source {
            Some(src) => format!("# admin token: [redacted], from {src}\n"),
            None => "# admin token: not set\n".into(),
        };
        text.push_str(&token_line);
        text
    }
}

enum TokenSource {
    File(PathBuf),
    Value(Secret),
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

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.label, "external-host");
        assert_eq!(c.poll_interval, Duration::from_secs(15));
        assert_eq!(c.max_vms, 3);
        assert_eq!(c.state_dir, Path::new("/var/lib/fkr-qemu"));
        assert_eq!(c.runtime_dir, Path::new("/run/fkr-qemu"));
        assert_eq!(
            c.base_image(),
            Path::new("/var/lib/fkr-qemu/images/runner-base.qcow2")
        );
        assert_eq!(
            c.ci_users_path(),
            Path::new("/var/lib/fkr-qemu/ci-users.json")
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_line() {
        let e = Config::from_toml("label = \"x\"\nmax_vm = 3\n", Path::new("c.toml")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("max_vm") && m.contains("line 2"), "{m}");
        let e = Config::from_toml("[vm]\ncpus = 2\n", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
        // The token itself is not a config-file key.
        let e =
            Config::from_toml("[forgejo]\nadmin_token = \"x\"\n", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("admin_token"), "{e}");
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "label = \"from-file\"\nmax_vms = 5\npoll_interval = \"2s\"\n\
             [forgejo]\nurl = \"http://file.example:3000/\"\n",
        );
        let tok = write(dir.path(), "tok", "file-token\n");
        let env = env_of(&[
            ("FORGEJO_URL", "http://env.example/"),
            ("FORGEJO_ADMIN_TOKEN_FILE", tok.to_str().unwrap()),
        ]);
        let flags = Overrides {
            label: Some("from-flag".into()),
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
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.forgejo_url().as_str(), "http://env.example/");
        assert_eq!(c.runner_url().as_str(), "http://env.example/");
        assert_eq!(c.admin_token().expose(), "file-token");

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
        assert_eq!(c.forgejo_url().as_str(), "http://flag.example/");
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
        assert_eq!(load(&[], &none).admin_token().expose(), "cfg-token");
        assert_eq!(
            load(&[("CREDENTIALS_DIRECTORY", creds_s)], &none)
                .admin_token()
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
        assert_eq!(c.admin_token().expose(), "envfile-token");
        let c = load(
            &[
                ("FORGEJO_ADMIN_TOKEN_FILE", envfile_s),
                ("FORGEJO_ADMIN_TOKEN", "env-token"),
            ],
            &none,
        );
        assert_eq!(c.admin_token().expose(), "env-token");
        assert_eq!(
            c.forgejo.admin_token_source.as_deref(),
            Some("FORGEJO_ADMIN_TOKEN")
        );
        let flags = Overrides {
            admin_token_file: Some(from_envfile.clone()),
            ..Default::default()
        };
        assert_eq!(
            load(&[("FORGEJO_ADMIN_TOKEN", "env-token")], &flags)
                .admin_token()
                .expose(),
            "envfile-token"
        );
    }

    #[test]
    fn missing_pieces_are_config_errors() {
        let env = env_of(&[]);
        let none = Overrides::default();
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "c.toml", "");
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
        let e = Config::load(&Sources {
            file: Some(&dir.path().join("nope.toml")),
            env: &env,
            flags: &none,
        })
        .unwrap_err();
        assert!(e.to_string().contains("nope.toml"), "{e}");
        assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
    }

    #[test]
    fn validation_rejects_bad_values() {
        let mut c = Config::default();
        c.forgejo.url = Some(Url::parse("http://f/").unwrap());
        c.forgejo.admin_token = Some(Secret::new("t"));
        c.validate().unwrap();
        for f in [
            |c: &mut Config| c.max_vms = 0,
            |c: &mut Config| c.label = "a,b".into(),
            |c: &mut Config| c.label = String::new(),
            |c: &mut Config| c.poll_interval = Duration::ZERO,
            |c: &mut Config| c.boot_deadline = Duration::from_secs(10 * 3600),
            |c: &mut Config| c.vm.accel = "xen".into(),
            |c: &mut Config| c.forgejo.url = Some(Url::parse("ftp://f/").unwrap()),
        ] {
            let mut bad = c.clone();
            f(&mut bad);
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redacted_toml_hides_token_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "runner_level = \"repo\"\n[forgejo]\nurl = \"http://f/\"\n",
        );
        let env = env_of(&[("FORGEJO_ADMIN_TOKEN", "super-secret-token-123")]);
        let c = Config::load(&Sources {
            file: Some(&file),
            env: &env,
            flags: &Overrides::default(),
        })
        .unwrap();
        assert_eq!(c.runner_level, RunnerLevel::Repository);
        let text = c.to_redacted_toml();
        assert!(!text.contains("super-secret-token-123"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        assert!(!format!("{c:?}").contains("super-secret-token-123"));
        // What --check-config prints is itself a valid config file.
        let back = Config::from_toml(&text, Path::new("printed")).unwrap();
        assert_eq!(back.max_vms, c.max_vms);
        assert_eq!(back.base_image(), c.base_image());
        assert_eq!(back.runner_level, RunnerLevel::Repository);
    }
}
