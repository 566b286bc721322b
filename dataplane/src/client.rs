//! The control plane's own gRPC calls (the registry's Watch, Register and Heartbeat, the
//! app's health and reflection), made on the data plane's connections.
//!
//! The sidecar then needs no second HTTP/2 stack (grpcio, which costs its process about
//! 14 MiB and threads of its own) for the few calls it makes itself. A call sends one
//! request message and hands each response message to the caller as it arrives: a
//! unary call is the case of one. Messages are never decoded here; Python does that.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Uri};
use http_body::Body;
use http_body_util::BodyExt;

use crate::grpc::{self, Deframer};
use crate::pool::{Pool, Upstream};

/// The largest response message taken (a registry snapshot of many instances).
const MAX_MESSAGE: usize = 64 << 20;
const USER_AGENT: HeaderValue = HeaderValue::from_static("shoal-sidecar");

/// How a call ended.
pub struct Status {
    pub code: u32,
    pub message: String,
}

impl Status {
    fn new(code: u32, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }
}

fn request(
    upstream: &Upstream,
    path: &str,
    timeout: Option<Duration>,
) -> Result<Request<()>, Status> {
    let bad = |what: &str| Status::new(grpc::INTERNAL, format!("shoal: bad {what} for a call"));
    let path: PathAndQuery = path.parse().map_err(|_| bad("method path"))?;
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(upstream.scheme.clone());
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(path);
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| bad("address"))?;
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    headers.insert(http::header::USER_AGENT, USER_AGENT);
    if let Some(timeout) = timeout {
        headers.insert("grpc-timeout", grpc::format_timeout(timeout));
    }
    Ok(request)
}

/// Call `path` at `address` with `message`; `deliver` gets each response message.
pub async fn call(
    pool: &Arc<Pool>,
    address: &str,
    path: &str,
    message: Bytes,
    timeout: Option<Duration>,
    deliver: impl FnMut(Bytes),
) -> Status {
    let exchange = exchange(pool, address, path, message, timeout, deliver);
    match timeout {
        None => exchange.await,
        Some(t) => tokio::time::timeout(t, exchange)
            .await
            .unwrap_or_else(|_| Status::new(grpc::DEADLINE_EXCEEDED, "shoal: deadline exceeded")),
    }
}

async fn exchange(
    pool: &Arc<Pool>,
    address: &str,
    path: &str,
    message: Bytes,
    timeout: Option<Duration>,
    mut deliver: impl FnMut(Bytes),
) -> Status {
    // The pool's own rule for the address (plaintext, or mTLS to whom) applies here too.
    let Some(upstream) = pool.get(address) else {
        return Status::new(grpc::UNAVAILABLE, format!("shoal: bad address {address:?}"));
    };
    let request = match request(&upstream, path, timeout) {
        Ok(request) => request,
        Err(status) => return status,
    };
    let response = match upstream
        .send_whole(pool, request, grpc::frame(&message))
        .await
    {
        Ok(response) => response,
        Err(failure) => return Status::new(failure.code, failure.message),
    };
    let (parts, mut body) = response.into_parts();
    // Trailers-only: the headers are the whole answer.
    if let Some(code) = grpc::status_of(&parts.headers) {
        return Status::new(code, grpc::message_of(&parts.headers));
    }
    if parts.status != http::StatusCode::OK {
        let message = format!("shoal: {address} answered HTTP {}", parts.status);
        return Status::new(grpc::UNAVAILABLE, message);
    }
    let mut messages = Deframer::new(MAX_MESSAGE);
    loop {
        if body.is_end_stream() {
            return Status::new(grpc::INTERNAL, "shoal: the call ended without a status");
        }
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Status::new(grpc::code_for_error(&err), err.to_string()),
            None => return Status::new(grpc::INTERNAL, "shoal: the call ended without a status"),
        };
        match frame.into_data() {
            Ok(data) => {
                messages.push(&data);
                loop {
                    match messages.next() {
                        Ok(Some(message)) => deliver(message),
                        Ok(None) => break,
                        Err(why) => {
                            return Status::new(
                                grpc::INTERNAL,
                                format!("shoal: {address} sent {why}"),
                            )
                        }
                    }
                }
            }
            Err(frame) => {
                let trailers = frame.into_trailers().unwrap_or_default();
                let code = grpc::status_of(&trailers).unwrap_or(grpc::UNKNOWN);
                if code == grpc::OK && !messages.is_empty() {
                    return Status::new(grpc::INTERNAL, "shoal: the call ended mid-message");
                }
                return Status::new(code, grpc::message_of(&trailers));
            }
        }
    }
}
