//! Admission control for every listener of both proxies: what a peer can hold before it has
//! proven anything, and what all peers together can take from the process.
//!
//! One [`Admission`] per process, shared by all of its listeners. It keeps:
//!
//! - **A file-descriptor reserve** ([`FdBudget`]). Accepted sockets may use only the low
//!   part of `RLIMIT_NOFILE` (half by default); sockets the proxy opens itself (to an app,
//!   an upstream, a peer node) may use all but the last [`FdBudget::reserve`]; and that
//!   reserve is left for the proxy's own work: opening a pod's network namespace, reading
//!   the config and certificates, loading eBPF state. The check costs nothing: Linux hands
//!   out the lowest free descriptor, so a new descriptor's number is a lower bound on how
//!   many are open, and a socket whose number is over its mark is closed at once (shed).
//! - **Bounds on handshakes in flight** per process and per source address: a connection
//!   holds a handshake slot from its accept until its TLS handshake completes (or times out
//!   after [`Limits::handshake_timeout`]), and one that finds no slot is closed at once.
//!   Peers that never send a byte therefore hold nothing for long and never many.
//! - **Per-listener bounds** ([`ListenerLimits`]): connections open at once on a listener
//!   (a set of listeners, for ztunnel's per-pod ones) and per source address.
//!
//! Accept loops built on [`Listener::accept`] never end on an error: running out of
//! descriptors (`EMFILE`, `ENFILE`) or kernel memory backs off (10 ms doubling to 1 s) and
//! retries; every error and every shed connection is counted
//! (`ambit_admission_accept_errors_total`, `ambit_admission_shed_total`) and logged at most
//! once per [`LOG_EVERY`] per listener, so a flood cannot also flood the log.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ambit_shared::admission::{Admission, Limits, ListenerLimits};
//! let mut registry = prometheus_client::registry::Registry::default();
//! let admission = Admission::new(Limits::default(), &mut registry)?;
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let mut listener = admission
//!     .gate("example", ListenerLimits::default())
//!     .listener(tcp);
//! loop {
//!     let conn = listener.accept().await; // never an error
//!     tokio::spawn(async move {
//!         let _permit = conn.permit; // counts the connection until the task ends
//!         drop(conn.stream);
//!     });
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Default bound on a TLS handshake, from accept (the client's first byte included) to the
/// end of the handshake. Clients in a mesh send their ClientHello at once; 5 s is far more
/// than a handshake takes even on a loaded node, and short enough that idle connections do
/// not pile up.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on handshakes in flight in one process.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
/// Default bound on handshakes in flight from one source address. A pooling client needs
/// one connection per destination identity, so even a burst to many pods of one node
/// stays far below it.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 128;
/// The least number of descriptors kept in reserve, however low the limit.
pub const MIN_FD_RESERVE: u64 = 64;
/// How often, at most, each listener logs the connections it shed or failed to accept.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// First pause after an accept error that a retry cannot fix at once (no descriptors, no
/// memory); doubles up to [`MAX_ACCEPT_BACKOFF`].
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while the process is out of descriptors.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Errors setting up admission control.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionError {
    /// `RLIMIT_NOFILE` could not be read.
    #[error("reading the open-files limit: {0}")]
    Rlimit(#[source] nix::Error),
    /// The settings leave no descriptor for connections.
    #[error(
        "open-files limit {limit} leaves no descriptors for connections (accepted below {accept_below}, \
         reserve {reserve})"
    )]
    NoRoom {
        /// `RLIMIT_NOFILE`.
        limit: u64,
        /// Accepted sockets must be numbered below this.
        accept_below: u64,
        /// Descriptors kept for the process's own work.
        reserve: u64,
    },
}

/// A socket the proxy was about to open would have eaten into the descriptor reserve.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "file-descriptor reserve reached (descriptor {fd} of limit {limit}, the last {reserve} are kept for the proxy's own work)"
)]
pub struct FdReserveError {
    /// The descriptor's number.
    pub fd: RawFd,
    /// `RLIMIT_NOFILE`.
    pub limit: u64,
    /// Descriptors kept in reserve.
    pub reserve: u64,
}

impl From<FdReserveError> for std::io::Error {
    fn from(e: FdReserveError) -> Self {
        std::io::Error::other(e)
    }
}

