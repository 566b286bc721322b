//! Upstream connections: one HTTP/2 connection per endpoint address, opened ahead,
//! re-established after it fails, and closed when the endpoint leaves or idles.
//!
//! A keeper task per address owns the connecting; calls only clone the ready sender
//! out of a watch channel, so the hot path takes no lock and makes no system call.
//! State changes are reported (READY, CONNECTING, TRANSIENT_FAILURE, IDLE) so the
//! control plane stops routing to an endpoint whose connection fails before a call
//! fails there.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::Authority;
use http::{Request, Response};
use http_body::Body;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::grpc;
use crate::replay::ReplayBody;
use crate::stream::{self, Abandon, UpBody};

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

pub struct Upstream {
    pub address: String,
    pub authority: Authority,
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

    fn set(&self, pool: &Pool, link: Link) {
        let state = link.state;
        let changed = self.link.borrow().state != state;
        self.link.send_replace(link);
        if changed {
            (pool.observer)(&self.address, state);
        }
    }
}

pub struct Pool {
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
    observer: Observer,
    idle_timeout: Duration,
    open: AtomicUsize,
}

impl Pool {
    pub fn new(observer: Observer, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool {
            upstreams: Mutex::new(HashMap::new()),
            observer,
            idle_timeout,
            open: AtomicUsize::new(0),
        })
    }

    /// The endpoint at `address`; `None` when the address is not `host:port`.
    pub fn get(self: &Arc<Self>, address: &str) -> Option<Arc<Upstream>> {
        if let Some(found) = self.upstreams.lock().unwrap().get(address) {
            return Some(found.clone());
        }
        let authority: Authority = address.parse().ok()?;
        authority.port_u16()?;
        let upstream = Arc::new(Upstream {
            address: address.to_owned(),
            authority,
            link: watch::Sender::new(Link::idle()),
            used: AtomicBool::new(true),
            keeper: Mutex::new(None),
        });
        let mut map = self.upstreams.lock().unwrap();
        Some(map.entry(address.to_owned()).or_insert(upstream).clone())
    }

    /// Open the connection to `address` ahead of its first call.
    pub fn warm(self: &Arc<Self>, address: &str) {
        if let Some(upstream) = self.get(address) {
            self.keep(&upstream);
        }
    }

    /// The endpoint left: stop reconnecting. Calls running on its connection go on.
    pub fn forget(&self, address: &str) {
        if let Some(upstream) = self.upstreams.lock().unwrap().remove(address) {
            if let Some(keeper) = upstream.keeper.lock().unwrap().take() {
                // Its guard gives back its place in the open count.
                keeper.abort();
            }
            upstream.link.send_replace(Link::idle());
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Start the keeper of `upstream` unless it runs already.
    fn keep(self: &Arc<Self>, upstream: &Arc<Upstream>) {
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
            let (sender, connection) = match connect(&upstream.address).await {
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
            let mut connection = tokio::spawn(connection);
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

type Connection = h2::client::Connection<TcpStream, Bytes>;

/// A new connection to `address`, or why there is none.
async fn connect(address: &str) -> Result<(SendRequest<Bytes>, Connection), String> {
    let timed_out = |what: &str| format!("{what} timed out after {}s", CONNECT_TIMEOUT.as_secs());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| timed_out("connecting"))?
        .map_err(|err| err.to_string())?;
    crate::net::tune(&stream);
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
    tokio::time::timeout(CONNECT_TIMEOUT, builder.handshake(stream))
        .await
        .map_err(|_| timed_out("the HTTP/2 handshake"))?
        .map_err(|err| format!("HTTP/2 handshake failed: {err}"))
}
