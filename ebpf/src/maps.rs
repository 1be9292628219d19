//! Rust mirrors of the map keys and values in `bpf/common.h`, and the typed
//! handles of the capture maps.
//!
//! Pinned maps outlive the ztunnel that created them, so a newer build may
//! find maps with an older layout. aya reuses a pinned map without comparing
//! it to the program's definition; [`CaptureMaps::take`] does that check and
//! names the offending pin instead of letting lookups silently miss.
// `aya::Pod` is an unsafe marker trait; implementing it is this module's only
// unsafe code.
#![allow(unsafe_code)]

use std::{
    mem,
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapType, SockHash},
};

use crate::{Error, MAX_ADDRS_PER_POD, MAX_PODS};

/// Entries of the address-keyed maps: every address of every pod.
const MAX_POD_ADDRS: u32 = MAX_PODS * MAX_ADDRS_PER_POD;

/// `struct ip_key`: a pod IP, IPv6 bytes in network order, IPv4 v4-mapped
/// (`::ffff:a.b.c.d`), so both families share one key type.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct IpKey {
    pub(crate) addr: [u8; 16],
}

// SAFETY: `IpKey` is `#[repr(C)]`, made only of `u8`s (no padding, every bit
// pattern valid), and `Copy`.
unsafe impl aya::Pod for IpKey {}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        Self { addr: v6.octets() }
    }
}

impl From<IpKey> for IpAddr {
    /// v4-mapped keys come back as IPv4, the form they were enrolled with.
    fn from(key: IpKey) -> Self {
        Ipv6Addr::from(key.addr).to_canonical()
    }
}

impl IpKey {
    /// All zeros (`::`): "no address of this family".
    pub(crate) const NONE: IpKey = IpKey { addr: [0; 16] };

    /// The key of `ip`, or [`IpKey::NONE`].
    pub(crate) fn of(ip: Option<IpAddr>) -> Self {
        ip.map_or(Self::NONE, IpKey::from)
    }

    /// The address, unless this is [`IpKey::NONE`].
    pub(crate) fn addr(self) -> Option<IpAddr> {
        (self != Self::NONE).then(|| IpAddr::from(self))
    }
}

/// `struct enrolled_value`: the pod's primary address of each family, or
/// [`IpKey::NONE`] for a family it is not served on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EnrolledValue {
    pub(crate) ip4: IpKey,
    pub(crate) ip6: IpKey,
}

// SAFETY: `#[repr(C)]` struct of two `Pod`s with no padding; `Copy`.
unsafe impl aya::Pod for EnrolledValue {}

/// `struct pod_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PodValue {
    pub(crate) netns_cookie: u64,
}

// SAFETY: `#[repr(C)]`, a single `u64`, no padding; `Copy`.
unsafe impl aya::Pod for PodValue {}

/// `sizeof(struct dns_origin)`: two `ip_key`s and a `__u32` port. Only the
/// kernel reads and writes it (socket-local storage), so there is no Rust
/// mirror; the size is what the pinned map is checked against.
const DNS_ORIGIN_SIZE: u32 = 16 + 16 + 4;

// The C side is the source of truth; these match `sizeof` there.
const _: () = assert!(mem::size_of::<IpKey>() == 16);
const _: () = assert!(mem::size_of::<EnrolledValue>() == 32);
const _: () = assert!(mem::size_of::<PodValue>() == 8);

/// Map names, as in `capture.bpf.c` (and as pinned under `<pin_dir>/maps`).
pub(crate) const ENROLLED: &str = "enrolled";
pub(crate) const PODS: &str = "pods";
pub(crate) const OUTBOUND_LISTENERS: &str = "outbound_listeners";
pub(crate) const INBOUND_LISTENERS: &str = "inbound_listeners";
pub(crate) const DNS_LISTENERS: &str = "dns_listeners";
pub(crate) const DNS_ORIGINS: &str = "dns_origins";
pub(crate) const ALL: [&str; 6] = [
    ENROLLED,
    PODS,
    OUTBOUND_LISTENERS,
    INBOUND_LISTENERS,
    DNS_LISTENERS,
    DNS_ORIGINS,
];

/// Typed handles of the capture maps (the kernel objects are pinned and
/// shared with every program that was loaded against the same pin dir).
pub(crate) struct CaptureMaps {
    /// netns cookie -> the pod's primary address of each family.
    pub(crate) enrolled: HashMap<MapData, u64, EnrolledValue>,
    /// Every pod address -> netns cookie.
    pub(crate) pods: HashMap<MapData, IpKey, PodValue>,
    /// Pod address -> 15001 listener of its family.
    pub(crate) outbound: SockHash<MapData, IpKey>,
    /// Pod address -> 15006 listener of its family.
    pub(crate) inbound: SockHash<MapData, IpKey>,
    /// Pod primary address of a family -> DNS proxy UDP socket of that family.
    pub(crate) dns: SockHash<MapData, IpKey>,
    /// Per-socket original DNS server. Never read here; held so the loader
    /// checked its pinned layout like every other map's.
    _dns_origins: Map,
}

