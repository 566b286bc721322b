//! The calls into the Python control plane, which decides where each call goes.
//!
//! Each forwarded call costs two short calls into Python (begin, which also picks the
//! first endpoint, and finish; one more per retry), made on the data plane's one
//! thread. Python never blocks here: every decision is synchronous and in memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::grpc;

/// The control plane object (`proxy_sidecar.control.Control`).
pub struct Control {
    obj: Py<PyAny>,
    /// The method paths seen, as Python strings: made (and hashed) once, not per call.
    paths: Mutex<HashMap<Box<str>, Py<PyString>>>,
}

/// Paths kept as Python strings at most: the control plane caches as many routes.
const MAX_PATHS: usize = 4096;

/// What `begin` decided for a call that may go ahead.
pub struct Admitted {
    pub call: Call,
    pub breaker: String,
    pub max_in_flight: usize,
    pub max_pending: usize,
    pub outbound: bool,
    /// The first try's endpoint, picked with the admission to save a call into Python.
    pub first: Result<Pick, Refusal>,
}

/// A status for the caller: the call can go nowhere.
pub struct Refusal {
    pub code: u32,
    pub message: String,
}

fn refusal(py: Python<'_>, err: PyErr) -> Refusal {
    // A bug in the control plane: the caller gets INTERNAL, the log the traceback.
    err.print(py);
    Refusal {
        code: grpc::INTERNAL,
        message: "shoal: the sidecar failed to route the call".into(),
    }
}

impl Control {
    pub fn new(obj: Py<PyAny>) -> Self {
        Control {
            obj,
            paths: Mutex::new(HashMap::new()),
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

    pub fn begin(
        &self,
        path: &str,
        target: Option<&str>,
        inbound: bool,
        metadata: Vec<(String, String)>,
        remaining: Option<f64>,
    ) -> Result<Admitted, Refusal> {
        Python::attach(|py| {
            let path = self.path(py, path);
            // Usually no metadata to route on: the empty tuple is a shared object.
            let got = if metadata.is_empty() {
                let metadata = PyTuple::empty(py);
                let args = (path, target, inbound, metadata, remaining);
                self.obj.call_method1(py, intern!(py, "begin"), args)
            } else {
                let args = (path, target, inbound, metadata, remaining);
                self.obj.call_method1(py, intern!(py, "begin"), args)
            }
            .map_err(|e| refusal(py, e))?;
            let tuple = got
                .bind(py)
                .cast::<PyTuple>()
                .map_err(|e| refusal(py, e.into()))?;
            if tuple.len() == 2 {
                let (code, message): (u32, String) = tuple.extract().map_err(|e| refusal(py, e))?;
                return Err(Refusal { code, message });
            }
            let (call, breaker, max_in_flight, max_pending, outbound, first): Admission =
                tuple.extract().map_err(|e| refusal(py, e))?;
            let first = to_pick(py, first.bind(py));
            Ok(Admitted {
                call: Call { obj: Some(call) },
                breaker,
                max_in_flight,
                max_pending,
                outbound,
                first,
            })
        })
    }

    /// Tell the control plane a connection changed state.
    pub fn connection_state(&self, address: &str, state: &str) {
        Python::attach(|py| {
            if let Err(err) =
                self.obj
                    .call_method1(py, intern!(py, "connection_state"), (address, state))
            {
                err.print(py);
            }
        });
    }
}

type Admission = (Py<PyAny>, String, usize, usize, bool, Py<PyAny>);

/// A pick's answer: `(address, instance_id, timeout)` or a `(code, message)` refusal.
fn to_pick(py: Python<'_>, got: &Bound<'_, PyAny>) -> Result<Pick, Refusal> {
    let tuple = got.cast::<PyTuple>().map_err(|e| refusal(py, e.into()))?;
    if tuple.len() == 2 {
        let (code, message): (u32, String) = tuple.extract().map_err(|e| refusal(py, e))?;
        return Err(Refusal { code, message });
    }
    let (address, instance, timeout): (String, String, Option<f64>) =
        tuple.extract().map_err(|e| refusal(py, e))?;
    let timeout = timeout.map(|t| Duration::from_secs_f64(t.clamp(0.0, 1e9)));
    Ok(Pick {
        address,
        instance,
        timeout,
    })
}

/// The endpoint chosen for one try.
pub struct Pick {
    pub address: String,
    pub instance: String,
    pub timeout: Option<Duration>,
}

/// One call's retry state in Python (`proxy_sidecar.control.Call`). Dropping it
/// unfinished (the caller went away) counts the call as CANCELLED.
pub struct Call {
    obj: Option<Py<PyAny>>,
}

impl Call {
    pub fn pick(&self) -> Result<Pick, Refusal> {
        let obj = self
            .obj
            .as_ref()
            .expect("a call is picked for only until it finishes");
        Python::attach(|py| {
            let got = obj
                .call_method0(py, intern!(py, "pick"))
                .map_err(|e| refusal(py, e))?;
            to_pick(py, got.bind(py))
        })
    }

    /// The try ended with `code` before any response: the pause before a retry, or `None`.
    pub fn failed(&self, code: u32, replayable: bool, elapsed: Duration) -> Option<Duration> {
        let obj = self.obj.as_ref()?;
        let elapsed = elapsed.as_secs_f64();
        Python::attach(|py| {
            match obj.call_method1(py, intern!(py, "failed"), (code, replayable, elapsed)) {
                Ok(pause) => pause
                    .extract::<Option<f64>>(py)
                    .ok()
                    .flatten()
                    .map(|p| Duration::from_secs_f64(p.clamp(0.0, 60.0))),
                Err(err) => {
                    err.print(py);
                    None
                }
            }
        })
    }

    /// The call ended with `code`; `latency` is the time the last try took to answer.
    pub fn finish(&mut self, code: u32, latency: Option<Duration>) {
        if let Some(obj) = self.obj.take() {
            // `obj` moves in to be released with the GIL held: dropped after the
            // closure, its reference would go to pyo3's deferred pool (a lock, and a
            // sweep on the next attach).
            Python::attach(move |py| {
                let seconds = latency.map(|l| l.as_secs_f64());
                if let Err(err) = obj.call_method1(py, intern!(py, "finish"), (code, seconds)) {
                    err.print(py);
                }
                drop(obj);
            });
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(grpc::CANCELLED, None);
    }
}
