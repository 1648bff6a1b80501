//! `fkr-qemu serve`: the daemon (see `crate::controller`). Flags override the config file and the
//! environment; the admin token is never a flag (only a token *file* is).

use std::path::PathBuf;

use crate::controller::config::{Config, ConfigLayer, Sources};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The TOML config file [default: /etc/fkr-qemu/config.toml, which may be missing].
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the configuration (files, Forgejo reachable, version, token scopes), print the
    /// effective configuration with secrets redacted, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Config values as flags: the config file's layer, with the keys that are flags set (boxed:
    /// it is large, and the other subcommands' args are small).
    #[command(flatten)]
    pub flags: Box<ConfigLayer>,
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    let env = |k: &str| std::env::var(k).ok();
    let cfg = Config::load(&Sources {
        file: args.config.as_deref(),
        env: &env,
        flags: &args.flags,
    })?;
    if args.check_config {
        return crate::controller::check::check_config(&cfg).await;
    }
    crate::controller::daemon::run(cfg).await
}
