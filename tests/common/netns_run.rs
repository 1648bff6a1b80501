//! Code run inside a network namespace.

use std::fs::File;

use nix::sched::{setns, CloneFlags};

use super::netns::NetNs;

impl NetNs {
    /// Runs `f` on a thread that joined this namespace (sockets, netlink, ioctls, `/dev/net/tun`
    /// and child processes started by `f` all belong to it).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(format!("/run/netns/{}", self.name())).expect("open the netns file");
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the test netns");
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}
