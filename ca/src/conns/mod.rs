//! Who may hold the CA's connections, and for how long. Every TLS connection holds a
//! slot from accept to close; a peer address holds at most its share of them (larger,
//! or unlimited, for addresses the operator names, such as an east-west gateway or a
//! node's ztunnel); a connection that sends no request soon after its handshake, or
//! stays without an open stream for long, is cut; and when the pool is full the
//! oldest idle connection makes room for the new one, so clients that hold
//! connections and send nothing cannot keep workloads from their certificates.
//!
//! A connection's requests are counted by [`ActivityLayer`], from the counters
//! each request carries ([`ConnInfo`]); the cuts happen in the connection's own
//! reads and writes ([`Deadlines`]), so no task polls the pool, and no request takes
//! its lock.

use std::{
    net::IpAddr,
    str::FromStr,
    time::{Duration, Instant},
};

use ipnet::IpNet;

mod activity;
mod pool;

pub use activity::{Activity, ActivityLayer, ConnInfo, Tracked};
pub use pool::{ConnState, Deadlines, InFlight, Pool, Slot};

/// Flags of the connection limits (part of `signet-ca serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// Open connections (including TLS handshakes in progress) allowed at once. When
    /// all are taken, the connection idle the longest is closed to make room; when
    /// none is idle, the new one is closed at once.
    #[arg(long, default_value_t = 4096, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Open connections one peer address may hold at once; more from it are closed
    /// as soon as they are accepted. Addresses named by --peer-connection-share get
    /// their own share.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections_per_peer: u32,

    /// A share of connections for the addresses in CIDR (repeatable), instead of
    /// --max-connections-per-peer: a number, or `unlimited`. For addresses that carry
    /// many workloads' connections: the east-west gateway remote clusters' pods come
    /// through, or the nodes whose ztunnel asks for its pods. The longest matching
    /// prefix wins.
    #[arg(long = "peer-connection-share", value_name = "CIDR=N|unlimited")]
    pub peer_connection_shares: Vec<PeerShare>,

    /// How long a connection may take, after its TLS handshake, to send the HTTP/2
    /// preface and its first request; then it is closed.
    #[arg(long, default_value = "10s", value_parser = bounded_duration(), value_name = "DURATION")]
    pub first_request_timeout: Duration,

    /// A connection with no request open for this long is closed (gRPC clients
    /// reconnect by themselves on their next call).
    #[arg(long, default_value = "2m", value_parser = bounded_duration(), value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Concurrent gRPC streams one connection may open (HTTP/2 SETTINGS; 1 to
    /// 1000000).
    #[arg(long, default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams_per_connection: u32,

    /// Connections are closed gracefully (GOAWAY) after this long, so nothing a
    /// connection proved at its handshake lives forever; clients reconnect (1s to
    /// 30 days).
    #[arg(long, default_value = "30m", value_parser = crate::flags::between(Duration::from_secs(1), 30 * crate::flags::DAY), value_name = "DURATION")]
    pub max_connection_age: Duration,
}

/// A duration from 100 ms to a day.
fn bounded_duration()
-> impl Fn(&str) -> Result<Duration, crate::flags::DurationError> + Clone + Send + Sync + 'static {
    crate::flags::between(Duration::from_millis(100), crate::flags::DAY)
}

/// `CIDR=N` or `CIDR=unlimited`: the connection share of a range of peer addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerShare {
    /// The addresses (a bare address is a /32 or /128).
    pub net: IpNet,
    /// Connections each address in `net` may hold; `None`: no per-peer limit.
    pub limit: Option<usize>,
}

impl FromStr for PeerShare {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, limit) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected CIDR=N or CIDR=unlimited"))?;
        let net = net.trim();
        let net = match net.parse::<IpNet>() {
            Ok(n) => n.trunc(),
            Err(_) => net
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("{net:?} is neither an address nor a CIDR range"))?,
        };
        let limit = match limit.trim() {
            "unlimited" => None,
            n => match n.parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => Some(n),
                _ => {
                    return Err(format!(
                        "{n:?}: the share must be a number from 1 to 1000000 or `unlimited`"
                    ));
                }
            },
        };
        Ok(Self { net, limit })
    }
}

/// The validated limits.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Connections at once, all peers together.
    pub max_total: usize,
    /// Connections at once from one peer address without a share of its own.
    pub per_peer: usize,
    /// Shares of named addresses.
    pub shares: Vec<PeerShare>,
    /// From the end of the handshake to the first request.
    pub first_request: Duration,
    /// With no request open.
    pub idle: Duration,
    /// Streams one connection may open.
    pub max_streams: u32,
    /// A connection's age at which it is told to go.
    pub max_age: Duration,
}

