//! The per-job state machine (explicit transitions, in the style of cloud-hypervisor's `VmState`).
//!
//! ```text
//! queued ──► preparing ──► booting ──► running ──► cleaning ──► done
//!   │            │            │                       │
//!   │            └────────────┴──────► cleaning       └──────► failed
//!   └──► done (dropped: the job was no longer waiting when its turn came)
//! ```
//! `preparing`: CI user, token, runner, seed, tap. `booting`: QEMU spawned, the runner has not picked the
//! job up yet. `running`: Forgejo shows the job running. `cleaning`: the VM is gone (or never started);
//! revoking, deleting, tearing down. `done` when the guest powered off by itself after its runner exited,
//! `failed` otherwise (preparation failed, crash, deadline, host stop).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    pub fn transition(&mut self, to: JobState) -> Result<(), Error> {
        if !self.can_become(to) {
            return Err(Error::InvalidTransition { from: *self, to });
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

#[cfg(test)]
mod tests {
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
