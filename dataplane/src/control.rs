//! The calls into the Python control plane, which decides where each call goes, and
//! the typed values that cross that boundary.
//!
//! Each forwarded call costs two short calls into Python (`begin`, which also picks the
//! first endpoint, and `finish`; one more per retry), made on the data plane's one
//! thread. Python never blocks here: every decision is synchronous and in memory.
//!
//! Entering Python is what costs (its caches are cold after the kernel's networking),
//! more than the control plane's work there. So a call's end is not reported alone:
//! it is queued, and the queue is delivered in the same entry into Python as the next
//! `begin`, or by the flusher task at the end of the data plane's current turn if no
//! call begins first. Reports are delivered in order, microseconds late.
//!
//! What crosses the boundary is typed: Python answers with the classes defined here
//! (`Admission`, `Target`, `Refusal`, and the cluster's `Breaker`), which Rust reads by
//! a type check, never by unpacking tuples. Anything else is a control plane bug: the
//! call gets INTERNAL and the log says what came back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use bytes::Bytes;
use http::HeaderValue;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};

use crate::breaker::{Breaker, Core};
use crate::grpc;
use crate::trace::{Started, Tracer};

/// A call the control plane will not route: the status the caller gets.
#[pyclass(frozen, module = "shoal_dataplane._native", get_all)]
#[derive(Clone)]
pub struct Refusal {
    pub code: u32,
    pub message: String,
}

#[pymethods]
impl Refusal {
    #[new]
    fn new(code: u32, message: String) -> PyResult<Self> {
        if code == grpc::OK || code > 16 {
            return Err(PyValueError::new_err(format!(
                "a refusal needs a gRPC error code (1..16), got {code}"
            )));
        }
        Ok(Refusal { code, message })
    }

    fn __repr__(&self) -> String {
        format!("Refusal({}, {:?})", self.code, self.message)
    }
}

/// One endpoint a try can go to: where it listens, and which instance it is.
///
/// The control plane makes one per endpoint and hands the same object out for every
/// pick, so a pick costs Python no allocation.
#[pyclass(frozen, module = "shoal_dataplane._native")]
pub struct Target {
    pick: Pick,
    instance: String,
}

#[pymethods]
impl Target {
    #[new]
    fn new(address: &str, instance: String) -> Self {
        Target {
            pick: Pick {
                address: address.into(),
                mark: HeaderValue::from_str(&instance).ok(),
            },
            instance,
        }
    }

    #[getter]
    fn address(&self) -> &str {
        &self.pick.address
    }

    #[getter]
    fn instance(&self) -> &str {
        &self.instance
    }

    fn __repr__(&self) -> String {
        format!("Target({:?}, {:?})", &*self.pick.address, self.instance)
    }
}

/// The endpoint chosen for one try, read out of its `Target` while the GIL is held (so
/// no Python reference outlives the call into Python).
#[derive(Clone)]
pub struct Pick {
    pub address: Arc<str>,
    /// The instance as the `shoal-upstream` header value, checked once.
    pub mark: Option<HeaderValue>,
}

/// What `begin` decided for a call that may go ahead.
#[pyclass(frozen, module = "shoal_dataplane._native")]
pub struct Admission {
    #[pyo3(get)]
    call: Py<PyAny>,
    #[pyo3(get, name = "breaker")]
    owner: Py<Breaker>,
    breaker: Arc<Core>,
    #[pyo3(get)]
    outbound: bool,
    per_try_timeout: Option<Duration>,
    #[pyo3(get)]
    first: Py<PyAny>,
}

