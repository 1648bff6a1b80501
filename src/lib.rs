//! fkr-qemu: runs every Forgejo Actions job in a fresh, throw-away QEMU virtual machine.
//!
//! The pipeline, one module per stage:
//! - [`forgejo`]: the Forgejo API client (jobs, CI users, tokens, runners).
//! - [`vm`]: the VM driver (firmware, overlay, NoCloud seed, qemu argv, QMP, lifecycle).
//! - [`net`]: host networking (bridge, taps, addressing, nftables).
//! - [`controller`]: config, discovery, dispatch, CI users, startup sweep (`serve`).
//! - [`ops`]: what operators use on a running host (control socket, metrics, list/console).
//! - [`types`]: values shared across modules (VM names, MACs, accelerators, error classes).
//! - [`paths`]: the config file, the directories and their defaults; [`layer`]: how partial
//!   configurations merge.
//! - [`cli`]: one module per subcommand; `main.rs` only parses arguments and maps errors.

pub mod cli;
pub mod controller;
pub mod error;
pub mod failpoint;
pub mod forgejo;
pub mod layer;
pub mod net;
pub mod ops;
pub mod paths;
pub mod secret;
pub mod types;
pub mod vm;

pub use error::Error;
