pub mod emulator;
pub mod frames;
pub mod guest;
pub mod netns;
pub mod prometheus;
pub mod serve;
