//! A small HTTP/1.1 client, one connection per request: calls are rare (a certificate per
//! identity per half-lifetime; a token review per request), so pooling buys nothing and a
//! fresh connection always sees the current DNS answer and serving certificate.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A request that did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The base URL is unusable.
    #[error("bad URL {url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Connecting, the TLS handshake or the exchange failed.
    #[error("{url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// No answer in time.
    #[error("{url}: no answer within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Where requests go: `http://host:port` or `https://host:port` (a path prefix is kept).
#[derive(Clone)]
pub struct Endpoint {
    base: String,
    host: String,
    port: u16,
    prefix: String,
    tls: Option<TlsConnector>,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Parses `url`. An `https` URL needs `tls` (the roots that vouch for the server);
    /// `http` is refused when `tls` is given, so a typo cannot drop TLS silently.
    pub fn new(
        url: &str,
        tls: Option<Arc<ClientConfig>>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Self, HttpError> {
        let bad = |reason: &str| HttpError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match (https, tls) {
            (true, Some(config)) => Some(TlsConnector::from(config)),
            (true, None) => return Err(bad("https needs the roots to verify the server")),
            (false, Some(_)) => return Err(bad("TLS roots given for a plain http URL")),
            (false, None) => None,
        };
        Ok(Endpoint {
            base: url.trim_end_matches('/').to_string(),
            host,
            port,
            prefix: uri.path().trim_end_matches('/').to_string(),
            tls,
            timeout,
            max_body,
        })
    }

    /// The URL it was built from.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends one request; `bearer` goes in `Authorization`, `body` as JSON. Returns the
    /// status and the body (at most `max_body` bytes, else an error).
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let url = format!("{}{}", self.base, path_and_query);
        match tokio::time::timeout(
            self.timeout,
            self.exchange(&url, method, path_and_query, bearer, body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        url: &str,
        method: Method,
        path_and_query: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let transport = |reason: String| HttpError::Transport {
            url: url.to_string(),
            reason,
        };
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.prefix, path_and_query))
            .header(header::HOST, &authority)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(format!("building the request: {e}")))?;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| transport(format!("connecting: {e}")))?;
        match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| transport(format!("server name: {e}")))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| transport(format!("TLS handshake: {e}")))?;
                self.round_trip(stream, req).await.map_err(transport)
            }
            None => self.round_trip(tcp, req).await.map_err(transport),
        }
    }

    async fn round_trip<IO>(
        &self,
        io: IO,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), String>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| format!("reading the answer (limit {} bytes): {e}", self.max_body))?
            .to_bytes();
        conn.abort();
        Ok((status, body))
    }
}

/// A client config trusting exactly `roots`, verifying the server's name as usual.
pub fn client_config_with_roots(
    roots: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, crate::tls::TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|e| crate::tls::TlsError::BadCertificate(e.to_string()))?;
    }
    let config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