#[pymethods]
impl Admission {
    /// `call` is told how the call goes (`failed`, `finish`) and picks retries (`pick`);
    /// `first` is the first try's `Target`, or the `Refusal` the caller gets.
    #[new]
    #[pyo3(signature = (call, breaker, outbound, per_try_timeout, first))]
    fn new(
        call: Py<PyAny>,
        breaker: &Bound<'_, Breaker>,
        outbound: bool,
        per_try_timeout: Option<f64>,
        first: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        if !(first.is_instance_of::<Target>() || first.is_instance_of::<Refusal>()) {
            return Err(PyTypeError::new_err(format!(
                "the first pick must be a Target or a Refusal, not {}",
                first.get_type().name()?
            )));
        }
        let per_try_timeout = per_try_timeout
            .map(|t| {
                Duration::try_from_secs_f64(t)
                    .map_err(|_| PyValueError::new_err("per_try_timeout must be >= 0 seconds"))
            })
            .transpose()?;
        Ok(Admission {
            call,
            owner: breaker.clone().unbind(),
            breaker: breaker.get().core.clone(),
            outbound,
            per_try_timeout,
            first: first.unbind(),
        })
    }

    #[getter]
    fn per_try_timeout(&self) -> Option<f64> {
        self.per_try_timeout.map(|t| t.as_secs_f64())
    }
}

/// `begin`'s answer, as the data plane uses it.
pub struct Admitted {
    pub call: Call,
    pub breaker: Arc<Core>,
    pub outbound: bool,
    pub per_try_timeout: Option<Duration>,
    /// The first try's endpoint, picked with the admission to save a call into Python.
    pub first: Result<Pick, Refusal>,
}

fn internal() -> Refusal {
    Refusal {
        code: grpc::INTERNAL,
        message: "shoal: the sidecar failed to route the call".into(),
    }
}

/// A bug in the control plane: the log gets the traceback; the caller, INTERNAL.
fn report(py: Python<'_>, what: &str, err: PyErr) {
    let traceback = err
        .traceback(py)
        .and_then(|tb| tb.format().ok())
        .unwrap_or_default();
    log::error!("control plane {what} failed: {err}\n{traceback}");
}

/// A pick's answer: the `Target` to try, or the `Refusal` for the caller.
fn to_pick(py: Python<'_>, what: &str, got: Bound<'_, PyAny>) -> Result<Pick, Refusal> {
    if let Ok(target) = got.cast::<Target>() {
        return Ok(target.get().pick.clone());
    }
    if let Ok(refusal) = got.cast::<Refusal>() {
        return Err(refusal.get().clone());
    }
    let kind = got
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    report(
        py,
        what,
        PyTypeError::new_err(format!("expected a Target or a Refusal, got {kind}")),
    );
    Err(internal())
}

/// A call that ended: its `Call` object, its status, the last try's time to answer,
/// the whole call's time from admission to its end (measured here: the control plane
/// hears of the end a little later, in a batch), and the message bytes of its request
/// (read from the caller) and of its response (sent to the caller).
type Ending = (Py<PyAny>, u32, Option<f64>, f64, u64, u64);

/// How calls ended, waiting to be told to the control plane.
#[derive(Default)]
pub struct Endings {
    queue: Mutex<Vec<Ending>>,
    queued: Notify,
}

impl Endings {
    fn push(&self, ending: Ending) {
        let mut queue = self.queue.lock().unwrap();
        queue.push(ending);
        if queue.len() == 1 {
            self.queued.notify_one();
        }
    }

    /// Tell every queued ending to its call's `finish`, in order.
    pub fn deliver(&self, py: Python<'_>) {
        let ended = std::mem::take(&mut *self.queue.lock().unwrap());
        for (call, code, latency, elapsed, request_bytes, response_bytes) in ended {
            let args = (code, latency, elapsed, request_bytes, response_bytes);
            if let Err(err) = call.call_method1(py, intern!(py, "finish"), args) {
                report(py, "finish", err);
            }
            // Released here, with the GIL held (see `Call`).
            drop(call);
        }
    }

    /// Deliver what the data plane's turn queued, once the turn's other tasks have run.
    pub async fn flush_forever(self: Arc<Self>) {
        loop {
            self.queued.notified().await;
            tokio::task::yield_now().await;
            if !self.queue.lock().unwrap().is_empty() {
                Python::attach(|py| self.deliver(py));
            }
        }
    }
}

