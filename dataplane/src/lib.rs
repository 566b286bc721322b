//! Shoal's sidecar data plane, a Python extension.
//!
//! The sidecar's Python control plane (discovery, balancers, outlier detection, retry
//! decisions) stays in Python; this module does the per-byte work it would do slowly:
//! it accepts HTTP/2 from the app, forwards each gRPC call as raw frames on pooled
//! upstream connections, and asks the control plane where each call goes. It runs on
//! one thread of its own with a single-threaded Tokio runtime, so Python is entered
//! from one thread only and never waits on the data plane.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod breaker;
mod control;
mod grpc;
mod net;
mod pool;
mod proxy;
mod relay;
mod replay;
mod server;
mod stream;

use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::breaker::Breakers;
use crate::control::Control;
use crate::pool::Pool;
use crate::proxy::Plane;

struct Running {
    thread: Option<JoinHandle<()>>,
    handle: Handle,
    stop: watch::Sender<Option<f64>>,
}

/// A data plane listening on one address; `stop()` ends it and its thread.
#[pyclass(frozen, module = "shoal_dataplane._native")]
struct DataPlane {
    plane: Arc<Plane>,
    running: Mutex<Option<Running>>,
}

#[pymethods]
impl DataPlane {
    #[new]
    #[pyo3(signature = (control, *, replay_limit=1 << 20, idle_timeout=300.0))]
    fn new(control: Py<PyAny>, replay_limit: usize, idle_timeout: f64) -> PyResult<Self> {
        if !(idle_timeout > 0.0 && idle_timeout < 1e9) {
            return Err(PyValueError::new_err(
                "idle_timeout must be a positive number of seconds",
            ));
        }
        let control = Arc::new(Control::new(control));
        let observer = {
            let control = control.clone();
            Arc::new(move |address: &str, state: pool::State| {
                control.connection_state(address, state.name())
            })
        };
        let pool = Pool::new(observer, Duration::from_secs_f64(idle_timeout));
        Ok(DataPlane {
            plane: Arc::new(Plane {
                control,
                pool,
                breakers: Breakers::default(),
                local: Mutex::new(None),
                replay_limit,
            }),
            running: Mutex::new(None),
        })
    }

    /// Bind `listen` (`host:port`, port 0 for any) and serve on a new thread; the port.
    fn start(&self, listen: &str) -> PyResult<u16> {
        let mut running = self.running.lock().unwrap();
        if running.is_some() {
            return Err(PyRuntimeError::new_err("the data plane is started already"));
        }
        let address = listen
            .to_socket_addrs()
            .map_err(|e| PyValueError::new_err(format!("cannot listen on {listen}: {e}")))?
            .next()
            .ok_or_else(|| {
                PyValueError::new_err(format!("cannot listen on {listen}: no address"))
            })?;
        let listener = std::net::TcpListener::bind(address)
            .map_err(|e| PyOSError::new_err(format!("cannot listen on {listen}: {e}")))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = watch::channel(None);
        let plane = self.plane.clone();
        let thread = std::thread::Builder::new()
            .name("shoal-dataplane".into())
            .spawn(move || {
                // Attach once and detach: the thread keeps its Python thread state, so each call
                // into the control plane only takes the GIL instead of creating and destroying
                // a thread state (which costs more than the control plane's work).
                Python::attach(|py| {
                    py.detach(|| {
                        runtime.block_on(async move {
                            match TcpListener::from_std(listener) {
                                Ok(listener) => server::serve(plane, listener, stopped).await,
                                Err(err) => eprintln!("shoal data plane: {err}"),
                            }
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
        });
        Ok(port)
    }

    /// Where the sidecar's own services (health, reflection) are served.
    fn set_local(&self, address: String) {
        *self.plane.local.lock().unwrap() = Some(address);
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

    /// The circuit breaker of `key`: (in flight, pending, rejected so far).
    fn breaker(&self, key: &str) -> (usize, usize, u64) {
        self.plane.breakers.stats(key)
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
            running.stop.send_replace(Some(grace.max(0.0)));
            running.thread.take()
        };
        if let Some(thread) = thread {
            py.detach(|| {
                let _ = thread.join();
            });
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataPlane>()?;
    Ok(())
}
