//! Weighted backend choice.

use super::*;

fn backends(weights: &[u32]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| Backend {
            namespace: "shop".into(),
            name: format!("b{i}"),
            port: 80,
            weight,
            filters: Vec::new(),
        })
        .collect()
}

fn index_of(bs: &[Backend], random: u64) -> Option<usize> {
    choose_backend(bs, random).and_then(|b| bs.iter().position(|x| std::ptr::eq(x, b)))
}

/// The acceptance criterion: a 90/10 split measured over 2,000 requests lands within the
/// binomial 99.9 % bound, for each of several seeds.
#[test]
fn ninety_ten_split_is_within_the_binomial_bound() {
    const DRAWS: u64 = 2_000;
    const P: f64 = 0.9;
    // Two-sided 99.9 %: z = 3.2905.
    let sd = (DRAWS as f64 * P * (1.0 - P)).sqrt();
    let mean = DRAWS as f64 * P;
    let (lo, hi) = (mean - 3.2905 * sd, mean + 3.2905 * sd);
    let bs = backends(&[90, 10]);
    for seed in 1..=10u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let heavy = (0..DRAWS)
            .filter(|_| index_of(&bs, rng.u64(..)) == Some(0))
            .count() as f64;
        assert!(
            (lo..=hi).contains(&heavy),
            "seed {seed}: {heavy} of {DRAWS} outside [{lo:.1}, {hi:.1}]"
        );
    }
}

/// Each backend owns exactly its share of the `u64` range.
#[test]
fn shares_are_exact_over_evenly_spaced_draws() {
    let bs = backends(&[3, 0, 5, 2]);
    let n = 10_000u64;
    let mut counts = [0u64; 4];
    for i in 0..n {
        // i / n of the way through the u64 range, rounded up so that boundaries land exactly.
        let random =
            u64::try_from((u128::from(i) << 64).div_ceil(u128::from(n))).expect("below 2^64");
        let k = index_of(&bs, random).expect("a backend");
        counts[k] += 1;
    }
    assert_eq!(counts, [3_000, 0, 5_000, 2_000]);
}

#[test]
fn zero_weights_are_never_chosen() {
    let bs = backends(&[0, 1, 0]);
    for r in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
        assert_eq!(index_of(&bs, r), Some(1), "{r}");
    }
    let bs = backends(&[7, 0]);
    assert_eq!(index_of(&bs, u64::MAX), Some(0), "the top of the range");
}

/// The spec: all weights 0 (or no backends) means 500, which `None` signals.
#[test]
fn all_zero_or_empty_chooses_nothing() {
    assert_eq!(index_of(&backends(&[0, 0]), 12345), None);
    assert_eq!(index_of(&backends(&[]), 12345), None);
}

/// A single backend with positive weight gets everything; the largest weights do not overflow.
#[test]
fn single_and_maximal_weights() {
    let one = backends(&[1]);
    assert!(
        [0, 1, u64::MAX]
            .iter()
            .all(|&r| index_of(&one, r) == Some(0))
    );
    let max = backends(&[1_000_000; 16]);
    assert_eq!(index_of(&max, u64::MAX), Some(15));
    assert_eq!(index_of(&max, 0), Some(0));
}

/// Weights come from the config (default 1) and split traffic as configured.
#[test]
fn config_weights_reach_the_router() {
    let r = router(&[http_route(
        "split",
        "[{ backendRefs: [{ name: v1, port: 80, weight: 90 }, { name: v2, port: 80, weight: 10 }, \
         { name: v3, port: 80 }, { name: web, port: 80, weight: 0 }] }]",
    )]);
    let p = parts("GET", "/", &[]);
    let s = select(&r, WEB, &Request::from_parts(&p, None)).expect("route");
    let weights: Vec<(&str, u32)> = s
        .rule
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.weight))
        .collect();
    assert_eq!(weights, [("v1", 90), ("v2", 10), ("v3", 1), ("web", 0)]);
}
