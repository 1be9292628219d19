//! DNS messages in and out: turning a pod's query into a decision (answer here, forward, or
//! drop), building the proxy's own answers, and checking the upstream's replies.
//!
//! Everything here works on bytes from the network, so nothing may panic: hickory-proto's
//! decoder returns errors for malformed input, and the few slices taken here are checked.

use std::net::IpAddr;

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::catalog::{Catalog, Lookup};

/// TTL of the proxy's own answers, and of negative answers (the SOA minimum). Short, like
/// CoreDNS's default for Kubernetes names, so a config change is seen within seconds.
pub(crate) const LOCAL_TTL: u32 = 5;
/// The UDP payload size the proxy advertises in its own EDNS answers (DNS Flag Day 2020).
const EDNS_PAYLOAD: u16 = 1232;
/// Largest query accepted, over either transport. Real queries are tens of bytes (a name is at
/// most 255); this leaves room for EDNS options and still bounds what one query can hold.
pub(crate) const MAX_QUERY: usize = 4096;
/// Largest UDP response the proxy sends or accepts from upstream, whatever a client
/// advertises. Larger answers go over TCP.
pub(crate) const MAX_UDP_RESPONSE: usize = 4096;
/// Largest message over TCP (its 2-byte length prefix).
pub(crate) const MAX_TCP_MESSAGE: usize = u16::MAX as usize;
/// DNS header length.
const HEADER_LEN: usize = 12;

/// What to do with a message a pod sent.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Not something to answer (too short, or a response rather than a query).
    Drop(&'static str),
    /// Send these bytes back.
    Reply(Reply),
    /// Ask the node's resolver.
    Forward(Forwarded),
}

/// An answer made here.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The encoded answer, within the client's size limit.
    pub(crate) bytes: Vec<u8>,
    /// For logs: what was asked (empty for unparseable queries) and the response code.
    pub(crate) question: String,
    pub(crate) rcode: ResponseCode,
}

/// A query for the node's resolver.
#[derive(Debug)]
pub(crate) struct Forwarded {
    /// The pod's query as it sent it; the forwarder only swaps the ID.
    pub(crate) raw: Vec<u8>,
    /// The parsed query, for error answers and for checking replies.
    pub(crate) query: Message,
    /// Largest answer the pod takes over UDP.
    pub(crate) udp_limit: usize,
}

impl Forwarded {
    /// The one question of the query (the decision checked that there is exactly one).
    pub(crate) fn question(&self) -> Option<&Query> {
        self.query.queries.first()
    }

    /// For logs.
    pub(crate) fn describe(&self) -> String {
        self.question().map(describe).unwrap_or_default()
    }
}

/// The transport a query came over, which bounds the answer's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// The cluster domain as a zone: its name and the SOA that negative answers carry, so
/// resolvers may cache them for [`LOCAL_TTL`] (RFC 2308).
#[derive(Debug)]
pub(crate) struct Zone {
    name: Name,
    soa: Record,
}

impl Zone {
    pub(crate) fn new(name: Name) -> Result<Self, String> {
        let mname = Name::from_ascii("ns.dns.")
            .and_then(|n| n.append_domain(&name))
            .map_err(|e| e.to_string())?;
        let rname = Name::from_ascii("hostmaster.")
            .and_then(|n| n.append_domain(&name))
            .map_err(|e| e.to_string())?;
        let soa = Record::from_rdata(
            name.clone(),
            LOCAL_TTL,
            RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, LOCAL_TTL)),
        );
        Ok(Zone { name, soa })
    }

    /// The zone's name, e.g. `cluster.local.`.
    pub(crate) fn name(&self) -> &Name {
        &self.name
    }
}

/// Decides what to do with `bytes` from a pod in namespace `client_ns`.
pub(crate) fn decide(
    bytes: &[u8],
    transport: Transport,
    catalog: &Catalog,
    zone: &Zone,
    client_ns: &str,
) -> Decision {
    if bytes.len() < HEADER_LEN {
        return Decision::Drop("shorter than a DNS header");
    }
    if bytes.len() > MAX_QUERY {
        return Decision::Drop("larger than any query");
    }
    let Ok(header) = Header::read(&mut BinDecoder::new(bytes)) else {
        return Decision::Drop("unreadable header");
    };
    // Never answer a response: that is how two DNS speakers loop.
    if header.metadata.message_type != MessageType::Query {
        return Decision::Drop("a response, not a query");
    }
    let limit = match transport {
        Transport::Udp => 512,
        Transport::Tcp => MAX_TCP_MESSAGE,
    };
    if header.metadata.op_code != OpCode::Query {
        return Decision::Reply(header_only(&header.metadata, ResponseCode::NotImp, limit));
    }
    let query = match Message::from_vec(bytes) {
        Ok(query) if query.queries.len() == 1 => query,
        _ => return Decision::Reply(header_only(&header.metadata, ResponseCode::FormErr, limit)),
    };
    let udp_limit = udp_limit(&query);
    let limit = match transport {
        Transport::Udp => udp_limit,
        Transport::Tcp => MAX_TCP_MESSAGE,
    };
    let Some(question) = query.queries.first() else {
        return Decision::Drop("no question");
    };
    let lookup = if question.query_class() == DNSClass::IN {
        catalog.lookup(question.name(), client_ns)
    } else {
        Lookup::Forward
    };
    if lookup == Lookup::Forward {
        return Decision::Forward(Forwarded {
            raw: bytes.to_vec(),
            query,
            udp_limit,
        });
    }
    let answer = zone.answer(&query, question, &lookup);
    Decision::Reply(Reply {
        bytes: encode(&answer, limit),
        question: describe(question),
        rcode: answer.metadata.response_code,
    })
}

