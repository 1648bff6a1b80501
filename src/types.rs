//! Values that cross module boundaries, typed once: the VM name (which also names the tap, the
//! runner and the per-VM directories), MAC addresses, the accelerator, and the class of an error.
//!
//! This module is a leaf: it imports nothing from the crate, so `vm`, `net`, `forgejo`,
//! `controller` and `ops` can all use it without depending on each other.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// What kind of failure an error is. Every module's error says its class; only the binary maps a
/// class to an exit code (README.md, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad usage or configuration: the operator must change a flag or the config file.
    Config,
    /// A host tool or file is missing (qemu, OVMF, the base image, nft, ...).
    MissingDependency,
    /// Forgejo refused or could not be reached.
    Forgejo,
    /// Host networking failed.
    Network,
    /// Anything else that failed while running.
    Runtime,
    /// A check ran and found a problem (a failed boot test, an unusable image, a daemon that is
    /// not ready).
    CheckFailed,
}

/// A string that is not a valid [`VmName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM name `{0}`: expected `fr-` followed by 8 lowercase hex digits")]
pub struct InvalidVmName(pub String);

/// A VM name: `fr-` and 8 lowercase hex digits. It names the per-VM directory, the serial log, the
/// tap, the cgroup and the Forgejo runner, and is how the sweep recognises our leftovers (and only
/// ours). It fits an interface name (15 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// What every VM, tap, cgroup and runner name of ours starts with.
    pub const PREFIX: &'static str = "fr-";

    /// A fresh random name.
    pub fn generate() -> Self {
        let n: u32 = rand::thread_rng().gen();
        Self(format!("{}{n:08x}", Self::PREFIX))
    }

    /// Accepts exactly `fr-` + 8 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, InvalidVmName> {
        let ok = s.strip_prefix(Self::PREFIX).is_some_and(|h| {
            h.len() == 8 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidVmName(s.to_owned()))
        }
    }

    /// Whether `s` is one of our names.
    pub fn is_valid(s: &str) -> bool {
        Self::parse(s).is_ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VmName {
    type Err = InvalidVmName;
    fn from_str(s: &str) -> Result<Self, InvalidVmName> {
        Self::parse(s)
    }
}

impl TryFrom<String> for VmName {
    type Error = InvalidVmName;
    fn try_from(s: String) -> Result<Self, InvalidVmName> {
        Self::parse(&s)
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A string that is not a usable interface MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMac {
    #[error("{0:?} is not a MAC address (xx:xx:xx:xx:xx:xx)")]
    Syntax(String),
    #[error("{0}: a multicast MAC cannot be an interface's address")]
    Multicast(String),
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address derived from `seed` (FNV-1a): stable across restarts,
    /// outside every vendor's range.
    pub fn derived(seed: &str) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let h = hash.to_be_bytes();
        // 0x02: locally administered, unicast.
        MacAddr([0x02, h[3], h[4], h[5], h[6], h[7]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, InvalidMac> {
        let bad = || InvalidMac::Syntax(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 == 1 {
            return Err(InvalidMac::Multicast(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = InvalidMac;
    fn try_from(s: String) -> Result<Self, InvalidMac> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(value: MacAddr) -> String {
        value.to_string()
    }
}

/// Which accelerator QEMU uses. `Auto` is a policy; a running VM is always under `Kvm` or `Tcg`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe VM really runs, otherwise TCG (the choice and its reason are logged).
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The per-job state machine (explicit transitions, in the style of cloud-hypervisor's `VmState`).
///
/// ```text
/// queued ──► preparing ──► booting ──► running ──► cleaning ──► done
///   │            │            │                       │
///   │            └────────────┴──────► cleaning       └──────► failed
///   └──► done (dropped: the job was no longer waiting when its turn came)
/// ```
/// `preparing`: CI user, token, runner, seed, tap. `booting`: QEMU spawned, the runner has not picked the
/// job up yet. `running`: Forgejo shows the job running. `cleaning`: the VM is gone (or never started);
/// revoking, deleting, tearing down. `done` when the guest powered off by itself after its runner exited,
/// `failed` otherwise (preparation failed, crash, deadline, host stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Preparing,
    Booting,
    Running,
    Cleaning,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Preparing => "preparing",
            JobState::Booting => "booting",
            JobState::Running => "running",
            JobState::Cleaning => "cleaning",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }

    /// Whether `self → to` is allowed.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Preparing)
                | (Queued, Done)
                | (Preparing, Booting)
                | (Preparing, Cleaning)
                | (Booting, Running)
                | (Booting, Cleaning)
                | (Running, Cleaning)
                | (Cleaning, Done)
                | (Cleaning, Failed)
        )
    }

    /// Moves to `to`, or says why not (the state is left unchanged).
    pub fn transition(&mut self, to: JobState) -> Result<(), InvalidTransition> {
        if !self.can_become(to) {
            return Err(InvalidTransition { from: *self, to });
        }
        *self = to;
        Ok(())
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition [`JobState::can_become`] does not allow: a bug, never an operational error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a job cannot go from {from} to {to}")]
pub struct InvalidTransition {
    pub from: JobState,
    pub to: JobState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_parse_and_fit_an_interface_name() {
        for _ in 0..100 {
            let n = VmName::generate();
            assert_eq!(VmName::parse(n.as_str()).unwrap(), n);
            assert!(n.as_str().len() <= 15);
        }
    }

    #[test]
    fn parse_rejects_everything_else() {
        for bad in [
            "",
            "fr-",
            "fr-1234567",
            "fr-123456789",
            "fr-ABCDEF12",
            "xx-12345678",
            "fr-1234567g",
            "fr-../../a",
            "fr-x",
        ] {
            assert!(VmName::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(VmName::parse("fr-0123abcd").is_ok());
    }

    #[test]
    fn macs_round_trip_and_multicast_is_refused() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(InvalidMac::Multicast(_))
        ));
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(MacAddr::derived("x").0[0], 0x02);
    }
}

#[cfg(test)]
mod job_state_tests {
    use super::JobState::*;
    use super::*;

    const ALL: [JobState; 7] = [Queued, Preparing, Booting, Running, Cleaning, Done, Failed];

    #[test]
    fn happy_path() {
        let mut s = Queued;
        for to in [Preparing, Booting, Running, Cleaning, Done] {
            s.transition(to).unwrap();
        }
        assert!(s.is_terminal());
    }

    #[test]
    fn failure_paths() {
        for path in [
            &[Preparing, Cleaning, Failed][..],
            &[Preparing, Booting, Cleaning, Failed][..],
            &[Preparing, Booting, Running, Cleaning, Failed][..],
            &[Done][..],
        ] {
            let mut s = Queued;
            for to in path {
                s.transition(*to).unwrap();
            }
            assert!(s.is_terminal());
        }
    }

    #[test]
    fn illegal_transitions_are_refused_and_leave_state() {
        let legal = 9;
        let mut count = 0;
        for from in ALL {
            for to in ALL {
                let mut s = from;
                match s.transition(to) {
                    Ok(()) => {
                        count += 1;
                        assert_eq!(s, to);
                    }
                    Err(e) => {
                        assert_eq!(s, from);
                        assert!(e.to_string().contains(from.as_str()), "{e}");
                    }
                }
            }
        }
        assert_eq!(count, legal);
        // Terminal states never move; nothing skips cleaning once a VM could exist.
        for to in ALL {
            assert!(!Done.can_become(to) && !Failed.can_become(to));
        }
        assert!(!Booting.can_become(Done) && !Running.can_become(Failed));
    }
}
