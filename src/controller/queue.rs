//! The discovery queue: FIFO, deduplicated by job handle, with the bookkeeping of attempts. Pure
//! data (no I/O), so the scheduling rules are unit-tested here; `daemon.rs` feeds it Forgejo's lists.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::forgejo::{Job, JobStatus};

/// How many VMs a job gets whose runner never picked it up before the queue gives up on it.
pub(crate) const MAX_ATTEMPTS: u32 = 3;

/// A job waiting for a VM slot.
#[derive(Debug)]
pub(crate) struct Queued {
    pub job: Job,
    /// When discovery first saw it (for the queue-wait metric).
    pub seen_at: Instant,
}

/// What one discovery round changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    /// Jobs that entered the queue: (id, handle).
    pub new: Vec<(i64, String)>,
    /// Queued jobs that left it because they are no longer waiting: (id, handle).
    pub dropped: Vec<(i64, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct JobQueue {
    entries: VecDeque<Queued>,
    /// Handles queued or in flight: a handle is never queued twice.
    known: HashSet<String>,
    /// Handles whose VMs ended without running the job, and how often.
    failures: HashMap<String, u32>,
    /// Handles already given a second VM because the host's accelerator failed the first.
    retried: HashSet<String>,
    /// Handles another host claimed, left alone until the instant (then, if still waiting, the
    /// claim is stale: its host died or gave up).
    claimed_elsewhere: HashMap<String, Instant>,
}

impl JobQueue {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One poll's list: new waiting handles join the back of the queue; queued jobs missing from the
    /// waiting ones leave it; attempt counts of jobs no longer waiting are forgotten.
    pub fn observe(&mut self, jobs: &[Job], now: Instant) -> Observed {
        let mut out = Observed::default();
        let waiting: HashSet<&str> = jobs
            .iter()
            .filter(|j| j.status == JobStatus::Waiting && !j.handle.is_empty())
            .map(|j| j.handle.as_str())
            .collect();
        self.claimed_elsewhere
            .retain(|h, until| waiting.contains(h.as_str()) && *until > now);
        for j in jobs.iter().filter(|j| waiting.contains(j.handle.as_str())) {
            let gave_up = self
                .failures
                .get(&j.handle)
                .is_some_and(|n| *n >= MAX_ATTEMPTS);
            let elsewhere = self.claimed_elsewhere.contains_key(&j.handle);
            if gave_up || elsewhere || !self.known.insert(j.handle.clone()) {
                continue;
            }
            out.new.push((j.id, j.handle.clone()));
            self.entries.push_back(Queued {
                job: j.clone(),
                seen_at: now,
            });
        }
        self.failures.retain(|h, _| waiting.contains(h.as_str()));
        let known = &self.known;
        self.retried
            .retain(|h| waiting.contains(h.as_str()) || known.contains(h));
        let known = &mut self.known;
        self.entries.retain(|q| {
            let keep = waiting.contains(q.job.handle.as_str());
            if !keep {
                known.remove(&q.job.handle);
                out.dropped.push((q.job.id, q.job.handle.clone()));
            }
            keep
        });
        out
    }

    /// The first queued job that `still_waiting` confirms; the ones before it that it does not
    /// confirm are dropped (pushed to `dropped`). The returned job's handle stays known (in flight)
    /// until [`JobQueue::finished`].
    pub fn next_still_waiting(
        &mut self,
        still_waiting: &HashSet<&str>,
        dropped: &mut Vec<(i64, String)>,
    ) -> Option<Queued> {
        while let Some(q) = self.entries.pop_front() {
            if still_waiting.contains(q.job.handle.as_str()) {
                return Some(q);
            }
            self.known.remove(&q.job.handle);
            dropped.push((q.job.id, q.job.handle));
        }
        None
    }

    /// A job's task ended. `ran`: its runner ran it (picked up, or the guest powered off by itself,
    /// or the daemon stopped it); otherwise the attempt counts as failed. Returns the number of
    /// failed attempts when the queue now gives up on the job.
    pub fn finished(&mut self, handle: &str, ran: bool) -> Option<u32> {
        self.known.remove(handle);
        if ran {
            self.failures.remove(handle);
            return None;
        }
        let n = self.failures.entry(handle.to_owned()).or_insert(0);
        *n += 1;
        (*n >= MAX_ATTEMPTS).then_some(*n)
    }

    /// An in-flight job lost its claim to another host: not queued again before `until` (not an
    /// attempt of this host's).
    pub fn claimed_elsewhere(&mut self, handle: &str, until: Instant) {
        self.known.remove(handle);
        self.claimed_elsewhere.insert(handle.to_owned(), until);
    }

    /// An in-flight job whose VM failed through the host's fault (the accelerator), not the job's:
    /// back to the front of the queue, its handle still known, the attempt not counted. Once per
    /// handle, so a host that keeps failing cannot loop. Returns whether it was queued again.
    pub fn retry_front(&mut self, q: Queued) -> bool {
        if !self.known.contains(&q.job.handle) || !self.retried.insert(q.job.handle.clone()) {
            return false;
        }
        self.entries.push_front(q);
        true
    }

    /// Forgets in-flight handles for which `alive` is false (tasks that panicked), keeping queued ones.
    pub fn retain_in_flight(&mut self, alive: impl Fn(&str) -> bool) {
        let queued: HashSet<&str> = self.entries.iter().map(|q| q.job.handle.as_str()).collect();
        self.known
            .retain(|h| queued.contains(h.as_str()) || alive(h));
    }

    /// A job that is in flight without having been queued here (taken over after a restart): its
    /// handle is known until [`JobQueue::finished`], so discovery never gives it a second VM.
    pub fn in_flight(&mut self, handle: &str) {
        self.known.insert(handle.to_owned());
    }

    /// Empties the queue (shutdown); in-flight handles stay known.
    pub fn clear(&mut self) {
        for q in self.entries.drain(..) {
            self.known.remove(&q.job.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: i64, handle: &str, status: JobStatus) -> Job {
        Job {
            id,
            handle: handle.into(),
            attempt: 1,
            repo_id: 1,
            owner_id: 1,
            name: "build".into(),
            runs_on: vec!["external-host".into()],
            needs: vec![],
            task_id: 0,
            status,
            run_id: 0,
        }
    }

    fn waiting(id: i64, handle: &str) -> Job {
        job(id, handle, JobStatus::Waiting)
    }

    fn h(s: &[&'static str]) -> HashSet<&'static str> {
        s.iter().copied().collect()
    }

    #[test]
    fn an_adopted_job_is_never_queued_while_in_flight() {
        let mut q = JobQueue::default();
        let now = Instant::now();
        q.in_flight("a");
        let o = q.observe(&[waiting(1, "a"), waiting(2, "b")], now);
        assert_eq!(
            o.new,
            [(2, "b".into())],
            "the adopted job is not queued again"
        );
        assert_eq!(q.finished("a", true), None);
        let o = q.observe(&[waiting(1, "a")], now);
        assert_eq!(
            o.new,
            [(1, "a".into())],
            "once it ended, a job still waiting is new again"
        );
    }

    #[test]
    fn fifo_and_dedupe_by_handle() {
        let mut q = JobQueue::default();
        let now = Instant::now();
        let o = q.observe(&[waiting(1, "a"), waiting(2, "b")], now);
        assert_eq!(o.new, [(1, "a".into()), (2, "b".into())]);
        // The next poll sees them again, plus a third: only the third is new.
        let o = q.observe(&[waiting(2, "b"), waiting(1, "a"), waiting(3, "c")], now);
        assert_eq!(o.new, [(3, "c".into())]);
        assert_eq!(q.len(), 3);
        let mut dropped = Vec::new();
        let order: Vec<i64> =
            std::iter::from_fn(|| q.next_still_waiting(&h(&["a", "b", "c"]), &mut dropped))
                .map(|x| x.job.id)
                .collect();
        assert_eq!(order, [1, 2, 3]);
        // In flight: still known, not queued again while Forgejo lists them as waiting.
        assert!(q.observe(&[waiting(1, "a")], now).new.is_empty());
        assert!(q.is_empty());
        // Finished: a handle that is still waiting (the VM did not run it) is queued again.
        assert_eq!(q.finished("a", false), None);
        assert_eq!(q.observe(&[waiting(1, "a")], now).new, [(1, "a".into())]);
    }

    #[test]
    fn a_job_claimed_elsewhere_waits_out_the_claim_then_comes_back() {
        let mut q = JobQueue::default();
        let t0 = Instant::now();
        q.observe(&[waiting(1, "a")], t0);
        let mut dropped = Vec::new();
        assert!(q.next_still_waiting(&h(&["a"]), &mut dropped).is_some());
        q.claimed_elsewhere("a", t0 + std::time::Duration::from_secs(60));
        // Not an attempt, and not queued again while the other host's claim is fresh.
        assert!(q.observe(&[waiting(1, "a")], t0).new.is_empty());
        assert!(q
            .observe(&[waiting(1, "a")], t0 + std::time::Duration::from_secs(59))
            .new
            .is_empty());
        // Still waiting after the claim's time: this host tries again.
        assert_eq!(
            q.observe(&[waiting(1, "a")], t0 + std::time::Duration::from_secs(61))
                .new,
            [(1, "a".into())]
        );
    }

    #[test]
    fn jobs_no_longer_waiting_leave_the_queue() {
        let mut q = JobQueue::default();
        let now = Instant::now();
        q.observe(
            &[
                waiting(1, "a"),
                waiting(2, "b"),
                job(9, "z", JobStatus::Running),
            ],
            now,
        );
        assert_eq!(q.len(), 2, "running jobs are not queued");
        // "a" was taken by someone else (running), "b" vanished (cancelled).
        let o = q.observe(&[job(1, "a", JobStatus::Running)], now);
        assert_eq!(o.dropped, [(1, "a".into()), (2, "b".into())]);
        assert!(q.is_empty());
        // The re-check at dispatch time drops what the fresh list no longer has.
        q.observe(&[waiting(3, "c"), waiting(4, "d")], now);
        let mut dropped = Vec::new();
        let next = q.next_still_waiting(&h(&["d"]), &mut dropped).unwrap();
        assert_eq!(next.job.id, 4);
        assert_eq!(dropped, [(3, "c".into())]);
        // A dropped handle may come back later (a new attempt is a new handle, but be safe).
        assert_eq!(
            q.observe(&[waiting(3, "c"), waiting(4, "d")], now).new,
            [(3, "c".into())]
        );
        // Jobs without a handle (older servers) are never queued.
        assert!(q.observe(&[waiting(5, "")], now).new.is_empty());
    }

    #[test]
    fn gives_up_after_max_attempts_and_forgets_vanished_jobs() {
        let mut q = JobQueue::default();
        let now = Instant::now();
        let mut dropped = Vec::new();
        for attempt in 1..=MAX_ATTEMPTS {
            assert_eq!(
                q.observe(&[waiting(1, "a")], now).new.len(),
                1,
                "attempt {attempt}"
            );
            q.next_still_waiting(&h(&["a"]), &mut dropped).unwrap();
            let gave_up = q.finished("a", false);
            assert_eq!(gave_up, (attempt == MAX_ATTEMPTS).then_some(attempt));
        }
        assert!(
            q.observe(&[waiting(1, "a")], now).new.is_empty(),
            "given up"
        );
        // Once it is no longer waiting, its count is forgotten.
        q.observe(&[], now);
        assert_eq!(q.observe(&[waiting(1, "a")], now).new.len(), 1);
        // A run that worked clears the count.
        q.next_still_waiting(&h(&["a"]), &mut dropped).unwrap();
        assert_eq!(q.finished("a", false), None);
        q.observe(&[waiting(1, "a")], now);
        q.next_still_waiting(&h(&["a"]), &mut dropped).unwrap();
        assert_eq!(q.finished("a", true), None);
        assert!(q.failures.is_empty());
    }

    #[test]
    fn clear_and_panicked_tasks() {
        let mut q = JobQueue::default();
        let now = Instant::now();
        q.observe(&[waiting(1, "a"), waiting(2, "b"), waiting(3, "c")], now);
        let mut dropped = Vec::new();
        q.next_still_waiting(&h(&["a"]), &mut dropped).unwrap(); // "a" in flight
        q.retain_in_flight(|_| false); // its task panicked
        assert_eq!(q.len(), 2, "queued jobs stay");
        assert_eq!(
            q.observe(&[waiting(1, "a"), waiting(2, "b"), waiting(3, "c")], now)
                .new,
            [(1, "a".into())]
        );
        q.clear();
        assert!(q.is_empty());
        assert_eq!(q.observe(&[waiting(2, "b")], now).new, [(2, "b".into())]);
    }

    #[test]
    fn an_accelerator_failure_requeues_the_job_in_front_once_without_counting() {
        let mut q = JobQueue::default();
        let now = Instant::now();
        q.observe(&[waiting(1, "a"), waiting(2, "b")], now);
        let mut dropped = Vec::new();
        let first = q.next_still_waiting(&h(&["a", "b"]), &mut dropped).unwrap();
        let again = Queued {
            job: first.job.clone(),
            seen_at: first.seen_at,
        };
        assert!(q.retry_front(first));
        // Ahead of "b", not duplicated by the next poll.
        assert!(q
            .observe(&[waiting(1, "a"), waiting(2, "b")], now)
            .new
            .is_empty());
        let second = q.next_still_waiting(&h(&["a", "b"]), &mut dropped).unwrap();
        assert_eq!(second.job.handle, "a");
        // A second accelerator failure of the same job is an ordinary failed attempt.
        assert!(!q.retry_front(again));
        for _ in 1..MAX_ATTEMPTS {
            assert_eq!(q.finished("a", false), None);
            q.observe(&[waiting(1, "a")], now);
            q.next_still_waiting(&h(&["a"]), &mut dropped).unwrap();
        }
        assert_eq!(q.finished("a", false), Some(MAX_ATTEMPTS));
        // A job no longer in flight is never requeued by a late report.
        let stale = Queued {
            job: waiting(9, "z"),
            seen_at: now,
        };
        assert!(!q.retry_front(stale));
        assert!(dropped.is_empty());
    }
}
