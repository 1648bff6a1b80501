//! `fkr-qemu serve`: the daemon (see `crate::controller`). Flags override the config file and the
//! environment; the admin token is never a flag (only a token *file* is).

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::controller::config::{Config, Overrides, Sources};
use crate::controller::duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The TOML config file [default: /etc/fkr-qemu/config.toml, which may be missing].
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the configuration (files, Forgejo reachable, version, token scopes), print the
    /// effective configuration with secrets redacted, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Overrides of config values (boxed: they are large, and the other subcommands' args are small).
    #[command(flatten)]
    pub flags: Box<Flags>,
}

/// Flags that override the config file and the environment.
#[derive(Debug, clap::Args)]
pub struct Flags {
    /// Forgejo's base URL (overrides FORGEJO_URL and forgejo.url).
    #[arg(long, value_name = "URL")]
    pub forgejo_url: Option<Url>,
    /// The Forgejo URL the VMs use (default: --forgejo-url).
    #[arg(long, value_name = "URL")]
    pub runner_url: Option<Url>,
    /// A file holding the admin token (the token itself is never accepted on the command line).
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// The runs-on label to serve.
    #[arg(long)]
    pub label: Option<String>,
    /// How often to poll Forgejo, e.g. 15s or 500ms.
    #[arg(long, value_parser = duration::parse)]
    pub poll_interval: Option<Duration>,
    /// At most this many VMs at once.
    #[arg(long)]
    pub max_vms: Option<usize>,
    /// The read-only base image.
    #[arg(long, value_name = "PATH")]
    pub base_image: Option<PathBuf>,
    /// Stop a VM whose runner has not picked its job up after this long.
    #[arg(long, value_parser = duration::parse)]
    pub boot_deadline: Option<Duration>,
    /// Stop a VM that runs longer than this.
    #[arg(long, value_parser = duration::parse)]
    pub job_deadline: Option<Duration>,
    /// State directory (ci-users.json, images, serial logs).
    #[arg(long, value_name = "PATH")]
    pub state_dir: Option<PathBuf>,
    /// Runtime directory (per-VM directories, control socket).
    #[arg(long, value_name = "PATH")]
    pub runtime_dir: Option<PathBuf>,
    /// Accelerator.
    #[arg(long, value_enum)]
    pub accel: Option<crate::types::Accel>,
}

impl Flags {
    fn overrides(&self) -> Overrides {
        Overrides {
            forgejo_url: self.forgejo_url.clone(),
            runner_url: self.runner_url.clone(),
            admin_token_file: self.admin_token_file.clone(),
            label: self.label.clone(),
            poll_interval: self.poll_interval,
            max_vms: self.max_vms,
            base_image: self.base_image.clone(),
            job_deadline: self.job_deadline,
            boot_deadline: self.boot_deadline,
            state_dir: self.state_dir.clone(),
            runtime_dir: self.runtime_dir.clone(),
            accel: self.accel,
        }
    }
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    let env = |k: &str| std::env::var(k).ok();
    let flags = args.flags.overrides();
    let cfg = Config::load(&Sources {
        file: args.config.as_deref(),
        env: &env,
        flags: &flags,
    })?;
    if args.check_config {
        return crate::controller::check::check_config(&cfg).await;
    }
    crate::controller::daemon::run(cfg).await
}
