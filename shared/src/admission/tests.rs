use std::net::Ipv4Addr;

use tokio::io::AsyncReadExt;

use super::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

#[test]
fn budget_keeps_a_reserve_and_gives_accepts_half() {
    let b = FdBudget::for_limit(1024, &Limits::default()).expect("room");
    assert_eq!(b.reserve(), 64);
    assert_eq!(b.accept_below(), 512);
    let b = FdBudget::for_limit(1 << 20, &Limits::default()).expect("room");
    assert_eq!(b.reserve(), 65_536);
    assert_eq!(b.accept_below(), 524_288);
    // An accept share larger than what the reserve leaves is cut down to it.
    let over = Limits {
        accept_fds: Some(5000),
        fd_reserve: Some(100),
        ..Limits::default()
    };
    let b = FdBudget::for_limit(1024, &over).expect("room");
    assert_eq!((b.accept_below(), b.reserve()), (924, 100));
    // A limit that leaves nothing is refused, not silently accepted.
    let err = FdBudget::for_limit(70, &Limits::default()).expect_err("no room");
    assert!(
        matches!(err, AdmissionError::NoRoom { limit: 70, .. }),
        "{err}"
    );
}

#[test]
fn opened_sockets_stay_out_of_the_reserve() {
    let b = FdBudget {
        limit: 1024,
        accept_below: 512,
        connect_below: 960,
    };
    struct Fd(RawFd);
    impl AsRawFd for Fd {
        fn as_raw_fd(&self) -> RawFd {
            self.0
        }
    }
    assert!(b.check_opened(&Fd(959)).is_ok());
    let e = b.check_opened(&Fd(960)).expect_err("in the reserve");
    assert_eq!((e.fd, e.limit, e.reserve), (960, 1024, 64));
    assert!(b.accepts(511) && !b.accepts(512) && !b.accepts(-1));
}

#[test]
fn slots_bound_total_and_per_source_and_come_back_on_drop() {
    let slots = Arc::new(Slots::new(
        3,
        2,
        (Shed::Handshakes, Shed::HandshakesPerSource),
    ));
    let a1 = slots.take(ip(1)).expect("free");
    let a2 = slots.take(ip(1)).expect("free");
    assert_eq!(
        slots.take(ip(1)).expect_err("per source"),
        Shed::HandshakesPerSource
    );
    let b1 = slots.take(ip(2)).expect("free");
    assert_eq!(slots.take(ip(3)).expect_err("total"), Shed::Handshakes);
    drop(a1);
    let a3 = slots.take(ip(1)).expect("one came back");
    drop((a2, a3, b1));
    assert_eq!(slots.held(), 0);
    // Sources holding nothing are forgotten, so the map cannot grow without bound.
    assert!(slots.counts.lock().per_source.is_empty());
}

#[test]
fn handshakes_get_at_most_half_of_the_accepted_descriptors() {
    let mut registry = Registry::default();
    let fds = FdBudget::for_limit(1024, &Limits::default()).expect("room");
    let a = Admission::with_budget(Limits::default(), fds, &mut registry);
    assert_eq!(a.inner.handshakes.max_total, 256);
    let permits: Vec<_> = (0..=255u8)
        .map(|i| a.handshake("t", ip(i)).expect("free"))
        .collect();
    assert_eq!(a.handshake("t", ip(1)).expect_err("full"), Shed::Handshakes);
    assert_eq!(a.handshakes_in_flight(), 256);
    drop(permits);
    assert_eq!(a.handshakes_in_flight(), 0);
    let text = crate::telemetry::encode(&registry).expect("encodes");
    assert!(
        text.contains(r#"ambit_admission_shed_total{listener="t",reason="handshakes"} 1"#),
        "{text}"
    );
}

async fn loopback_listener(admission: &Admission, limits: ListenerLimits) -> Listener {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    admission.gate("test", limits).listener(tcp)
}

/// Reads until the peer closes or resets; true if it did within a second.
async fn closed_by_peer(mut s: TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn listener_sheds_over_the_per_source_bound_and_admits_again_after_a_close() {
    let mut registry = Registry::default();
    let a = Admission::with_budget(Limits::default(), FdBudget::unlimited(), &mut registry);
    let mut l = loopback_listener(
        &a,
        ListenerLimits {
            max_connections: None,
            max_per_source: Some(2),
        },
    )
    .await;
    let addr = l.local_addr().expect("bound");
    let c1 = TcpStream::connect(addr).await.expect("connect");
    let c2 = TcpStream::connect(addr).await.expect("connect");
    let c3 = TcpStream::connect(addr).await.expect("connect");
    let first = l.accept().await;
    let second = l.accept().await;
    assert_eq!(l.gate().open_connections(), 2);
    // The third is accepted by the kernel, then shed: the client sees it closed.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), l.accept())
            .await
            .is_err()
    );
    assert!(closed_by_peer(c3).await, "over the bound: closed");
    // A slot that comes back is usable at once.
    drop(first);
    let c4 = TcpStream::connect(addr).await.expect("connect");
    let third = l.accept().await;
    assert_eq!(third.peer.port(), c4.local_addr().expect("bound").port());
    assert_eq!(l.gate().open_connections(), 2);
    drop((second, third, c1, c2));
    let text = crate::telemetry::encode(&registry).expect("encodes");
    assert!(
        text.contains(
            r#"ambit_admission_shed_total{listener="test",reason="connections_per_source"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn listener_sheds_descriptors_over_the_mark() {
    let mut registry = Registry::default();
    let none = FdBudget {
        limit: 1024,
        accept_below: 0,
        connect_below: 960,
    };
    let a = Admission::with_budget(Limits::default(), none, &mut registry);
    let mut l = loopback_listener(&a, ListenerLimits::default()).await;
    let addr = l.local_addr().expect("bound");
    let client = TcpStream::connect(addr).await.expect("connect");
    // Nothing can be admitted; accept keeps shedding and never returns.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), l.accept())
            .await
            .is_err()
    );
    assert!(closed_by_peer(client).await);
    let text = crate::telemetry::encode(&registry).expect("encodes");
    assert!(
        text.contains(r#"ambit_admission_shed_total{listener="test",reason="fd_reserve"} 1"#),
        "{text}"
    );
}

#[test]
fn throttle_logs_once_per_period_and_counts_the_rest() {
    let t = Throttle::new();
    assert_eq!(t.tick(), Some(1));
    assert_eq!(t.tick(), None);
    assert_eq!(t.tick(), None);
}
