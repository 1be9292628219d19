//! Entry points for the fuzz targets in `fuzz/` at the repository root (feature
//! `fuzzing`), also built into the unit tests, which replay every saved input under
//! `fuzz/regressions/<target>/`. Each takes the fuzzer's bytes, must never panic on them,
//! and asserts what its parser promises.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ambit_shared::config::Config;
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::Name;

use crate::cni::{plugin, proto};
use crate::dns::catalog::Catalog;
use crate::dns::message::{
    self, Decision, MAX_QUERY, MAX_TCP_MESSAGE, MAX_UDP_RESPONSE, Transport, Zone,
};

/// The services the DNS target answers for (two namespaces, IPv4 and IPv6 VIPs).
const DNS_CONFIG: &str = r#"
trustDomain: cluster.local
namespaces: [{ name: shop }, { name: legacy }, { name: empty }]
services:
  - { name: web, namespace: shop, vips: [10.96.0.10, "fd00::10"], ports: [{ port: 80 }], selector: { app: x } }
  - { name: db, namespace: legacy, vips: [10.96.0.20], ports: [{ port: 5432 }], selector: { app: x } }
"#;

/// The DNS message handler: what a pod's query becomes (an answer made here, a query to
/// forward, or nothing), and the checks on the upstream's reply. The first byte picks the
/// transport and the client's namespace; the rest is the message.
///
/// An answer must fit the transport (512 bytes for plain UDP, the advertised EDNS size up
/// to 4 KiB, 64 KiB over TCP), parse back as a response, and carry the query's ID.
pub fn dns(data: &[u8]) {
    let Some((&flags, query)) = data.split_first() else {
        return;
    };
    let (catalog, zone) = dns_state();
    let transport = if flags & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let client_ns = ["shop", "legacy", "empty", "unknown"][usize::from(flags >> 1 & 3)];
    match message::decide(query, transport, catalog, zone, client_ns) {
        Decision::Drop(_) => {}
        Decision::Reply(reply) => {
            // 512 bytes without EDNS (RFC 1035), else what the client advertised, capped.
            let limit = match transport {
                Transport::Udp => Message::from_vec(query)
                    .map(|q| usize::from(q.max_payload()).clamp(512, MAX_UDP_RESPONSE))
                    .unwrap_or(512),
                Transport::Tcp => MAX_TCP_MESSAGE,
            };
            assert!(
                reply.bytes.len() <= limit,
                "{} bytes over {limit}",
                reply.bytes.len()
            );
            assert_eq!(
                reply.bytes.get(..2),
                query.get(..2),
                "the answer keeps the query's ID"
            );
            let parsed = Message::from_vec(&reply.bytes).expect("our own answer parses");
            assert_eq!(parsed.metadata.message_type, MessageType::Response);
        }
        Decision::Forward(forwarded) => {
            assert!(query.len() <= MAX_QUERY);
            assert_eq!(
                forwarded.raw, query,
                "a forwarded query is sent as the pod sent it"
            );
            let Some(question) = forwarded.question() else {
                panic!("a forwarded query has its question");
            };
            let _ = forwarded.describe();
            assert!(message::truncated(&forwarded.query).len() <= 512);
            assert!(message::servfail(&forwarded.query, 512).len() <= 512);
            // The query itself, as a reply, is refused (not a response); with the QR bit
            // set it answers itself.
            let id = forwarded.query.metadata.id;
            assert!(message::check_reply(query, id, question).is_none());
            let mut reply = query.to_vec();
            if let Some(b) = reply.get_mut(2) {
                *b |= 0x80;
            }
            let _ = message::check_reply(&reply, id, question);
            let mut other = reply.clone();
            message::set_id(&mut other, id.wrapping_add(1));
            assert!(message::check_reply(&other, id, question).is_none());
        }
    }
}

fn dns_state() -> &'static (Catalog, Zone) {
    static STATE: OnceLock<(Catalog, Zone)> = OnceLock::new();
    STATE.get_or_init(|| {
        let config: Config = ambit_shared::config::parse_str(Path::new("fuzz.yaml"), DNS_CONFIG)
            .expect("the DNS target's config is valid");
        // The sender may go: a closed channel still holds its last value.
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(config));
        let domain = Name::from_ascii("cluster.local.").expect("a valid domain");
        let zone = Zone::new(domain.clone()).expect("a valid zone");
        (Catalog::new(rx, &domain), zone)
    })
}

/// The CNI hook's two parsers: ztunnel's side of the socket (one JSON request line, first
/// byte even) and the plugin's (environment and network config from the runtime). The
/// plugin's input is `env NUL stdin`, with `env` as `KEY=VALUE` lines and the first byte
/// choosing `CNI_COMMAND`.
pub fn cni(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    if flags & 1 == 0 {
        if let Ok(req) = serde_json::from_slice::<proto::Request>(rest) {
            let line = serde_json::to_vec(&req).expect("a request serializes");
            let again: proto::Request =
                serde_json::from_slice(&line).expect("a serialized request parses");
            assert_eq!(again, req);
        }
        return;
    }
    let (env_text, stdin) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut env: HashMap<String, String> = String::from_utf8_lossy(env_text)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let command = ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "", "add"];
    env.insert(
        "CNI_COMMAND".into(),
        command[usize::from(flags >> 1 & 7)].into(),
    );
    if let Ok(invocation) = plugin::parse(&env, stdin) {
        let _ = serde_json::to_vec(&invocation.request).expect("a request serializes");
    }
    let _ = plugin::parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default());
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(stdin) {
        let _ = plugin::result_ips(&value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `target` on every file in `fuzz/regressions/<name>/`.
    fn replay(name: &str, target: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions")
            .join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).expect("a regression input is readable");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{} fails again", entry.path().display());
        }
    }

    #[test]
    fn dns_regressions() {
        replay("dns", dns);
        // A query for a service, over UDP from shop, and one to forward.
        let mut query = hickory_proto::op::Message::query();
        query.metadata.id = 7;
        query.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("web.shop.svc.cluster.local.").expect("name"),
            hickory_proto::rr::RecordType::A,
        ));
        let bytes = query.to_vec().expect("encodes");
        dns(&[&[0u8][..], &bytes].concat());
        let mut query = hickory_proto::op::Message::query();
        query.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("example.com.").expect("name"),
            hickory_proto::rr::RecordType::AAAA,
        ));
        dns(&[&[1u8][..], &query.to_vec().expect("encodes")].concat());
    }

    #[test]
    fn cni_regressions() {
        replay("cni", cni);
        cni(br#"{"command":"add","containerId":"c","netns":"/n","namespace":"shop","name":"p"}"#);
        cni(b"\x01CNI_CONTAINERID=c\nCNI_NETNS=/n\nCNI_ARGS=K8S_POD_NAMESPACE=shop;K8S_POD_NAME=p\0{\"cniVersion\":\"1.0.0\",\"prevResult\":{\"ips\":[{\"address\":\"10.0.0.2/24\"}]}}");
    }
}
