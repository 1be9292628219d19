//! Closing the enrollment race for new pods with a node-local CNI hook.
//!
//! A pod's IP reaches the config (the API server, or the file) only after its sandbox is
//! set up, and its containers may already be running by then; without a hook its first
//! connections could leave in plaintext. `ztunnel cni` is a chained CNI plugin ([`plugin`])
//! that runs during the sandbox's CNI ADD, before any container starts, and asks the node's
//! ztunnel over a Unix socket ([`server`]) to hold the pod's netns closed: the netns cookie
//! goes into the eBPF `enrolled` map with no listener behind it, so the connect hooks refuse
//! every captured connect() (EPERM) until the normal reconcile enrolls the pod, or the hold
//! is released because the pod turns out not to be enrolled. When ztunnel cannot answer,
//! the ADD fails and the kubelet retries the sandbox: the pod never runs uncaptured.

pub mod install;
pub mod plugin;
pub mod proto;
pub mod server;

/// Where ztunnel serves the hook and where the plugin looks by default.
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";
