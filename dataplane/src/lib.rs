//! Shoal's sidecar data plane, a Python extension.
//!
//! The sidecar's Python control plane (discovery, balancers, outlier detection, retry
//! decisions) stays in Python; this module does the per-byte work it would do slowly:
//! it accepts HTTP/2 from the app, forwards each gRPC call as raw frames on pooled
//! upstream connections, and asks the control plane where each call goes. It runs on
//! one thread of its own with a single-threaded Tokio runtime, so Python is entered
//! from one thread only and never waits on the data plane.

// The one exception is one call into the allocator (`alloc`), allowed there by name.
#![deny(unsafe_code)]

mod alloc;
mod breaker;
mod client;
mod control;
mod grpc;
mod net;
mod own;
mod pool;
mod proxy;
mod relay;
mod replay;
mod server;
mod stream;
mod tls;
mod trace;
mod verify;

use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::control::Control;
use crate::pool::Pool;
use crate::proxy::{Plane, Role};
use crate::server::{Limits, Listener};
use crate::tls::{Identity, Tls};
use crate::trace::Tracer;

struct Running {
    thread: Option<JoinHandle<()>>,
    handle: Handle,
    stop: watch::Sender<Option<f64>>,
    stopped: bool,
}

/// A data plane serving the sidecar's listeners; `stop()` ends it and its thread.
#[pyclass(frozen, module = "shoal_dataplane._native")]
struct DataPlane {
    plane: Arc<Plane>,
    limits: Limits,
    running: Mutex<Option<Running>>,
    /// Whether the mesh-facing listener and the pool speak mutual TLS.
    secure: bool,
    tls: Arc<Tls>,
}

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if !(value > 0.0 && value < 1e9) {
        return Err(PyValueError::new_err(format!(
            "{name} must be a positive number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

fn bind(listen: &str) -> PyResult<std::net::TcpListener> {
    let address = listen
        .to_socket_addrs()
        .map_err(|e| PyValueError::new_err(format!("cannot listen on {listen}: {e}")))?
        .next()
        .ok_or_else(|| PyValueError::new_err(format!("cannot listen on {listen}: no address")))?;
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| PyOSError::new_err(format!("cannot listen on {listen}: {e}")))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[pymethods]
impl DataPlane {
    #[new]
    #[pyo3(signature = (
        control, *, replay_limit=1 << 20, idle_timeout=300.0, max_connections=1024,
        max_streams=1000, connection_idle_timeout=600.0, secure=false,
        trace_collector=None, trace_sample=0.01,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        control: Py<PyAny>,
        replay_limit: usize,
        idle_timeout: f64,
        max_connections: usize,
        max_streams: u32,
        connection_idle_timeout: f64,
        secure: bool,
        trace_collector: Option<String>,
        trace_sample: f64,
    ) -> PyResult<Self> {
        if !(0.0..=1.0).contains(&trace_sample) {
            return Err(PyValueError::new_err(
                "trace_sample must be between 0 and 1",
            ));
        }
        let idle_timeout = seconds("idle_timeout", idle_timeout)?;
        let connection_idle_timeout = seconds("connection_idle_timeout", connection_idle_timeout)?;
        if max_connections == 0 || max_streams == 0 {
            return Err(PyValueError::new_err(
                "max_connections and max_streams must be at least 1",
            ));
        }
        let control = Arc::new(Control::new(control));
        let observer = {
            let control = control.clone();
            Arc::new(move |address: &str, state: pool::State| {
                control.connection_state(address, state.name())
            })
        };
        let tls = Arc::new(Tls::default());
        let pool = Pool::new(observer, idle_timeout, secure.then(|| tls.clone()));
        let tracer = trace_collector.map(|collector| {
            // The collector is no mesh member: it is reached in plaintext.
            pool.expect_peer(&collector, None);
            Arc::new(Tracer::new(collector, trace_sample))
        });
        Ok(DataPlane {
            plane: Arc::new(Plane {
                control,
                pool,
                serving: watch::Sender::new(true),
                replay_limit,
                tracer,
            }),
            limits: Limits {
                max_connections,
                max_streams,
                idle_timeout: connection_idle_timeout,
            },
            running: Mutex::new(None),
            secure,
            tls,
        })
    }

    /// Bind the app-facing `outbound` listener and, for a sidecar with an app, the
    /// mesh-facing `inbound` one (`host:port`, port 0 for any), and serve them on a new
    /// thread; the ports bound.
    #[pyo3(signature = (outbound, inbound=None))]
    fn start(&self, outbound: &str, inbound: Option<&str>) -> PyResult<(u16, Option<u16>)> {
        let mut running = self.running.lock().unwrap();
        if running.is_some() {
            return Err(PyRuntimeError::new_err("the data plane is started already"));
        }
        if self.secure && !self.tls.ready() {
            return Err(PyRuntimeError::new_err(
                "a secure data plane needs a mesh identity or a trust bundle: \
                 call set_identity() or set_trust_bundle() first",
            ));
        }
        let mut bound = vec![(bind(outbound)?, Role::Outbound)];
        if let Some(inbound) = inbound {
            bound.push((bind(inbound)?, Role::Inbound));
        }
        let ports: Vec<u16> = bound
            .iter()
            .map(|(l, _)| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = watch::channel(None);
        let plane = self.plane.clone();
        let limits = self.limits;
        let tls = self.secure.then(|| self.tls.clone());
        let thread = std::thread::Builder::new()
            .name("shoal-dataplane".into())
            .spawn(move || {
                // Attach once and detach: the thread keeps its Python thread state, so each call
                // into the control plane only takes the GIL instead of creating and destroying
                // a thread state (which costs more than the control plane's work).
                Python::attach(|py| {
                    py.detach(|| {
                        runtime.block_on(async move {
                            let mut listeners = Vec::new();
                            for (socket, role) in bound {
                                match TcpListener::from_std(socket) {
                                    Ok(socket) => listeners.push(Listener {
                                        socket,
                                        role,
                                        limits,
                                        // The app talks to its sidecar on loopback, in plaintext.
                                        tls: tls.clone().filter(|_| role == Role::Inbound),
                                    }),
                                    Err(err) => {
                                        log::error!("{} listener failed: {err}", role.name())
                                    }
                                }
                            }
                            let endings = plane.control.endings.clone();
                            let flusher = tokio::spawn(endings.clone().flush_forever());
                            let collector = tokio::spawn(alloc::collect_forever());
                            let tracer = plane.tracer.clone();
                            let pool = plane.pool.clone();
                            let exporter = tracer
                                .clone()
                                .map(|t| tokio::spawn(t.export_forever(pool.clone())));
                            server::serve(plane, listeners, stopped).await;
                            flusher.abort();
                            collector.abort();
                            if let (Some(exporter), Some(tracer)) = (exporter, tracer) {
                                exporter.abort();
                                // The last spans, within a bound: the collector may be gone.
                                let last = tracer.flush(&pool);
                                let _ = tokio::time::timeout(Duration::from_secs(2), last).await;
                            }
                            // The calls that ended during the drain are told too.
                            Python::attach(|py| endings.deliver(py));
                        });
                        // Dropping the runtime ends every task still running: calls past the grace.
                        drop(runtime);
                    })
                });
            })?;
        *running = Some(Running {
            thread: Some(thread),
            handle,
            stop,
            stopped: false,
        });
        Ok((ports[0], ports.get(1).copied()))
    }

    /// Whether the data plane's thread is serving: started, not stopped, not dead.
    fn alive(&self) -> bool {
        let running = self.running.lock().unwrap();
        running
            .as_ref()
            .is_some_and(|r| !r.stopped && r.thread.as_ref().is_some_and(|t| !t.is_finished()))
    }

    /// What the sidecar's own grpc.health.v1 says of it: SERVING, or NOT_SERVING.
    fn set_serving(&self, serving: bool) {
        self.plane.serving.send_replace(serving);
    }

    /// A gRPC call of the control plane's own (to the registry, to its app), made on the
    /// data plane's connections: `message` is the one request message; `on_message(bytes)`
    /// gets each response message and then `done(code, message)` the status, both on the
    /// data plane's thread (they must be quick: hand over to the event loop).
    #[pyo3(signature = (address, path, message, timeout, on_message, done))]
    fn call(
        &self,
        address: String,
        path: String,
        message: &[u8],
        timeout: Option<f64>,
        on_message: Py<PyAny>,
        done: Py<PyAny>,
    ) -> PyResult<OwnCall> {
        let timeout = timeout.map(|t| seconds("timeout", t)).transpose()?;
        let running = self.running.lock().unwrap();
        let Some(running) = running.as_ref().filter(|r| !r.stopped) else {
            return Err(PyRuntimeError::new_err("the data plane is not running"));
        };
        let pool = self.plane.pool.clone();
        let message = Bytes::copy_from_slice(message);
        let task = running.handle.spawn(async move {
            let deliver = |message: Bytes| {
                Python::attach(|py| {
                    if let Err(err) = on_message.call1(py, (PyBytes::new(py, &message),)) {
                        log::error!("a call's message handler failed: {err}");
                    }
                })
            };
            let status = client::call(&pool, &address, &path, message, timeout, deliver).await;
            Python::attach(|py| {
                if let Err(err) = done.call1(py, (status.code, status.message)) {
                    log::error!("a call's end handler failed: {err}");
                }
                drop(done);
                drop(on_message);
            });
        });
        Ok(OwnCall {
            task: Mutex::new(Some(task.abort_handle())),
        })
    }

    /// Connect to `address` ahead of its first call.
    fn warm(&self, address: String) {
        if let Some(running) = self.running.lock().unwrap().as_ref() {
            let pool = self.plane.pool.clone();
            running.handle.spawn(async move { pool.warm(&address) });
        }
    }

    /// `address` left the mesh: close its connection once its calls are done.
    fn forget(&self, address: &str) {
        self.plane.pool.forget(address);
    }

    /// Install (or replace) the mesh identity: the leaf and its issuers, the leaf's key
    /// and the trust bundle, as PEM. New connections use it; open ones keep theirs.
    fn set_identity(&self, chain_pem: &[u8], key_pem: &[u8], bundle_pem: &[u8]) -> PyResult<()> {
        let identity = Identity::from_pem(chain_pem, key_pem, bundle_pem)
            .map_err(|why| PyValueError::new_err(format!("bad mesh identity: {why}")))?;
        self.tls.install(identity);
        Ok(())
    }

    /// Trust the roots of `bundle_pem` for connections made before `set_identity`: they
    /// present no certificate (the one call that asks for it), but check the server's.
    fn set_trust_bundle(&self, bundle_pem: &[u8]) -> PyResult<()> {
        self.tls
            .trust(bundle_pem)
            .map_err(|why| PyValueError::new_err(format!("bad trust bundle: {why}")))
    }

    /// In secure mode, how `address` is reached: over mutual TLS to a server that proves
    /// it is `peer` (a SPIFFE ID), or in plaintext (`None`).
    #[pyo3(signature = (address, peer))]
    fn expect_peer(&self, address: &str, peer: Option<&str>) -> PyResult<()> {
        if let Some(peer) = peer.filter(|p| !verify::is_spiffe(p)) {
            return Err(PyValueError::new_err(format!(
                "{peer:?} is not a SPIFFE ID (spiffe://DOMAIN/PATH)"
            )));
        }
        self.plane.pool.expect_peer(address, peer);
        Ok(())
    }

    /// The name this sidecar's spans carry (OpenTelemetry's `service.name`).
    fn set_trace_service(&self, name: String) {
        if let Some(tracer) = &self.plane.tracer {
            tracer.set_service(name);
        }
    }

    /// Spans exported to the collector and spans dropped, `(0, 0)` without tracing.
    fn trace_counts(&self) -> (u64, u64) {
        self.plane.tracer.as_ref().map_or((0, 0), |t| t.counts())
    }

    /// TLS handshakes completed, both directions.
    fn handshakes(&self) -> u64 {
        self.tls.handshakes()
    }

    /// TLS handshakes that failed, both directions.
    fn handshake_failures(&self) -> u64 {
        self.tls.failures()
    }

    /// Open upstream connections.
    fn connections(&self) -> usize {
        self.plane.pool.open_connections()
    }

    /// Stop accepting calls, let running ones finish for `grace` seconds, then end them.
    /// A second call, with a shorter grace, cuts the first one's short.
    fn stop(&self, py: Python<'_>, grace: f64) {
        let thread = {
            let mut running = self.running.lock().unwrap();
            let Some(running) = running.as_mut() else {
                return;
            };
            running.stopped = true;
            running.stop.send_replace(Some(grace.max(0.0)));
            running.thread.take()
        };
        if let Some(thread) = thread {
            py.detach(|| {
                if thread.join().is_err() {
                    log::error!("the data plane thread panicked");
                }
            });
        }
    }
}

/// A call the control plane made on the data plane; `cancel()` ends it (its `done`
/// handler is then not called).
#[pyclass(frozen, module = "shoal_dataplane._native")]
struct OwnCall {
    task: Mutex<Option<AbortHandle>>,
}

#[pymethods]
impl OwnCall {
    fn cancel(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust logs become records of Python's `shoal_dataplane` loggers. Levels are asked of
    // Python each time (nothing logs per call), so a change of level applies at once.
    let logger = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::Loggers)?
        .filter(log::LevelFilter::Debug)
        .set_prefix("shoal_dataplane");
    // Another copy of this module in the process installed its logger already: keep it.
    let _ = logger.install();
    m.add_class::<DataPlane>()?;
    m.add_class::<OwnCall>()?;
    m.add_class::<breaker::Breaker>()?;
    m.add_class::<control::Admission>()?;
    m.add_class::<control::Target>()?;
    m.add_class::<control::Refusal>()?;
    Ok(())
}