/// The control plane object (`proxy_sidecar.control.Control`).
pub struct Control {
    obj: Py<PyAny>,
    /// The method paths seen, as Python strings: made (and hashed) once, not per call.
    paths: Mutex<HashMap<Box<str>, Py<PyString>>>,
    pub endings: Arc<Endings>,
}

/// Paths kept as Python strings at most: the control plane caches as many routes.
const MAX_PATHS: usize = 4096;

impl Control {
    pub fn new(obj: Py<PyAny>) -> Self {
        Control {
            obj,
            paths: Mutex::new(HashMap::new()),
            endings: Arc::default(),
        }
    }

    fn path<'py>(&self, py: Python<'py>, path: &str) -> Bound<'py, PyString> {
        let mut paths = self.paths.lock().unwrap();
        if let Some(found) = paths.get(path) {
            return found.bind(py).clone();
        }
        let made = PyString::new(py, path);
        if paths.len() < MAX_PATHS {
            paths.insert(path.into(), made.clone().unbind());
        }
        made
    }

    /// Route a new call: its admission, or the refusal to answer with. `peer` is who
    /// called, the SPIFFE ID of a mutual TLS client.
    pub fn begin(
        &self,
        path: &str,
        target: Option<&str>,
        inbound: bool,
        metadata: Vec<(String, String)>,
        remaining: Option<f64>,
        peer: Option<&str>,
    ) -> Result<Admitted, Refusal> {
        Python::attach(|py| {
            // The calls that ended since: told first, so this one is routed on them.
            self.endings.deliver(py);
            let path = self.path(py, path);
            let begin = intern!(py, "begin");
            // Usually no metadata to route on: the empty tuple is a shared object.
            let got = if metadata.is_empty() {
                let args = (path, target, inbound, PyTuple::empty(py), remaining, peer);
                self.obj.call_method1(py, begin, args)
            } else {
                let args = (path, target, inbound, metadata, remaining, peer);
                self.obj.call_method1(py, begin, args)
            };
            let got = got.map_err(|e| {
                report(py, "begin", e);
                internal()
            })?;
            let got = got.into_bound(py);
            if let Ok(refusal) = got.cast::<Refusal>() {
                return Err(refusal.get().clone());
            }
            let Ok(admission) = got.cast::<Admission>() else {
                let kind = got
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                let err =
                    PyTypeError::new_err(format!("expected an Admission or a Refusal, got {kind}"));
                report(py, "begin", err);
                return Err(internal());
            };
            let admission = admission.get();
            let call = Call {
                obj: Some(admission.call.clone_ref(py)),
                endings: self.endings.clone(),
                started: Instant::now(),
                request_bytes: None,
                response_bytes: 0,
                span: None,
                tries: 0,
            };
            Ok(Admitted {
                first: to_pick(py, "begin", admission.first.bind(py).clone()),
                call,
                breaker: admission.breaker.clone(),
                outbound: admission.outbound,
                per_try_timeout: admission.per_try_timeout,
            })
        })
    }

    /// The control plane's answer to one server reflection request, or `None` (logged).
    pub fn reflect(&self, request: &[u8]) -> Option<Bytes> {
        Python::attach(|py| {
            let request = PyBytes::new(py, request);
            match self
                .obj
                .call_method1(py, intern!(py, "reflect"), (request,))
            {
                Ok(answer) => match answer.extract::<Vec<u8>>(py) {
                    Ok(bytes) => Some(Bytes::from(bytes)),
                    Err(err) => {
                        report(py, "reflect", err);
                        None
                    }
                },
                Err(err) => {
                    report(py, "reflect", err);
                    None
                }
            }
        })
    }

    /// Tell the control plane a connection changed state.
    pub fn connection_state(&self, address: &str, state: &str) {
        Python::attach(|py| {
            let args = (address, state);
            if let Err(err) = self
                .obj
                .call_method1(py, intern!(py, "connection_state"), args)
            {
                report(py, "connection_state", err);
            }
        });
    }
}

