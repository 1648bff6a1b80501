//! One module per subcommand. Each has a clap `Args` struct and `run`, so `main.rs` stays a thin
//! dispatcher and each subcommand's owner edits only its own file.

pub mod boot_test;
pub mod ci_users;
pub mod console;
pub mod list;
pub mod serve;
pub mod status;
