//! Giving memory back after a burst.
//!
//! glibc's allocator keeps freed memory in its per-thread arenas, so a proxy that held tens
//! of thousands of connections during a flood stays at its peak RSS long after they are
//! gone (measured: a waypoint at 268 MB and a ztunnel at 1.6 GB with no connection left).
//! [`spawn_trim`] asks the allocator every period to return the free pages of every arena
//! (`malloc_trim(0)`), which costs a walk of the free lists, a few milliseconds at most, and
//! nothing while there is nothing to return. A steady-state proxy reuses what it frees
//! within a period, so the trim rarely takes memory it will fault back in.
//!
//! Chosen over swapping the allocator (jemalloc, mimalloc) because it needs no C dependency
//! and leaves idle RSS exactly where it was.

use std::time::Duration;

/// How often freed memory is returned by default.
pub const DEFAULT_TRIM_PERIOD: Duration = Duration::from_secs(10);

/// Spawns a task on the current runtime that returns freed memory to the OS every `period`.
pub fn spawn_trim(period: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The walk is short, but it takes the arenas' locks: off the async workers.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

/// Returns the allocator's free pages to the OS; true if any were returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: malloc_trim only reorganises the allocator's own free lists; it takes no
    // pointer from us and is thread-safe (it locks each arena as it walks it).
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries return memory on their own (musl) or have no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_burst_is_returned() {
        fn rss_kib() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse().ok())
                })
                .unwrap_or(0)
        }
        // Many small blocks from another thread (its own arena), touched, then freed but for
        // one in 64 that lives on (a few connections outlive a flood): the heap cannot
        // shrink from its top, only a trim returns the free pages between the survivors.
        let (peak, survivors) = std::thread::spawn(|| {
            let mut blocks: Vec<Vec<u8>> = (0..64 * 1024).map(|i| vec![i as u8; 1024]).collect();
            let peak = rss_kib();
            let survivors: Vec<Vec<u8>> =
                blocks.iter_mut().step_by(64).map(std::mem::take).collect();
            drop(blocks);
            (peak, survivors)
        })
        .join()
        .expect("the burst thread");
        let before = rss_kib();
        assert!(trim(), "a trim after a freed burst returns memory");
        let after = rss_kib();
        assert!(
            after + 32 * 1024 < before,
            "about 63 MiB freed: RSS {peak} KiB at the peak, {before} KiB before the trim and \
             still {after} KiB after it"
        );
        drop(survivors);
    }
}
