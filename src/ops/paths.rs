//! Where the operator commands look: the daemon's runtime, state and log dirs, taken from flags,
//! then the daemon's config file, then the defaults (ARCHITECTURE.md).

use std::path::{Path, PathBuf};

use super::Error;

pub const DEFAULT_CONFIG: &str = "/etc/fkr-qemu/config.toml";
pub const DEFAULT_RUNTIME_DIR: &str = "/run/fkr-qemu";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fkr-qemu";

/// The directory flags every operator command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DirArgs {
    /// The daemon's config file; only its directory settings are read
    /// [default: /etc/fkr-qemu/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's runtime dir [default: from the config, else /run/fkr-qemu].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// The daemon's state dir [default: from the config, else /var/lib/fkr-qemu].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where serial logs are [default: from the config, else <state-dir>/logs].
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
}

/// The resolved directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
}

/// The directory settings of the daemon's config file, with the same keys and defaults as
/// `controller::Config` (top-level `runtime_dir` and `state_dir`, `[vm] log_dir` defaulting to
/// `<state_dir>/logs`). Everything else in it is ignored here: the operator commands need neither
/// Forgejo nor the admin token, which the full loader insists on.
#[derive(Debug, Default, serde::Deserialize)]
struct ConfigDirs {
    runtime_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    vm: VmSection,
}

#[derive(Debug, Default, serde::Deserialize)]
struct VmSection {
    log_dir: Option<PathBuf>,
}

impl DirArgs {
    pub fn resolve(&self) -> Result<Dirs, Error> {
        let file = match &self.config {
            Some(path) => read_config(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_config(Path::new(DEFAULT_CONFIG))?,
            None => ConfigDirs::default(),
        };
        let runtime_dir = self
            .runtime_dir
            .clone()
            .or(file.runtime_dir)
            .unwrap_or_else(|| DEFAULT_RUNTIME_DIR.into());
        let state_dir = self
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let log_dir = self
            .log_dir
            .clone()
            .or(file.vm.log_dir)
            .unwrap_or_else(|| state_dir.join("logs"));
        Ok(Dirs {
            runtime_dir,
            state_dir,
            log_dir,
        })
    }
}

fn read_config(path: &Path) -> Result<ConfigDirs, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| Error::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

impl Dirs {
    /// `<runtime_dir>/vms`: one dir per VM.
    pub fn vms_dir(&self) -> PathBuf {
        self.runtime_dir.join("vms")
    }

    /// `<runtime_dir>/vms/<name>`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    /// `<log_dir>/<name>.serial.log`.
    pub fn serial_log(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.serial.log"))
    }

    /// `<state_dir>/ci-users.json`.
    pub fn ci_users_file(&self) -> PathBuf {
        self.state_dir.join("ci-users.json")
    }
}

/// Checks a VM name given on the command line (the driver's rule: `fr-` + 8 lowercase hex
/// digits), so it can be joined onto a path safely.
pub fn check_vm_name(name: &str) -> Result<(), Error> {
    crate::types::VmName::parse(name)
        .map(|_| ())
        .map_err(|_| Error::InvalidVmName(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_config_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            "forgejo_url = \"https://x\"\nstate_dir = \"/srv/fkr\"\n[vm]\nlog_dir = \"/srv/logs\"\n",
        )
        .unwrap();
        let args = DirArgs {
            config: Some(cfg.clone()),
            runtime_dir: Some("/tmp/rt".into()),
            ..DirArgs::default()
        };
        let d = args.resolve().unwrap();
        assert_eq!(d.runtime_dir, Path::new("/tmp/rt"));
        assert_eq!(d.state_dir, Path::new("/srv/fkr"));
        assert_eq!(d.log_dir, Path::new("/srv/logs"));
        assert_eq!(
            d.serial_log("fr-00000000"),
            Path::new("/srv/logs/fr-00000000.serial.log")
        );

        std::fs::write(&cfg, "state_dir = \"/srv/fkr\"\n").unwrap();
        let d = DirArgs {
            config: Some(cfg),
            ..DirArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(d.runtime_dir, Path::new(DEFAULT_RUNTIME_DIR));
        assert_eq!(d.log_dir, Path::new("/srv/fkr/logs"));
    }

    /// The operator commands find the same dirs `serve` uses, for every combination of settings.
    #[test]
    fn agrees_with_the_daemons_config_loader() {
        use crate::controller::config::{Config, Overrides};
        let env = |k: &str| match k {
            "FORGEJO_ADMIN_TOKEN" => Some("t0ken".to_owned()),
            _ => None,
        };
        // (top-level keys, [vm] keys); [forgejo] goes in between so each key lands in its table.
        let cases = [
            ("", ""),
            ("state_dir = \"/srv/st\"", ""),
            (
                "runtime_dir = \"/run/x\"\nstate_dir = \"/srv/st\"",
                "log_dir = \"/var/log/f\"",
            ),
            ("", "log_dir = \"/var/log/f\""),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        for (top, vm) in cases {
            let full = format!("{top}\n[forgejo]\nurl = \"https://forgejo.example\"\n[vm]\n{vm}\n");
            std::fs::write(&path, &full).unwrap();
            let serve = Config::from_parts(&full, &path, &env, &Overrides::default()).unwrap();
            let ours = DirArgs {
                config: Some(path.clone()),
                ..DirArgs::default()
            }
            .resolve()
            .unwrap();
            assert_eq!(ours.runtime_dir, serve.runtime_dir, "{full}");
            assert_eq!(ours.state_dir, serve.state_dir, "{full}");
            assert_eq!(ours.log_dir, serve.vm.log_dir, "{full}");
        }
    }

    #[test]
    fn a_named_config_must_exist() {
        let args = DirArgs {
            config: Some("/nonexistent/fkr.toml".into()),
            ..DirArgs::default()
        };
        assert!(matches!(args.resolve(), Err(Error::Config { .. })));
    }

    #[test]
    fn vm_names() {
        assert!(check_vm_name("fr-0123abcd").is_ok());
        for bad in [
            "fr-0123ABCD",
            "fr-0123abc",
            "fr-../../x",
            "0123abcd",
            "fr-0123abcde",
            "",
        ] {
            assert!(check_vm_name(bad).is_err(), "{bad}");
        }
    }
}
