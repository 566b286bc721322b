//! Spans of the calls the data plane forwards, exported over OTLP/gRPC.
//!
//! A traced call gets one span per sidecar: CLIENT for a call the app makes into the
//! mesh, SERVER for one another sidecar delivers to the app. The caller's W3C
//! `traceparent` is read with OpenTelemetry's own propagator; the upstream gets one
//! naming this hop's span as its parent; a call with none starts a trace, kept at the
//! configured ratio (the Rust SDK's `TraceIdRatioBased` rule). A caller's unsampled
//! trace goes on untouched; a trace started here unsampled is still sent on, so the
//! next hops decide alike instead of each starting one of its own.
//!
//! All of it happens here, with no call into Python: a span costs the call a few
//! hundred nanoseconds and one push onto a bounded queue (full: the span is dropped and
//! counted). Once a second, or when a batch is waiting, the exporter task encodes the
//! queue as one OTLP `ExportTraceServiceRequest` (OpenTelemetry's generated protobuf
//! types) and sends it to the collector as a gRPC call on the data plane's own pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use opentelemetry::Context;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use prost::Message;
use tokio::sync::Notify;

use crate::client;
use crate::grpc;
use crate::pool::Pool;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Spans waiting for the exporter at most; more are dropped (and counted).
const MAX_QUEUED: usize = 8192;
/// Spans in one export; the exporter wakes early once this many wait.
const BATCH: usize = 512;
const EXPORT_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The request's headers, as OpenTelemetry's propagators read a carrier.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// A traced call's span while the call runs.
pub struct Started {
    trace_id: TraceId,
    span_id: SpanId,
    /// `SpanId::INVALID` for the root of a trace.
    parent: SpanId,
    start: SystemTime,
    path: Box<str>,
    inbound: bool,
}

/// A span that ended: how, after how long, where its last try went, after how many.
struct Ended {
    started: Started,
    code: u32,
    elapsed: Duration,
    upstream: Option<HeaderValue>,
    retries: u32,
}

/// The data plane's tracing: sampling, propagation, the queue and its export.
pub struct Tracer {
    /// Where spans go: the collector's `host:port`, reached in plaintext.
    collector: String,
    /// A new trace is kept when its id's low 63 bits fall under this (the Rust SDK's
    /// `TraceIdRatioBased`).
    bound: u64,
    ids: RandomIdGenerator,
    propagator: TraceContextPropagator,
    /// The name spans carry (`service.name`): set once the sidecar knows its identity.
    service: Mutex<String>,
    queue: Mutex<Vec<Ended>>,
    queued: Notify,
    exported: AtomicU64,
    dropped: AtomicU64,
}

/// `traceparent` for a span of `trace_id` (W3C Trace Context, version 00).
fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> HeaderValue {
    let value = format!("00-{trace_id}-{span_id}-{:02x}", u8::from(sampled));
    HeaderValue::from_str(&value).expect("hex digits and dashes make a header value")
}

