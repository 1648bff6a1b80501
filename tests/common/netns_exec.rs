//! Programs run inside a network namespace.

use std::process::Command;

use super::netns::{run_ok, NetNs};

impl NetNs {
    /// A command that runs inside this namespace. `nsenter --net`, not `ip netns exec`: the latter
    /// also mounts a fresh sysfs, which hides the host's cgroup file systems under /sys/fs/cgroup —
    /// and `serve` puts each QEMU into a cgroup, as it does on a real host.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args…` inside the namespace; panics on failure, returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_ok(&mut cmd)
    }
}