/// One call's retry state in Python (`proxy_sidecar.control.Call`). Dropping it
/// unfinished (the caller went away) counts the call as CANCELLED.
pub struct Call {
    obj: Option<Py<PyAny>>,
    endings: Arc<Endings>,
    started: Instant,
    /// The request's message bytes, counted as the replay reads them from the caller.
    request_bytes: Option<Arc<AtomicU64>>,
    response_bytes: u64,
    /// The call's span, when it is traced: boxed, as most calls are not, and every
    /// call's future carries this struct.
    span: Option<Box<Traced>>,
    tries: u32,
}

/// A traced call's span, and the instance its last try went to.
struct Traced {
    tracer: Arc<Tracer>,
    started: Started,
    upstream: Option<HeaderValue>,
}

impl Call {
    /// Count the request's bytes from `read` (the call's `Replay::received`).
    pub fn count_request(&mut self, read: Arc<AtomicU64>) {
        self.request_bytes = Some(read);
    }

    /// Record the call's span with `tracer` when it ends.
    pub fn trace(&mut self, tracer: Arc<Tracer>, started: Started) {
        self.span = Some(Box::new(Traced {
            tracer,
            started,
            upstream: None,
        }));
    }

    /// A try goes to the instance `mark` names (`None`: the local app).
    pub fn trying(&mut self, mark: Option<&HeaderValue>) {
        self.tries += 1;
        if let Some(span) = self.span.as_mut() {
            span.upstream = mark.cloned();
        }
    }

    /// `n` more bytes of the response went to the caller.
    pub fn responded(&mut self, n: usize) {
        self.response_bytes += n as u64;
    }

    /// The next try's endpoint.
    pub fn pick(&self) -> Result<Pick, Refusal> {
        let Some(obj) = self.obj.as_ref() else {
            return Err(internal());
        };
        Python::attach(|py| match obj.call_method0(py, intern!(py, "pick")) {
            Ok(got) => to_pick(py, "pick", got.into_bound(py)),
            Err(err) => {
                report(py, "pick", err);
                Err(internal())
            }
        })
    }

    /// The try ended with `code` before any response: the pause before a retry, or `None`.
    pub fn failed(&self, code: u32, replayable: bool, elapsed: Duration) -> Option<Duration> {
        let obj = self.obj.as_ref()?;
        let elapsed = elapsed.as_secs_f64();
        Python::attach(|py| {
            let args = (code, replayable, elapsed);
            match obj.call_method1(py, intern!(py, "failed"), args) {
                Ok(pause) => match pause.extract::<Option<f64>>(py) {
                    Ok(pause) => pause.map(|p| Duration::from_secs_f64(p.clamp(0.0, 60.0))),
                    Err(err) => {
                        report(py, "failed", err);
                        None
                    }
                },
                Err(err) => {
                    report(py, "failed", err);
                    None
                }
            }
        })
    }

    /// The call ended with `code`; `latency` is the time the last try took to answer.
    /// Queued for the control plane (see the module's notes).
    pub fn finish(&mut self, code: u32, latency: Option<Duration>) {
        if let Some(span) = self.span.take() {
            let Traced {
                tracer,
                started,
                upstream,
            } = *span;
            let retries = self.tries.saturating_sub(1);
            tracer.end(started, code, self.started.elapsed(), upstream, retries);
        }
        if let Some(obj) = self.obj.take() {
            let elapsed = self.started.elapsed().as_secs_f64();
            let request_bytes = self
                .request_bytes
                .as_ref()
                .map_or(0, |read| read.load(Ordering::Relaxed));
            self.endings.push((
                obj,
                code,
                latency.map(|l| l.as_secs_f64()),
                elapsed,
                request_bytes,
                self.response_bytes,
            ));
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(grpc::CANCELLED, None);
    }
}
