//! Where fkr-qemu keeps things: the config file, the state and runtime directories, the layout under
//! them, and their defaults. `serve` (`controller::config`), the VM driver's defaults
//! (`vm::VmConfig`) and the operator commands (`ops::paths`) all take them from here, so a default
//! is written once.
//!
//! The directories come in as a [`DirsLayer`] (each optional: the config file's keys, or flags) and
//! are resolved into [`Dirs`]. The config file itself is read by [`ConfigFile`], for `serve` (every
//! key) and for the operator commands (only the directory keys, so that they need neither Forgejo
//! nor the admin token).
//!
//! A leaf: it imports nothing from the crate but [`crate::types`] and [`crate::layer`].

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::layer::layer;
use crate::types::ErrorClass;

/// Where the config file is when none is named (a missing file there is fine).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fkr-qemu/config.toml";
/// `runtime_dir`'s default: per-VM directories and the control socket (tmpfs).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/fkr-qemu";
/// `state_dir`'s default: `ci-users.json`, images, serial logs, overlays (on disk).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fkr-qemu";

layer! {
    /// The directory settings, each optional: the config file's `runtime_dir`, `state_dir` and
    /// `[vm] log_dir`, or the operator commands' flags.
    #[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
    pub struct DirsLayer {
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
}

impl DirsLayer {
    /// Fills in the defaults: `/run/fkr-qemu`, `/var/lib/fkr-qemu`, `<state_dir>/logs`.
    pub fn resolve(self) -> Dirs {
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Dirs {
            runtime_dir: self
                .runtime_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR)),
            log_dir: self.log_dir.unwrap_or_else(|| state_dir.join("logs")),
            state_dir,
        }
    }

    /// The directory keys of a config file; every other key is ignored (the operator commands
    /// read nothing else, and `serve` checks the rest).
    pub fn from_file(file: &ConfigFile) -> Result<Self, FileError> {
        /// The same keys as `serve`'s layers (`controller::config` tests that they agree).
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct Keys {
            runtime_dir: Option<PathBuf>,
            state_dir: Option<PathBuf>,
            vm: VmKeys,
        }
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct VmKeys {
            log_dir: Option<PathBuf>,
        }
        let keys: Keys = file.parse()?;
        Ok(DirsLayer {
            runtime_dir: keys.runtime_dir,
            state_dir: keys.state_dir,
            log_dir: keys.vm.log_dir,
        })
    }
}

/// `<runtime_dir>/vms`: one directory per VM, named like the VM (the driver's and the operator
/// commands' view alike).
pub fn vms_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("vms")
}

/// `<log_dir>/<name>.serial.log`: a VM's serial log.
pub fn serial_log(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join(format!("{name}.serial.log"))
}

/// The resolved directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// Per-VM directories (`vms/<name>/`) and the control socket.
    pub runtime_dir: PathBuf,
    /// `ci-users.json`, images, serial logs and overlays by default.
    pub state_dir: PathBuf,
    /// Serial logs: `<log_dir>/<name>.serial.log`.
    pub log_dir: PathBuf,
}

impl Default for Dirs {
    fn default() -> Self {
        DirsLayer::default().resolve()
    }
}

impl Dirs {
    /// `<runtime_dir>/vms`: one dir per VM.
    pub fn vms_dir(&self) -> PathBuf {
        vms_dir(&self.runtime_dir)
    }

    /// `<runtime_dir>/vms/<name>`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    /// `<log_dir>/<name>.serial.log`.
    pub fn serial_log(&self, name: &str) -> PathBuf {
        serial_log(&self.log_dir, name)
    }

    /// `<state_dir>/ci-users.json`.
    pub fn ci_users_file(&self) -> PathBuf {
        self.state_dir.join("ci-users.json")
    }

    /// `vm.disk_dir`'s default, `<state_dir>/disks`: overlays live on disk, never in the runtime
    /// dir (tmpfs, i.e. RAM).
    pub fn default_disk_dir(&self) -> PathBuf {
        self.state_dir.join("disks")
    }

    /// `base_image`'s default, `<state_dir>/images/runner-base.qcow2` (where
    /// `image-builder/build-runner-base.sh` publishes it).
    pub fn default_base_image(&self) -> PathBuf {
        self.state_dir.join("images/runner-base.qcow2")
    }
}

/// A config file's text and where it came from.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
}