/// Process-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Descriptors kept free for the process's own work; no connection may use them.
    /// `None`: a sixteenth of the limit, at least [`MIN_FD_RESERVE`].
    pub fd_reserve: Option<u64>,
    /// Accepted connections may use descriptors numbered below this. `None`: half the
    /// limit, so the sockets the proxy opens for the peers it serves always have room.
    pub accept_fds: Option<u64>,
    /// Handshakes in flight in the process. Also never more than half of the accepted
    /// descriptors, so proven peers keep room while unproven ones wait.
    pub max_handshakes: usize,
    /// Handshakes in flight from one source address.
    pub max_handshakes_per_source: usize,
    /// Bound on one handshake, from accept to its end.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fd_reserve: None,
            accept_fds: None,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

// === FdBudget ===

/// Where, in the descriptor table, accepted and opened sockets may go. Cheap to copy; it
/// holds only numbers, so any layer can check a socket without shared state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    limit: u64,
    accept_below: u64,
    connect_below: u64,
}

impl FdBudget {
    /// The budget for the current `RLIMIT_NOFILE` soft limit (read it after raising it).
    pub fn from_rlimit(limits: &Limits) -> Result<Self, AdmissionError> {
        use nix::sys::resource::{Resource, getrlimit};
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(AdmissionError::Rlimit)?;
        Self::for_limit(soft, limits)
    }

    /// The budget for an open-files limit of `limit`.
    pub fn for_limit(limit: u64, limits: &Limits) -> Result<Self, AdmissionError> {
        let reserve = limits
            .fd_reserve
            .unwrap_or((limit / 16).max(MIN_FD_RESERVE));
        let connect_below = limit.saturating_sub(reserve);
        let accept_below = limits.accept_fds.unwrap_or(limit / 2).min(connect_below);
        // Below ~16 the process's own descriptors (stdio, epoll, eBPF) leave nothing.
        if accept_below < 16 {
            return Err(AdmissionError::NoRoom {
                limit,
                accept_below,
                reserve,
            });
        }
        Ok(FdBudget {
            limit,
            accept_below,
            connect_below,
        })
    }

    /// No limits (for tests and tools that have no reserve to keep).
    pub fn unlimited() -> Self {
        FdBudget {
            limit: u64::MAX,
            accept_below: u64::MAX,
            connect_below: u64::MAX,
        }
    }

    /// `RLIMIT_NOFILE` the budget was made for.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Descriptors no connection may use.
    pub fn reserve(&self) -> u64 {
        self.limit.saturating_sub(self.connect_below)
    }

    /// Accepted sockets must be numbered below this.
    pub fn accept_below(&self) -> u64 {
        self.accept_below
    }

    fn accepts(&self, fd: RawFd) -> bool {
        u64::try_from(fd).is_ok_and(|fd| fd < self.accept_below)
    }

    /// Refuses a socket the proxy just opened (before connecting it) when it sits in the
    /// reserve. Close it and fail the request that wanted it: the reserve is for the
    /// proxy's own work.
    pub fn check_opened(&self, socket: &impl AsRawFd) -> Result<(), FdReserveError> {
        let fd = socket.as_raw_fd();
        if u64::try_from(fd).is_ok_and(|n| n < self.connect_below) {
            Ok(())
        } else {
            Err(FdReserveError {
                fd,
                limit: self.limit,
                reserve: self.reserve(),
            })
        }
    }
}

// === Slots ===

/// Why a connection was closed without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shed {
    /// Its descriptor was over the accepted-sockets mark.
    FdReserve,
    /// The listener holds as many connections as it may.
    Connections,
    /// Its source holds as many connections on the listener as it may.
    ConnectionsPerSource,
    /// As many handshakes are in flight as the process allows.
    Handshakes,
    /// As many handshakes from its source are in flight as allowed.
    HandshakesPerSource,
}

impl Shed {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::FdReserve => "fd_reserve",
            Shed::Connections => "connections",
            Shed::ConnectionsPerSource => "connections_per_source",
            Shed::Handshakes => "handshakes",
            Shed::HandshakesPerSource => "handshakes_per_source",
        }
    }
}

impl std::fmt::Display for Shed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counted slots, in total and per source address.
#[derive(Debug)]
struct Slots {
    max_total: usize,
    max_per_source: usize,
    over_total: Shed,
    over_source: Shed,
    counts: Mutex<Counts>,
    gauge: Option<Gauge>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Only sources holding at least one slot, so its size is bounded by `max_total`.
    per_source: HashMap<IpAddr, usize>,
}

