//! The Forgejo emulator (tests/emulator/), for integration tests: `use common::emulator::Emulator;`.
#[path = "../emulator/mod.rs"]
mod imp;

// Not every test crate that links `common` uses the emulator.
#[allow(unused_imports)]
pub use imp::*;
