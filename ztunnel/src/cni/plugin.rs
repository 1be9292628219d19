//! The chained CNI plugin (`ztunnel cni`, or the binary installed as `ambit-cni`).
//!
//! CNI spec 1.0: the runtime passes the command and the sandbox in the environment
//! (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`) and
//! the network config, with the previous plugin's result in `prevResult`, on stdin. ADD
//! prints `prevResult` back unchanged; a failure prints `{cniVersion, code, msg}` on stdout
//! and exits non-zero. The plugin never touches the pod itself: it tells the node's ztunnel
//! and waits for its answer, failing the ADD (so the kubelet retries the sandbox) whenever
//! ztunnel cannot confirm.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::DEFAULT_SOCKET;
use super::proto::{self, Command, Request, Response};

/// Versions of the CNI spec this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long ADD waits for ztunnel unless the config says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// CNI error codes (spec, "Error"), plus ours from 100 on.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: ztunnel is not reachable or did not answer in time.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// ztunnel answered and refused.
    pub const REFUSED: u32 = 100;
}

/// A failed CNI command, as the runtime must see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    /// Spec error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error JSON the spec requires on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// One parsed invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// `CNI_COMMAND`, upper case.
    pub command: String,
    /// `cniVersion` of the network config (or of the VERSION request).
    pub cni_version: String,
    /// The ztunnel socket (`ztunnelSocket`).
    pub socket: PathBuf,
    /// How long to wait for ztunnel (`timeoutSeconds`).
    pub timeout: Duration,
    /// `prevResult`, unchanged.
    pub prev_result: Option<Value>,
    /// What ztunnel is told.
    pub request: Request,
}

/// The environment keys the plugin reads (so callers can pass exactly these).
pub const ENV_KEYS: &[&str] = &[
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

fn env_get<'a>(env: &'a HashMap<String, String>, key: &str) -> &'a str {
    env.get(key).map(String::as_str).unwrap_or_default()
}

/// `CNI_ARGS`: `K1=V1;K2=V2`.
pub fn parse_cni_args(args: &str) -> Result<HashMap<String, String>, CniError> {
    let mut out = HashMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                "invalid CNI_ARGS",
                format!("CNI_ARGS element {pair:?} is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The addresses in a CNI result (`ips[].address`, CIDR notation).
pub fn result_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(ips) = result.get("ips") else {
        return Ok(Vec::new());
    };
    let Some(ips) = ips.as_array() else {
        return Err(CniError::new(
            code::DECODE,
            "invalid prevResult",
            "prevResult.ips is not a list",
        ));
    };
    let mut out = Vec::new();
    for (i, entry) in ips.iter().enumerate() {
        let address = entry
            .get("address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let ip = address.split('/').next().unwrap_or_default();
        let ip: IpAddr = ip.parse().map_err(|_| {
            CniError::new(
                code::DECODE,
                "invalid prevResult",
                format!("prevResult.ips[{i}].address {address:?} is not an address in CIDR form"),
            )
        })?;
        out.push(ip);
    }
    Ok(out)
}

/// Parses the environment and stdin of one invocation. VERSION needs no environment
/// beyond `CNI_COMMAND`.
pub fn parse(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Invocation, CniError> {
    let command = env_get(env, "CNI_COMMAND").to_ascii_uppercase();
    if command.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "this is a CNI plugin: run it from a container runtime",
        ));
    }
    let conf: Value = if stdin.iter().all(u8::is_ascii_whitespace) && command == "VERSION" {
        json!({})
    } else {
        serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "network config on stdin is not JSON",
                e.to_string(),
            )
        })?
    };
    if !conf.is_object() {
        return Err(CniError::new(
            code::DECODE,
            "network config on stdin is not a JSON object",
            "",
        ));
    }
    let cni_version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_string();
    if command != "VERSION" && !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {cni_version}"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let socket = match conf.get("ztunnelSocket") {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(_) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network config",
                "ztunnelSocket must be a non-empty string (a Unix socket path)",
            ));
        }
    };
    let timeout = match conf.get("timeoutSeconds") {
        None => DEFAULT_TIMEOUT,
        Some(v) => match v.as_u64() {
            Some(s) if (1..=300).contains(&s) => Duration::from_secs(s),
            _ => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "invalid network config",
                    "timeoutSeconds must be a whole number from 1 to 300",
                ));
            }
        },
    };
    let prev_result = conf.get("prevResult").cloned();
    let ips = match &prev_result {
        Some(r) => result_ips(r)?,
        None => Vec::new(),
    };
    let args = parse_cni_args(env_get(env, "CNI_ARGS"))?;
    let arg = |k: &str| args.get(k).cloned().unwrap_or_default();
    let forwarded = match command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        _ => Command::Check,
    };
    let request = Request {
        command: forwarded,
        container_id: env_get(env, "CNI_CONTAINERID").to_string(),
        netns: env_get(env, "CNI_NETNS").to_string(),
        namespace: arg("K8S_POD_NAMESPACE"),
        name: arg("K8S_POD_NAME"),
        uid: arg("K8S_POD_UID"),
        ips,
    };
    if matches!(command.as_str(), "ADD" | "DEL" | "CHECK") && request.container_id.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            "CNI_CONTAINERID is not set",
            "",
        ));
    }
    if matches!(command.as_str(), "ADD" | "CHECK") && request.netns.is_empty() {
        return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set", ""));
    }
    Ok(Invocation {
        command,
        cni_version,
        socket,
        timeout,
        prev_result,
        request,
    })
}