/// One slot of a [`Slots`], given back on drop.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Slots {
    fn new(max_total: usize, max_per_source: usize, over: (Shed, Shed)) -> Self {
        Slots {
            max_total,
            max_per_source,
            over_total: over.0,
            over_source: over.1,
            counts: Mutex::default(),
            gauge: None,
        }
    }

    fn take(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Shed> {
        let mut c = self.counts.lock();
        if c.total >= self.max_total {
            return Err(self.over_total);
        }
        let from_source = c.per_source.entry(source).or_default();
        if *from_source >= self.max_per_source {
            return Err(self.over_source);
        }
        *from_source += 1;
        c.total += 1;
        if let Some(g) = &self.gauge {
            g.inc();
        }
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }

    fn held(&self) -> usize {
        self.counts.lock().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.counts.lock();
        c.total = c.total.saturating_sub(1);
        if let std::collections::hash_map::Entry::Occupied(mut e) = c.per_source.entry(self.source)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        if let Some(g) = &self.slots.gauge {
            g.dec();
        }
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    listener: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    listener: &'static str,
    phase: &'static str,
}

#[derive(Debug, Default)]
struct Metrics {
    shed: Family<ShedLabels, Counter>,
    accept_errors: Family<ErrorLabels, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    handshakes: Gauge,
}

impl Metrics {
    fn register(&self, registry: &mut Registry, fds: &FdBudget) {
        let r = registry.sub_registry_with_prefix("ambit_admission");
        r.register(
            "shed",
            "Connections closed at accept without being served, by listener and reason",
            self.shed.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accepts (the loop backs off and retries), by listener and errno",
            self.accept_errors.clone(),
        );
        r.register(
            "timeouts",
            "Connections closed for taking too long in a phase (handshake, preface, keepalive, idle, header_read, request_body)",
            self.timeouts.clone(),
        );
        r.register(
            "handshakes_in_flight",
            "Accepted connections that have not finished their TLS handshake",
            self.handshakes.clone(),
        );
        let gauge = |v: u64| {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            g
        };
        r.register(
            "fd_limit",
            "The open-files limit admission works from",
            gauge(fds.limit),
        );
        r.register(
            "fd_accept_below",
            "Accepted sockets must have a descriptor number below this",
            gauge(fds.accept_below),
        );
    }
}

/// Logs at most once per [`LOG_EVERY`], with how many events it stands for.
#[derive(Debug)]
struct Throttle {
    start: Instant,
    /// Milliseconds since `start` of the next allowed log line.
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    fn new() -> Self {
        Throttle {
            start: Instant::now(),
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events since the last line)` when a line may be logged now.
    fn tick(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next.load(Ordering::Relaxed);
        let every = u64::try_from(LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now.saturating_add(every),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::AcqRel) + 1)
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

// === Admission ===

/// Admission control shared by every listener of a process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: Limits,
    fds: FdBudget,
    handshakes: Arc<Slots>,
    metrics: Metrics,
}

impl Admission {
    /// Admission for the current open-files limit (raise it first), with its metrics
    /// registered in `registry` under `ambit_admission_`.
    pub fn new(limits: Limits, registry: &mut Registry) -> Result<Self, AdmissionError> {
        let fds = FdBudget::from_rlimit(&limits)?;
        Ok(Self::with_budget(limits, fds, registry))
    }

    /// Admission with an explicit descriptor budget.
    pub fn with_budget(limits: Limits, fds: FdBudget, registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        metrics.register(registry, &fds);
        // Unproven peers get at most half of the accepted descriptors, so a flood of them
        // leaves room for connections that finished their handshake.
        let half = usize::try_from(fds.accept_below / 2).unwrap_or(usize::MAX);
        let mut handshakes = Slots::new(
            limits.max_handshakes.min(half).max(1),
            limits.max_handshakes_per_source.max(1),
            (Shed::Handshakes, Shed::HandshakesPerSource),
        );
        handshakes.gauge = Some(metrics.handshakes.clone());
        tracing::info!(
            fd_limit = fds.limit,
            accept_below = fds.accept_below,
            fd_reserve = fds.reserve(),
            max_handshakes = handshakes.max_total,
            max_handshakes_per_source = handshakes.max_per_source,
            handshake_timeout = ?limits.handshake_timeout,
            "admission control"
        );
        Admission {
            inner: Arc::new(Inner {
                limits,
                fds,
                handshakes: Arc::new(handshakes),
                metrics,
            }),
        }
    }

    /// The descriptor budget, for checking sockets the proxy opens.
    pub fn fds(&self) -> FdBudget {
        self.inner.fds
    }

    /// The bound on one TLS handshake.
    pub fn handshake_timeout(&self) -> Duration {
        self.inner.limits.handshake_timeout
    }

    /// A gate for the listener (or set of listeners, such as ztunnel's per-pod ones)
    /// called `name` in metrics and logs.
    pub fn gate(&self, name: &'static str, limits: ListenerLimits) -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                name,
                admission: self.clone(),
                connections: Arc::new(Slots::new(
                    limits.max_connections.unwrap_or(usize::MAX),
                    limits.max_per_source.unwrap_or(usize::MAX),
                    (Shed::Connections, Shed::ConnectionsPerSource),
                )),
                throttle: Throttle::new(),
            }),
        }
    }

    /// A handshake slot for a connection from `source`, held until the handshake ends;
    /// an error (counted as shed on `listener`) when none is free: close the connection.
    pub fn handshake(
        &self,
        listener: &'static str,
        source: IpAddr,
    ) -> Result<HandshakePermit, Shed> {
        match self.inner.handshakes.take(source) {
            Ok(slot) => Ok(HandshakePermit { _slot: slot }),
            Err(reason) => {
                self.count_shed(listener, reason);
                Err(reason)
            }
        }
    }

    /// Handshakes in flight now.
    pub fn handshakes_in_flight(&self) -> usize {
        self.inner.handshakes.held()
    }

    /// Counts a connection closed for taking too long in `phase` (e.g. `handshake`,
    /// `preface`, `header_read`).
    pub fn count_timeout(&self, listener: &'static str, phase: &'static str) {
        self.inner
            .metrics
            .timeouts
            .get_or_create(&TimeoutLabels { listener, phase })
            .inc();
    }

    fn count_shed(&self, listener: &'static str, reason: Shed) {
        self.inner
            .metrics
            .shed
            .get_or_create(&ShedLabels {
                listener,
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// Why a TLS connection was not established.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// No handshake slot was free; the connection was closed unserved.
    #[error("shed: {0}")]
    Shed(Shed),
    /// The client did not finish its handshake in time.
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    /// The client closed the connection before finishing its handshake (what a flood's
    /// connections do when the flood ends: not worth a warning each).
    #[error("the client closed the connection before its TLS handshake")]
    Closed,
    /// The handshake failed (bad certificate, wrong protocol, the peer went away).
    #[error("{}", crate::tls::describe_handshake_error(.0))]
    Tls(#[source] std::io::Error),
}

impl Admission {
    /// Runs the server side of a TLS handshake on an accepted connection from `peer`: takes
    /// a handshake slot (or sheds the connection), then handshakes within
    /// [`Limits::handshake_timeout`] with the small-buffer [`crate::tls::accept`].
    /// Timeouts are counted on `listener`.
    pub async fn tls_handshake(
        &self,
        listener: &'static str,
        acceptor: &tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
        peer: IpAddr,
    ) -> Result<crate::tls::accept::ServerTls, HandshakeError> {
        let permit = match self.handshake(listener, peer) {
            Ok(p) => p,
            Err(reason) => {
                reset(&tcp);
                return Err(HandshakeError::Shed(reason));
            }
        };
        let limit = self.handshake_timeout();
        let result = tokio::time::timeout(limit, crate::tls::accept::accept(acceptor, tcp)).await;
        drop(permit);
        match result {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(HandshakeError::Closed)
            }
            Ok(Err(e)) => Err(HandshakeError::Tls(e)),
            Err(_) => {
                self.count_timeout(listener, "handshake");
                Err(HandshakeError::Timeout(limit))
            }
        }
    }
}

/// Permission to run one TLS handshake; give it back (drop it) when the handshake ends.
#[derive(Debug)]
pub struct HandshakePermit {
    _slot: Slot,
}

/// Bounds of one listener (or set of listeners sharing a [`Gate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once. `None`: only the descriptor budget bounds them.
    pub max_connections: Option<usize>,
    /// Connections open at once from one source address. `None`: no per-source bound.
    pub max_per_source: Option<usize>,
}

// === Gate ===

/// The admission of one listener, or of a set of listeners that share their bounds
/// (ztunnel's 15008 listeners of every pod). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    name: &'static str,
    admission: Admission,
    connections: Arc<Slots>,
    throttle: Throttle,
}

impl Gate {
    /// The listener's name in metrics and logs.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// The process's admission.
    pub fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    /// Wraps a bound listener.
    pub fn listener(&self, listener: TcpListener) -> Listener {
        Listener {
            listener,
            gate: self.clone(),
            backoff: MIN_ACCEPT_BACKOFF,
        }
    }

    /// Connections this gate admitted that are still open.
    pub fn open_connections(&self) -> usize {
        self.inner.connections.held()
    }

    fn shed(&self, peer: SocketAddr, reason: Shed) {
        self.inner.admission.count_shed(self.inner.name, reason);
        match self.inner.throttle.tick() {
            Some(n) => warn!(listener = self.inner.name, %peer, %reason, shed_or_failed = n,
                "connection shed at accept (admission control); counted in ambit_admission_shed_total"),
            None => debug!(listener = self.inner.name, %peer, %reason, "connection shed"),
        }
    }

    fn accept_error(&self, e: &std::io::Error) {
        let error = errno_name(e);
        self.inner
            .admission
            .inner
            .metrics
            .accept_errors
            .get_or_create(&ErrorLabels {
                listener: self.inner.name,
                error,
            })
            .inc();
        match self.inner.throttle.tick() {
            Some(n) => warn!(listener = self.inner.name, error = %e, shed_or_failed = n,
                "accept failed; backing off and retrying (ambit_admission_accept_errors_total)"),
            None => debug!(listener = self.inner.name, error = %e, "accept failed"),
        }
    }
}

/// A connection admitted by a [`Listener`].
#[derive(Debug)]
pub struct Accepted {
    /// The socket, with `TCP_NODELAY` set.
    pub stream: TcpStream,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Counts the connection against its listener's bounds until dropped: keep it for as
    /// long as the connection lives.
    pub permit: ConnPermit,
}

/// Counts one connection against its listener until dropped.
#[derive(Debug)]
pub struct ConnPermit {
    _slot: Slot,
}

/// A listener whose accepts go through admission control.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    gate: Gate,
    backoff: Duration,
}

