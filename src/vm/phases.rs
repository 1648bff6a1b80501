//! Boot milestones read from the serial console as it arrives, so a boot can be cut where its time
//! is spent: firmware (QEMU spawn → the kernel's first line), kernel (→ the first userspace process),
//! userspace (→ the guest's ready marker, e.g. boot-test's proof or the runner's start line).
//!
//! [`PhaseDetector`] is pure: the serial pump feeds it each chunk with the host [`Instant`] the chunk
//! arrived, and it returns the milestones that chunk completed. It works on lines, so a marker split
//! across reads is still found, and it reads the kernel's printk timestamp (`[    5.123456] …`) of
//! the matching line when there is one: the guest clock's view of the same moment.

use std::time::{Duration, Instant};

/// A point in the boot, in the order a boot reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Milestone {
    /// The kernel printed its banner: the firmware (and the UKI stub) handed over.
    Kernel,
    /// The kernel started the first userspace process (the initramfs' `/init`, or systemd).
    Userspace,
    /// The guest printed the ready marker the caller asked for.
    Ready,
}

/// One milestone as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub milestone: Milestone,
    /// When the chunk that completed the marker arrived on the host.
    pub at: Instant,
    /// The printk timestamp of the line, if it carried one (time since the kernel started).
    pub guest: Option<Duration>,
}

/// `Linux version 6.12.… (…)`: `start_kernel`'s banner, printed before anything else the kernel
/// says — unless the command line has `quiet`, which hides it (the test guest's does).
const KERNEL_MARKERS: &[&str] = &["Linux version "];

/// The kernel's `Run /init as init process` (initramfs) or `Run /sbin/init as init process` (no
/// initramfs); with `quiet`, systemd's own first words or the test guest's `/init` markers.
const USERSPACE_MARKERS: &[&str] = &[" as init process", "systemd[1]: ", "fkr-guest: "];

/// Bytes of one line kept for matching: markers and timestamps sit near the start, and a guest
/// printing one endless line must not grow the buffer.
const MAX_LINE: usize = 512;

/// Finds the boot milestones in a stream of serial chunks (see the module doc).
#[derive(Debug)]
pub struct PhaseDetector {
    ready_marker: Option<String>,
    /// The current line so far (at most [`MAX_LINE`] bytes of it).
    line: Vec<u8>,
    /// Whether the current line was already matched (a line yields each milestone once).
    kernel: bool,
    userspace: bool,
    ready: bool,
}

impl PhaseDetector {
    /// `ready_marker`: text the guest prints when it is ready (none: only kernel and userspace).
    pub fn new(ready_marker: Option<String>) -> Self {
        Self {
            ready_marker: ready_marker.filter(|m| !m.is_empty()),
            line: Vec::new(),
            kernel: false,
            userspace: false,
            ready: false,
        }
    }

    /// Every milestone found; nothing more to look for.
    pub fn done(&self) -> bool {
        self.kernel && self.userspace && (self.ready || self.ready_marker.is_none())
    }

