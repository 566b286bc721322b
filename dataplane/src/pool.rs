//! Upstream connections: one HTTP/2 connection per endpoint address, opened ahead,
//! re-established after it fails, and closed when the endpoint leaves or idles.
//!
//! A keeper task per address owns the connecting; calls only clone the ready sender
//! out of a watch channel, so the hot path takes no lock and makes no system call.
//! State changes are reported (READY, CONNECTING, TRANSIENT_FAILURE, IDLE) so the
//! control plane stops routing to an endpoint whose connection fails before a call
//! fails there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        self.used.store(true, Ordering::Relaxed);
        let mut sender = self.link.borrow().sender.clone();
        if sender.is_none() {
            sender = self.wait_ready(pool).await;
        }
        let Some(mut sender) = sender else {
            return Err(Failure {
                code: grpc::UNAVAILABLE,
                message: format!("shoal: cannot connect to {}", self.address),
            });
        };
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

    fn set(&self, pool: &Pool, state: State, sender: Option<SendRequest<Bytes>>) {
        let changed = self.link.borrow().state != state;
        self.link.send_replace(Link { state, sender });
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
            link: watch::Sender::new(Link {
                state: State::Idle,
                sender: None,
            }),
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
                keeper.abort();
            }
            upstream.link.send_replace(Link {
                state: State::Idle,
                sender: None,
            });
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
        let mut backoff = BACKOFF_INITIAL;
        loop {
            // Sticky failure (as gRPC's): an endpoint that failed stays unroutable while
            // it is retried, instead of drawing calls during every reconnect attempt.
            if upstream.link.borrow().state != State::TransientFailure {
                upstream.set(&self, State::Connecting, None);
            }
            let (sender, connection) = match connect(&upstream.address).await {
                Ok(found) => found,
                Err(()) => {
                    upstream.set(&self, State::TransientFailure, None);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_INITIAL;
            self.open.fetch_add(1, Ordering::Relaxed);
            let mut connection = tokio::spawn(connection);
            upstream.set(&self, State::Ready, Some(sender));
            upstream.used.store(true, Ordering::Relaxed);
            let idle = loop {
                tokio::select! {
                    _ = &mut connection => break false,
                    _ = tokio::time::sleep(self.idle_timeout / 2) => {
                        if !upstream.used.swap(false, Ordering::Relaxed) {
                            break true;
                        }
                    }
                }
            };
            self.open.fetch_sub(1, Ordering::Relaxed);
            // Dropping the last sender lets the connection close once its calls are done.
            upstream.set(&self, State::Idle, None);
            if idle {
                return;
            }
            // The server closed the connection (it may be draining): reconnect at once,
            // so a dead endpoint shows up as unreachable before a call is sent there.
        }
    }
}

type Connection = h2::client::Connection<TcpStream, Bytes>;

async fn connect(address: &str) -> Result<(SendRequest<Bytes>, Connection), ()> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
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
        .map_err(|_| ())?
        .map_err(|_| ())
}
