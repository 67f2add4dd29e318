//! One way to keep looking at files: every poller of Signet (the CA's `cacerts`
//! reload, the agent's file secrets and federated bundles) is a [`Poll`] loop that
//! reads with [`read_off_thread`] and reports a recurring failure once through
//! [`Reported`]. Files are polled, not watched with inotify: a kubelet-mounted Secret
//! changes by swapping a `..data` link, which a poll of the content sees wherever the
//! link points.

use std::{fmt::Display, time::Duration};

use tokio::sync::watch;

/// Ticks every `interval` until the stop signal (when there is one) turns true.
#[derive(Debug)]
pub struct Poll {
    interval: Duration,
    stop: Option<watch::Receiver<bool>>,
}

impl Poll {
    /// A poll that ends when `stop` turns true, or never when `None` (the caller
    /// then ends its loop itself).
    pub fn new(interval: Duration, stop: Option<watch::Receiver<bool>>) -> Self {
        Self { interval, stop }
    }

    /// Waits one interval; false once stopped (at once if already stopped).
    pub async fn tick(&mut self) -> bool {
        match &mut self.stop {
            None => {
                tokio::time::sleep(self.interval).await;
                true
            }
            Some(stop) => {
                if *stop.borrow() {
                    return false;
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => false,
                    _ = tokio::time::sleep(self.interval) => true,
                }
            }
        }
    }
}

/// Why [`read_off_thread`] has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffThreadError {
    /// The read took longer than allowed (a hung network file system, say).
    #[error("took longer than {0:?}")]
    TimedOut(Duration),
    /// The blocking task panicked or was cancelled.
    #[error("the reading task failed: {0}")]
    Failed(String),
}

/// Runs a blocking read on tokio's blocking threads, at most `limit` long, so a slow
/// or stuck file never holds up the runtime's threads (the agent has only one). On a
/// time-out the read may still finish in the background; its result is dropped.
pub async fn read_off_thread<T: Send + 'static>(
    limit: Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffThreadError> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(read)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(OffThreadError::Failed(e.to_string())),
        Err(_) => Err(OffThreadError::TimedOut(limit)),
    }
}

/// The last failure reported, so a poller logs a failure once, not every interval,
/// and again once it changes.
#[derive(Debug, Default)]
pub struct Reported(Option<String>);

impl Reported {
    /// Whether `failure` differs from the last one reported (and should be logged).
    pub fn is_new(&mut self, failure: &dyn Display) -> bool {
        let text = failure.to_string();
        if self.0.as_deref() == Some(text.as_str()) {
            return false;
        }
        self.0 = Some(text);
        true
    }

    /// Things work again: the next failure is new.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_poll_ticks_every_interval_until_stopped() {
        let (tx, rx) = watch::channel(false);
        let mut poll = Poll::new(Duration::from_secs(2), Some(rx));
        let start = tokio::time::Instant::now();
        assert!(poll.tick().await);
        assert!(poll.tick().await);
        assert_eq!(start.elapsed(), Duration::from_secs(4));
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tx.send_replace(true);
        });
        assert!(!poll.tick().await, "stopped mid-interval");
        assert_eq!(start.elapsed(), Duration::from_millis(4500));
        stopper.await.unwrap();
        assert!(!poll.tick().await, "stays stopped");
    }

    #[tokio::test]
    async fn a_slow_read_times_out_and_a_panic_is_an_error() {
        let slow = read_off_thread(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500));
        })
        .await;
        assert_eq!(
            slow,
            Err(OffThreadError::TimedOut(Duration::from_millis(50)))
        );
        #[allow(clippy::panic)]
        let broken = read_off_thread(Duration::from_secs(5), || -> u8 { panic!("boom") }).await;
        assert!(
            matches!(broken, Err(OffThreadError::Failed(_))),
            "{broken:?}"
        );
        assert_eq!(read_off_thread(Duration::from_secs(5), || 7).await, Ok(7));
    }

    #[test]
    fn a_failure_is_reported_once_until_it_changes_or_clears() {
        let mut r = Reported::default();
        assert!(r.is_new(&"no such file"));
        assert!(!r.is_new(&"no such file"));
        assert!(r.is_new(&"permission denied"));
        r.clear();
        assert!(r.is_new(&"permission denied"));
    }
}