impl Zone {
    /// The proxy's authoritative answer for a cluster name.
    fn answer(&self, query: &Message, question: &Query, lookup: &Lookup) -> Message {
        let mut response = response_to(query, ResponseCode::NoError);
        response.metadata.authoritative = true;
        match lookup {
            Lookup::Service(vips) => {
                let qtype = question.query_type();
                for ip in vips.iter() {
                    let rdata = match (qtype, ip) {
                        (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => RData::A(A(*v4)),
                        (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => {
                            RData::AAAA(AAAA(*v6))
                        }
                        _ => continue,
                    };
                    // Owned by the name as asked (a short form too), in the client's case.
                    response.add_answer(Record::from_rdata(
                        question.name().clone(),
                        LOCAL_TTL,
                        rdata,
                    ));
                }
                if response.answers.is_empty() {
                    response.add_authority(self.soa.clone());
                }
            }
            Lookup::Empty { apex: true } if question.query_type() == RecordType::SOA => {
                response.add_answer(self.soa.clone());
            }
            Lookup::Empty { .. } => {
                response.add_authority(self.soa.clone());
            }
            Lookup::NxDomain | Lookup::Forward => {
                response.metadata.response_code = ResponseCode::NXDomain;
                response.add_authority(self.soa.clone());
            }
        }
        response
    }
}

/// A response to `query` with its ID, question and flags, and EDNS if it had EDNS.
pub(crate) fn response_to(query: &Message, rcode: ResponseCode) -> Message {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = query.metadata.checking_disabled;
    response.metadata.response_code = rcode;
    response.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

/// SERVFAIL for a query the forwarder could not answer.
pub(crate) fn servfail(query: &Message, limit: usize) -> Vec<u8> {
    encode(&response_to(query, ResponseCode::ServFail), limit)
}

/// An empty answer with the TC bit: "too large for UDP, ask over TCP".
pub(crate) fn truncated(query: &Message) -> Vec<u8> {
    let mut response = response_to(query, ResponseCode::NoError);
    response.metadata.truncation = true;
    encode(&response, 512)
}

/// The largest answer `query`'s sender takes over UDP: 512 bytes without EDNS (RFC 1035),
/// else what it advertises, capped at [`MAX_UDP_RESPONSE`].
fn udp_limit(query: &Message) -> usize {
    usize::from(query.max_payload()).clamp(512, MAX_UDP_RESPONSE)
}

/// Encodes `response`, replacing it with its truncated form (header, question, TC) when it
/// exceeds `limit`, and with a bare SERVFAIL header if even encoding fails.
fn encode(response: &Message, limit: usize) -> Vec<u8> {
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => response
            .truncate()
            .to_vec()
            .ok()
            .filter(|b| b.len() <= limit)
            .unwrap_or_else(|| header_bytes(&response.metadata, ResponseCode::NoError, true)),
        Err(_) => header_bytes(&response.metadata, ResponseCode::ServFail, false),
    }
}

/// A header-only answer to a query that could not be parsed (FORMERR) or is not a standard
/// query (NOTIMP).
fn header_only(query: &Metadata, rcode: ResponseCode, limit: usize) -> Reply {
    let mut response = Message::error_msg(query.id, query.op_code, rcode);
    response.metadata.recursion_desired = query.recursion_desired;
    response.metadata.recursion_available = true;
    Reply {
        bytes: encode(&response, limit),
        question: String::new(),
        rcode,
    }
}

/// The 12 header bytes of a response with no sections: the last resort, built by hand.
fn header_bytes(query: &Metadata, rcode: ResponseCode, truncated: bool) -> Vec<u8> {
    let [id_hi, id_lo] = query.id.to_be_bytes();
    let opcode: u8 = query.op_code.into();
    let flags1 = 0x80 | ((opcode & 0x0f) << 3) | (u8::from(truncated) << 1);
    let flags1 = flags1 | u8::from(query.recursion_desired);
    let flags2 = 0x80 | (rcode.low() & 0x0f);
    vec![id_hi, id_lo, flags1, flags2, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// What an upstream reply says about itself, once it is known to answer our query.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplyInfo {
    pub(crate) truncated: bool,
    pub(crate) rcode: ResponseCode,
}

/// Checks that `reply` answers the query with `id` and `question`: a response, same ID, and
/// the same question (when it repeats one; error answers may omit it). Anything else is
/// ignored by the caller, like a resolver ignores stray or spoofed datagrams.
pub(crate) fn check_reply(reply: &[u8], id: u16, question: &Query) -> Option<ReplyInfo> {
    let mut decoder = BinDecoder::new(reply);
    let header = Header::read(&mut decoder).ok()?;
    let metadata = header.metadata;
    if metadata.id != id || metadata.message_type != MessageType::Response {
        return None;
    }
    match header.counts.queries {
        0 if metadata.response_code != ResponseCode::NoError => {}
        1 => {
            if Query::read(&mut decoder).ok()? != *question {
                return None;
            }
        }
        _ => return None,
    }
    Some(ReplyInfo {
        truncated: metadata.truncation,
        rcode: metadata.response_code,
    })
}

/// Replaces a message's ID (its first two bytes).
pub(crate) fn set_id(message: &mut [u8], id: u16) {
    if let Some(head) = message.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// `name type` for logs.
fn describe(question: &Query) -> String {
    format!("{} {}", question.name(), question.query_type())
}
