//! `fkr-qemu generate`: the manual pages and shell completions, written from the CLI's own clap
//! definition so they cannot drift from it. For the packages (packaging/build-deb.sh,
//! packaging/arch/PKGBUILD), not for operators: `main.rs` adds the subcommand hidden, next to the
//! documented CLI rather than in it, so neither the pages nor the completions offer it.

use std::io::Write as _;
use std::path::PathBuf;

use clap_complete::Shell;

#[derive(Debug, clap::Subcommand)]
pub enum Generate {
    /// Write one manual page per command (fkr-qemu.1, fkr-qemu-serve.1, …) into DIR.
    Man {
        /// An existing directory; pages already there are overwritten.
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    Completions { shell: Shell },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the manual pages into {dir}: {source}")]
    Man {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the completion script: {0}")]
    Completions(std::io::Error),
}

/// The hidden `generate` subcommand, for `main.rs` to add to the documented CLI.
pub fn command() -> clap::Command {
    use clap::Subcommand as _;
    Generate::augment_subcommands(
        clap::Command::new("generate")
            .about("Write the manual pages or a shell completion script (for packaging)")
            .subcommand_required(true)
            .hide(true),
    )
}

/// Runs `generate` for `cli`, the documented command line (without `generate`).
pub fn run(what: Generate, cli: clap::Command) -> Result<(), Error> {
    match what {
        // The top page lists the subcommands; each has a page of its own, fkr-qemu-<name>.1.
        Generate::Man { dir } => {
            clap_mangen::generate_to(cli, &dir).map_err(|source| Error::Man { dir, source })
        }
        Generate::Completions { shell } => {
            let mut cli = cli;
            let name = cli.get_name().to_owned();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli, name, &mut script);
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&script)
                .and_then(|()| stdout.flush())
                .map_err(Error::Completions)
        }
    }
}
