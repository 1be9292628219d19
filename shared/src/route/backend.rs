//! Weighted backend choice, with the randomness supplied by the caller.

use super::Backend;

/// Picks a backend with probability `weight / sum of weights`, from a uniformly random
/// `random` (any `u64`).
///
/// Backends of weight 0 are never picked. Returns `None` when there is no backend or all
/// weights are 0: the Gateway API then requires a 500 for HTTP (`UNAVAILABLE` for gRPC).
///
/// `random` is scaled onto the total weight (Lemire's multiply-shift) rather than reduced
/// modulo it: each backend owns a contiguous slice of the `u64` range matching its share
/// to within one part in 2^40, even for the largest total (16 backends of 1,000,000).
pub fn choose_backend(backends: &[Backend], random: u64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    // (random * total) >> 64 is uniform over 0..total and always below total.
    let scaled = (u128::from(random) * u128::from(total)) >> 64;
    let mut point = u64::try_from(scaled).unwrap_or(total - 1);
    for b in backends {
        let w = u64::from(b.weight);
        if point < w {
            return Some(b);
        }
        point -= w;
    }
    // Unreachable: point < total = sum of weights.
    backends.iter().rev().find(|b| b.weight > 0)
}