/// What the kernel must report for a pinned map made from this build.
struct Expected {
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl CaptureMaps {
    /// Takes the maps out of a loaded object and checks that the kernel maps
    /// behind them (possibly reused pins) have this build's layout.
    pub(crate) fn take(ebpf: &mut Ebpf, maps_dir: &Path) -> Result<Self, Error> {
        let enrolled = take_checked(
            ebpf,
            maps_dir,
            ENROLLED,
            &Expected {
                map_type: MapType::Hash,
                key_size: size_u32::<u64>(),
                value_size: size_u32::<EnrolledValue>(),
                max_entries: MAX_PODS,
            },
        )?;
        let pods = take_checked(
            ebpf,
            maps_dir,
            PODS,
            &Expected {
                map_type: MapType::Hash,
                key_size: size_u32::<IpKey>(),
                value_size: size_u32::<PodValue>(),
                max_entries: MAX_POD_ADDRS,
            },
        )?;
        let sockhash = Expected {
            map_type: MapType::SockHash,
            key_size: size_u32::<IpKey>(),
            // aya's SockHash writes the listener fd as a 4-byte value.
            value_size: 4,
            max_entries: MAX_POD_ADDRS,
        };
        let outbound = take_checked(ebpf, maps_dir, OUTBOUND_LISTENERS, &sockhash)?;
        let inbound = take_checked(ebpf, maps_dir, INBOUND_LISTENERS, &sockhash)?;
        let dns = take_checked(ebpf, maps_dir, DNS_LISTENERS, &sockhash)?;
        let dns_origins = take_checked(
            ebpf,
            maps_dir,
            DNS_ORIGINS,
            &Expected {
                map_type: MapType::SkStorage,
                // The socket fd the kernel takes as key.
                key_size: size_u32::<i32>(),
                value_size: DNS_ORIGIN_SIZE,
                // Socket-local storage has no size of its own.
                max_entries: 0,
            },
        )?;

        let typed = |name: &'static str, source| Error::Map {
            name,
            source: Box::new(source),
        };
        Ok(Self {
            enrolled: HashMap::try_from(enrolled).map_err(|e| typed(ENROLLED, e))?,
            pods: HashMap::try_from(pods).map_err(|e| typed(PODS, e))?,
            outbound: SockHash::try_from(outbound).map_err(|e| typed(OUTBOUND_LISTENERS, e))?,
            inbound: SockHash::try_from(inbound).map_err(|e| typed(INBOUND_LISTENERS, e))?,
            dns: SockHash::try_from(dns).map_err(|e| typed(DNS_LISTENERS, e))?,
            _dns_origins: dns_origins,
        })
    }
}

fn take_checked(
    ebpf: &mut Ebpf,
    maps_dir: &Path,
    name: &'static str,
    expected: &Expected,
) -> Result<Map, Error> {
    let map = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    let data = match &map {
        Map::HashMap(data) | Map::SockHash(data) | Map::SkStorage(data) => data,
        other => {
            return Err(Error::IncompatiblePinnedMap {
                path: maps_dir.join(name),
                what: "map type",
                found: format!("{other:?}"),
                expected: format!("{:?}", expected.map_type),
            });
        }
    };
    let info = data.info().map_err(|source| Error::Map {
        name,
        source: Box::new(source),
    })?;
    let path = || maps_dir.join(name);
    let found_type = info.map_type().map_err(|source| Error::Map {
        name,
        source: Box::new(source),
    })?;
    let checks = [
        (
            "map type",
            format!("{found_type:?}"),
            format!("{:?}", expected.map_type),
        ),
        (
            "key size",
            info.key_size().to_string(),
            expected.key_size.to_string(),
        ),
        (
            "value size",
            info.value_size().to_string(),
            expected.value_size.to_string(),
        ),
        (
            "max entries",
            info.max_entries().to_string(),
            expected.max_entries.to_string(),
        ),
    ];
    for (what, found, expected) in checks {
        if found != expected {
            return Err(Error::IncompatiblePinnedMap {
                path: path(),
                what,
                found,
                expected,
            });
        }
    }
    Ok(map)
}

fn size_u32<T>() -> u32 {
    u32::try_from(mem::size_of::<T>()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv4_keys_are_v4_mapped_and_round_trip() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 201, 0, 2));
        let key = IpKey::from(ip);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 201, 0, 2]
        );
        assert_eq!(IpAddr::from(key), ip);
    }

    #[test]
    fn ipv6_keys_round_trip() {
        let ip = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
        let key = IpKey::from(ip);
        assert_eq!(key.addr, ip_octets(ip));
        assert_eq!(IpAddr::from(key), ip);
    }

    fn ip_octets(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }
}