/// Sends one request to ztunnel and waits (bounded) for its answer.
pub fn ask(socket: &Path, timeout: Duration, request: &Request) -> Result<Response, CniError> {
    let unreachable = |what: &str, e: std::io::Error| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "ztunnel is not reachable",
            format!(
                "{what} {}: {e}; the pod is not started until the node's ztunnel can hold it",
                socket.display()
            ),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| unreachable("connecting to", e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| unreachable("setting timeouts on", e))?;
    let mut line = serde_json::to_vec(request)
        .map_err(|e| CniError::new(code::DECODE, "cannot encode the request", e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| unreachable("writing to", e))?;
    let mut answer = String::new();
    BufReader::new(stream.take_limit())
        .read_line(&mut answer)
        .map_err(|e| unreachable("reading the answer from", e))?;
    if answer.trim().is_empty() {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "ztunnel closed the connection without an answer",
            socket.display().to_string(),
        ));
    }
    serde_json::from_str(&answer)
        .map_err(|e| CniError::new(code::DECODE, "ztunnel's answer is not valid", e.to_string()))
}

trait TakeLimit {
    fn take_limit(self) -> std::io::Take<UnixStream>;
}

impl TakeLimit for UnixStream {
    fn take_limit(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, proto::MAX_LINE as u64)
    }
}

/// Runs one invocation: returns what goes to stdout and whether it succeeded.
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> (String, bool) {
    let version_hint = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "1.0.0".to_string());
    match execute(env, stdin) {
        Ok(out) => (out.map(|v| v.to_string()).unwrap_or_default(), true),
        Err(e) => (e.to_json(&version_hint).to_string(), false),
    }
}

fn execute(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let inv = parse(env, stdin)?;
    match inv.command.as_str() {
        "VERSION" => Ok(Some(json!({
            "cniVersion": inv.cni_version,
            "supportedVersions": SUPPORTED_VERSIONS,
        }))),
        "ADD" => {
            let answer = ask(&inv.socket, inv.timeout, &inv.request)?;
            if !answer.ok {
                return Err(CniError::new(
                    code::REFUSED,
                    "ztunnel refused the pod",
                    answer.message,
                ));
            }
            // A chained plugin passes the result through; only the version is filled in
            // when the previous plugin left it out.
            let mut result = inv.prev_result.unwrap_or_else(|| json!({}));
            if let Some(obj) = result.as_object_mut() {
                obj.entry("cniVersion")
                    .or_insert_with(|| Value::String(inv.cni_version.clone()));
            }
            Ok(Some(result))
        }
        // DEL must succeed when there is nothing left to do, including when ztunnel is down:
        // it drops holds it cannot find itself (the netns disappears) once it is back.
        "DEL" => {
            if let Err(e) = ask(&inv.socket, inv.timeout, &inv.request) {
                eprintln!("ambit-cni: DEL not delivered to ztunnel: {e}");
            }
            Ok(None)
        }
        "CHECK" | "STATUS" => {
            let answer = ask(&inv.socket, inv.timeout, &inv.request)?;
            if answer.ok {
                Ok(None)
            } else {
                Err(CniError::new(
                    code::REFUSED,
                    "ztunnel check failed",
                    answer.message,
                ))
            }
        }
        "GC" => Ok(None),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other}"),
            "",
        )),
    }
}

