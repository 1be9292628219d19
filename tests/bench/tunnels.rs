//! The two "TLS without a mesh" contenders, a stunnel4 pair and an HAProxy pair, and the
//! plaintext HAProxy relay pair that measures the floor the extra hops set.
//!
//! The client side runs in the source pod, listening on loopback and originating TLS to the
//! destination pod; the server side runs in the destination pod, terminating TLS and
//! forwarding to the app on 127.0.0.1. Both use TLS 1.3 only, ECDSA P-256 certificates from
//! the cluster's CA (`ztunnel ca issue`, the same kind ztunnel uses), and mutual TLS with
//! the peer's chain verified against the cluster's trust bundle. Neither logs per
//! connection (nor does ztunnel in the benchmark, see `--ztunnel-log`).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use harness::{Cluster, Pod, Proc};

use crate::model::Kind;

/// A port the client-side tunnel listens on (loopback of the source pod) and the TLS port
/// the server side listens on (the destination pod), forwarding to `app_port`.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub name: &'static str,
    pub local_port: u16,
    pub tls_port: u16,
    pub app_port: u16,
}

/// Certificates for one side of a pair.
#[derive(Debug, Clone)]
pub struct Creds {
    /// Leaf plus issuer, PEM.
    pub cert: PathBuf,
    /// PKCS#8 key, PEM.
    pub key: PathBuf,
    /// Cert chain and key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
    /// The trusted roots.
    pub bundle: PathBuf,
}

/// Issues a certificate for `identity` with `ztunnel ca issue` into `dir`.
pub fn issue(cluster: &Cluster, identity: &str, dir: &Path) -> Result<Creds> {
    let bin = harness::bin_path("ztunnel")?;
    let mut cmd = Command::new(bin);
    cmd.args(["ca", "issue", "--dir"])
        .arg(cluster.ca_dir())
        .args(["--identity", identity, "--out"])
        .arg(dir);
    harness::process::run_ok(&mut cmd, Duration::from_secs(30))
        .with_context(|| format!("ztunnel ca issue {identity}"))?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let combined = dir.join("combined.pem");
    let mut both = std::fs::read_to_string(&cert).context("reading issued cert")?;
    both.push_str(&std::fs::read_to_string(&key).context("reading issued key")?);
    std::fs::write(&combined, both).context("writing combined PEM")?;
    Ok(Creds {
        cert,
        key,
        combined,
        bundle: cluster.ca_dir().join("bundle.pem"),
    })
}

/// A running pair: the process in the source pod and the one in the destination pod.
pub struct Pair {
    kind: Kind,
    client_pod: Pod,
    server_pod: Pod,
    client_conf: PathBuf,
    server_conf: PathBuf,
    routes: Vec<Route>,
    procs: Vec<Proc>,
}

