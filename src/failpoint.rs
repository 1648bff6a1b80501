//! Crash points for the restart tests: with `FKR_QEMU_CRASH_AT=<point>` in its environment, the
//! daemon kills itself with SIGKILL (as the OOM killer or a power cut would) when it reaches that
//! point, so a test can check that the next start takes over or sweeps exactly what a crash there
//! leaves. Without the variable (always, in production) a point costs one cached lookup.
//!
//! The points, in dispatch order: `after-runner`, `after-ci-user`, `after-token`,
//! `after-network`, `after-disks`, `after-spawn` (QEMU runs, its pid not yet recorded),
//! `before-qmp` (pid recorded, QMP not yet connected).

use std::sync::OnceLock;

/// Dies here if `FKR_QEMU_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("FKR_QEMU_CRASH_AT").ok())
        .as_deref()
        == Some(point)
    {
        tracing::warn!("crash point {point}: killing this process (FKR_QEMU_CRASH_AT)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
