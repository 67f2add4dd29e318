//! The signing queue: CPU-heavy work (CSR verification, signing) runs on a fixed pool
//! of dedicated threads, never on the async reactor, fed by a bounded queue. A worker
//! that finishes a job takes the next one straight from the queue, so the pool stays
//! busy under load without a round trip through the runtime. When the queue is full a
//! request is refused at once: overload shows as `RESOURCE_EXHAUSTED` instead of every
//! caller timing out.

use std::sync::{
    Arc, Mutex,
    mpsc::{self, Receiver, SyncSender, TrySendError},
};

use tokio::sync::oneshot;

/// Why a job did not run.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Too many jobs are waiting already.
    #[error("the CA is overloaded: {0} signing requests are already queued; retry with backoff")]
    Full(usize),
    /// The job panicked, or the pool is gone.
    #[error("the signing task failed: {0}")]
    Failed(String),
}

type Job = Box<dyn FnOnce() + Send>;

/// A bounded queue in front of a fixed number of signing threads.
#[derive(Debug, Clone)]
pub struct SigningQueue {
    jobs: SyncSender<Job>,
    capacity: usize,
}

impl SigningQueue {
    /// Starts `workers` threads; up to `capacity` jobs wait for them. The threads end
    /// when the last clone of the queue is dropped.
    pub fn new(workers: usize, capacity: usize) -> Result<Self, std::io::Error> {
        let capacity = capacity.max(1);
        let (jobs, queue) = mpsc::sync_channel::<Job>(capacity);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..workers.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("signet-sign-{n}"))
                .spawn(move || work(&queue))?;
        }
        Ok(Self { jobs, capacity })
    }

    /// Runs `job` on a signing thread, or refuses at once when the queue is full.
    pub async fn run<T, F>(&self, job: F) -> Result<T, QueueError>
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

fn work(queue: &Mutex<Receiver<Job>>) {
    loop {
        // Only idle workers wait on this lock; a busy one holds it just for `recv`.
        let job = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        match job {
            Ok(job) => job(),
            Err(_) => return, // every sender dropped: shut down
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_when_full_and_recovers() {
        let queue = SigningQueue::new(1, 1).unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
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
        let queue = SigningQueue::new(1, 4).unwrap();
        assert!(matches!(
            queue.run(|| panic!("boom")).await,
            Err(QueueError::Failed(_))
        ));
        assert_eq!(queue.run(|| 3).await.unwrap(), 3);
    }
}
