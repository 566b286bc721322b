//! A call's request body, kept so a retry can send it again.
//!
//! Until the call commits (the upstream sent its first message) or the request
//! outgrows the replay limit, every frame read from the client is kept, and each try
//! gets a body that replays them and then goes on reading from the client. Reads from
//! the client are shared by all tries; a try that is abandoned gets an error, which
//! resets its upstream stream instead of ending it as if the request were complete.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::stream::UpBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Shared {
    source: UpBody,
    kept: Vec<Frame<Bytes>>,
    size: usize,
    limit: usize,
    eof: bool,
    /// No more frames are kept: the call committed or the request grew too big.
    passing: bool,
    overflowed: bool,
    generation: u64,
    /// Every message byte read from the client, kept or not (the request's size).
    received: Arc<AtomicU64>,
}

impl Shared {
    fn count(&self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.received
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
}

/// The client's request stream, shared by the tries of one call.
#[derive(Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

impl Replay {
    pub fn new(source: UpBody, limit: usize) -> Self {
        let eof = source.is_end_stream();
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                source,
                kept: Vec::new(),
                size: 0,
                limit,
                eof,
                passing: false,
                overflowed: false,
                generation: 0,
                received: Arc::default(),
            })),
        }
    }

    /// Keep the request frames that have arrived already, without waiting for more.
    ///
    /// A unary request is usually whole by now: the first try then queues all of it
    /// with its headers (`stream::send_body`), one write and no task for the body.
    pub async fn prefetch(&self) {
        std::future::poll_fn(|cx| {
            let mut shared = self.shared.lock().unwrap();
            while !shared.eof && shared.size <= shared.limit {
                match Pin::new(&mut shared.source).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        shared.count(&frame);
                        shared.size += frame.data_ref().map_or(0, Bytes::len);
                        shared.kept.push(frame);
                    }
                    Poll::Ready(None) => shared.eof = true,
                    // An error is met again, and reported, by the try that reads on.
                    Poll::Ready(Some(Err(_))) | Poll::Pending => break,
                }
            }
            if shared.size > shared.limit {
                // Sent once, never replayed.
                shared.overflowed = true;
            }
            Poll::Ready(())
        })
        .await
    }

    /// A body for the next try: the frames so far, then new ones. Earlier bodies go stale.
    pub fn body(&self) -> ReplayBody {
        let mut shared = self.shared.lock().unwrap();
        shared.generation += 1;
        ReplayBody {
            shared: self.shared.clone(),
            generation: shared.generation,
            next: 0,
        }
    }

    /// The count of the request's message bytes read from the client so far.
    pub fn received(&self) -> Arc<AtomicU64> {
        self.shared.lock().unwrap().received.clone()
    }

    /// Whether a failed try may be retried: every frame sent so far is still kept.
    pub fn replayable(&self) -> bool {
        let shared = self.shared.lock().unwrap();
        !shared.overflowed
    }

    /// No more retries: frames go straight through from now on.
    pub fn commit(&self) {
        let mut shared = self.shared.lock().unwrap();
        shared.passing = true;
        shared.overflowed = true;
    }
}

#[derive(Debug)]
struct Abandoned;

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the try was abandoned for a retry")
    }
}

impl std::error::Error for Abandoned {}

pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    next: usize,
}

impl ReplayBody {
    /// The next kept frame, without reading from the client.
    pub fn next_kept(&mut self) -> Option<Frame<Bytes>> {
        let shared = self.shared.lock().unwrap();
        if shared.generation != self.generation || self.next >= shared.kept.len() {
            return None;
        }
        self.next += 1;
        Some(clone_frame(&shared.kept[self.next - 1]))
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut guard = this.shared.lock().unwrap();
        let shared = &mut *guard;
        if shared.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Abandoned))));
        }
        // Kept frames go out even after the commit: an upstream may answer before a
        // replayed request is all sent.
        if this.next < shared.kept.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(clone_frame(&shared.kept[this.next - 1]))));
        }
        if shared.eof {
            return Poll::Ready(None);
        }
        match Pin::new(&mut shared.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.eof = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Box::new(err)))),
            Poll::Ready(Some(Ok(frame))) => {
                shared.count(&frame);
                if !shared.passing {
                    shared.size += frame.data_ref().map_or(0, Bytes::len);
                    if shared.size > shared.limit {
                        shared.passing = true;
                        shared.overflowed = true;
                        shared.kept = Vec::new();
                        this.next = 0;
                    } else {
                        shared.kept.push(clone_frame(&frame));
                        this.next += 1;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Asked after each frame: saying so here puts END_STREAM on the last data frame
        // instead of sending an empty one after it.
        let shared = self.shared.lock().unwrap();
        shared.generation == self.generation
            && (shared.eof || shared.source.is_end_stream())
            && self.next >= shared.kept.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn clone_frame(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match frame.data_ref() {
        Some(data) => Frame::data(data.clone()),
        None => Frame::trailers(frame.trailers_ref().cloned().unwrap_or_default()),
    }
}