/// Entry point of `ztunnel cni`: reads the process environment and stdin, prints the
/// result, and returns the exit code.
pub fn main() -> i32 {
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| ENV_KEYS.contains(&k.as_str()))
        .collect();
    let mut stdin = Vec::new();
    let read = std::io::Read::read_to_end(
        &mut std::io::Read::take(std::io::stdin(), 1 << 20),
        &mut stdin,
    );
    let (out, ok) = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => (
            CniError::new(code::DECODE, "cannot read stdin", e.to_string())
                .to_json("1.0.0")
                .to_string(),
            false,
        ),
    };
    if !out.is_empty() {
        println!("{out}");
    }
    if ok { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn add_env() -> HashMap<String, String> {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u-1",
            ),
        ])
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni",
        "ztunnelSocket":"/tmp/x.sock",
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
          "ips":[{"address":"10.1.2.3/24","interface":0},{"address":"fd00::3/64"}]}}"#;

    #[test]
    fn parses_env_args_and_prev_result() {
        let inv = parse(&add_env(), CONF.as_bytes()).expect("valid");
        assert_eq!(inv.command, "ADD");
        assert_eq!(inv.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(inv.timeout, DEFAULT_TIMEOUT);
        assert_eq!(inv.request.command, Command::Add);
        assert_eq!(inv.request.namespace, "shop");
        assert_eq!(inv.request.name, "web-1");
        assert_eq!(inv.request.uid, "u-1");
        assert_eq!(inv.request.container_id, "abc123");
        assert_eq!(inv.request.netns, "/var/run/netns/cni-1");
        let want: Vec<IpAddr> = vec![
            "10.1.2.3".parse().expect("ip"),
            "fd00::3".parse().expect("ip"),
        ];
        assert_eq!(inv.request.ips, want);
    }

    #[test]
    fn default_socket_and_timeout() {
        let inv = parse(
            &add_env(),
            br#"{"cniVersion":"0.4.0","name":"k8s","type":"ambit-cni","timeoutSeconds":3}"#,
        )
        .expect("valid");
        assert_eq!(inv.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(inv.timeout, Duration::from_secs(3));
        assert!(inv.request.ips.is_empty());
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let e = parse(&add_env(), b"not json").expect_err("invalid");
        assert_eq!(e.code, code::DECODE);
        let e = parse(&env(&[]), CONF.as_bytes()).expect_err("no command");
        assert_eq!(e.code, code::INVALID_ENV);
        let mut no_netns = add_env();
        no_netns.remove("CNI_NETNS");
        assert_eq!(
            parse(&no_netns, CONF.as_bytes())
                .expect_err("no netns")
                .code,
            code::INVALID_ENV
        );
        let mut bad_args = add_env();
        bad_args.insert("CNI_ARGS".into(), "K8S_POD_NAME".into());
        assert_eq!(
            parse(&bad_args, CONF.as_bytes())
                .expect_err("bad args")
                .code,
            code::INVALID_ENV
        );
        let e = parse(&add_env(), br#"{"cniVersion":"9.9.9"}"#).expect_err("version");
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = parse(
            &add_env(),
            br#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"nope"}]}}"#,
        )
        .expect_err("bad ip");
        assert_eq!(e.code, code::DECODE);
        assert!(
            e.details.contains("prevResult.ips[0].address"),
            "{}",
            e.details
        );
        let e = parse(&add_env(), br#"{"cniVersion":"1.0.0","ztunnelSocket":3}"#)
            .expect_err("bad socket");
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let (out, ok) = run(&add_env(), br#"{"cniVersion":"0.4.0","prevResult":7}"#);
        assert!(!ok);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["code"].as_u64().is_some(), "{v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }

    #[test]
    fn unreachable_ztunnel_fails_add_but_not_del() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = json!({
            "cniVersion": "1.0.0",
            "ztunnelSocket": dir.path().join("none.sock"),
            "prevResult": {"ips": [{"address": "10.0.0.9/24"}]},
        })
        .to_string();
        let (out, ok) = run(&add_env(), conf.as_bytes());
        assert!(!ok);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["code"], code::TRY_AGAIN_LATER);
        let mut del = add_env();
        del.insert("CNI_COMMAND".into(), "DEL".into());
        let (out, ok) = run(&del, conf.as_bytes());
        assert!(ok, "{out}");
        assert!(out.is_empty());
    }

    #[test]
    fn version_answers_without_config() {
        let (out, ok) = run(&env(&[("CNI_COMMAND", "VERSION")]), b"");
        assert!(ok);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["supportedVersions"].as_array().map(Vec::len), Some(5));
    }
}
