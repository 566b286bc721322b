//! Circuit breakers: per upstream cluster, at most `max_in_flight` calls running and
//! `max_pending` waiting for a slot; beyond that a call fails fast.
//!
//! The slots are a fair semaphore, so a freed slot goes to the oldest waiting call.
//! Every place a call takes is held by a guard, so a call whose future is dropped (the
//! caller reset its stream, went away or ran out of time) gives back its slot and its
//! place in the queue: the counts are always what is really running and waiting.
//!
//! A breaker belongs to the Python control plane's cluster that made it
//! (`shoal_dataplane.Breaker`), so it lives exactly as long as that cluster.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Core {
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    max_pending: usize,
    pending: AtomicUsize,
    rejected: AtomicU64,
}

/// Why a call got no slot, with the counts to tell the caller.
#[derive(Debug)]
pub struct Rejected {
    pub in_flight: usize,
    pub pending: usize,
}

/// A running call's slot; dropping it frees the slot.
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

/// A waiting call's place in the queue; dropping it (however the wait ends) gives it back.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Core {
    pub fn new(max_in_flight: usize, max_pending: usize) -> Self {
        Core {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            max_pending,
            pending: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.slots.available_permits()
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// A slot, waiting until `deadline` at most as one of the pending calls.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<Permit, Rejected> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(Permit(permit));
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(self.reject());
        }
        // Take a place first, then check it was free: two callers racing for the last
        // place cannot both get it.
        let place = {
            self.pending.fetch_add(1, Ordering::AcqRel);
            Waiting(&self.pending)
        };
        if self.pending() > self.max_pending {
            drop(place);
            return Err(self.reject());
        }
        let wait = self.slots.clone().acquire_owned();
        let got = match deadline {
            None => Some(wait.await),
            Some(d) => tokio::time::timeout_at(d.into(), wait).await.ok(),
        };
        drop(place);
        match got {
            Some(Ok(permit)) => Ok(Permit(permit)),
            _ => Err(self.reject()),
        }
    }

    fn reject(&self) -> Rejected {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        Rejected {
            in_flight: self.in_flight(),
            pending: self.pending(),
        }
    }
}

/// The circuit breaker of one cluster, made and owned by the Python control plane.
#[pyclass(frozen, module = "shoal_dataplane._native")]
pub struct Breaker {
    pub core: Arc<Core>,
}

#[pymethods]
impl Breaker {
    #[new]
    #[pyo3(signature = (*, max_in_flight, max_pending))]
    fn new(max_in_flight: usize, max_pending: usize) -> PyResult<Self> {
        if max_in_flight == 0 || max_in_flight > Semaphore::MAX_PERMITS {
            return Err(PyValueError::new_err("max_in_flight must be at least 1"));
        }
        Ok(Breaker {
            core: Arc::new(Core::new(max_in_flight, max_pending)),
        })
    }

    /// Calls holding a slot now.
    #[getter]
    fn in_flight(&self) -> usize {
        self.core.in_flight()
    }

    /// Calls waiting for a slot now.
    #[getter]
    fn pending(&self) -> usize {
        self.core.pending()
    }

    /// Calls refused so far.
    #[getter]
    fn rejected(&self) -> u64 {
        self.core.rejected.load(Ordering::Relaxed)
    }

    #[getter]
    fn max_in_flight(&self) -> usize {
        self.core.max_in_flight
    }

    #[getter]
    fn max_pending(&self) -> usize {
        self.core.max_pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn counts(b: &Core) -> (usize, usize, u64) {
        (
            b.in_flight(),
            b.pending(),
            b.rejected.load(Ordering::Relaxed),
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn full_breaker_queues_then_rejects() {
        let b = Arc::new(Core::new(1, 1));
        let first = b.acquire(None).await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(None).await.is_ok() })
        };
        tokio::task::yield_now().await;
        assert_eq!(counts(&b), (1, 1, 0));
        // A third call finds the one pending place taken.
        assert!(b.acquire(None).await.is_err());
        assert_eq!(counts(&b), (1, 1, 1));
        // One with no time left is rejected at once.
        assert!(b.acquire(Some(Instant::now())).await.is_err());
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!(counts(&b), (0, 0, 2));
        let held = b.acquire(None).await.unwrap();
        let late = Instant::now() + Duration::from_millis(20);
        assert!(b.acquire(Some(late)).await.is_err());
        assert_eq!(counts(&b), (1, 0, 3));
        drop(held);
        assert_eq!(counts(&b), (0, 0, 3));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn dropped_waiters_give_back_their_places() {
        // Two slots, thirty callers that give up: every place taken comes back, and the
        // counts equal what is really waiting after every step.
        let b = Arc::new(Core::new(2, 30));
        let held = [
            b.acquire(None).await.unwrap(),
            b.acquire(None).await.unwrap(),
        ];
        let mut waiters = Vec::new();
        for i in 0..30 {
            let waiter = b.clone();
            waiters.push(tokio::spawn(
                async move { waiter.acquire(None).await.is_ok() },
            ));
            tokio::task::yield_now().await;
            assert_eq!(counts(&b), (2, i + 1, 0));
        }
        for (i, waiter) in waiters.iter().enumerate() {
            // As when the caller resets its stream: the call's future is dropped mid-wait.
            waiter.abort();
            tokio::task::yield_now().await;
            assert_eq!(counts(&b), (2, 29 - i, 0));
        }
        // Callers whose deadline passes while they wait give their places back too.
        let soon = Instant::now() + Duration::from_millis(500);
        let timed: Vec<_> = (0..5)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.acquire(Some(soon)).await.is_ok() })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(counts(&b), (2, 5, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        for t in timed {
            assert!(!t.await.unwrap());
        }
        assert_eq!(counts(&b), (2, 0, 5));
        drop(held);
        assert_eq!(counts(&b), (0, 0, 5));
        // The breaker is whole again: both slots and every queue place are usable.
        let again = [
            b.acquire(None).await.unwrap(),
            b.acquire(None).await.unwrap(),
        ];
        assert_eq!(counts(&b), (2, 0, 5));
        drop(again);
    }
}
