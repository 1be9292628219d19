use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::ca::{self, LocalCa};

/// A CA in a temp dir and a workload certificate from it.
fn ca_and_cert(dir: &tempfile::TempDir, id: &Identity) -> (TrustBundle, WorkloadCert, ca::CaPaths) {
    let paths = ca::init(dir.path(), "td", false).expect("init");
    let issued = LocalCa::load(&paths)
        .expect("load")
        .issue(id, Duration::from_secs(600))
        .expect("issue");
    let bundle = TrustBundle::load(&paths.bundle()).expect("bundle");
    (
        bundle,
        WorkloadCert::from_issued(issued).expect("cert"),
        paths,
    )
}

/// One handshake plus a byte each way; Err(description) when it fails.
async fn handshake(client: ClientConfig, server: Arc<ServerConfig>) -> Result<(), String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server = async move {
        let mut tls = TlsAcceptor::from(server)
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())
    };
    let client = async move {
        let name = ServerName::try_from("server.invalid").map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(name, c)
            .await
            .map_err(|e| describe_handshake_error(&e))?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let (s, c) = tokio::join!(server, client);
    c.and(s)
}

#[tokio::test]
async fn a_replaced_bundle_takes_effect_at_the_next_handshake_on_both_sides() {
    let server_id: Identity = "spiffe://td/ns/a/sa/server".parse().expect("id");
    let client_id: Identity = "spiffe://td/ns/a/sa/client".parse().expect("id");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let (bundle_a, server_cert, _) = ca_and_cert(&dir_a, &server_id);
    let (bundle_b, client_cert, paths_b) = ca_and_cert(&dir_b, &client_id);

    // The server trusts only A; the client (from B) trusts A for the server.
    let server_bundle = SharedBundle::new(bundle_a.clone());
    let server = Arc::new(
        server_config(Arc::new(CertSlot::new(server_cert)), &server_bundle, "td").expect("server"),
    );
    let client = || {
        client_config(client_cert.certified.clone(), &bundle_a, server_id.clone()).expect("client")
    };
    let refused = handshake(client(), server.clone()).await;
    assert!(refused.is_err(), "a client from an untrusted CA got in");

    // Add B's root to the server's bundle: the same server config now accepts the client.
    let both = TrustBundle::from_certs(
        &paths_b.bundle(),
        bundle_a
            .roots()
            .iter()
            .chain(bundle_b.roots())
            .cloned()
            .collect(),
    )
    .expect("both");
    server_bundle.replace(both);
    handshake(client(), server.clone())
        .await
        .expect("trusted after the bundle changed");

    // And a client whose shared bundle loses A refuses the server at its next handshake.
    let client_bundle = SharedBundle::new(bundle_a.clone());
    let shared_client = || {
        client_config(
            client_cert.certified.clone(),
            &client_bundle,
            server_id.clone(),
        )
        .expect("client")
    };
    let config = shared_client();
    handshake(shared_client(), server.clone())
        .await
        .expect("client trusts A");
    client_bundle.replace(bundle_b);
    let err = handshake(config, server)
        .await
        .expect_err("A no longer trusted");
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );
}
