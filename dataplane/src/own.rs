//! The sidecar's own services, for its app on the app-facing listener: grpc.health.v1
//! (the sidecar's own health, which the control plane sets: SERVING until it drains)
//! and server reflection (answered by the control plane, one message at a time).
//!
//! They are served here rather than by a gRPC server in Python: the sidecar then needs
//! no second HTTP/2 stack for them.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::mpsc;

use crate::grpc::{self, Deframer};
use crate::proxy::Plane;
use crate::relay::RelayBody;
use crate::stream::UpBody;

const CHECK: &str = "/grpc.health.v1.Health/Check";
const WATCH: &str = "/grpc.health.v1.Health/Watch";
const LIST: &str = "/grpc.health.v1.Health/List";
const REFLECTION: [&str; 2] = [
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];
// A request to these services is a service name or a symbol: small.
const MAX_REQUEST: usize = 64 << 10;

#[derive(Clone, PartialEq, Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

#[derive(Clone, PartialEq, Message)]
struct HealthListResponse {
    #[prost(map = "string, message", tag = "1")]
    statuses: std::collections::HashMap<String, HealthCheckResponse>,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;
const SERVICE_UNKNOWN: i32 = 3;

fn ok_trailers() -> Frame<Bytes> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(grpc::OK));
    Frame::trailers(trailers)
}

fn refused(code: u32, message: &str) -> Response<RelayBody> {
    grpc::trailers_only(code, message, RelayBody::empty())
}

/// A streamed answer: the body's frames come from what the returned sender sends.
fn streamed() -> (Response<RelayBody>, mpsc::Sender<Frame<Bytes>>) {
    let (tx, rx) = mpsc::channel(8);
    let mut response = Response::new(RelayBody::local(rx));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    (response, tx)
}

fn health(serving: bool) -> HealthCheckResponse {
    let status = if serving { SERVING } else { NOT_SERVING };
    HealthCheckResponse { status }
}

fn status(serving: bool) -> Frame<Bytes> {
    Frame::data(grpc::frame(&health(serving).encode_to_vec()))
}

/// A unary answer: `message`, then OK.
fn answered(message: Bytes) -> Response<RelayBody> {
    let (response, tx) = streamed();
    let _ = tx.try_send(Frame::data(grpc::frame(&message)));
    let _ = tx.try_send(ok_trailers());
    response
}

/// The request's one message: what a unary (or server-streaming) call sends.
async fn one_message(mut body: UpBody) -> Result<Bytes, &'static str> {
    let mut messages = Deframer::new(MAX_REQUEST);
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    messages.push(&data);
                }
                if let Some(message) = messages.next()? {
                    return Ok(message);
                }
            }
            Some(Err(_)) | None => return Err("the request ended before its message"),
        }
    }
}

/// Answer one call to the sidecar's own services.
pub async fn serve(plane: &Arc<Plane>, path: &str, body: UpBody) -> Response<RelayBody> {
    if REFLECTION.contains(&path) {
        return reflection(plane, body);
    }
    if path != CHECK && path != WATCH && path != LIST {
        return refused(
            grpc::UNIMPLEMENTED,
            &format!("shoal: the sidecar does not serve {path}"),
        );
    }
    let request = match one_message(body).await {
        Ok(message) => message,
        Err(why) => return refused(grpc::INTERNAL, &format!("shoal: {why}")),
    };
    if path == LIST {
        // Every service the sidecar answers for: itself, the empty name.
        let now = *plane.serving.borrow();
        let statuses = [(String::new(), health(now))].into_iter().collect();
        return answered(HealthListResponse { statuses }.encode_to_vec().into());
    }
    let Ok(request) = HealthCheckRequest::decode(request) else {
        return refused(grpc::INTERNAL, "shoal: the health request does not decode");
    };
    // The sidecar has one service to answer for: itself, the empty name.
    let known = request.service.is_empty();
    let mut serving = plane.serving.subscribe();
    if path == CHECK {
        if !known {
            return refused(grpc::NOT_FOUND, "unknown service");
        }
        let now = *serving.borrow();
        return answered(health(now).encode_to_vec().into());
    }
    let (response, tx) = streamed();
    tokio::spawn(async move {
        if !known {
            let unknown = HealthCheckResponse {
                status: SERVICE_UNKNOWN,
            };
            let _ = tx
                .send(Frame::data(grpc::frame(&unknown.encode_to_vec())))
                .await;
            // Kept open until the caller goes, as grpc.health.v1 says.
            tx.closed().await;
            return;
        }
        loop {
            let now = *serving.borrow_and_update();
            if tx.send(status(now)).await.is_err() {
                return; // the caller went away
            }
            tokio::select! {
                changed = serving.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    response
}

/// Server reflection: each request message answered by the control plane, in order.
fn reflection(plane: &Arc<Plane>, mut body: UpBody) -> Response<RelayBody> {
    let (response, tx) = streamed();
    let control = plane.control.clone();
    tokio::spawn(async move {
        let mut messages = Deframer::new(MAX_REQUEST);
        loop {
            let frame = match body.frame().await {
                Some(Ok(frame)) => frame,
                Some(Err(_)) => return,
                None => break,
            };
            let Ok(data) = frame.into_data() else { break };
            messages.push(&data);
            loop {
                match messages.next() {
                    Ok(Some(request)) => {
                        let Some(answer) = control.reflect(&request) else {
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", HeaderValue::from(grpc::INTERNAL));
                            let _ = tx.send(Frame::trailers(trailers)).await;
                            return;
                        };
                        if tx.send(Frame::data(grpc::frame(&answer))).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
        let _ = tx.send(ok_trailers()).await;
    });
    response
}
