use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::*;

fn depth(limit: usize, text: &str) -> Result<(), LimitError> {
    Limits {
        max_bytes: DEFAULT_MAX_BYTES,
        max_depth: limit,
    }
    .check(text)
}

fn too_deep_at(text: &str, limit: usize) -> Position {
    match depth(limit, text) {
        Err(LimitError::TooDeep { at, .. }) => at,
        other => panic!("expected TooDeep for {text:?}, got {other:?}"),
    }
}

#[test]
fn realistic_configs_pass_with_room_to_spare() {
    let route = "\
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: { name: web, namespace: shop, annotations: { note: \"[[[{{\" } }
    spec:
      parentRefs:
        - { group: \"\", kind: Service, name: web, port: 80 }
      rules:
        - matches:
            - headers: [{ name: x-canary, value: \"true\" }]
              path:
                type: RegularExpression
                value: ^/api/[a-z[]+$
          backendRefs: [{ name: web-v2, port: 80 }]
        - description: |
            [[[[[[[[[[[[[[[[[[[[ text, not structure
                  {{{{{{{{{{{{{{{{{{
          note: 'it''s [[[[[[[[[[[[[[[[[[[[[[[' # and [[[[[[[[[[[[[[[[[[ in a comment
";
    // The route's deepest value is 9 levels down; the scan counts at most a few more.
    depth(12, route).expect("a deep route config is within 12");
    assert!(matches!(
        depth(4, route),
        Err(LimitError::TooDeep { limit: 4, .. })
    ));
}

#[test]
fn flow_nesting_is_refused_fast_with_its_position() {
    let text = format!("a: {}", "[".repeat(100_000));
    let started = Instant::now();
    let at = too_deep_at(&text, 64);
    // Linear: microseconds, where the parser took 41 s.
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        at,
        Position {
            line: 1,
            column: 67
        }
    );
    let shown = depth(64, &text).expect_err("deep").to_string();
    assert!(
        shown.contains("line 1, column 67") && shown.contains(MAX_DEPTH_ENV),
        "{shown}"
    );
}

#[test]
fn every_way_of_nesting_counts() {
    let n = 20;
    let cases = [
        // Block mappings by indentation.
        (0..n)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect::<String>(),
        // Compact sequences on one line.
        format!("{}x\n", "- ".repeat(n)),
        // Flow collections behind a tag and an anchor.
        format!("a: !tag &anchor {}\n", "{k: ".repeat(n)),
        // A sequence at its parent's indentation still adds its entries' mappings.
        (0..n)
            .map(|i| format!("{}- k{i}:\n", " ".repeat(2 * i)))
            .collect::<String>(),
        // A multi-line flow collection.
        "[\n".repeat(n),
        // A document marker followed by a collection.
        format!("--- {}\n", "[".repeat(n)),
        // A quote at the start of a plain scalar's continuation opens nothing, so it hides
        // nothing after it.
        format!("a: b\n  'c\nd: {}\n", "[".repeat(n)),
        // Likewise inside a flow collection.
        format!("[a\n 'b, {}\n", "[".repeat(n)),
        // Lines broken by CR alone, or by NEL, LS or PS, as libyaml reads them.
        (0..n)
            .map(|i| format!("{}k{i}:\r", " ".repeat(i)))
            .collect::<String>(),
        (0..n)
            .map(|i| format!("{}k{i}:\u{85}", " ".repeat(i)))
            .collect::<String>(),
        (0..n)
            .map(|i| format!("{}k{i}:\u{2028}", " ".repeat(i)))
            .collect::<String>(),
    ];
    for text in &cases {
        too_deep_at(text, 10);
    }
}

#[test]
fn quoted_commented_and_block_scalar_brackets_do_not_count() {
    let n = 100;
    let b = "[".repeat(n);
    for text in [
        format!("a: '{b}'\n"),
        format!("a: \"{b}\\\"{b}\"\n"),
        format!("a: \"{b}\n  {b}\"\nb: 1\n"),
        format!("a: 1 # {b}\n"),
        format!("# {b}\n"),
        format!("a: |\n  {b}\n   {b}\nb: 1\n"),
        format!("a: x{b}\n"),
        format!("a: it's {b}\n"),
    ] {
        depth(4, &text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}

#[test]
fn size_is_checked_first() {
    let limits = Limits {
        max_bytes: 10,
        max_depth: 64,
    };
    assert_eq!(
        limits.check("a: 123456789"),
        Err(LimitError::TooLarge {
            size: 12,
            limit: 10
        })
    );
    assert_eq!(limits.check_size(10), Ok(()));
}

#[test]
fn limits_come_from_the_environment() {
    let env = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Limits::from_lookup(move |k| map.get(k).cloned())
    };
    assert_eq!(env(&[]), Ok(Limits::default()));
    assert_eq!(
        env(&[(MAX_BYTES_ENV, "1048576"), (MAX_DEPTH_ENV, "32")]),
        Ok(Limits {
            max_bytes: 1 << 20,
            max_depth: 32
        })
    );
    for (name, value) in [
        (MAX_BYTES_ENV, "0"),
        (MAX_BYTES_ENV, "10MB"),
        (MAX_DEPTH_ENV, "-1"),
        (MAX_DEPTH_ENV, "1000"),
    ] {
        let e = env(&[(name, value)]).expect_err(value);
        assert_eq!((e.name, e.value.as_str()), (name, value));
    }
}
