//! SIGINT and SIGTERM as one stream, for every command that starts VMs (`serve`, `boot-test`).
//!
//! Both mean "stop": Ctrl+C sends SIGINT, while `timeout`, `systemctl stop` and CI runners send
//! SIGTERM. A command that handled only one of them would die on the other with its VMs still
//! running and their files left behind.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals that ask a command to stop, installed once at its start.
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Installs the handlers; from now on neither signal ends the process by itself.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next one and names it.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}
