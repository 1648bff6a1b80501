//! Where the operator commands look: the daemon's runtime, state and log dirs, from flags, then the
//! directory keys of the daemon's config file, then the defaults — the same keys and defaults as
//! `serve` ([`crate::paths`]).

use std::path::PathBuf;

use super::Error;
use crate::layer::Merge;
use crate::paths::{ConfigFile, DirsLayer};

pub use crate::paths::Dirs;

/// The directory flags every operator command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DirArgs {
    /// The daemon's config file; only its directory settings are read
    /// [default: /etc/fkr-qemu/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub dirs: DirsLayer,
}

impl DirArgs {
    pub fn resolve(&self) -> Result<Dirs, Error> {
        let file = ConfigFile::read(self.config.as_deref())?;
        Ok(DirsLayer::from_file(&file)?
            .merge(self.dirs.clone())
            .resolve())
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
    use std::path::Path;

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
            dirs: DirsLayer {
                runtime_dir: Some("/tmp/rt".into()),
                ..DirsLayer::default()
            },
        };
        let d = args.resolve().unwrap();
        assert_eq!(d.runtime_dir, Path::new("/tmp/rt"));
        assert_eq!(d.state_dir, Path::new("/srv/fkr"));
        assert_eq!(d.log_dir, Path::new("/srv/logs"));

        std::fs::write(&cfg, "state_dir = \"/srv/fkr\"\n").unwrap();
        let d = DirArgs {
            config: Some(cfg),
            ..DirArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(d.runtime_dir, Path::new(crate::paths::DEFAULT_RUNTIME_DIR));
        assert_eq!(d.log_dir, Path::new("/srv/fkr/logs"));
    }

    #[test]
    fn a_named_config_must_exist() {
        let args = DirArgs {
            config: Some("/nonexistent/fkr.toml".into()),
            ..DirArgs::default()
        };
        let e = args.resolve().unwrap_err();
        assert!(matches!(e, Error::ConfigFile(_)), "{e:?}");
        assert_eq!(e.class(), crate::types::ErrorClass::Config);
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