impl ConnArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> ConnLimits {
        ConnLimits {
            max_total: self.max_connections as usize,
            per_peer: self.max_connections_per_peer as usize,
            shares: self.peer_connection_shares.clone(),
            first_request: self.first_request_timeout,
            idle: self.idle_timeout,
            max_streams: self.max_streams_per_connection,
            max_age: self.max_connection_age,
        }
    }
}

impl ConnLimits {
    /// How many connections `ip` may hold: its share when a `--peer-connection-share`
    /// range holds it (the longest prefix wins), else the per-peer cap. `None`: no cap.
    pub fn peer_limit(&self, ip: IpAddr) -> Option<usize> {
        let ip = ip.to_canonical();
        self.shares
            .iter()
            .filter(|s| s.net.contains(&ip))
            .max_by_key(|s| s.net.prefix_len())
            .map_or(Some(self.per_peer), |s| s.limit)
    }
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its peer address holds its whole share already.
    #[error("the peer holds {0} connections, its share")]
    PeerShare(usize),
    /// Every slot is taken by a connection with a request open.
    #[error("all {0} connection slots are busy")]
    Full(usize),
}

/// Why the CA closed a connection of its own accord.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// It sent no request within the first-request timeout after its handshake.
    NoRequest,
    /// It had no request open for the idle timeout.
    Idle,
    /// It was past its maximum age and the grace after it.
    MaxAge,
    /// It was the oldest idle one when the pool was full (or the server stops).
    Evicted,
}

impl Cut {
    /// The `reason` label of `signet_ca_connections_closed_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoRequest => "first_request_timeout",
            Self::Idle => "idle_timeout",
            Self::MaxAge => "max_age",
            Self::Evicted => "evicted",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::NoRequest => "no request within the first-request timeout",
            Self::Idle => "no request open for the idle timeout",
            Self::MaxAge => "the connection outlived its maximum age",
            Self::Evicted => {
                "closed by the CA: to make room in a full pool for a new connection, or at shutdown"
            }
        }
    }
}

/// What a connection's deadlines say at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Close it now.
    Cut(Cut),
    /// Look again at this instant (or when something else wakes it).
    At(Instant),
}

/// The state of one connection at `now`, as [`verdict`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// When its handshake finished.
    pub ready_at: Instant,
    /// When it is cut whatever it does (maximum age and grace).
    pub cut_at: Instant,
    /// Requests open now.
    pub in_flight: usize,
    /// Requests started so far.
    pub requests: u64,
    /// When its last request ended (its handshake, before the first).
    pub idle_since: Instant,
}