/// A config file that cannot be read or does not fit what is read from it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `key` is the dotted path of the offending key (`vm.vcpus`), `None` for a syntax error.
    #[error(
        "config file {}{}{}: {message}",
        path.display(),
        line.map(|l| format!(", line {l}")).unwrap_or_default(),
        key.as_ref().map(|k| format!(", {k}")).unwrap_or_default()
    )]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
}

impl FileError {
    /// Always a configuration error.
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

impl ConfigFile {
    /// Reads `named`, which must exist; without a name, [`DEFAULT_CONFIG_PATH`] if it exists
    /// (else an empty file: every setting at its default).
    pub fn read(named: Option<&Path>) -> Result<Self, FileError> {
        let path = named.unwrap_or(Path::new(DEFAULT_CONFIG_PATH)).to_owned();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if named.is_none() && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(FileError::Read { path, error }),
        };
        Ok(ConfigFile { path, text })
    }

    /// Parses the text as a `T`; an error names the key and the line.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, FileError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(&self.text)).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            FileError::Invalid {
                path: self.path.clone(),
                line: inner.span().map(|span| {
                    let start = span.start.min(self.text.len());
                    self.text[..start].matches('\n').count() + 1
                }),
                key: (key != ".").then_some(key),
                message: inner.message().replace('\n', "; "),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Merge;

    fn file(text: &str) -> ConfigFile {
        ConfigFile {
            path: "c.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn defaults_and_layout() {
        let d = Dirs::default();
        assert_eq!(d.runtime_dir, Path::new("/run/fkr-qemu"));
        assert_eq!(d.state_dir, Path::new("/var/lib/fkr-qemu"));
        assert_eq!(d.log_dir, Path::new("/var/lib/fkr-qemu/logs"));
        assert_eq!(
            d.vm_dir("fr-00000000"),
            Path::new("/run/fkr-qemu/vms/fr-00000000")
        );
        assert_eq!(d.default_disk_dir(), Path::new("/var/lib/fkr-qemu/disks"));
        assert_eq!(
            d.default_base_image(),
            Path::new("/var/lib/fkr-qemu/images/runner-base.qcow2")
        );
        assert_eq!(
            d.ci_users_file(),
            Path::new("/var/lib/fkr-qemu/ci-users.json")
        );
    }

    #[test]
    fn flags_beat_the_file_beats_the_defaults() {
        let from_file = DirsLayer::from_file(&file(
            "forgejo_url = \"ignored\"\nstate_dir = \"/srv/fkr\"\n[vm]\nlog_dir = \"/srv/logs\"\nvcpus = 1\n",
        ))
        .unwrap();
        let flags = DirsLayer {
            runtime_dir: Some("/tmp/rt".into()),
            ..DirsLayer::default()
        };
        let d = from_file.merge(flags).resolve();
        assert_eq!(d.runtime_dir, Path::new("/tmp/rt"));
        assert_eq!(d.state_dir, Path::new("/srv/fkr"));
        assert_eq!(d.log_dir, Path::new("/srv/logs"));
        assert_eq!(
            d.serial_log("fr-00000000"),
            Path::new("/srv/logs/fr-00000000.serial.log")
        );

        let d = DirsLayer::from_file(&file("state_dir = \"/srv/fkr\"\n"))
            .unwrap()
            .resolve();
        assert_eq!(d.runtime_dir, Path::new(DEFAULT_RUNTIME_DIR));
        assert_eq!(d.log_dir, Path::new("/srv/fkr/logs"));
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let e = DirsLayer::from_file(&file("\n\n[vm]\nlog_dir = 3\n")).unwrap_err();
        let FileError::Invalid { line, key, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!((*line, key.as_deref()), (Some(4), Some("vm.log_dir")));
        let text = e.to_string();
        assert!(
            text.starts_with("config file c.toml, line 4, vm.log_dir: "),
            "{text}"
        );

        let e = DirsLayer::from_file(&file("state_dir = \n")).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::Invalid {
                    key: None,
                    line: Some(1),
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_named_file_must_exist_the_default_may_be_missing() {
        let e = ConfigFile::read(Some(Path::new("/nonexistent/fkr.toml"))).unwrap_err();
        assert!(matches!(e, FileError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/fkr.toml"), "{e}");
        assert_eq!(e.class(), ErrorClass::Config);
    }
}
