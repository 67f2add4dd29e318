//! The pool of open connections: a slot per connection from accept to close, shares
//! per peer address, eviction of the oldest idle connection when full; each
//! connection's counters and the deadlines polled from its reads and writes.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Context,
    time::{Duration, Instant},
};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{ConnLimits, Cut, Refused, Snapshot, Verdict, verdict};

/// One connection's counters, shared by its slot, its deadlines and the requests
/// it carries.
#[derive(Debug)]
pub struct ConnState {
    id: u64,
    peer: SocketAddr,
    epoch: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds after `epoch` when it last became idle.
    idle_since_ms: AtomicU64,
    pub(super) kill: CancellationToken,
}

impl ConnState {
    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }

    fn mark_idle(&self, now: Instant) {
        let ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        self.idle_since_ms.store(ms, Ordering::Release);
    }

    /// Counts a request as open until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn snapshot(&self, ready_at: Instant, cut_at: Instant) -> Snapshot {
        Snapshot {
            ready_at,
            cut_at,
            in_flight: self.in_flight.load(Ordering::Acquire),
            requests: self.requests.load(Ordering::Acquire),
            idle_since: self.idle_since(),
        }
    }
}

/// An open request; the connection is idle again when the last one is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // Idle-since first, so whoever sees no request open sees a fresh time.
        self.0.mark_idle(Instant::now());
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every open connection, by peer address (a TCP peer address is unique among the
/// open connections of one listener).
#[derive(Debug)]
pub struct Pool {
    limits: ConnLimits,
    epoch: Instant,
    inner: Mutex<Inner>,
    /// The parent of every connection's kill token.
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<SocketAddr, Arc<ConnState>>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove(&mut self, conn: &ConnState) {
        if self.conns.get(&conn.peer).is_some_and(|c| c.id == conn.id) {
            self.conns.remove(&conn.peer);
            let ip = conn.peer.ip().to_canonical();
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
    }
}

/// A new connection's place in the pool, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<Pool>,
    /// Its counters.
    pub conn: Arc<ConnState>,
    /// Whether another (idle) connection was closed to make room for it.
    pub evicted: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.lock().remove(&self.conn);
    }
}

impl Pool {
    /// An empty pool with these limits.
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            epoch: Instant::now(),
            inner: Mutex::default(),
            shutdown: CancellationToken::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a few inserts and removes that cannot panic half-way: a
        // poisoned pool is whole (refusing every connection after it would not be).
        crate::sync::lock(&self.inner)
    }

    /// Admits a connection from `peer` just accepted, closing the connection idle the
    /// longest when the pool is full.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, Refused> {
        let ip = peer.ip().to_canonical();
        let now = Instant::now();
        let mut inner = self.lock();
        let held = inner.per_ip.get(&ip).copied().unwrap_or(0);
        if let Some(limit) = self.limits.peer_limit(ip)
            && held >= limit
        {
            return Err(Refused::PeerShare(limit));
        }
        let mut evicted = false;
        if inner.conns.len() >= self.limits.max_total {
            // Linear, but only when full, and the pool is bounded.
            let victim = inner
                .conns
                .values()
                .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
                // Ties (the same millisecond) go to the older connection.
                .min_by_key(|c| (c.idle_since_ms.load(Ordering::Acquire), c.id))
                .cloned();
            let Some(victim) = victim else {
                return Err(Refused::Full(self.limits.max_total));
            };
            inner.remove(&victim);
            victim.kill.cancel();
            evicted = true;
        }
        inner.next_id += 1;
        let conn = Arc::new(ConnState {
            id: inner.next_id,
            peer,
            epoch: self.epoch,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            kill: self.shutdown.child_token(),
        });
        conn.mark_idle(now);
        // A connection in the map for this address is one whose close we have not
        // seen yet; the kernel has closed it, so it goes.
        if let Some(stale) = inner.conns.get(&peer).cloned() {
            inner.remove(&stale);
        }
        inner.conns.insert(peer, conn.clone());
        *inner.per_ip.entry(ip).or_default() += 1;
        drop(inner);
        Ok(Slot {
            pool: self.clone(),
            conn,
            evicted,
        })
    }

    /// Cuts every connection, now and as they come: for a shutdown whose graceful part
    /// is over (a stream that never ends, such as a health Watch, would hold it).
    pub fn cut_all(&self) {
        self.shutdown.cancel();
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's deadlines, polled from its reads and writes: eviction, the first
/// request, idleness and maximum age.
#[derive(Debug)]
pub struct Deadlines {
    slot: Slot,
    ready_at: Instant,
    cut_at: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    cut: Option<Cut>,
}

impl Deadlines {
    /// Deadlines from now (the end of the handshake); cut whatever it does at
    /// `cut_after`.
    pub fn start(slot: Slot, cut_after: Duration) -> Self {
        let now = Instant::now();
        let killed = Box::pin(slot.conn.kill.clone().cancelled_owned());
        let first = now + slot.pool.limits.first_request;
        Self {
            ready_at: now,
            cut_at: now + cut_after,
            timer: Box::pin(tokio::time::sleep_until(first.min(now + cut_after).into())),
            killed,
            slot,
            cut: None,
        }
    }

    /// The connection's counters.
    pub fn conn(&self) -> &Arc<ConnState> {
        &self.slot.conn
    }

    /// A future that completes if the connection is evicted (for its handshake).
    pub fn evicted(slot: &Slot) -> WaitForCancellationFutureOwned {
        slot.conn.kill.clone().cancelled_owned()
    }

    /// `Some` once the connection is to be cut; the waker is registered otherwise.
    pub fn poll_cut(&mut self, cx: &mut Context<'_>) -> Option<Cut> {
        if self.cut.is_some() {
            return self.cut;
        }
        if self.killed.as_mut().poll(cx).is_ready() {
            self.cut = Some(Cut::Evicted);
            return self.cut;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let snapshot = self.slot.conn.snapshot(self.ready_at, self.cut_at);
            match verdict(snapshot, &self.slot.pool.limits, now) {
                Verdict::Cut(cut) => {
                    self.cut = Some(cut);
                    return self.cut;
                }
                Verdict::At(at) => self.timer.as_mut().reset(at.max(now).into()),
            }
        }
        None
    }

    /// The error a cut connection's reads and writes get.
    pub fn error(cut: Cut) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, cut.message())
    }
}
