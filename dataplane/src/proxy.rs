//! One forwarded call: admit it, try endpoints until one answers, relay the answer.
//!
//! The request and response are never decoded: headers are copied (less the mesh's own
//! keys, plus the per-try deadline), bodies stream through as HTTP/2 frames. A try may
//! be retried until the upstream sends its first message: before that nothing has
//! reached the caller, and the request frames sent so far are kept (`replay`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{
    response, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body::{Body, Frame};
use http_body_util::BodyExt;

use crate::control::{Control, Refusal};
use crate::grpc;
use crate::own;
use crate::pool::{Failure, Pool, Upstream};
use crate::relay::{Ending, RelayBody, UPSTREAM_KEY};
use crate::replay::Replay;
use crate::stream::UpBody;
use crate::trace::{Tracer, TRACEPARENT};
use tokio::sync::watch;

const TARGET_KEY: HeaderName = HeaderName::from_static("shoal-target-service");
/// Marks a call one sidecar forwards to another; it must arrive on a mesh-facing listener.
const HOP_KEY: HeaderName = HeaderName::from_static("shoal-hop");
const TIMEOUT_KEY: HeaderName = HeaderName::from_static("grpc-timeout");
// Services the sidecar serves itself (`own`), for calls from its app.
const OWN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
];

/// Which side of the sidecar a listener faces.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// App-facing: the app's calls, routed into the mesh.
    Outbound,
    /// Mesh-facing: other sidecars' calls, delivered to this sidecar's app.
    Inbound,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Outbound => "outbound",
            Role::Inbound => "inbound",
        }
    }
}

pub struct Plane {
    pub control: Arc<Control>,
    pub pool: Arc<Pool>,
    /// Whether the sidecar says it is serving, on its own grpc.health.v1 (see `own`).
    pub serving: watch::Sender<bool>,
    pub replay_limit: usize,
    /// Spans of calls, when the sidecar traces.
    pub tracer: Option<Arc<Tracer>>,
}

fn refused(refusal: Refusal) -> Response<RelayBody> {
    grpc::trailers_only(refusal.code, &refusal.message, RelayBody::empty())
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Text metadata the control plane may route on (a hash key): what the application set.
fn metadata(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        if name.starts_with("grpc-")
            || name.ends_with("-bin")
            || matches!(name, "te" | "content-type" | "user-agent")
        {
            continue;
        }
        if let Ok(text) = value.to_str() {
            found.push((name.to_owned(), text.to_owned()));
        }
    }
    found
}

