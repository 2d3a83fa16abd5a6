//! Sockets that neither listen nor talk to a peer inside the process: TCP
//! sockets created or bound but not listening, and UNIX sockets of every
//! type that are unbound, bound, or connected to a named socket outside the
//! process.

use serde::{Deserialize, Serialize};

use super::manifest::SocketOption;

/// A TCP socket that is neither listening nor connected (state `CLOSE`):
/// just created, or bound to an address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TcpSocket {
    /// Local address and port: `0.0.0.0:0` or `[::]:0` when unbound (the
    /// family alone), a port of 0 for an address bound with
    /// `IP_BIND_ADDRESS_NO_PORT`.
    pub local: String,
    /// `SO_REUSEADDR`.
    pub reuseaddr: bool,
    /// `SO_REUSEPORT`.
    pub reuseport: bool,
    /// `IPV6_V6ONLY` for IPv6 sockets.
    pub v6only: bool,
    /// Other integer options, set again before the socket is bound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<SocketOption>,
    /// `SO_LINGER` time in seconds, when lingering is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger: Option<i32>,
}

/// A UNIX socket that is not listening and whose peer, if any, is outside
/// the process: unbound, bound (to a path or an abstract name), or
/// connected to a named socket that restore connects to again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnixSocket {
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub socket_type: i32,
    /// Bound name: a path, `@name` in the abstract namespace, or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// For a name that is a path: the socket file it named at checkpoint,
    /// or `None` when the socket's file had been removed (restore binds,
    /// then removes the file it made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<SocketFile>,
    /// Name of the peer to connect to again: the path (or `@name`) of the
    /// socket outside the process it was connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Integer socket options that were set (`SO_PASSCRED`, locked buffer
    /// sizes, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<SocketOption>,
    /// Directions shut down, as the kernel keeps them: 1 receiving
    /// (`RCV_SHUTDOWN`), 2 sending (`SEND_SHUTDOWN`), 3 both.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shutdown: u8,
}

/// For `skip_serializing_if`: a field left at zero is not written.
pub(super) fn is_zero(value: &u8) -> bool {
    *value == 0
}

/// The file a UNIX socket is bound to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketFile {
    /// Permission bits (who may connect or send).
    pub mode: u32,
    /// Owner uid and gid: restore gives them to the new file, and replaces
    /// a stale socket file at the path only if it has this owner.
    pub owner: (u32, u32),
}
