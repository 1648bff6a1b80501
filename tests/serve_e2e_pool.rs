//! `fkr-qemu serve` end to end with the warm pool on (`[pool] size = 1`): the very suite of
//! tests/serve_e2e.rs (tests/e2e/suite.rs), where a job that finds a warm VM is bound to it and
//! the pool refills after each bind. Assertions that depend on the mode say so (`POOL_SIZE`).

mod common {
    pub mod daemon;
    pub mod emulator;
    pub mod fake_qemu;
    pub mod links;
    pub mod netns;
    pub mod netns_exec;
    pub mod prometheus;
    pub mod sandbox;
    pub mod serve;
    pub mod topology;
    pub mod uplink;
}

/// One warm VM kept ready.
const POOL_SIZE: usize = 1;

include!("e2e/suite.rs");
