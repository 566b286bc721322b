//! Circuit breakers: per upstream cluster, at most `max_in_flight` calls running and
//! `max_pending` waiting for a slot; beyond that a call fails fast.
//!
//! The slots are a fair semaphore, so a freed slot goes to the oldest waiting call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Breaker {
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    max_pending: usize,
    pending: AtomicUsize,
    rejected: AtomicU64,
}

/// Why a call got no slot, with the counts to tell the caller.
pub struct Rejected {
    pub in_flight: usize,
    pub pending: usize,
}

impl Breaker {
    fn new(max_in_flight: usize, max_pending: usize) -> Self {
        Breaker {
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

    /// A slot, waiting until `deadline` at most as one of the pending calls.
    pub async fn acquire(
        &self,
        deadline: Option<Instant>,
    ) -> Result<OwnedSemaphorePermit, Rejected> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let expired = deadline.is_some_and(|d| d <= Instant::now());
        if expired || self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            if !expired {
                self.pending.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(self.reject());
        }
        let wait = self.slots.clone().acquire_owned();
        let got = match deadline {
            None => Some(wait.await),
            Some(d) => tokio::time::timeout_at(d.into(), wait).await.ok(),
        };
        self.pending.fetch_sub(1, Ordering::AcqRel);
        match got {
            Some(Ok(permit)) => Ok(permit),
            _ => Err(self.reject()),
        }
    }

    fn reject(&self) -> Rejected {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        Rejected {
            in_flight: self.in_flight(),
            pending: self.pending.load(Ordering::Relaxed),
        }
    }

    pub fn stats(&self) -> (usize, usize, u64) {
        (
            self.in_flight(),
            self.pending.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
        )
    }
}

/// The breakers by cluster key, created with the limits of the first call to a cluster.
#[derive(Default)]
pub struct Breakers {
    by_key: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    pub fn get(&self, key: &str, max_in_flight: usize, max_pending: usize) -> Arc<Breaker> {
        let mut map = self.by_key.lock().unwrap();
        if let Some(found) = map.get(key) {
            return found.clone();
        }
        let breaker = Arc::new(Breaker::new(max_in_flight, max_pending));
        map.insert(key.to_owned(), breaker.clone());
        breaker
    }

    pub fn stats(&self, key: &str) -> (usize, usize, u64) {
        self.by_key
            .lock()
            .unwrap()
            .get(key)
            .map_or((0, 0, 0), |b| b.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn full_breaker_queues_then_rejects() {
        let b = Arc::new(Breaker::new(1, 1));
        let first = b.acquire(None).await.ok().unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(None).await.is_ok() })
        };
        tokio::task::yield_now().await;
        assert_eq!(b.stats().1, 1);
        // A third call finds the one pending place taken.
        assert!(b.acquire(None).await.is_err());
        // One with no time left is rejected at once.
        assert!(b.acquire(Some(Instant::now())).await.is_err());
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!(b.stats(), (0, 0, 2));
        let held = b.acquire(None).await.ok().unwrap();
        let late = Instant::now() + Duration::from_millis(20);
        assert!(b.acquire(Some(late)).await.is_err());
        drop(held);
    }
}
