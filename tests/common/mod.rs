pub mod emulator;
pub mod netns;
