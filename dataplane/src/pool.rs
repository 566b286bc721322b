//! Upstream connections: one HTTP/2 connection per endpoint address, opened ahead,
//! re-established after it fails, and closed when the endpoint leaves or idles.
//!
//! A keeper task per address owns the connecting; calls only clone the ready sender
//! out of a watch channel, so the hot path takes no lock and makes no system call.
//! State changes are reported (READY, CONNECTING, TRANSIENT_FAILURE, IDLE) so the
//! control plane stops routing to an endpoint whose connection fails before a call
//! fails there.
//!
//! In secure mode each address also carries how it is reached (`Security`), fixed when
//! its `Upstream` is made: over mTLS to the SPIFFE ID `expect_peer` named, in plaintext
//! when told so (the sidecar's own app), or not at all when nothing was said, so that
//! no call leaves the sidecar unencrypted by omission. A new rule replaces the address's
//! `Upstream`, as `forget` does, and the next connection follows it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::grpc;
use crate::replay::ReplayBody;
use crate::stream::{self, Abandon, UpBody};
use crate::tls::Tls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lasted this long was healthy: the next one starts a fresh backoff.
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// The pause before reconnect attempt `attempt` (0-based): exponential, with "equal
/// jitter" (half fixed, half random), the same rule as `shoal_core.backoff`: never zero,
/// so a peer that accepts and closes is not hammered, and never in lock step, so the
/// sidecars that lost one endpoint do not all come back at the same instant.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_INITIAL
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_MAX);
    // A random fraction from the standard library's per-instance random hash keys.
    let random = RandomState::new().hash_one(attempt) as f64 / u64::MAX as f64;
    ceiling.div_f64(2.0).mul_f64(1.0 + random)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Connecting,
    Ready,
    TransientFailure,
    Idle,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Connecting => "CONNECTING",
            State::Ready => "READY",
            State::TransientFailure => "TRANSIENT_FAILURE",
            State::Idle => "IDLE",
        }
    }
}

#[derive(Clone)]
struct Link {
    state: State,
    sender: Option<SendRequest<Bytes>>,
    /// Why the last connection attempt failed.
    error: Option<Arc<str>>,
}

impl Link {
    fn idle() -> Self {
        Link {
            state: State::Idle,
            sender: None,
            error: None,
        }
    }
}

/// Told of every connection state change: `(address, state)`.
pub type Observer = Arc<dyn Fn(&str, State) + Send + Sync>;

/// How an address is reached.
enum Security {
    Plain,
    /// Over mTLS, to a server that proves it is this SPIFFE ID.
    Mesh(Arc<str>),
    /// Secure mode, and no rule for this address: refused.
    Unknown,
}

pub struct Upstream {
    pub address: String,
    pub authority: Authority,
    /// `https` over TLS, as the request's `:scheme` says.
    pub scheme: Scheme,
    security: Security,
    link: watch::Sender<Link>,
    used: AtomicBool,
    keeper: Mutex<Option<JoinHandle<()>>>,
}

/// A failed exchange: the status for the caller and why.
pub struct Failure {
    pub code: u32,
    pub message: String,
}

impl Failure {
    /// The exchange with the upstream at `address` failed with `err`.
    pub fn upstream(address: &str, err: &h2::Error) -> Self {
        Failure {
            code: grpc::code_for_error(err),
            message: format!("shoal: upstream {address}: {err}"),
        }
    }
}

impl Upstream {
    /// Send one request on this endpoint's connection, connecting first if need be.
    pub async fn send(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        request: Request<()>,
        body: ReplayBody,
    ) -> Result<Response<UpBody>, Failure> {
        let mut sender = self.sender(pool).await?;
        let failed = |err: h2::Error| Failure::upstream(&self.address, &err);
        // A fresh clone has no stream of its own pending open: it may send at once
        // (the connection queues streams beyond the peer's concurrency limit).
        let eos = body.is_end_stream();
        let (response, tx) = sender.send_request(request, eos).map_err(failed)?;
        let abandon = Abandon(if eos {
            None
        } else {
            stream::send_body(body, tx)
        });
        let response = response.await.map_err(failed)?;
        abandon.disarm();
        Ok(response.map(UpBody::new))
    }

    /// Send one request whose body is all in `body`, connecting first if need be.
    pub async fn send_whole(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        request: Request<()>,
        body: Bytes,
    ) -> Result<Response<UpBody>, Failure> {
        let mut sender = self.sender(pool).await?;
        let failed = |err: h2::Error| Failure::upstream(&self.address, &err);
        let (response, mut tx) = sender.send_request(request, false).map_err(failed)?;
        tx.send_data(body, true).map_err(failed)?;
        Ok(response.await.map_err(failed)?.map(UpBody::new))
    }

