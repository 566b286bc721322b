//! The allocator, and the one thing the data plane asks of it beyond `alloc`/`dealloc`.
//!
//! mimalloc gives freed pages back to the OS only after a delay (`MIMALLOC_PURGE_DELAY`,
//! 1 s, as `shoal_dataplane` sets it). With no delay, a large message faults in fresh
//! pages for every buffer its frames pass through: 15 % of the sidecar's CPU samples
//! at 1 MiB (perf: `exc_page_fault` under `recv`). But delayed purges are carried out
//! only when the allocator is next used, so an idle sidecar would keep what a burst of
//! connections left behind for good: `collect_forever` makes sure it is asked.

use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often the allocator carries out purges that are due; a wake-up a second costs
/// nothing an idle sidecar's CPU shows.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// Carry out the purges that are due, on this thread's heap, without forcing any.
#[allow(unsafe_code)]
fn collect() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any
    // time; with `force` false it only frees what mimalloc itself holds as free.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// Collect once a second, on the data plane's thread (where its memory is freed).
pub async fn collect_forever() {
    let mut every = tokio::time::interval(COLLECT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        collect();
    }
}
