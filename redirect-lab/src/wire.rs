//! What the lab's programs print (one JSON object per line), shared with the tests.

use serde::{Deserialize, Serialize};

/// A line the sidecar logs per accepted connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProxyRecord {
    /// `outbound` or `inbound`, or `error`.
    pub event: String,
    /// The accepted socket's peer (the application, for outbound).
    pub peer: String,
    /// The accepted socket's local address.
    pub local: String,
    /// The original destination the proxy learned (SO_ORIGINAL_DST / getsockname).
    pub orig_dst: Option<String>,
    /// The local address of the proxy's upstream connection.
    pub upstream_local: Option<String>,
    pub error: Option<String>,
}

/// What the server answers: the addresses it saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerReply {
    /// The server socket's local address (where the connection arrived).
    pub local: String,
    /// The connection's peer as the server saw it.
    pub peer: String,
    /// The request line it received.
    pub echo: String,
}

/// One client connection's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientResult {
    pub target: String,
    /// The client socket's local address.
    pub local: Option<String>,
    /// What getpeername() returned on the client socket.
    pub peername: Option<String>,
    /// What `SO_ORIGINAL_DST` returned on the client's own socket (an error as text).
    #[serde(default)]
    pub own_orig_dst: Option<String>,
    pub reply: Option<ServerReply>,
    pub error: Option<String>,
    /// With `--hold`: getpeername() again once every connection of the run is open.
    #[serde(default)]
    pub peername_held: Option<String>,
}

/// A line Envoy's access log writes per connection or request (see [`crate::envoy`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnvoyRecord {
    /// Which listener took it: `outbound`, `inbound`, `self`, `health`, `stats`.
    pub listener: String,
    /// The downstream peer: the application (outbound), the client (inbound).
    pub downstream_remote: String,
    /// The downstream local address after the `original_dst` filter: the original destination.
    pub downstream_local: String,
    /// The accepted socket's own local address, before any restoring.
    pub downstream_direct_local: String,
    /// The upstream Envoy connected to (none for a listener that answers itself).
    pub upstream_host: Option<String>,
    /// The local address of Envoy's upstream connection.
    pub upstream_local: Option<String>,
    /// Envoy's response flags (`-` when none; e.g. `UF` upstream connection failure).
    pub flags: String,
}

impl EnvoyRecord {
    /// The record as the lab sidecar would have written it, for a connection Envoy's
    /// `virtualOutbound` or `virtualInbound` took (`None` for its other listeners).
    pub fn as_proxy_record(&self) -> Option<ProxyRecord> {
        if self.listener != "outbound" && self.listener != "inbound" {
            return None;
        }
        Some(ProxyRecord {
            event: self.listener.clone(),
            peer: self.downstream_remote.clone(),
            local: self.downstream_direct_local.clone(),
            orig_dst: Some(self.downstream_local.clone()),
            upstream_local: self.upstream_local.clone(),
            error: (self.flags != "-").then(|| self.flags.clone()),
        })
    }
}

/// What `redirect-lab dns-query` saw: the A records of the reply, its response code, and the
/// address the reply came from as the application was told (`recvfrom`, or the TCP peer).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsResult {
    pub answers: Vec<String>,
    pub rcode: u8,
    pub from: Option<String>,
    pub error: Option<String>,
}