impl Pair {
    /// Writes both configs into `dir` and starts both sides.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        kind: Kind,
        dir: &Path,
        client_pod: &Pod,
        server_pod: &Pod,
        client: &Creds,
        server: &Creds,
        routes: &[Route],
    ) -> Result<Pair> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let server_ip = server_pod.ip();
        let (client_text, server_text, ext) = match kind {
            Kind::Stunnel => (
                stunnel_client(dir, client, server_ip, routes),
                stunnel_server(dir, server, routes),
                "conf",
            ),
            Kind::Haproxy => (
                haproxy_client(client, server_ip, routes),
                haproxy_server(server, routes),
                "cfg",
            ),
            Kind::Relay => (relay_client(server_ip, routes), relay_server(routes), "cfg"),
            other => bail!("{} is not a TLS tunnel pair", other.name()),
        };
        let client_conf = dir.join(format!("client.{ext}"));
        let server_conf = dir.join(format!("server.{ext}"));
        std::fs::write(&client_conf, client_text).context("writing client config")?;
        std::fs::write(&server_conf, server_text).context("writing server config")?;
        let mut pair = Pair {
            kind,
            client_pod: client_pod.clone(),
            server_pod: server_pod.clone(),
            client_conf,
            server_conf,
            routes: routes.to_vec(),
            procs: Vec::new(),
        };
        pair.spawn()?;
        Ok(pair)
    }

    fn command(&self, pod: &Pod, conf: &Path) -> Command {
        match self.kind {
            Kind::Stunnel => {
                let mut c = pod.command("stunnel4");
                c.arg(conf);
                c
            }
            _ => {
                // -db: stay in the foreground, one process (no master/worker split).
                let mut c = pod.command("haproxy");
                c.arg("-db").arg("-f").arg(conf);
                c
            }
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let mut server = self.command(&self.server_pod, &self.server_conf);
        let server = self.server_pod.spawn(&mut server)?;
        let mut client = self.command(&self.client_pod, &self.client_conf);
        let client = self.client_pod.spawn(&mut client)?;
        self.procs = vec![client, server];
        for r in &self.routes {
            self.server_pod
                .wait_listening(r.tls_port, Duration::from_secs(10))
                .with_context(|| format!("{} server side did not start", self.kind.name()))?;
            self.client_pod
                .wait_listening(r.local_port, Duration::from_secs(10))
                .with_context(|| format!("{} client side did not start", self.kind.name()))?;
        }
        Ok(())
    }

    /// Stops both sides and starts them again (fresh processes, for memory figures).
    pub fn restart(&mut self) -> Result<()> {
        for mut p in self.procs.drain(..) {
            p.stop(Duration::from_secs(5))?;
        }
        self.spawn()
    }

    /// PIDs of the client side and the server side.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// Where the client connects for `route`.
    pub fn local_addr(route: &Route) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, route.local_port))
    }
}

fn stunnel_global(dir: &Path, side: &str) -> String {
    // pid = (empty): no pid file. debug = err: no per-connection notices.
    format!(
        "foreground = yes\npid =\nsyslog = no\ndebug = err\noutput = {}\n\
         socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
        dir.join(format!("stunnel-{side}.log")).display()
    )
}

fn stunnel_tls(creds: &Creds) -> String {
    format!(
        "cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
        creds.cert.display(),
        creds.key.display(),
        creds.bundle.display()
    )
}

fn stunnel_client(dir: &Path, creds: &Creds, server: Ipv4Addr, routes: &[Route]) -> String {
    let mut s = stunnel_global(dir, "client");
    for r in routes {
        let _ = write!(
            s,
            "\n[{}]\nclient = yes\naccept = 127.0.0.1:{}\nconnect = {server}:{}\n{}",
            r.name,
            r.local_port,
            r.tls_port,
            stunnel_tls(creds)
        );
    }
    s
}

fn stunnel_server(dir: &Path, creds: &Creds, routes: &[Route]) -> String {
    let mut s = stunnel_global(dir, "server");
    for r in routes {
        let _ = write!(
            s,
            "\n[{}]\naccept = 0.0.0.0:{}\nconnect = 127.0.0.1:{}\n{}",
            r.name,
            r.tls_port,
            r.app_port,
            stunnel_tls(creds)
        );
    }
    s
}

fn haproxy_global() -> String {
    "global\n    maxconn 8000\n    ssl-default-bind-options ssl-min-ver TLSv1.3\n    \
     ssl-default-server-options ssl-min-ver TLSv1.3\n    ssl-server-verify required\n\n\
     defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 300s\n    \
     timeout server 300s\n"
        .to_string()
}

fn haproxy_client(creds: &Creds, server: Ipv4Addr, routes: &[Route]) -> String {
    let mut s = haproxy_global();
    for r in routes {
        let _ = write!(
            s,
            "\nfrontend {n}\n    bind 127.0.0.1:{lp}\n    default_backend {n}\n\n\
             backend {n}\n    server {n} {server}:{tp} ssl crt {crt} ca-file {ca} verify required\n",
            n = r.name,
            lp = r.local_port,
            tp = r.tls_port,
            crt = creds.combined.display(),
            ca = creds.bundle.display()
        );
    }
    s
}

