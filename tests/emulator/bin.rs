//! `forgejo-emulator`: the test emulator as a process, for tests and demos that run it elsewhere
//! (another process, a network namespace). Prints one JSON line `{"url", "admin_token"}` on stdout
//! once it listens, then serves until SIGTERM or SIGINT.

#[path = "mod.rs"]
mod emulator;

use std::io::Write;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "forgejo-emulator",
    about = "In-memory Forgejo emulator for fkr-qemu's tests"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Admin token to accept (random when absent).
    #[arg(long, env = "FORGEJO_EMULATOR_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Version reported by GET /api/v1/version.
    #[arg(long, default_value = emulator::DEFAULT_VERSION)]
    version: String,
    /// Serve the admin token routes (default: when the version's major is 16 or more).
    #[arg(long)]
    admin_token_routes: Option<bool>,
    /// Repository to create at start, `owner/name` (repeatable).
    #[arg(long = "repo")]
    repos: Vec<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let opts = emulator::Options {
        listen: args.listen,
        version: args.version,
        admin_token: args.admin_token,
        admin_token_routes: args.admin_token_routes,
        repos: args.repos,
        ..emulator::Options::default()
    };
    let emu = emulator::Emulator::start(opts).await?;
    let line = serde_json::json!({"url": emu.url(), "admin_token": emu.admin_token()});
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    drop(out);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(emu);
    Ok(())
}
