use std::fmt;

use serde::Serialize;

use super::Error;

/// The lifecycle of one VM. Transitions are checked by [`VmState::transition`]; anything else is a bug
/// and reported as [`Error::InvalidTransition`] (the style of cloud-hypervisor's `VmState`).
///
/// ```text
/// Created ─► Starting ─► Running ─► Stopping ─► Stopped
///    │          │  │        │  └──────────────►  ▲
///    │          │  └────────┼─────► Stopping     │ (guest powered off by itself)
///    └──────────┴───────────┴───────► Failed ◄───┘ (Stopping ─► Failed)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Directory, overlay, seed and VARS copy exist; no process yet.
    Created,
    /// QEMU was spawned; QMP not negotiated yet.
    Starting,
    /// QMP answered and the guest runs.
    Running,
    /// The host asked the guest to stop (powerdown → quit → kill ladder).
    Stopping,
    /// QEMU exited after an orderly shutdown (guest power-off or host stop).
    Stopped,
    /// Start-up failed, QEMU crashed, or the guest crashed.
    Failed,
}

impl VmState {
    pub fn can_become(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Created, Starting)
                | (Created, Failed)
                | (Starting, Running)
                | (Starting, Stopping)
                | (Starting, Failed)
                | (Running, Stopping)
                | (Running, Stopped)
                | (Running, Failed)
                | (Stopping, Stopped)
                | (Stopping, Failed)
        )
    }

    /// Moves `self` to `to` if that transition is allowed.
    pub fn transition(&mut self, to: VmState) -> Result<(), Error> {
        if self.can_become(to) {
            *self = to;
            Ok(())
        } else {
            Err(Error::InvalidTransition { from: *self, to })
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, VmState::Stopped | VmState::Failed)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::*;
    use super::*;

    const ALL: [VmState; 6] = [Created, Starting, Running, Stopping, Stopped, Failed];

    #[test]
    fn the_happy_paths_are_allowed() {
        let mut s = Created;
        for to in [Starting, Running, Stopped] {
            s.transition(to).unwrap();
        }
        let mut s = Created;
        for to in [Starting, Running, Stopping, Stopped] {
            s.transition(to).unwrap();
        }
        let mut s = Created;
        for to in [Starting, Stopping, Failed] {
            s.transition(to).unwrap();
        }
    }

    #[test]
    fn final_states_are_final_and_nothing_goes_back() {
        for from in [Stopped, Failed] {
            assert!(from.is_final());
            for to in ALL {
                assert!(!from.can_become(to), "{from} -> {to}");
            }
        }
        for (from, to) in [
            (Running, Starting),
            (Stopping, Running),
            (Starting, Created),
            (Created, Running),
            (Created, Stopped),
        ] {
            let mut s = from;
            let err = s.transition(to).unwrap_err();
            assert!(matches!(err, Error::InvalidTransition { .. }));
            assert_eq!(s, from, "a refused transition leaves the state alone");
        }
        for s in ALL {
            assert!(!s.can_become(s), "{s} -> {s}");
        }
    }
}
