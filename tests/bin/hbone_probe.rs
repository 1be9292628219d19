//! `ambit-hbone-probe`: sends one hand-made HBONE request and prints the status, so tests
//! can check how ztunnel answers malformed and misdirected tunnels.
//!
//! It speaks real mutual TLS with a certificate from `ztunnel ca issue`, and checks the
//! server's identity like a ztunnel would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_shared::identity::Identity;
use ambit_shared::tls;
use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
struct Args {
    /// HBONE address (ip:15008).
    #[arg(long)]
    to: SocketAddr,
    /// Identity the server must prove.
    #[arg(long)]
    server_identity: Identity,
    /// Client certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Client key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Trust bundle (PEM).
    #[arg(long)]
    bundle: PathBuf,
    /// HTTP method.
    #[arg(long, default_value = "CONNECT")]
    method: String,
    /// Request target: an authority for CONNECT, a URI otherwise.
    #[arg(long)]
    target: String,
    /// Bytes to send through an accepted tunnel (then read the reply until EOF).
    #[arg(long)]
    send: Option<String>,
    /// Overall time limit.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = Duration::from_secs(args.timeout_secs);
    let result = tokio::time::timeout(limit, probe(&args))
        .await
        .context("probe timed out")?;
    match result {
        Ok((status, received)) => println!(
            "{}",
            serde_json::json!({ "status": status, "received": received })
        ),
        Err(e) => println!("{}", serde_json::json!({ "error": format!("{e:#}") })),
    }
    Ok(())
}

async fn probe(args: &Args) -> anyhow::Result<(u16, String)> {
    let cert = tls::load_certified_key(&args.cert, &args.key)?;
    let bundle = tls::TrustBundle::load(&args.bundle)?;
    let config = tls::client_config(cert, &bundle, args.server_identity.clone())?;
    let tcp = TcpStream::connect(args.to).await.context("TCP connect")?;
    let io = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(args.to.ip().into()), tcp)
        .await
        .context("TLS handshake")?;
    let (client, connection) = h2::client::handshake(io)
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;
    let request = http::Request::builder()
        .method(args.method.as_str())
        .uri(args.target.as_str())
        .body(())?;
    let (response, mut send) = client.send_request(request, false)?;
    let response = response.await?;
    let status = response.status().as_u16();
    let mut received = Vec::new();
    if status == 200 {
        if let Some(data) = &args.send {
            send.send_data(Bytes::copy_from_slice(data.as_bytes()), true)?;
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            received.extend_from_slice(&chunk);
        }
    }
    Ok((status, String::from_utf8_lossy(&received).into_owned()))
}