impl Tracer {
    /// `sample`: the share of the traces started here that are kept, 0 to 1.
    pub fn new(collector: String, sample: f64) -> Self {
        Tracer {
            collector,
            // As the SDK computes it: 1.0 keeps every id, whose shifted value is < 2^63.
            bound: (sample.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64,
            ids: RandomIdGenerator::default(),
            propagator: TraceContextPropagator::new(),
            service: Mutex::new("sidecar".into()),
            queue: Mutex::new(Vec::new()),
            queued: Notify::new(),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn set_service(&self, name: String) {
        *self.service.lock().unwrap() = name;
    }

    /// Spans exported and spans dropped (queue full, or the collector refused them).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.exported.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    fn keeps(&self, trace_id: TraceId) -> bool {
        let low = u64::from_be_bytes(trace_id.to_bytes()[8..].try_into().unwrap());
        (low >> 1) < self.bound
    }

    /// A new call's span (`None`: not sampled) and the `traceparent` the upstream gets
    /// instead of the caller's (`None`: the caller's goes on as it was).
    pub fn start(
        &self,
        headers: &HeaderMap,
        path: &str,
        inbound: bool,
    ) -> (Option<Started>, Option<HeaderValue>) {
        let caller = if headers.contains_key(TRACEPARENT) {
            let cx = self
                .propagator
                .extract_with_context(&Context::new(), &Headers(headers));
            Some(cx.span().span_context().clone()).filter(|c| c.is_valid())
        } else {
            None
        };
        let span_id = self.ids.new_span_id();
        let (trace_id, parent, sampled) = match caller {
            Some(caller) if !caller.is_sampled() => return (None, None),
            Some(caller) => (caller.trace_id(), caller.span_id(), true),
            None => {
                let trace_id = self.ids.new_trace_id();
                (trace_id, SpanId::INVALID, self.keeps(trace_id))
            }
        };
        let header = traceparent(trace_id, span_id, sampled);
        let started = sampled.then(|| Started {
            trace_id,
            span_id,
            parent,
            start: SystemTime::now(),
            path: path.into(),
            inbound,
        });
        (started, Some(header))
    }

    /// A traced call ended: queue its span for the exporter.
    pub fn end(
        &self,
        started: Started,
        code: u32,
        elapsed: Duration,
        upstream: Option<HeaderValue>,
        retries: u32,
    ) {
        let mut queue = self.queue.lock().unwrap();
        if queue.len() >= MAX_QUEUED {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push(Ended {
            started,
            code,
            elapsed,
            upstream,
            retries,
        });
        if queue.len() == BATCH {
            self.queued.notify_one();
        }
    }

    /// Export what is queued every second (sooner when a batch waits), for ever.
    pub async fn export_forever(self: Arc<Self>, pool: Arc<Pool>) {
        loop {
            let _ = tokio::time::timeout(EXPORT_EVERY, self.queued.notified()).await;
            self.flush(&pool).await;
        }
    }

    /// Send everything queued now, a batch at a time.
    pub async fn flush(&self, pool: &Arc<Pool>) {
        loop {
            let batch: Vec<Ended> = {
                let mut queue = self.queue.lock().unwrap();
                let take = queue.len().min(BATCH);
                queue.drain(..take).collect()
            };
            if batch.is_empty() {
                return;
            }
            let count = batch.len() as u64;
            let request = self.encode(batch).encode_to_vec();
            let status = client::call(
                pool,
                &self.collector,
                EXPORT_PATH,
                request.into(),
                Some(EXPORT_TIMEOUT),
                |_| {},
            )
            .await;
            if status.code == grpc::OK {
                self.exported.fetch_add(count, Ordering::Relaxed);
            } else {
                self.dropped.fetch_add(count, Ordering::Relaxed);
                log::debug!(
                    "the trace collector at {} took no spans: {}",
                    self.collector,
                    status.message
                );
            }
        }
    }

    fn encode(&self, batch: Vec<Ended>) -> ExportTraceServiceRequest {
        let service = self.service.lock().unwrap().clone();
        let resource = Resource {
            attributes: vec![
                text("service.name", service),
                text("shoal.component", "sidecar"),
            ],
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: "shoal.dataplane".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope),
                    spans: batch.into_iter().map(to_span).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    value_of(key, any_value::Value::StringValue(value.into()))
}

fn value_of(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One span as OTLP has it, with OpenTelemetry's RPC attributes.
fn to_span(ended: Ended) -> Span {
    let Ended {
        started,
        code,
        elapsed,
        upstream,
        retries,
    } = ended;
    let name = started.path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let mut attributes = vec![
        text("rpc.system", "grpc"),
        text("rpc.service", service),
        text("rpc.method", method),
        value_of(
            "rpc.grpc.status_code",
            any_value::Value::IntValue(i64::from(code)),
        ),
        value_of(
            "shoal.retries",
            any_value::Value::IntValue(i64::from(retries)),
        ),
    ];
    if let Some(instance) = upstream.as_ref().and_then(|v| v.to_str().ok()) {
        attributes.push(text("shoal.upstream", instance));
    }
    let status = if code == grpc::OK {
        Status::default()
    } else {
        Status {
            code: status::StatusCode::Error as i32,
            message: grpc::code_name(code).into(),
        }
    };
    let start = unix_nanos(started.start);
    Span {
        trace_id: started.trace_id.to_bytes().to_vec(),
        span_id: started.span_id.to_bytes().to_vec(),
        parent_span_id: if started.parent == SpanId::INVALID {
            Vec::new()
        } else {
            started.parent.to_bytes().to_vec()
        },
        name: name.into(),
        kind: if started.inbound {
            span::SpanKind::Server
        } else {
            span::SpanKind::Client
        } as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + elapsed.as_nanos() as u64,
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn a_sampled_caller_is_continued_with_this_hops_span_as_the_parent() {
        let tracer = Tracer::new("127.0.0.1:1".into(), 0.0);
        let (started, header) = tracer.start(&with(CALLER), "/p.S/M", true);
        let started = started.expect("the caller's decision wins over the ratio");
        let header = header.unwrap();
        let sent = header.to_str().unwrap();
        assert!(sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(sent.ends_with("-01"));
        assert_eq!(&sent[36..52], started.span_id.to_string());
        assert_eq!(started.parent.to_string(), "b7ad6b7169203331");
    }

    #[test]
    fn an_unsampled_caller_goes_on_untouched() {
        let tracer = Tracer::new("127.0.0.1:1".into(), 1.0);
        let (started, header) = tracer.start(&with(&CALLER.replace("-01", "-00")), "/p.S/M", true);
        assert!(started.is_none() && header.is_none());
    }

    #[test]
    fn without_a_caller_a_trace_starts_and_the_ratio_decides() {
        let all = Tracer::new("127.0.0.1:1".into(), 1.0);
        let none = Tracer::new("127.0.0.1:1".into(), 0.0);
        for _ in 0..100 {
            let (started, header) = all.start(&HeaderMap::new(), "/p.S/M", false);
            assert!(started.is_some_and(|s| s.parent == SpanId::INVALID));
            assert!(header.unwrap().to_str().unwrap().ends_with("-01"));
            let (started, header) = none.start(&HeaderMap::new(), "/p.S/M", false);
            assert!(started.is_none());
            assert!(header.unwrap().to_str().unwrap().ends_with("-00"));
        }
        let some = Tracer::new("127.0.0.1:1".into(), 0.25);
        let kept = (0..4000)
            .filter(|_| some.start(&HeaderMap::new(), "/p.S/M", false).0.is_some())
            .count();
        assert!((800..1200).contains(&kept), "{kept} of 4000 kept at 0.25");
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        let tracer = Tracer::new("127.0.0.1:1".into(), 1.0);
        let (started, _) = tracer.start(&with("00-zz-yy-01"), "/p.S/M", true);
        assert!(started.is_some_and(|s| s.parent == SpanId::INVALID));
    }

    #[test]
    fn the_queue_is_bounded_and_its_overflow_counted() {
        let tracer = Tracer::new("127.0.0.1:1".into(), 1.0);
        for _ in 0..MAX_QUEUED + 5 {
            let (started, _) = tracer.start(&HeaderMap::new(), "/p.S/M", false);
            tracer.end(
                started.unwrap(),
                grpc::OK,
                Duration::from_millis(1),
                None,
                0,
            );
        }
        assert_eq!(tracer.counts(), (0, 5));
        assert_eq!(tracer.queue.lock().unwrap().len(), MAX_QUEUED);
    }

    #[test]
    fn a_span_carries_the_rpc_attributes_and_an_error_status() {
        let tracer = Tracer::new("127.0.0.1:1".into(), 1.0);
        tracer.set_service("worker-sidecar".into());
        let (started, _) = tracer.start(&with(CALLER), "/shoal.worker.v1.Worker/Echo", true);
        let upstream = Some(HeaderValue::from_static("worker-1"));
        let ended = Ended {
            started: started.unwrap(),
            code: grpc::UNAVAILABLE,
            elapsed: Duration::from_micros(1500),
            upstream,
            retries: 2,
        };
        let request = tracer.encode(vec![ended]);
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        let span = &spans[0];
        assert_eq!(span.name, "shoal.worker.v1.Worker/Echo");
        assert_eq!(span.kind, span::SpanKind::Server as i32);
        assert_eq!(
            span.end_time_unix_nano - span.start_time_unix_nano,
            1_500_000
        );
        assert_eq!(span.parent_span_id, 0xb7ad6b7169203331u64.to_be_bytes());
        let status = span.status.as_ref().unwrap();
        assert_eq!(status.message, "UNAVAILABLE");
        let keys: Vec<&str> = span.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "rpc.system",
                "rpc.service",
                "rpc.method",
                "rpc.grpc.status_code",
                "shoal.retries",
                "shoal.upstream"
            ]
        );
        let resource = request.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes[0].key, "service.name");
    }
}
