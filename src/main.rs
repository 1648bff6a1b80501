//! The `fkr-qemu` binary: argument parsing, logging set-up, and mapping errors to exit codes.
//! Everything else lives in the library (`src/lib.rs`).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use fkr_qemu::cli;

#[derive(Debug, Parser)]
#[command(
    name = "fkr-qemu",
    version,
    about = "Runs every Forgejo Actions job in a fresh QEMU VM"
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Poll Forgejo and run each waiting job in a fresh VM (the daemon).
    Serve(cli::serve::Args),
    /// Boot a base image once in a throw-away VM and report each phase.
    BootTest(cli::boot_test::Args),
    /// List this host's VMs.
    List(cli::list::Args),
    /// Show a VM's serial console output.
    Console(cli::console::Args),
    /// List the CI users the daemon manages (never their secrets).
    CiUsers(cli::ci_users::Args),
    /// Ask the running daemon whether it is healthy.
    Status(cli::status::Args),
    /// Upgrade without draining: the daemon re-executes its binary and takes its VMs over.
    Handover(cli::handover::Args),
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FKR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // journald and files get no colour codes; only a terminal does.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        // journald: a syslog priority prefix per line, and no second timestamp.
        LogFormat::Text if fkr_qemu::ops::journal::stderr_is_journal() => builder
            .event_format(fkr_qemu::ops::journal::Priority::new(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init(),
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // `generate` (manual pages, completions for the packages) is parsed next to the documented
    // command line, not as part of it: the pages and completions it writes leave it out.
    let matches = Cli::command()
        .subcommand(cli::generate::command())
        .get_matches();
    if let Some(("generate", m)) = matches.subcommand() {
        let what = cli::generate::Generate::from_arg_matches(m).unwrap_or_else(|e| e.exit());
        return match cli::generate::run(what, Cli::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fkr-qemu: {e}");
                ExitCode::from(cli::exit::RUNTIME)
            }
        };
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fkr-qemu: cannot start the async runtime: {e}");
            return ExitCode::from(cli::exit::RUNTIME);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(a) => cli::serve::run(a).await,
            Command::BootTest(a) => cli::boot_test::run(a).await,
            Command::List(a) => cli::list::run(a).await,
            Command::Console(a) => cli::console::run(a).await,
            Command::CiUsers(a) => cli::ci_users::run(a).await,
            Command::Status(a) => cli::status::run(a).await,
            Command::Handover(a) => cli::handover::run(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fkr-qemu: {e}");
            ExitCode::from(cli::exit_code(e.class()))
        }
    }
}
