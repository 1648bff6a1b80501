//! The Forgejo emulator (tests/emulator/), for integration tests: `use common::emulator::Emulator;`.
#[path = "../emulator/mod.rs"]
mod imp;

pub use imp::*;