    /// A sender on this endpoint's connection, once it is ready.
    async fn sender(self: &Arc<Self>, pool: &Arc<Pool>) -> Result<SendRequest<Bytes>, Failure> {
        if matches!(self.security, Security::Unknown) {
            return Err(Failure {
                code: grpc::UNAVAILABLE,
                message: format!("shoal: no mesh identity is known for {}", self.address),
            });
        }
        self.used.store(true, Ordering::Relaxed);
        let mut sender = self.link.borrow().sender.clone();
        if sender.is_none() {
            sender = self.wait_ready(pool).await;
        }
        sender.ok_or_else(|| {
            let why = self.link.borrow().error.clone();
            let why = why.as_deref().unwrap_or("the endpoint left the mesh");
            Failure {
                code: grpc::UNAVAILABLE,
                message: format!("shoal: cannot connect to {}: {why}", self.address),
            }
        })
    }

    /// The sender once a connection attempt ends; `None` when it failed.
    async fn wait_ready(self: &Arc<Self>, pool: &Arc<Pool>) -> Option<SendRequest<Bytes>> {
        let mut seen = self.link.subscribe();
        pool.keep(self);
        loop {
            {
                let link = seen.borrow_and_update();
                match link.state {
                    State::Ready if link.sender.is_some() => return link.sender.clone(),
                    State::TransientFailure => return None,
                    _ => {}
                }
            }
            if seen.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Out of the pool: stop reconnecting; the connection closes once its calls are done.
    fn retire(&self) {
        if let Some(keeper) = self.keeper.lock().unwrap().take() {
            // Its guard gives back its place in the open count.
            keeper.abort();
        }
        self.link.send_replace(Link::idle());
    }

    fn set(&self, pool: &Pool, link: Link) {
        let state = link.state;
        let changed = self.link.borrow().state != state;
        self.link.send_replace(link);
        if changed {
            (pool.observer)(&self.address, state);
        }
    }
}

#[derive(Default)]
struct Table {
    upstreams: HashMap<String, Arc<Upstream>>,
    /// Secure mode's rule per address: the SPIFFE ID its server must prove, or `None`
    /// for plaintext. In one lock with `upstreams`, so that no `Upstream` is made under
    /// a rule that is being replaced.
    expected: HashMap<String, Option<Arc<str>>>,
}

pub struct Pool {
    table: Mutex<Table>,
    observer: Observer,
    idle_timeout: Duration,
    open: AtomicUsize,
    /// Set in secure mode: the identity the pool's connections present.
    tls: Option<Arc<Tls>>,
}

impl Pool {
    pub fn new(observer: Observer, idle_timeout: Duration, tls: Option<Arc<Tls>>) -> Arc<Self> {
        Arc::new(Pool {
            table: Mutex::default(),
            observer,
            idle_timeout,
            open: AtomicUsize::new(0),
            tls,
        })
    }

    /// The endpoint at `address`; `None` when the address is not `host:port`.
    pub fn get(self: &Arc<Self>, address: &str) -> Option<Arc<Upstream>> {
        let mut table = self.table.lock().unwrap();
        if let Some(found) = table.upstreams.get(address) {
            return Some(found.clone());
        }
        let authority: Authority = address.parse().ok()?;
        authority.port_u16()?;
        let security = match (&self.tls, table.expected.get(address)) {
            (None, _) | (Some(_), Some(None)) => Security::Plain,
            (Some(_), Some(Some(peer))) => Security::Mesh(peer.clone()),
            (Some(_), None) => Security::Unknown,
        };
        let upstream = Arc::new(Upstream {
            address: address.to_owned(),
            authority,
            scheme: match security {
                Security::Mesh(_) => Scheme::HTTPS,
                _ => Scheme::HTTP,
            },
            security,
            link: watch::Sender::new(Link::idle()),
            used: AtomicBool::new(true),
            keeper: Mutex::new(None),
        });
        table.upstreams.insert(address.to_owned(), upstream.clone());
        Some(upstream)
    }

    /// In secure mode, how `address` is reached from now on: over mTLS to a server that
    /// proves it is `peer`, or in plaintext (`None`). A change lets go of the address's
    /// connection as `forget` does. Without TLS everything is plaintext: ignored.
    pub fn expect_peer(&self, address: &str, peer: Option<&str>) {
        if self.tls.is_none() {
            return;
        }
        let peer: Option<Arc<str>> = peer.map(Arc::from);
        let gone = {
            let mut table = self.table.lock().unwrap();
            if table.expected.get(address) == Some(&peer) {
                return;
            }
            table.expected.insert(address.to_owned(), peer);
            table.upstreams.remove(address)
        };
        if let Some(upstream) = gone {
            upstream.retire();
        }
    }

    /// Open the connection to `address` ahead of its first call.
    pub fn warm(self: &Arc<Self>, address: &str) {
        if let Some(upstream) = self.get(address) {
            self.keep(&upstream);
        }
    }

    /// The endpoint left: stop reconnecting. Calls running on its connection go on.
    /// (Its `expect_peer` rule stays: it is about the address, not the endpoint.)
    pub fn forget(&self, address: &str) {
        let gone = self.table.lock().unwrap().upstreams.remove(address);
        if let Some(upstream) = gone {
            upstream.retire();
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Start the keeper of `upstream` unless it runs already (or it may not connect).
    fn keep(self: &Arc<Self>, upstream: &Arc<Upstream>) {
        if matches!(upstream.security, Security::Unknown) {
            return;
        }
        let mut keeper = upstream.keeper.lock().unwrap();
        if keeper.as_ref().is_some_and(|k| !k.is_finished()) {
            return;
        }
        let (pool, up) = (self.clone(), upstream.clone());
        *keeper = Some(tokio::spawn(async move { pool.run_keeper(up).await }));
    }

    async fn run_keeper(self: Arc<Self>, upstream: Arc<Upstream>) {
        let mut attempt = 0;
        loop {
            // Sticky failure (as gRPC's): an endpoint that failed stays unroutable while
            // it is retried, instead of drawing calls during every reconnect attempt.
            let failing = upstream.link.borrow().error.clone();
            if upstream.link.borrow().state != State::TransientFailure {
                let connecting = Link {
                    state: State::Connecting,
                    sender: None,
                    error: failing,
                };
                upstream.set(&self, connecting);
            }
            let (sender, mut connection) = match connect(&upstream, self.tls.as_deref()).await {
                Ok(found) => found,
                Err(why) => {
                    log::debug!("cannot connect to {}: {why}", upstream.address);
                    let failed = Link {
                        state: State::TransientFailure,
                        sender: None,
                        error: Some(why.into()),
                    };
                    upstream.set(&self, failed);
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
            };
            let opened = Instant::now();
            let counted = Opened::new(&self.open);
            let ready = Link {
                state: State::Ready,
                sender: Some(sender),
                error: None,
            };
            upstream.set(&self, ready);
            upstream.used.store(true, Ordering::Relaxed);
            let idle = loop {
                tokio::select! {
                    ended = &mut connection => {
                        match ended {
                            Ok(Err(err)) => {
                                log::debug!("connection to {} failed: {err}", upstream.address)
                            }
                            _ => log::debug!("connection to {} closed", upstream.address),
                        }
                        break false;
                    }
                    _ = tokio::time::sleep(self.idle_timeout / 2) => {
                        if !upstream.used.swap(false, Ordering::Relaxed) {
                            break true;
                        }
                    }
                }
            };
            drop(counted);
            // Dropping the last sender lets the connection close once its calls are done.
            upstream.set(&self, Link::idle());
            if idle {
                return;
            }
            // The server closed the connection (it may be draining). The first time,
            // reconnect at once, so a dead endpoint shows up as unreachable before a call
            // is sent there; a peer that keeps closing soon after accepting is backed off.
            if opened.elapsed() >= STABLE_AFTER {
                attempt = 0;
            } else {
                if attempt > 0 {
                    tokio::time::sleep(backoff(attempt - 1)).await;
                }
                attempt += 1;
            }
        }
    }
}

/// One connection's place in the pool's open count, given back however the keeper ends
/// (even aborted, when its endpoint is forgotten).
struct Opened<'a>(&'a AtomicUsize);

impl<'a> Opened<'a> {
    fn new(open: &'a AtomicUsize) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Opened(open)
    }
}

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's task, driving it; it ends when the connection does.
type Connection = JoinHandle<Result<(), h2::Error>>;

/// A new connection to `upstream`, over TLS if its rule says so, or why there is none.
async fn connect(
    upstream: &Upstream,
    tls: Option<&Tls>,
) -> Result<(SendRequest<Bytes>, Connection), String> {
    let address = &upstream.address;
    let timed_out = |what: &str| format!("{what} timed out after {}s", CONNECT_TIMEOUT.as_secs());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| timed_out("connecting"))?
        .map_err(|err| err.to_string())?;
    crate::net::tune(&stream);
    match (&upstream.security, tls) {
        (Security::Plain, _) => handshake(stream).await,
        (Security::Mesh(peer), Some(tls)) => {
            let host = upstream.authority.host();
            handshake(tls.connect(stream, host, peer, CONNECT_TIMEOUT).await?).await
        }
        _ => Err(format!("no mesh identity is known for {address}")),
    }
}

/// HTTP/2 on `io`, its connection driven by a task of its own: the task is what the
/// keeper holds, whatever the stream's type.
async fn handshake<T>(io: T) -> Result<(SendRequest<Bytes>, Connection), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timed_out = |what: &str| format!("{what} timed out after {}s", CONNECT_TIMEOUT.as_secs());
    // h2's defaults as hyper's client sets them, but for the windows and the header list.
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(100)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .max_header_list_size(1 << 16)
        .max_frame_size(1 << 14)
        .max_send_buffer_size(1 << 20)
        .enable_push(false);
    let (sender, connection) = tokio::time::timeout(CONNECT_TIMEOUT, builder.handshake(io))
        .await
        .map_err(|_| timed_out("the HTTP/2 handshake"))?
        .map_err(|err| format!("HTTP/2 handshake failed: {err}"))?;
    Ok((sender, tokio::spawn(connection)))
}