impl Listener {
    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The gate it admits through.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The next admitted connection. Never fails: errors back off and retry, and
    /// connections over a bound are closed (with a reset, so neither side keeps state)
    /// and counted. Cancel-safe.
    pub async fn accept(&mut self) -> Accepted {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = MIN_ACCEPT_BACKOFF;
                    // A dual-stack listener shows IPv4 peers as v4-mapped IPv6; bounds,
                    // policy and logs must see them as the IPv4 addresses they are.
                    (stream, crate::listen::canonical(peer))
                }
                Err(e) => {
                    self.gate.accept_error(&e);
                    if is_resource_error(&e) {
                        // The listen queue keeps the connection; retrying at once would
                        // only spin until a descriptor frees up.
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    }
                    continue;
                }
            };
            if !self
                .gate
                .inner
                .admission
                .inner
                .fds
                .accepts(stream.as_raw_fd())
            {
                reset(&stream);
                self.gate.shed(peer, Shed::FdReserve);
                continue;
            }
            let slot = match self.gate.inner.connections.take(peer.ip()) {
                Ok(slot) => slot,
                Err(reason) => {
                    reset(&stream);
                    self.gate.shed(peer, reason);
                    continue;
                }
            };
            // Small records (a request, a response, a TLS record) must leave at once: with
            // Nagle on, each waits for the peer's ACK of the previous one, which costs
            // about a millisecond per exchange on pooled tunnels.
            if let Err(e) = stream.set_nodelay(true) {
                debug!(listener = self.gate.inner.name, error = %e, "TCP_NODELAY not set");
            }
            return Accepted {
                stream,
                peer,
                permit: ConnPermit { _slot: slot },
            };
        }
    }
}

/// Makes the close of a shed connection a reset: no FIN exchange and no TIME_WAIT entry
/// on our side for a connection we never served.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Errors that mean the process or the kernel is short of something, not that this one
/// connection failed.
fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

fn errno_name(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc_errno::EMFILE) => "EMFILE",
        Some(libc_errno::ENFILE) => "ENFILE",
        Some(libc_errno::ENOBUFS) => "ENOBUFS",
        Some(libc_errno::ENOMEM) => "ENOMEM",
        Some(libc_errno::ECONNABORTED) => "ECONNABORTED",
        Some(_) => "other",
        None => "unknown",
    }
}

/// The errno values this module tells apart, from nix (which has them per platform).
mod libc_errno {
    use nix::errno::Errno;
    pub const EMFILE: i32 = Errno::EMFILE as i32;
    pub const ENFILE: i32 = Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = Errno::ENOMEM as i32;
    pub const ECONNABORTED: i32 = Errno::ECONNABORTED as i32;
}

#[cfg(feature = "cli")]
pub mod flags;

#[cfg(test)]
mod tests;
