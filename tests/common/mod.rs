pub mod emulator;
pub mod guest;
pub mod netns;
pub mod prometheus;
pub mod serve;
