//! The signing queue: CPU-heavy work (CSR verification, signing) runs on a fixed pool
//! of dedicated threads, never on the async reactor, fed by a bounded queue. A worker
//! that finishes a job takes the next one straight from the queue, so the pool stays
//! busy under load without a round trip through the runtime. When the queue is full a
//! request is refused at once: overload shows as `RESOURCE_EXHAUSTED` instead of every
//! caller timing out. No one caller (a service account) may hold more than its share
//! of the queue, so one noisy workload cannot lock every other out.
//!
//! Nothing here is one lock that every request takes: the queue is crossbeam's
//! lock-free multi-consumer channel, and the per-caller counts are split over
//! [`SHARDS`] locks by the caller's hash.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use tokio::sync::oneshot;

/// The largest value a queue flag takes: each sizes a queue or a thread pool made
/// up front, and a typo of a few extra digits must be an error, not an allocation.
const MAX_LIMIT: u64 = 1_000_000;

/// Flags of the signing queue (part of `signet-ca serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct QueueArgs {
    /// Signing requests allowed to wait; more are refused with RESOURCE_EXHAUSTED
    /// (1 to 1000000).
    #[arg(long, default_value_t = 512, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_LIMIT))]
    pub max_pending: usize,

    /// Threads that sign (1 to 4096; default: one per CPU).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub signing_threads: Option<usize>,

    /// Share of --max-pending one caller (service account) may hold at once; more
    /// from that caller are refused with RESOURCE_EXHAUSTED (1 to 1000000; default: a
    /// quarter of --max-pending).
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_LIMIT))]
    pub max_pending_per_caller: Option<usize>,
}

/// The signing queue's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Signing threads.
    pub workers: usize,
    /// Jobs that may wait.
    pub capacity: usize,
    /// Jobs one caller may have waiting or running.
    pub per_caller: usize,
}

impl QueueArgs {
    /// The sizes these flags set, defaults filled in.
    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            workers: self
                .signing_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            capacity: self.max_pending,
            per_caller: self
                .max_pending_per_caller
                .unwrap_or((self.max_pending / 4).max(1)),
        }
    }
}

/// Why a job did not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    /// Too many jobs are waiting already.
    #[error("the CA is overloaded: {0} signing requests are already queued; retry with backoff")]
    Full(usize),
    /// This caller already has its whole share of the queue.
    #[error(
        "this caller already has {0} signing requests in progress, its share of the queue; retry with backoff"
    )]
    Share(usize),
    /// The job panicked, or the pool is gone.
    #[error("the signing task failed: {0}")]
    Failed(String),
}

type Job = Box<dyn FnOnce() + Send>;

/// A bounded queue in front of a fixed number of signing threads.
#[derive(Debug, Clone)]
pub(crate) struct SigningQueue {
    jobs: Sender<Job>,
    capacity: usize,
    shares: Arc<Shares>,
}

/// Locks the per-caller counts are split over.
const SHARDS: usize = 16;

/// Jobs in progress per caller.
#[derive(Debug)]
struct Shares {
    limit: usize,
    hasher: RandomState,
    held: [Mutex<HashMap<String, usize>>; SHARDS],
}

/// One job's place in its caller's share; given back on drop.
struct ShareGuard {
    shares: Arc<Shares>,
    key: String,
    shard: usize,
}

impl Shares {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            hasher: RandomState::new(),
            held: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, shard: usize) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Every update is a single insert, increment or remove: a panic elsewhere
        // cannot leave a shard inconsistent, so a poisoned lock is still usable.
        crate::sync::lock(&self.held[shard])
    }

    fn take(self: &Arc<Self>, key: &str) -> Option<ShareGuard> {
        let shard = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        let mut held = self.shard(shard);
        let n = held.entry(key.to_owned()).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ShareGuard {
            shares: self.clone(),
            key: key.to_owned(),
            shard,
        })
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        (0..SHARDS).all(|s| self.shard(s).is_empty())
    }
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        let mut held = self.shares.shard(self.shard);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