    /// Feeds one chunk of serial output that arrived at `at`; returns the milestones it completed,
    /// each at most once per detector.
    pub fn feed(&mut self, chunk: &[u8], at: Instant) -> Vec<Seen> {
        let mut seen = Vec::new();
        if self.done() {
            return seen;
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            let (part, ended) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = if ended { &rest[part.len() + 1..] } else { &[] };
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&part[..part.len().min(room)]);
            // Checked on partial lines too: a marker counts as soon as it has arrived.
            self.check_line(at, &mut seen);
            if ended {
                self.line.clear();
            }
        }
        seen
    }

    fn check_line(&mut self, at: Instant, seen: &mut Vec<Seen>) {
        let line = &self.line;
        let has = |markers: &[&str]| markers.iter().any(|m| contains(line, m.as_bytes()));
        let mut found = Vec::new();
        if !self.kernel && has(KERNEL_MARKERS) {
            self.kernel = true;
            found.push(Milestone::Kernel);
        }
        if !self.userspace && has(USERSPACE_MARKERS) {
            self.userspace = true;
            found.push(Milestone::Userspace);
        }
        if !self.ready
            && self
                .ready_marker
                .as_deref()
                .is_some_and(|m| contains(line, m.as_bytes()))
        {
            self.ready = true;
            found.push(Milestone::Ready);
        }
        let guest = printk_time(line);
        seen.extend(found.into_iter().map(|milestone| Seen {
            milestone,
            at,
            guest,
        }));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The printk timestamp a kernel line starts with: `[    5.123456] …` (also journald's console
/// lines, which carry the same monotonic clock). `[  OK  ] Started …` and other brackets are not one.
pub fn printk_time(line: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(line.get(..line.len().min(32))?).ok()?;
    let inner = text.trim_start_matches('\r').strip_prefix('[')?;
    let (stamp, _) = inner.split_once(']')?;
    let (secs, frac) = stamp.trim_start().split_once('.')?;
    if secs.is_empty()
        || frac.is_empty()
        || frac.len() > 9
        || !secs.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    Some(Duration::new(secs.parse().ok()?, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn finds_each_milestone_once_with_its_arrival_time_and_guest_clock() {
        let t0 = Instant::now();
        let mut d = PhaseDetector::new(Some("fkr: starting forgejo-runner".into()));
        assert!(d
            .feed(
                b"\x1b[2J\x1b[01;01HBdsDxe: starting Boot0001\r\n",
                at(t0, 10)
            )
            .is_empty());
        let seen = d.feed(
            b"[    0.000000] Linux version 6.12.41+deb13-cloud-amd64 (debian-kernel@lists)\r\n",
            at(t0, 3000),
        );
        assert_eq!(
            seen,
            [Seen {
                milestone: Milestone::Kernel,
                at: at(t0, 3000),
                guest: Some(Duration::ZERO)
            }]
        );
        // A second banner (kexec, a log replay) is not a new milestone.
        assert!(d
            .feed(b"[    0.100000] Linux version again\n", at(t0, 3100))
            .is_empty());
        let seen = d.feed(
            b"[    5.123456] Run /init as init process\r\n[    5.2] with arguments:\n",
            at(t0, 8000),
        );
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].milestone, Milestone::Userspace);
        assert_eq!(seen[0].guest, Some(Duration::from_micros(5_123_456)));
        assert!(!d.done());
        let seen = d.feed(
            b"[   40.5] cloud-init[612]: fkr: starting forgejo-runner for job handle h\n",
            at(t0, 45_000),
        );
        assert_eq!(
            seen,
            [Seen {
                milestone: Milestone::Ready,
                at: at(t0, 45_000),
                guest: Some(Duration::from_millis(40_500))
            }]
        );
        assert!(d.done());
        assert!(d
            .feed(b"fkr: starting forgejo-runner\n", at(t0, 46_000))
            .is_empty());
    }

    #[test]
    fn a_marker_split_across_chunks_counts_when_its_last_byte_arrives() {
        let t0 = Instant::now();
        let mut d = PhaseDetector::new(None);
        assert!(d.feed(b"[    1.000000] Linux ver", at(t0, 100)).is_empty());
        let seen = d.feed(b"sion 6.1.0-cloud\n[    4.0] Run /sbin/in", at(t0, 200));
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (seen[0].milestone, seen[0].at),
            (Milestone::Kernel, at(t0, 200))
        );
        assert_eq!(seen[0].guest, Some(Duration::from_secs(1)));
        // The timestamp and the marker of the next line arrive in pieces too.
        assert!(d.feed(b"it as init pro", at(t0, 300)).is_empty());
        let seen = d.feed(b"cess\n", at(t0, 400));
        assert_eq!(seen[0].milestone, Milestone::Userspace);
        assert_eq!(seen[0].at, at(t0, 400));
        assert_eq!(seen[0].guest, Some(Duration::from_secs(4)));
        assert!(d.done(), "no ready marker asked for");
    }

    #[test]
    fn markers_in_different_lines_of_one_chunk_are_not_joined() {
        let t0 = Instant::now();
        let mut d = PhaseDetector::new(Some("ready now".into()));
        // "ready" ends one line and "now" starts the next: no marker.
        assert!(d.feed(b"x ready\nnow y\n", t0).is_empty());
        let seen = d.feed(b"ready now\n", t0);
        assert_eq!(seen[0].milestone, Milestone::Ready);
        assert_eq!(seen[0].guest, None, "no printk timestamp on this line");
    }

    #[test]
    fn a_quiet_kernel_leaves_the_kernel_milestone_missing() {
        // The test guest boots with `quiet`: no banner, no "Run /init"; its /init speaks first.
        let t0 = Instant::now();
        let mut d = PhaseDetector::new(Some("fkr-boot-test: proof 10".into()));
        let log: &[u8] = b"BdsDxe: starting Boot0001\r\nEFI stub: Loaded initrd\r\n\
            fkr-guest: init\nfkr-guest: seed found\nfkr-boot-test: proof 10\n";
        let kinds: Vec<Milestone> = d.feed(log, t0).iter().map(|s| s.milestone).collect();
        assert_eq!(kinds, [Milestone::Userspace, Milestone::Ready]);
        assert!(!d.done(), "the kernel milestone was never seen");
    }

    #[test]
    fn an_endless_line_does_not_grow_the_buffer() {
        let t0 = Instant::now();
        let mut d = PhaseDetector::new(None);
        for _ in 0..1000 {
            assert!(d.feed(&[b'x'; 4096], t0).is_empty());
        }
        assert!(d.line.len() <= MAX_LINE);
        // The next line is read as usual.
        let seen = d.feed(b"\n[    0.000000] Linux version 6\n", t0);
        assert_eq!(seen[0].milestone, Milestone::Kernel);
    }

    #[test]
    fn printk_timestamps_are_read_and_other_brackets_are_not() {
        assert_eq!(
            printk_time(b"[   12.345678] systemd[1]: x"),
            Some(Duration::from_micros(12_345_678))
        );
        assert_eq!(printk_time(b"\r[0.5] x"), Some(Duration::from_millis(500)));
        assert_eq!(printk_time(b"[  OK  ] Started x"), None);
        assert_eq!(printk_time(b"[ 12] x"), None);
        assert_eq!(printk_time(b"[1.x] x"), None);
        assert_eq!(printk_time(b"no bracket"), None);
        assert_eq!(printk_time(b"[ 1.2"), None, "unterminated");
    }
}
