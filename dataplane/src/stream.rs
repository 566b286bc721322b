//! One try's HTTP/2 stream to the upstream, driven through `h2` directly.
//!
//! hyper's client sends each request through a channel to its connection task, runs
//! each response in a task of its own and, when the request has a body, sends the
//! body from yet another task; the request's HEADERS and DATA then leave in separate
//! writes. Here the try opens the stream itself and queues the frames of the request
//! it holds already, so a unary request goes out whole in one write, with no task.
//! Only a request still streaming from the caller gets a task (`Pump`) for the rest;
//! its flow-control handling follows hyper's own body pipe (hyper is MIT-licensed),
//! including the fix for hyper issue #4003.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::replay::{BoxError, ReplayBody};

/// Queue the request frames at hand on `tx`; the rest of the body, if any, as a task.
///
/// The returned sender, when the try is abandoned before the upstream answers, resets
/// the stream (a dropped sender lets the task go on: the call committed to this try).
pub fn send_body(mut body: ReplayBody, mut tx: SendStream<Bytes>) -> Option<oneshot::Sender<()>> {
    while let Some(frame) = body.next_kept() {
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if tx.send_data(data, eos).is_err() || eos {
                    return None;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                }
                return None;
            }
        }
    }
    if body.is_end_stream() {
        let _ = tx.send_data(Bytes::new(), true);
        return None;
    }
    let (cancel, cancelled) = oneshot::channel();
    tokio::spawn(Pump {
        cancelled: Some(cancelled),
        ..Pump::new(body, tx)
    });
    Some(cancel)
}

/// Sends a body on an HTTP/2 stream as it arrives, within the stream's flow control:
/// the rest of a request upstream, or a response to the caller.
pub struct Pump<B> {
    body: B,
    tx: SendStream<Bytes>,
    /// A frame waiting for send capacity, and whether it ends the stream.
    buffered: Option<(Bytes, bool)>,
    cancelled: Option<oneshot::Receiver<()>>,
}

/// The reset reason for a body that failed: the caller's own, if it reset its stream.
fn reason_of(err: &BoxError) -> h2::Reason {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(err) = source {
        if let Some(reason) = err.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        source = err.source();
    }
    h2::Reason::INTERNAL_ERROR
}

impl<B> Pump<B> {
    /// Sends `body` on `tx` until it ends, the peer resets the stream, or it fails.
    pub fn new(body: B, tx: SendStream<Bytes>) -> Self {
        Pump {
            body,
            tx,
            buffered: None,
            cancelled: None,
        }
    }
}

impl<B> Future for Pump<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(cancelled) = this.cancelled.as_mut() {
            match Pin::new(cancelled).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.tx.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                Poll::Ready(Err(_)) => this.cancelled = None,
                Poll::Pending => {}
            }
        }
        loop {
            // Woken if the upstream resets the stream while the caller is quiet.
            if this.tx.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((data, eos)) = this.buffered.take() {
                while this.tx.capacity() == 0 {
                    match this.tx.poll_capacity(cx) {
                        Poll::Pending => {
                            this.buffered = Some((data, eos));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(_) => return Poll::Ready(()),
                    }
                }
                if this.tx.send_data(data, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.body.is_end_stream();
                        if data.is_empty() {
                            if this.tx.send_data(data, eos).is_err() || eos {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        // A token claim: h2 raises it to what is buffered (see hyper #4003).
                        this.tx.reserve_capacity(1);
                        this.buffered = Some((data, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.tx.reserve_capacity(0);
                            let _ = this.tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Poll::Ready(Some(Err(err))) => {
                    this.tx.send_reset(reason_of(&err));
                    return Poll::Ready(());
                }
                Poll::Ready(None) => {
                    let _ = this.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// Resets the try's stream when dropped armed: the try was abandoned unanswered.
pub struct Abandon(pub Option<oneshot::Sender<()>>);

impl Abandon {
    /// The upstream answered: the body goes on.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            let _ = cancel.send(());
        }
    }
}

/// An upstream response body, as hyper's `Incoming` reads one.
pub struct UpBody {
    recv: RecvStream,
    data_done: bool,
}

impl UpBody {
    pub fn new(recv: RecvStream) -> Self {
        UpBody {
            recv,
            data_done: false,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM with NO_ERROR: an early end, not a failure (RFC 9113 8.1).
                Poll::Ready(Some(Err(err))) if err.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(trailers)) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Poll::Ready(Err(err)) if err.reason() == Some(h2::Reason::NO_ERROR) => {
                Poll::Ready(None)
            }
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