/// The time a try may take: the per-try timeout within what is left of the deadline.
fn try_timeout(
    per_try: Option<Duration>,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    let left = deadline.map(|d| d.saturating_duration_since(now));
    match (per_try, left) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// Forward one call that arrived on a listener facing `role`; the response to give.
/// `caller` is the SPIFFE ID a TLS client proved, for the control plane.
pub async fn handle(
    plane: Arc<Plane>,
    role: Role,
    caller: Option<Arc<str>>,
    request: Request<UpBody>,
) -> Response<RelayBody> {
    let plane = &plane;
    let received = Instant::now();
    if request.method() != Method::POST || !is_grpc(request.headers()) {
        let mut response = Response::new(RelayBody::empty());
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return response;
    }
    let (parts, body) = request.into_parts();
    let mut headers = parts.headers;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let deadline = match headers.remove(TIMEOUT_KEY) {
        None => None,
        // As gRPC servers do: a deadline that cannot be read is an error, not "no deadline".
        Some(value) => match grpc::parse_timeout(&value) {
            Some(timeout) => Some(received + timeout),
            None => {
                let message = format!("shoal: malformed grpc-timeout header {value:?}");
                return grpc::trailers_only(grpc::INTERNAL, &message, RelayBody::empty());
            }
        },
    };
    let hop = headers.remove(HOP_KEY).is_some();
    let target = headers
        .remove(TARGET_KEY)
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    if hop && role == Role::Outbound {
        // A sidecar forwarded here: an instance advertises this app-facing address. Were
        // it routed, it would go round the mesh again.
        return grpc::trailers_only(
            grpc::UNAVAILABLE,
            "shoal: a call from another sidecar reached an app-facing listener; \
             instances must advertise their sidecar's inbound address",
            RelayBody::empty(),
        );
    }
    let path = path_and_query.path();
    if role == Role::Outbound && OWN_SERVICES.iter().any(|s| path.starts_with(s)) {
        return own::serve(plane, path, body).await;
    }
    let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
    let inbound = role == Role::Inbound;
    let admitted = match plane.control.begin(
        path,
        target.as_deref(),
        inbound,
        metadata(&headers),
        remaining,
        caller.as_deref(),
    ) {
        Ok(admitted) => admitted,
        Err(refusal) => return refused(refusal),
    };
    let mut call = admitted.call;
    let mut first = Some(admitted.first);
    let permit = match admitted.breaker.acquire(deadline).await {
        Ok(permit) => permit,
        Err(rejected) => {
            call.finish(grpc::RESOURCE_EXHAUSTED, None);
            let message = format!(
                "shoal: circuit breaker is open ({} in flight, {} pending)",
                rejected.in_flight, rejected.pending
            );
            return grpc::trailers_only(grpc::RESOURCE_EXHAUSTED, &message, RelayBody::empty());
        }
    };
    if admitted.outbound {
        headers.insert(HOP_KEY, HeaderValue::from_static("1"));
    }
    if let Some(tracer) = &plane.tracer {
        let (started, traceparent) = tracer.start(&headers, path, inbound);
        if let Some(traceparent) = traceparent {
            headers.insert(TRACEPARENT, traceparent);
        }
        if let Some(started) = started {
            call.trace(tracer.clone(), started);
        }
    }
    let replay = Replay::new(body, plane.replay_limit);
    call.count_request(replay.received());
    replay.prefetch().await;
    loop {
        let pick = match first.take().unwrap_or_else(|| call.pick()) {
            Ok(pick) => pick,
            Err(refusal) => {
                call.finish(refusal.code, None);
                return refused(refusal);
            }
        };
        let mark = if admitted.outbound { pick.mark } else { None };
        call.trying(mark.as_ref());
        let Some(upstream) = plane.pool.get(&pick.address) else {
            call.finish(grpc::UNAVAILABLE, None);
            let message = format!("shoal: bad endpoint address {:?}", &*pick.address);
            return grpc::trailers_only(grpc::UNAVAILABLE, &message, RelayBody::empty());
        };
        let started = Instant::now();
        let timeout = try_timeout(admitted.per_try_timeout, deadline, started);
        let outcome = match try_once(
            plane,
            &upstream,
            &headers,
            &path_and_query,
            &replay,
            timeout,
        )
        .await
        {
            Ok(Answer::Committed { parts, first, body }) => {
                replay.commit();
                let ending = Ending {
                    call: Some(call),
                    latency: Some(started.elapsed()),
                    mark,
                    permit: Some(permit),
                };
                return Response::from_parts(parts, RelayBody::streamed(first, body, ending));
            }
            Ok(ended @ Answer::Ended { code: grpc::OK, .. }) => {
                call.finish(grpc::OK, Some(started.elapsed()));
                return ended.into_response(mark);
            }
            Ok(ended @ Answer::Ended { .. }) => Unanswered::Ended(Box::new(ended)),
            Err(failure) => Unanswered::Failed(failure),
        };
        let code = match &outcome {
            Unanswered::Failed(failure) => failure.code,
            Unanswered::Ended(ended) => ended.code(),
        };
        if let Some(pause) = call.failed(code, replay.replayable(), started.elapsed()) {
            tokio::time::sleep(pause).await;
            continue;
        }
        call.finish(code, None);
        return match outcome {
            // The upstream's own answer, with its metadata.
            Unanswered::Ended(ended) => ended.into_response(mark),
            Unanswered::Failed(failure) => {
                let mut response = grpc::trailers_only(code, &failure.message, RelayBody::empty());
                if let Some(mark) = mark {
                    response.headers_mut().insert(UPSTREAM_KEY, mark);
                }
                response
            }
        };
    }
}

/// A try that got no message: the upstream ended the call, or the exchange failed.
enum Unanswered {
    Ended(Box<Answer>),
    Failed(Failure),
}

/// How the upstream answered a try.
enum Answer {
    /// With a message: the call commits to this try.
    Committed {
        parts: response::Parts,
        first: Frame<Bytes>,
        body: UpBody,
    },
    /// With a status and no message: `trailers` unless the headers carried the status.
    Ended {
        code: u32,
        parts: response::Parts,
        trailers: Option<HeaderMap>,
    },
}

impl Answer {
    fn code(&self) -> u32 {
        match self {
            Answer::Committed { .. } => grpc::OK,
            Answer::Ended { code, .. } => *code,
        }
    }

    /// An ended call's answer for the caller, marked with the instance that gave it.
    fn into_response(self, mark: Option<HeaderValue>) -> Response<RelayBody> {
        let Answer::Ended {
            mut parts,
            trailers,
            ..
        } = self
        else {
            unreachable!("only an ended call is answered whole");
        };
        match trailers {
            Some(mut trailers) => {
                if let Some(mark) = mark {
                    trailers.insert(UPSTREAM_KEY, mark);
                }
                Response::from_parts(parts, RelayBody::just(Some(Frame::trailers(trailers))))
            }
            None => {
                if let Some(mark) = mark {
                    parts.headers.insert(UPSTREAM_KEY, mark);
                }
                Response::from_parts(parts, RelayBody::empty())
            }
        }
    }
}

/// One try: send the request and wait for the first message or the end of the call,
/// all within `timeout`.
async fn try_once(
    plane: &Arc<Plane>,
    upstream: &Arc<Upstream>,
    headers: &HeaderMap,
    path: &PathAndQuery,
    replay: &Replay,
    timeout: Option<Duration>,
) -> Result<Answer, Failure> {
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = upstream_uri(upstream, path);
    let mut headers = headers.clone();
    if let Some(t) = timeout {
        headers.insert(TIMEOUT_KEY, grpc::format_timeout(t));
    }
    *request.headers_mut() = headers;
    let exchange = async {
        let (parts, mut body) = upstream
            .send(&plane.pool, request, replay.body())
            .await?
            .into_parts();
        if body.is_end_stream() {
            let code = grpc::status_of(&parts.headers).unwrap_or(grpc::UNKNOWN);
            return Ok(Answer::Ended {
                code,
                parts,
                trailers: None,
            });
        }
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_trailers() {
                Ok(trailers) => {
                    let code = grpc::status_of(&trailers).unwrap_or(grpc::UNKNOWN);
                    Ok(Answer::Ended {
                        code,
                        parts,
                        trailers: Some(trailers),
                    })
                }
                Err(first) => Ok(Answer::Committed { parts, first, body }),
            },
            None => {
                let code = grpc::status_of(&parts.headers).unwrap_or(grpc::INTERNAL);
                Ok(Answer::Ended {
                    code,
                    parts,
                    trailers: None,
                })
            }
            Some(Err(err)) => Err(Failure::upstream(&upstream.address, &err)),
        }
    };
    match timeout {
        None => exchange.await,
        Some(t) => tokio::time::timeout(t, exchange).await.unwrap_or_else(|_| {
            Err(Failure {
                code: grpc::DEADLINE_EXCEEDED,
                message: "shoal: deadline exceeded".into(),
            })
        }),
    }
}

fn upstream_uri(upstream: &Upstream, path: &PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(upstream.scheme.clone());
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(path.clone());
    Uri::from_parts(parts).expect("scheme, authority and path make a URI")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_gets_the_shorter_of_its_timeout_and_what_is_left_of_the_deadline() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let cases = [
            (Some(secs(2)), Some(now + secs(10)), Some(secs(2))),
            (
                Some(secs(2)),
                Some(now + Duration::from_millis(500)),
                Some(Duration::from_millis(500)),
            ),
            (Some(secs(2)), None, Some(secs(2))),
            (None, Some(now + secs(3)), Some(secs(3))),
            (None, None, None),
            // A deadline already past leaves no time at all, never a negative one.
            (Some(secs(2)), Some(now - secs(1)), Some(Duration::ZERO)),
        ];
        for (per_try, deadline, expected) in cases {
            assert_eq!(
                try_timeout(per_try, deadline, now),
                expected,
                "{per_try:?} {deadline:?}"
            );
        }
        // A retry later in the call gets what is left, not the whole per-try timeout.
        let later = now + secs(2) + Duration::from_millis(100);
        assert_eq!(
            try_timeout(Some(secs(2)), Some(now + secs(3)), later),
            Some(Duration::from_millis(900))
        );
    }
}
