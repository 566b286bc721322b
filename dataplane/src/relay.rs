//! The response body handed to the caller: the upstream's frames as they come, plus
//! the end of the call: the status from the trailers is reported to the control
//! plane, the caller's side of the mesh adds `shoal-upstream`, and the circuit
//! breaker slot is released.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::breaker::Permit;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use crate::control::Call;
use crate::grpc;
use crate::replay::BoxError;
use crate::stream::UpBody;

pub const UPSTREAM_KEY: HeaderName = HeaderName::from_static("shoal-upstream");

/// What happens when the response ends.
pub struct Ending {
    pub call: Option<Call>,
    pub latency: Option<Duration>,
    pub mark: Option<HeaderValue>,
    pub permit: Option<Permit>,
}

impl Ending {
    pub fn none() -> Self {
        Ending {
            call: None,
            latency: None,
            mark: None,
            permit: None,
        }
    }

    /// A frame going to the caller: its message bytes count toward the response's.
    fn sent(&mut self, frame: &Frame<Bytes>) {
        if let (Some(call), Some(data)) = (self.call.as_mut(), frame.data_ref()) {
            call.responded(data.len());
        }
    }

    fn end(&mut self, code: u32) {
        if let Some(mut call) = self.call.take() {
            call.finish(code, self.latency);
        }
        self.permit = None;
    }
}

pub struct RelayBody {
    /// A frame read ahead (the first message, or the trailers of a call that ended).
    first: Option<Frame<Bytes>>,
    inner: Option<UpBody>,
    /// Frames the sidecar makes itself (its own services), as they are made.
    local: Option<mpsc::Receiver<Frame<Bytes>>>,
    ending: Ending,
}

impl RelayBody {
    /// A streamed response from upstream whose `first` frame was read already.
    pub fn streamed(first: Frame<Bytes>, inner: UpBody, ending: Ending) -> Self {
        RelayBody {
            first: Some(first),
            inner: Some(inner),
            local: None,
            ending,
        }
    }

    /// A response the sidecar makes itself: the frames `local` receives, in order.
    pub fn local(local: mpsc::Receiver<Frame<Bytes>>) -> Self {
        RelayBody {
            first: None,
            inner: None,
            local: Some(local),
            ending: Ending::none(),
        }
    }

    /// One frame and the end, such as the trailers of a call that ended without a message.
    pub fn just(frame: Option<Frame<Bytes>>) -> Self {
        RelayBody {
            first: frame,
            inner: None,
            local: None,
            ending: Ending::none(),
        }
    }

    /// No body: the headers were the whole response (trailers-only).
    pub fn empty() -> Self {
        RelayBody::just(None)
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            this.ending.sent(&first);
            return Poll::Ready(Some(Ok(first)));
        }
        if let Some(local) = this.local.as_mut() {
            return match local.poll_recv(cx) {
                Poll::Ready(None) => {
                    this.local = None;
                    Poll::Ready(None)
                }
                got => got.map(|frame| frame.map(Ok)),
            };
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    let code = grpc::status_of(&trailers).unwrap_or(grpc::UNKNOWN);
                    if let Some(mark) = this.ending.mark.take() {
                        trailers.insert(UPSTREAM_KEY, mark);
                    }
                    this.ending.end(code);
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Err(frame) => {
                    this.ending.sent(&frame);
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Poll::Ready(None) => {
                // Ended without trailers: the caller sees a broken call.
                this.ending.end(grpc::INTERNAL);
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.ending.end(grpc::code_for_error(&err));
                this.inner = None;
                // Passed on, so the caller's stream is reset with the upstream's reason.
                Poll::Ready(Some(Err(Box::new(err))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && self.local.is_none()
            && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
