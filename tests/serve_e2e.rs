//! `fkr-qemu serve` end to end: the real binary in a network namespace, the emulator as a process
//! behind NAT, test-guest VMs under TCG running the stand-in runner.
//!
//! What serve is doing is read from its control socket (typed status) and its metrics; its log is
//! read only for what it says to the operator (errors, warnings) and, in one test, for the log
//! lines kept from the original tool (the one log-wording contract).

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

/// The pool off: serve as before the pool existed (every job boots its VM).
const POOL_SIZE: usize = 0;

include!("e2e/suite.rs");
