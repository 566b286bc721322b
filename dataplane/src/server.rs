//! The caller's side: HTTP/2 connections from the app (or from other sidecars), each
//! stream a call handed to `proxy`, driven through `h2` directly.
//!
//! Each call runs in a task of its own, which forwards it, sends the response's
//! headers, then pumps the response body within the stream's flow control. A caller
//! that resets its stream ends the task, and with it the upstream try. Stopping sends
//! GOAWAY on every connection, lets the calls under way finish within the grace
//! period, and then drops whatever is left.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response};
use http_body::Body;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::net;
use crate::proxy::{self, Plane};
use crate::stream::{Pump, UpBody};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections still open, and a wake-up when the last one closes.
#[derive(Default)]
struct Live {
    count: AtomicUsize,
    idle: Notify,
}

struct Held(Arc<Live>);

impl Drop for Held {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accept and serve until `stopped` carries a grace period; then drain for that long.
pub async fn serve(
    plane: Arc<Plane>,
    listener: TcpListener,
    mut stopped: watch::Receiver<Option<f64>>,
) {
    let live = Arc::new(Live::default());
    let (closing, closed) = watch::channel(false);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors, say: let calls end and accept again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                net::tune(&stream);
                live.count.fetch_add(1, Ordering::AcqRel);
                let held = Held(live.clone());
                tokio::spawn(connection(plane.clone(), stream, closed.clone(), held));
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    closing.send_replace(true);
    loop {
        let drained = live.idle.notified();
        if live.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let grace = stopped.borrow_and_update().unwrap_or(0.0);
        tokio::select! {
            _ = drained => {}
            _ = tokio::time::sleep(Duration::from_secs_f64(grace)) => return,
            changed = stopped.changed() => if changed.is_err() { return },
        }
    }
}

async fn connection(
    plane: Arc<Plane>,
    stream: TcpStream,
    mut closing: watch::Receiver<bool>,
    _held: Held,
) {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .max_concurrent_streams(10_000)
        .max_header_list_size(1 << 16);
    let Ok(Ok(mut conn)) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, builder.handshake::<_, Bytes>(stream)).await
    else {
        // Not HTTP/2 (or too slow to say so): h2 has answered with GOAWAY where it could.
        return;
    };
    let mut draining = *closing.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(call(plane.clone(), request, respond));
                }
                // The connection closed, or failed (the peer broke the protocol).
                Some(Err(_)) | None => return,
            },
            changed = closing.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

/// One call: forward it, then send the answer back as it comes.
async fn call(plane: Arc<Plane>, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let request = request.map(UpBody::new);
    // Boxed: the call's state machine is a few kilobytes, and this task is one per call.
    let forward = Box::pin(proxy::handle(plane, request));
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

    fn size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_call_task_is_small() {
        // One task per call: its future is moved into the task, so the call's state
        // (a few kilobytes) stays boxed.
        assert!(size(call) < 1024, "{} bytes", size(call));
    }
}
