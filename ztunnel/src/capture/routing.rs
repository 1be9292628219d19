//! The capture rules and routes inside a pod, over rtnetlink: for each family,
//!
//! ```text
//! rule:  fwmark CAPTURE_MARK/CAPTURE_MARK lookup CAPTURE_ROUTE_TABLE priority CAPTURE_RULE_PRIORITY
//! route: local 0.0.0.0/0 (::/0) dev lo table CAPTURE_ROUTE_TABLE [src <pod address>]
//! ```
//!
//! Both families are always installed and removed together. The connect hooks mark a pod's
//! sockets of either family, and a marked SYN of a family without its rule would leave the pod
//! uncaptured; so a pod whose rules cannot all be installed is not enrolled (it stays held
//! closed). The numbers come from [`ambit_ebpf::contract`], like the kernel programs'.
//!
//! The netlink socket is created inside the pod's namespace, so every request it carries
//! applies there, and no thread of ours stays in the pod for longer than that.

use std::net::{Ipv4Addr, Ipv6Addr};

use ambit_ebpf::contract::{
    CAPTURE_MARK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY, LOOPBACK_IFINDEX,
};
use futures_util::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{RouteHeader, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{CaptureError, Netns};

/// Which capture routes to install: the `src` of each family's route, when the pod has a
/// routable address of that family. Without one the route is installed without `src`: the
/// connect hooks refuse that family anyway, and the rule and route stay as a backstop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sources {
    /// The pod's primary IPv4 address.
    pub v4: Option<Ipv4Addr>,
    /// The pod's primary IPv6 address.
    pub v6: Option<Ipv6Addr>,
}

/// Installs both families' capture rule and route in the pod (idempotent: an existing rule
/// is kept, an existing route replaced). `ipv6` is false only when IPv6 is off in the pod, in
/// which case there is nothing to capture on it and nothing to install.
pub async fn install(ns: &Netns, sources: Sources, ipv6: bool) -> Result<(), CaptureError> {
    let handle = connect(ns)?;
    let netns = ns.path().display().to_string();
    let err = |what: &'static str| {
        let netns = netns.clone();
        move |source| CaptureError::Routing {
            what,
            netns,
            source,
        }
    };
    add_rule(&handle, AddressFamily::Inet)
        .await
        .map_err(err("adding the IPv4 capture rule"))?;
    let mut v4 =
        RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0);
    if let Some(src) = sources.v4 {
        v4 = v4.pref_source(src);
    }
    add_route(&handle, local_route(v4.build()))
        .await
        .map_err(err("adding the IPv4 capture route"))?;
    if ipv6 {
        add_rule(&handle, AddressFamily::Inet6)
            .await
            .map_err(err("adding the IPv6 capture rule"))?;
        let mut v6 =
            RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(Ipv6Addr::UNSPECIFIED, 0);
        if let Some(src) = sources.v6 {
            v6 = v6.pref_source(src);
        }
        add_route(&handle, local_route(v6.build()))
            .await
            .map_err(err("adding the IPv6 capture route"))?;
    }
    Ok(())
}

/// Removes both families' capture rules and routes from the pod. Missing pieces are not an
/// error; every piece is tried, and the first failure is returned.
pub async fn remove(ns: &Netns) -> Result<(), CaptureError> {
    let handle = connect(ns)?;
    let netns = ns.path().display().to_string();
    let mut first = None;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let rule = handle.rule().del(capture_rule(family)).execute().await;
        let routes = remove_routes(&handle, family).await;
        for (what, result) in [
            ("removing a capture rule", rule),
            ("removing the capture routes", routes),
        ] {
            if let Err(source) = result
                && !is_missing(&source)
            {
                first.get_or_insert(CaptureError::Routing {
                    what,
                    netns: netns.clone(),
                    source,
                });
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// An rtnetlink connection whose socket lives in the pod's namespace.
fn connect(ns: &Netns) -> Result<Handle, CaptureError> {
    let (connection, handle, _) =
        ns.run(rtnetlink::new_connection)?
            .map_err(|source| CaptureError::Netlink {
                netns: ns.path().display().to_string(),
                source,
            })?;
    // The connection task ends when the handle (and every clone) is dropped.
    tokio::spawn(connection);
    Ok(handle)
}

fn capture_rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.action = RuleAction::ToTable;
    rule.header.table = table_u8();
    rule.attributes = vec![
        RuleAttribute::Table(CAPTURE_ROUTE_TABLE),
        RuleAttribute::Priority(CAPTURE_RULE_PRIORITY),
        RuleAttribute::FwMark(CAPTURE_MARK),
        RuleAttribute::FwMask(CAPTURE_MARK),
    ];
    rule
}

/// The header's 8-bit table field; tables above 255 live only in the attribute.
fn table_u8() -> u8 {
    u8::try_from(CAPTURE_ROUTE_TABLE).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

async fn add_rule(handle: &Handle, family: AddressFamily) -> Result<(), rtnetlink::Error> {
    let mut request = handle.rule().add();
    *request.message_mut() = capture_rule(family);
    match request.execute().await {
        // Left by an earlier ztunnel: it is exactly ours.
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// `local <default> dev lo table CAPTURE_ROUTE_TABLE`.
fn local_route(mut route: RouteMessage) -> RouteMessage {
    route.header.kind = RouteType::Local;
    route.header.scope = RouteScope::Host;
    route.header.table = table_u8();
    route
        .attributes
        .push(netlink_packet_route::route::RouteAttribute::Table(
            CAPTURE_ROUTE_TABLE,
        ));
    route
        .attributes
        .push(netlink_packet_route::route::RouteAttribute::Oif(
            LOOPBACK_IFINDEX,
        ));
    route
}

async fn add_route(handle: &Handle, route: RouteMessage) -> Result<(), rtnetlink::Error> {
    handle.route().add(route).replace().execute().await
}

/// Deletes every route of `family` in the capture table.
async fn remove_routes(handle: &Handle, family: AddressFamily) -> Result<(), rtnetlink::Error> {
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    let routes: Vec<RouteMessage> = handle.route().get(query).execute().try_collect().await?;
    for route in routes.into_iter().filter(in_capture_table) {
        match handle.route().del(route).execute().await {
            Err(e) if is_missing(&e) => {}
            other => other?,
        }
    }
    Ok(())
}

fn in_capture_table(route: &RouteMessage) -> bool {
    route.attributes.iter().any(|a| {
        matches!(a, netlink_packet_route::route::RouteAttribute::Table(t) if *t == CAPTURE_ROUTE_TABLE)
    }) || route.header.table == table_u8()
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Deleting what is not there: already removed.
fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(libc::ENOENT) | Some(libc::ESRCH))
}
