//! What the plugin and ztunnel say to each other: one JSON line each way per connection.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The CNI command forwarded to ztunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// A sandbox is being set up: hold it if its namespace is ambient.
    Add,
    /// A sandbox is going away: release any hold on it.
    Del,
    /// Liveness (CNI CHECK and STATUS).
    Check,
}

/// Plugin → ztunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    /// What happened.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on DEL).
    pub netns: String,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`.
    #[serde(default)]
    pub uid: String,
    /// The pod's addresses from `prevResult`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// ztunnel → plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// Whether the command succeeded; `false` fails the CNI command.
    pub ok: bool,
    /// `true` when the pod's netns is now held closed until enrollment.
    #[serde(default)]
    pub held: bool,
    /// Why it failed, or what was done.
    #[serde(default)]
    pub message: String,
}

impl Response {
    /// Success.
    pub fn ok(held: bool, message: impl Into<String>) -> Self {
        Response {
            ok: true,
            held,
            message: message.into(),
        }
    }

    /// Refusal.
    pub fn refuse(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            held: false,
            message: message.into(),
        }
    }
}

/// Longest request line ztunnel reads; a real one is a few hundred bytes.
pub const MAX_LINE: usize = 64 * 1024;