impl SigningQueue {
    /// Starts `workers` threads; up to `capacity` jobs wait for them, at most
    /// `per_caller` of them for any one caller. The threads end when the last clone
    /// of the queue is dropped.
    pub(crate) fn new(
        QueueConfig {
            workers,
            capacity,
            per_caller,
        }: QueueConfig,
    ) -> Result<Self, std::io::Error> {
        let capacity = capacity.max(1);
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(capacity);
        for n in 0..workers.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("signet-sign-{n}"))
                .spawn(move || work(&queue))?;
        }
        Ok(Self {
            jobs,
            capacity,
            shares: Arc::new(Shares::new(per_caller.max(1))),
        })
    }

    /// Runs `job` for `caller` on a signing thread, or refuses at once when the queue
    /// is full or the caller already holds its share. The share is held until the
    /// job has run (or the request is cancelled).
    pub(crate) async fn run_as<T, F>(&self, caller: &str, job: F) -> Result<T, QueueError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let Some(_share) = self.shares.take(caller) else {
            return Err(QueueError::Share(self.shares.limit));
        };
        self.run(job).await
    }

    /// Runs `job` on a signing thread, or refuses at once when the queue is full.
    pub(crate) async fn run<T, F>(&self, job: F) -> Result<T, QueueError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let wrapped: Job = Box::new(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            // The caller may have gone away (client cancelled); nothing to do then.
            let _ = done.send(outcome.map_err(|_| QueueError::Failed("the job panicked".into())));
        });
        self.jobs.try_send(wrapped).map_err(|e| match e {
            TrySendError::Full(_) => QueueError::Full(self.capacity),
            TrySendError::Disconnected(_) => {
                QueueError::Failed("the signing pool has stopped".into())
            }
        })?;
        result
            .await
            .map_err(|_| QueueError::Failed("the signing thread went away".into()))?
    }
}

fn work(queue: &Receiver<Job>) {
    // Ends when every sender is dropped.
    while let Ok(job) = queue.recv() {
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(workers: usize, capacity: usize, per_caller: usize) -> QueueConfig {
        QueueConfig {
            workers,
            capacity,
            per_caller,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_when_full_and_recovers() {
        let queue = SigningQueue::new(sizes(1, 1, 1)).unwrap();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let q = queue.clone();
        // Occupies the one worker until released.
        let running = tokio::spawn(async move {
            q.run(move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .await
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        // Fills the one queue slot.
        let q = queue.clone();
        let waiting = tokio::spawn(async move { q.run(|| 1).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(matches!(queue.run(|| 2).await, Err(QueueError::Full(1))));
        release_tx.send(()).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), 1);
        assert_eq!(queue.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_not_a_dead_pool() {
        let queue = SigningQueue::new(sizes(1, 4, 4)).unwrap();
        assert!(matches!(
            queue.run(|| panic!("boom")).await,
            Err(QueueError::Failed(_))
        ));
        assert_eq!(queue.run(|| 3).await.unwrap(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_caller_cannot_take_the_whole_queue() {
        // Eight slots, two per caller; the only worker is held busy.
        let queue = SigningQueue::new(sizes(1, 8, 2)).unwrap();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let q = queue.clone();
        let busy = tokio::spawn(async move {
            q.run_as("noisy", move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .await
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        let q = queue.clone();
        let second = tokio::spawn(async move { q.run_as("noisy", || 2).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The noisy caller's third request is refused at once, although the queue has
        // room (bounded: without the share it would wait for the busy worker forever)...
        let third = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            queue.run_as("noisy", || 3),
        )
        .await
        .expect("a request past the caller's share waited instead of being refused");
        assert!(matches!(third, Err(QueueError::Share(2))));
        // ...which another caller still gets.
        let q = queue.clone();
        let other = tokio::spawn(async move { q.run_as("quiet", || 4).await });
        release_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        assert_eq!(second.await.unwrap().unwrap(), 2);
        assert_eq!(other.await.unwrap().unwrap(), 4);
        // Shares are given back once jobs finish.
        assert_eq!(queue.run_as("noisy", || 5).await.unwrap(), 5);
        assert!(queue.shares.is_empty());
    }
}
