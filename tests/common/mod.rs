pub mod emulator;
pub mod netns;
pub mod prometheus;
pub mod serve;
