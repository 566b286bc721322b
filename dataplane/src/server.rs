//! The caller's side: HTTP/2 connections on the sidecar's listeners (app-facing and
//! mesh-facing), each stream a call handed to `proxy`, driven through `h2` directly.
//!
//! Each call runs in a task of its own, which forwards it, sends the response's
//! headers, then pumps the response body within the stream's flow control. A caller
//! that resets its stream ends the task, and with it the upstream try.
//!
//! What a caller can make the sidecar hold is bounded: connections per listener (past
//! the cap a new connection is closed at once), streams per connection (HTTP/2's
//! MAX_CONCURRENT_STREAMS), the handshake's time, and a connection's time without a
//! stream (then GOAWAY, and the connection is dropped if the peer does not close it).
//! Stopping sends GOAWAY on every connection, lets the calls under way finish within
//! the grace period, and then drops whatever is left.
//!
//! A secure listener (the mesh-facing one, in secure mode) speaks only mutual TLS: the
//! TLS handshake comes first, within the same handshake time and under the same
//! connection cap, and the caller's SPIFFE ID, read once for the connection, goes with
//! each of its calls to the control plane.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::net;
use crate::proxy::{self, Plane, Role};
use crate::stream::{Pump, UpBody};
use crate::tls::Tls;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an idle connection's GOAWAY, how long the peer has to close it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// A full listener says so at most this often, not once per refused connection.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// What one listener lets its callers hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_streams: u32,
    /// A connection with no stream for this long is closed.
    pub idle_timeout: Duration,
}

/// A bound listener and what it is for.
pub struct Listener {
    pub socket: TcpListener,
    pub role: Role,
    pub limits: Limits,
    /// Set when the listener takes mutual TLS only.
    pub tls: Option<Arc<Tls>>,
}

/// How many of something are open (connections of a listener, streams of a
/// connection), and a wake-up when the last one ends.
#[derive(Default)]
struct Tally {
    open: AtomicUsize,
    emptied: Notify,
}

impl Tally {
    fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// One more is open until the guard is dropped (however its task ends).
    fn enter(self: &Arc<Self>) -> Entered {
        self.open.fetch_add(1, Ordering::AcqRel);
        Entered(self.clone())
    }
}

struct Entered(Arc<Tally>);

impl Drop for Entered {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit is kept if nobody waits yet: the waiter checks the count first.
            self.0.emptied.notify_one();
        }
    }
}

/// Accept on every listener until `stopped` carries a grace period; then drain for that long.
pub async fn serve(
    plane: Arc<Plane>,
    listeners: Vec<Listener>,
    mut stopped: watch::Receiver<Option<f64>>,
) {
    let (closing, closed) = watch::channel(false);
    let mut lives = Vec::new();
    let mut acceptors = Vec::new();
    for listener in listeners {
        let live = Arc::new(Tally::default());
        lives.push(live.clone());
        acceptors.push(tokio::spawn(accept(
            plane.clone(),
            listener,
            live,
            closed.clone(),
        )));
    }
    let _ = stopped.changed().await;
    for acceptor in &acceptors {
        acceptor.abort();
    }
    closing.send_replace(true);
    let grace = |stopped: &mut watch::Receiver<Option<f64>>| {
        let seconds = stopped.borrow_and_update().unwrap_or(0.0);
        tokio::time::Instant::now() + Duration::from_secs_f64(seconds.clamp(0.0, 1e9))
    };
    // One deadline for the whole drain; a second stop may only bring it closer.
    let mut deadline = grace(&mut stopped);
    for live in lives {
        while live.count() > 0 {
            tokio::select! {
                _ = live.emptied.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return,
                changed = stopped.changed() => match changed {
                    Ok(()) => deadline = deadline.min(grace(&mut stopped)),
                    Err(_) => return,
                },
            }
        }
    }
}

async fn accept(
    plane: Arc<Plane>,
    listener: Listener,
    live: Arc<Tally>,
    closing: watch::Receiver<bool>,
) {
    let role = listener.role;
    let limits = listener.limits;
    let last_warning = AtomicU64::new(0);
    let started = Instant::now();
    loop {
        let (stream, peer) = match listener.socket.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors, say: let calls end and accept again shortly.
                log::warn!("{} listener cannot accept: {err}", role.name());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if live.count() >= limits.max_connections {
            // Closed at once: the caller learns now, and holds nothing of ours.
            drop(stream);
            let now = started.elapsed().as_secs();
            let last = last_warning.load(Ordering::Relaxed);
            if last == 0 || now >= last + FULL_WARNING_EVERY.as_secs() {
                last_warning.store(now.max(1), Ordering::Relaxed);
                log::warn!(
                    "{} listener is at its limit of {} connections; refusing new ones",
                    role.name(),
                    limits.max_connections
                );
            }
            continue;
        }
        net::tune(&stream);
        let held = live.enter();
        let connection = Connection {
            plane: plane.clone(),
            role,
            limits,
            peer,
            tls: listener.tls.clone(),
        };
        tokio::spawn(connection.serve(stream, closing.clone(), held));
    }
}

