//! This host's job-list requests, all of them: discovery's poll, dispatch's fresh look, and each
//! claim's still-waiting check. [`JobLister`] sends at most one per `min_gap` (`poll_interval_min`,
//! default 1 s, so Forgejo sees at most one job-list request per second from a host) and lets
//! callers share a list: whoever needs a list sent no earlier than some instant gets the newest one
//! if it qualifies, or waits for the next request — one request serves every caller waiting then.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::forgejo::{self, Job};

#[derive(Debug, Default)]
struct Last {
    /// When the last request was sent (answered or not): the gap counts from here.
    sent: Option<Instant>,
    /// The last answer: when its request was sent, for which label, the list.
    list: Option<(Instant, String, Arc<Vec<Job>>)>,
}

/// Rate-limited, shared job lists (see the module doc).
#[derive(Debug)]
pub(crate) struct JobLister {
    min_gap: Duration,
    /// Held while a request is waited for and sent: concurrent callers queue here and then take its
    /// answer instead of sending their own.
    last: Mutex<Last>,
}

impl JobLister {
    pub fn new(min_gap: Duration) -> Self {
        Self {
            min_gap,
            last: Mutex::new(Last::default()),
        }
    }

    /// The jobs list for `label` as Forgejo answered a request sent at or after `since`: the last
    /// answer if it is that fresh, else a new request by `fetch`, sent no sooner than `min_gap`
    /// after the one before.
    pub async fn list_since<F, Fut>(
        &self,
        label: &str,
        since: Instant,
        fetch: F,
    ) -> Result<Arc<Vec<Job>>, forgejo::Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Job>, forgejo::Error>>,
    {
        let mut last = self.last.lock().await;
        if let Some((sent, l, list)) = &last.list {
            if *sent >= since && l == label {
                return Ok(list.clone());
            }
        }
        if let Some(sent) = last.sent {
            tokio::time::sleep_until(sent + self.min_gap).await;
        }
        let sent = Instant::now();
        last.sent = Some(sent);
        let list = Arc::new(fetch().await?);
        last.list = Some((sent, label.to_owned(), list.clone()));
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const GAP: Duration = Duration::from_millis(200);

    fn fetcher(
        calls: &Arc<AtomicUsize>,
    ) -> impl FnOnce() -> std::future::Ready<Result<Vec<Job>, forgejo::Error>> {
        let calls = calls.clone();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(Vec::new()))
        }
    }

    #[tokio::test]
    async fn requests_keep_the_gap_and_fresh_enough_lists_are_shared() {
        let lister = Arc::new(JobLister::new(GAP));
        let calls = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        lister.list_since("l", t0, fetcher(&calls)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Asked for a list no older than t0: the one just made serves, at once.
        lister.list_since("l", t0, fetcher(&calls)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(t0.elapsed() < GAP);
        // A fresher one is needed: it waits out the gap.
        lister
            .list_since("l", Instant::now(), fetcher(&calls))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(t0.elapsed() >= GAP);
        // Three callers at once, each needing a list newer than now: one request serves them all.
        let now = Instant::now();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let (lister, calls) = (lister.clone(), calls.clone());
                tokio::spawn(async move { lister.list_since("l", now, fetcher(&calls)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(t0.elapsed() >= 2 * GAP);
        // Another label is another list.
        lister
            .list_since("other", t0, fetcher(&calls))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(t0.elapsed() >= 3 * GAP);
    }

    #[tokio::test]
    async fn a_failed_request_counts_for_the_gap_and_is_not_shared() {
        let lister = JobLister::new(GAP);
        let t0 = Instant::now();
        let err = lister
            .list_since("l", t0, || async {
                Err(forgejo::Error::Timeout {
                    method: "GET",
                    route: "/admin/actions/runners/jobs",
                    timeout_ms: 30_000,
                })
            })
            .await;
        assert!(err.is_err());
        let calls = Arc::new(AtomicUsize::new(0));
        lister.list_since("l", t0, fetcher(&calls)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the failure was not kept");
        assert!(t0.elapsed() >= GAP, "nor was the next request sent at once");
    }
}