/// The plaintext relay pair: HAProxy's TCP mode with no `ssl` on either side.
fn relay_client(server: Ipv4Addr, routes: &[Route]) -> String {
    let mut s = haproxy_global();
    for r in routes {
        let _ = write!(
            s,
            "\nfrontend {n}\n    bind 127.0.0.1:{lp}\n    default_backend {n}\n\n\
             backend {n}\n    server {n} {server}:{tp}\n",
            n = r.name,
            lp = r.local_port,
            tp = r.tls_port,
        );
    }
    s
}

fn relay_server(routes: &[Route]) -> String {
    let mut s = haproxy_global();
    for r in routes {
        let _ = write!(
            s,
            "\nfrontend {n}\n    bind 0.0.0.0:{tp}\n    default_backend {n}\n\n\
             backend {n}\n    server app 127.0.0.1:{ap}\n",
            n = r.name,
            tp = r.tls_port,
            ap = r.app_port,
        );
    }
    s
}

fn haproxy_server(creds: &Creds, routes: &[Route]) -> String {
    let mut s = haproxy_global();
    for r in routes {
        let _ = write!(
            s,
            "\nfrontend {n}\n    bind 0.0.0.0:{tp} ssl crt {crt} ca-file {ca} verify required\n    \
             default_backend {n}\n\nbackend {n}\n    server app 127.0.0.1:{ap}\n",
            n = r.name,
            tp = r.tls_port,
            ap = r.app_port,
            crt = creds.combined.display(),
            ca = creds.bundle.display()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Creds {
        Creds {
            cert: "/c/cert.pem".into(),
            key: "/c/key.pem".into(),
            combined: "/c/combined.pem".into(),
            bundle: "/ca/bundle.pem".into(),
        }
    }

    const ROUTE: Route = Route {
        name: "http",
        local_port: 8080,
        tls_port: 8443,
        app_port: 80,
    };

    #[test]
    fn stunnel_configs_are_mutual_tls13() {
        let c = stunnel_client(
            Path::new("/d"),
            &creds(),
            Ipv4Addr::new(10, 1, 2, 3),
            &[ROUTE],
        );
        assert!(c.contains("client = yes\naccept = 127.0.0.1:8080\nconnect = 10.1.2.3:8443\n"));
        assert!(c.contains("verifyChain = yes\nsslVersionMin = TLSv1.3\n"));
        let s = stunnel_server(Path::new("/d"), &creds(), &[ROUTE]);
        assert!(s.contains("accept = 0.0.0.0:8443\nconnect = 127.0.0.1:80\n"));
        assert!(!s.contains("client = yes"));
    }

    #[test]
    fn haproxy_configs_are_mutual_tls13() {
        let c = haproxy_client(&creds(), Ipv4Addr::new(10, 1, 2, 3), &[ROUTE]);
        assert!(c.contains(
            "server http 10.1.2.3:8443 ssl crt /c/combined.pem ca-file /ca/bundle.pem verify required"
        ));
        let s = haproxy_server(&creds(), &[ROUTE]);
        assert!(s.contains(
            "bind 0.0.0.0:8443 ssl crt /c/combined.pem ca-file /ca/bundle.pem verify required"
        ));
        assert!(s.contains("server app 127.0.0.1:80"));
    }

    #[test]
    fn relay_configs_carry_no_tls() {
        let c = relay_client(Ipv4Addr::new(10, 1, 2, 3), &[ROUTE]);
        assert!(c.contains("bind 127.0.0.1:8080\n"));
        assert!(c.contains("server http 10.1.2.3:8443\n"));
        let s = relay_server(&[ROUTE]);
        assert!(s.contains("bind 0.0.0.0:8443\n"));
        assert!(s.contains("server app 127.0.0.1:80\n"));
        assert!(!c.contains("ssl crt") && !s.contains("ssl crt"));
    }
}
