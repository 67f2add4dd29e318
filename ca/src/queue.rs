//! The signing queue: CPU-heavy work (CSR verification, signing) runs on blocking
//! threads, a few at a time, behind a bounded queue. When the queue is full a request
//! is refused at once, so overload shows as `RESOURCE_EXHAUSTED` instead of every
//! caller timing out.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Why a job did not run.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Too many jobs are waiting already.
    #[error("the CA is overloaded: {0} signing requests are already queued; retry with backoff")]
    Full(usize),
    /// The job panicked or the runtime is shutting down.
    #[error("the signing task failed: {0}")]
    Failed(String),
}

/// A bounded queue in front of a fixed number of signing workers.
#[derive(Debug, Clone)]
pub struct SigningQueue {
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    capacity: usize,
}

impl SigningQueue {
    /// `workers` jobs run at once; up to `capacity` are admitted (running or waiting).
    pub fn new(workers: usize, capacity: usize) -> Self {
        let workers = workers.max(1);
        let capacity = capacity.max(workers);
        Self {
            admitted: Arc::new(Semaphore::new(capacity)),
            running: Arc::new(Semaphore::new(workers)),
            capacity,
        }
    }

    /// Runs `job` on a blocking thread once a worker is free, or refuses at once when
    /// the queue is full.
    pub async fn run<T, F>(&self, job: F) -> Result<T, QueueError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let _slot = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| QueueError::Full(self.capacity))?;
        let _worker = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| QueueError::Failed(e.to_string()))?;
        tokio::task::spawn_blocking(job)
            .await
            .map_err(|e| QueueError::Failed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_when_full_and_recovers() {
        let queue = SigningQueue::new(1, 2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let mut held = Vec::new();
        for _ in 0..2 {
            let q = queue.clone();
            let rx = release_rx.clone();
            held.push(tokio::spawn(async move {
                q.run(move || rx.lock().unwrap().recv().unwrap()).await
            }));
        }
        // Let both be admitted.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(matches!(queue.run(|| ()).await, Err(QueueError::Full(2))));
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        for h in held {
            h.await.unwrap().unwrap();
        }
        assert_eq!(queue.run(|| 7).await.unwrap(), 7);
    }
}