/// Decides whether a connection is cut now, and when to look again. While requests
/// are open it looks again every idle period, so an idle stretch that starts later is
/// never seen late by more than that.
pub fn verdict(s: Snapshot, limits: &ConnLimits, now: Instant) -> Verdict {
    if now >= s.cut_at {
        return Verdict::Cut(Cut::MaxAge);
    }
    let (deadline, cut) = match (s.in_flight, s.requests) {
        (0, 0) => (s.ready_at + limits.first_request, Some(Cut::NoRequest)),
        (0, _) => (s.idle_since + limits.idle, Some(Cut::Idle)),
        _ => (now + limits.idle, None),
    };
    match cut {
        Some(cut) if now >= deadline => Verdict::Cut(cut),
        _ => Verdict::At(deadline.min(s.cut_at)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::{net::SocketAddr, task::Context};

    fn limits() -> ConnLimits {
        ConnLimits {
            max_total: 3,
            per_peer: 2,
            shares: vec![
                "10.0.0.0/8=unlimited".parse().unwrap(),
                "10.1.0.0/16=5".parse().unwrap(),
            ],
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            max_streams: 100,
            max_age: Duration::from_secs(1800),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn shares_take_the_longest_prefix_and_v4_mapped_addresses_count_as_v4() {
        let l = limits();
        assert_eq!(l.peer_limit("192.0.2.1".parse().unwrap()), Some(2));
        assert_eq!(l.peer_limit("10.9.9.9".parse().unwrap()), None);
        assert_eq!(l.peer_limit("10.1.2.3".parse().unwrap()), Some(5));
        assert_eq!(l.peer_limit("::ffff:10.1.2.3".parse().unwrap()), Some(5));
    }

    #[test]
    fn shares_parse_addresses_ranges_and_refuse_nonsense() {
        let s: PeerShare = "192.0.2.7=100".parse().unwrap();
        assert_eq!(s.net, "192.0.2.7/32".parse::<IpNet>().unwrap());
        assert_eq!(s.limit, Some(100));
        let s: PeerShare = "2001:db8::1/48=unlimited".parse().unwrap();
        assert_eq!(s.net, "2001:db8::/48".parse::<IpNet>().unwrap());
        assert_eq!(s.limit, None);
        for bad in [
            "10.0.0.0/8",
            "10.0.0.0/33=4",
            "host=4",
            "10.0.0.1=0",
            "10.0.0.1=-1",
        ] {
            assert!(bad.parse::<PeerShare>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_peer_gets_its_share_and_a_full_pool_evicts_the_oldest_idle() {
        let pool = Pool::new(limits());
        let a1 = pool.admit(addr("192.0.2.1:1000")).unwrap();
        let a2 = pool.admit(addr("192.0.2.1:1001")).unwrap();
        assert_eq!(
            pool.admit(addr("192.0.2.1:1002")).unwrap_err(),
            Refused::PeerShare(2)
        );
        // The first connection of another peer is busy; the pool is now full.
        let b1 = pool.admit(addr("192.0.2.2:1000")).unwrap();
        let _busy = b1.conn.begin();
        std::thread::sleep(Duration::from_millis(5));
        let a2_open = a2.conn.begin();
        drop(a2_open);
        std::thread::sleep(Duration::from_millis(5));
        // Full: the oldest idle (a1, idle since its accept) goes, not a2 nor busy b1.
        let c1 = pool.admit(addr("192.0.2.3:1000")).unwrap();
        assert!(c1.evicted);
        assert!(a1.conn.kill.is_cancelled());
        assert!(!a2.conn.kill.is_cancelled() && !b1.conn.kill.is_cancelled());
        assert_eq!(pool.len(), 3);
        // The evicted connection's slot is gone already; dropping it changes nothing.
        drop(a1);
        assert_eq!(pool.len(), 3);
        // a2 is the only idle one now.
        let _c2 = pool.admit(addr("192.0.2.3:1001")).unwrap();
        assert!(a2.conn.kill.is_cancelled());
        // Everything busy: the new connection is refused.
        let _c1_open = c1.conn.begin();
        let _c2_open = _c2.conn.begin();
        assert_eq!(
            pool.admit(addr("192.0.2.4:1000")).unwrap_err(),
            Refused::Full(3)
        );
        // A closed connection gives its place and its peer's share back.
        drop(a2);
        drop(_busy);
        drop(b1);
        assert_eq!(pool.len(), 2);
        assert!(pool.admit(addr("192.0.2.2:1001")).is_ok());
    }

    #[tokio::test]
    async fn a_stopping_server_cuts_every_connection_busy_or_not() {
        let pool = Pool::new(limits());
        let busy = pool.admit(addr("192.0.2.1:1000")).unwrap();
        let _open = busy.conn.begin();
        let idle = pool.admit(addr("192.0.2.2:1000")).unwrap();
        let mut deadlines = [
            Deadlines::start(busy, Duration::from_secs(1800)),
            Deadlines::start(idle, Duration::from_secs(1800)),
        ];
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for d in &mut deadlines {
            assert_eq!(d.poll_cut(&mut cx), None);
        }
        pool.cut_all();
        for d in &mut deadlines {
            assert_eq!(d.poll_cut(&mut cx), Some(Cut::Evicted));
        }
        // And any connection admitted after.
        let late = pool.admit(addr("192.0.2.3:1000")).unwrap();
        assert_eq!(
            Deadlines::start(late, Duration::from_secs(1800)).poll_cut(&mut cx),
            Some(Cut::Evicted)
        );
    }

    #[test]
    fn verdicts_cut_silent_idle_and_old_connections_only() {
        let l = limits();
        let t0 = Instant::now();
        let s = Snapshot {
            ready_at: t0,
            cut_at: t0 + Duration::from_secs(1800),
            in_flight: 0,
            requests: 0,
            idle_since: t0,
        };
        let at = |secs| t0 + Duration::from_secs(secs);
        // No request yet: the first-request deadline.
        assert_eq!(verdict(s, &l, at(1)), Verdict::At(at(10)));
        assert_eq!(verdict(s, &l, at(10)), Verdict::Cut(Cut::NoRequest));
        // A request open: never idle, looked at again an idle period later.
        let busy = Snapshot {
            in_flight: 1,
            requests: 1,
            ..s
        };
        assert_eq!(verdict(busy, &l, at(500)), Verdict::At(at(620)));
        // Idle since 100 s: cut at 220 s.
        let idle = Snapshot {
            requests: 1,
            idle_since: at(100),
            ..s
        };
        assert_eq!(verdict(idle, &l, at(150)), Verdict::At(at(220)));
        assert_eq!(verdict(idle, &l, at(220)), Verdict::Cut(Cut::Idle));
        // Past the maximum age, busy or not.
        assert_eq!(verdict(busy, &l, at(1800)), Verdict::Cut(Cut::MaxAge));
        // A deadline past the maximum age is looked at no later than the age.
        let late = Snapshot { cut_at: at(5), ..s };
        assert_eq!(verdict(late, &l, at(1)), Verdict::At(at(5)));
    }
}
