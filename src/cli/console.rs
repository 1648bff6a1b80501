//! `fkr-qemu console <name> [--follow]`: a VM's serial output, read-only.

use crate::ops::console::{self, End};
use crate::ops::paths::{check_vm_name, DirArgs};
use crate::ops::{runtime, Client};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The VM (`fr-<8 hex>`, as `fkr-qemu list` shows it).
    pub name: String,
    /// After the output so far, keep printing new output until the VM ends (or Ctrl+C).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Copy the guest's bytes unchanged. By default, control characters other than newline and
    /// tab (escape sequences included), a CR outside CRLF, invalid UTF-8 and bidi overrides are
    /// shown as visible escapes such as `\x1b`: the guest must not drive your terminal.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub dirs: DirArgs,
}

pub async fn run(args: Args) -> Result<(), crate::Error> {
    check_vm_name(&args.name)?;
    let dirs = args.dirs.resolve()?;
    // The daemon (or the VM's vm.json) knows where its log is (the config may place logs
    // elsewhere); for an ended VM, the log is where the dir settings say.
    let known = match Client::connect(&dirs.runtime_dir).await {
        Ok(mut client) => client
            .list()
            .await?
            .into_iter()
            .find(|vm| vm.name == args.name)
            .and_then(|vm| vm.serial_log),
        Err(crate::ops::Error::DaemonNotRunning(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let log = known.unwrap_or_else(|| runtime::serial_log_of(&dirs, &args.name));
    let alive = || runtime::vm_alive(&dirs, &args.name);
    let log_expected = log.exists() || (args.follow && alive());
    if !log_expected {
        return Err(crate::ops::Error::UnknownVm {
            name: args.name,
            log,
        }
        .into());
    }
    let stop = async {
        // If the handler cannot be installed, Ctrl+C keeps its default effect (ending us).
        let _ = tokio::signal::ctrl_c().await;
    };
    let mut stdout = tokio::io::stdout();
    match console::stream(&log, &mut stdout, args.follow, args.raw, alive, stop).await? {
        End::VmEnded => eprintln!("\n[fkr-qemu: {} has ended]", args.name),
        End::EndOfLog | End::Stopped | End::OutputClosed => {}
    }
    Ok(())
}