struct Connection {
    plane: Arc<Plane>,
    role: Role,
    limits: Limits,
    peer: SocketAddr,
    tls: Option<Arc<Tls>>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, closing: watch::Receiver<bool>, held: Entered) {
        // One deadline for both handshakes, TLS and then HTTP/2.
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        match self.tls.clone() {
            None => self.run(stream, None, deadline, closing, held).await,
            Some(tls) => match tls.accept(stream, deadline).await {
                Ok((stream, caller)) => {
                    self.run(stream, Some(caller), deadline, closing, held)
                        .await
                }
                // Dropped here, socket and TLS state with it.
                Err(why) => log::debug!("connection from {}: {why}", self.peer),
            },
        }
    }

    /// Serve HTTP/2 on `io`; `caller` is the client's SPIFFE ID on a TLS connection.
    async fn run<T>(
        self,
        io: T,
        caller: Option<Arc<str>>,
        deadline: tokio::time::Instant,
        mut closing: watch::Receiver<bool>,
        _held: Entered,
    ) where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = self.peer;
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .max_concurrent_streams(self.limits.max_streams)
            .max_header_list_size(1 << 16);
        let mut conn =
            match tokio::time::timeout_at(deadline, builder.handshake::<_, Bytes>(io)).await {
                Ok(Ok(conn)) => conn,
                // Not HTTP/2: h2 has answered with GOAWAY where it could.
                Ok(Err(err)) => return log::debug!("connection from {peer}: handshake: {err}"),
                Err(_) => return log::debug!("connection from {peer}: no HTTP/2 preface in time"),
            };
        let streams = Arc::new(Tally::default());
        let idle = tokio::time::sleep(self.limits.idle_timeout);
        tokio::pin!(idle);
        let mut draining = *closing.borrow();
        if draining {
            conn.graceful_shutdown();
        }
        // Once an idle connection has been told to go, by when it must be gone.
        let mut going: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((request, respond))) => {
                        let open = streams.enter();
                        let caller = caller.clone();
                        let plane = self.plane.clone();
                        tokio::spawn(call(plane, self.role, caller, request, respond, open));
                    }
                    Some(Err(err)) => {
                        return log::debug!("connection from {peer} failed: {err}");
                    }
                    None => return,
                },
                _ = streams.emptied.notified() => {
                    if streams.count() == 0 {
                        idle.as_mut().reset(tokio::time::Instant::now() + self.limits.idle_timeout);
                    }
                }
                _ = &mut idle => {
                    let now = tokio::time::Instant::now();
                    if streams.count() > 0 {
                        idle.as_mut().reset(now + self.limits.idle_timeout);
                    } else if let Some(deadline) = going {
                        if now >= deadline {
                            return log::debug!("connection from {peer}: closed after idling");
                        }
                        idle.as_mut().reset(deadline);
                    } else {
                        log::debug!("connection from {peer}: idle, sending GOAWAY");
                        if !draining {
                            draining = true;
                            conn.graceful_shutdown();
                        }
                        going = Some(now + CLOSE_GRACE);
                        idle.as_mut().reset(now + CLOSE_GRACE);
                    }
                }
                changed = closing.changed(), if !draining => {
                    draining = true;
                    if changed.is_ok() {
                        conn.graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// One call: forward it, then send the answer back as it comes.
async fn call(
    plane: Arc<Plane>,
    role: Role,
    caller: Option<Arc<str>>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    _open: Entered,
) {
    let request = request.map(UpBody::new);
    // Boxed: the call's state machine is a few kilobytes, and this task is one per call.
    let forward = Box::pin(proxy::handle(plane, role, caller, request));
    let response = tokio::select! {
        response = forward => response,
        // The caller reset the stream: dropping the forward cancels the upstream try.
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(tx) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return;
    };
    if !end {
        Pump::new(body, tx).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size<A, B, C, D, E, G, F: std::future::Future>(_: fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_call_task_is_small() {
        // One task per call: its future is moved into the task, so the call's state
        // (a few kilobytes) stays boxed.
        assert!(size(call) < 1024, "{} bytes", size(call));
    }
}
