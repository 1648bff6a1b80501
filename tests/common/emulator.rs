//! The Forgejo emulator (tests/emulator/) for integration tests: `Emulator` is the one handle on
//! it, started in the test's process (`Emulator::start`) or as the `forgejo-emulator` process
//! (`Emulator::spawn`), with the same controls either way.
#[path = "../emulator/mod.rs"]
mod imp;

pub use imp::*;
