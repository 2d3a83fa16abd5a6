//! An established TCP connection, saved with `TCP_REPAIR` so that it is
//! re-created in the same state without the peer noticing: same addresses,
//! sequence numbers, windows, negotiated options and queued data.

use serde::{Deserialize, Serialize};

use super::SocketOption;
use super::manifest::base64_bytes;

/// An established TCP connection ([`super::FdKind::TcpConnection`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TcpConnection {
    /// Local address and port, e.g. `127.0.0.1:41234`.
    pub local: String,
    /// The peer's address and port.
    pub peer: String,
    /// Sequence number of the first byte of `send_queue`: the oldest byte
    /// the peer has not acknowledged.
    pub send_seq: u32,
    /// Sequence number of the first byte of `recv_queue`: the next byte the
    /// process reads.
    pub recv_seq: u32,
    /// Bytes written by the process and not acknowledged by the peer, sent
    /// ones first.
    #[serde(with = "base64_bytes")]
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were never sent.
    pub send_unsent: u32,
    /// Bytes received and not yet read by the process.
    #[serde(with = "base64_bytes")]
    pub recv_queue: Vec<u8>,
    /// Largest segment the peer accepts (`mss_clamp`).
    pub mss: u32,
    /// Window scale shifts (ours to send, ours to receive), if negotiated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_scale: Option<(u8, u8)>,
    /// Selective acknowledgements were negotiated.
    pub sack: bool,
    /// The connection's timestamp clock (`TCP_TIMESTAMP`), if timestamps
    /// were negotiated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u32>,
    /// Send and receive windows (`TCP_REPAIR_WINDOW`).
    pub window: TcpWindow,
    /// `SO_SNDBUF` and `SO_RCVBUF` as the kernel reports them (twice what
    /// a process sets).
    pub buffers: (u32, u32),
    /// `SO_REUSEADDR`.
    pub reuseaddr: bool,
    /// `IPV6_V6ONLY`, for an IPv6 socket.
    #[serde(default)]
    pub v6only: bool,
    /// Other integer options that were not zero (`TCP_NODELAY`,
    /// `SO_KEEPALIVE` and keepalive timing, `TCP_USER_TIMEOUT`).
    #[serde(default)]
    pub options: Vec<SocketOption>,
}

/// The windows of a connection (`struct tcp_repair_window`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct TcpWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's receive window.
    pub snd_wnd: u32,
    /// Largest window the peer ever offered.
    pub max_window: u32,
    /// Our receive window.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when our window was last advertised.
    pub rcv_wup: u32,
}

#[cfg(test)]
mod tests {
    use super::super::FdKind;
    use super::*;

    #[test]
    fn a_connection_reads_back_as_written_with_its_queues_in_base64() {
        let kind = FdKind::TcpConnection(TcpConnection {
            local: "127.0.0.1:41234".to_owned(),
            peer: "127.0.0.1:6379".to_owned(),
            send_seq: u32::MAX - 2,
            recv_seq: 7,
            send_queue: b"PING\r\n".to_vec(),
            send_unsent: 2,
            recv_queue: vec![0, 255, 10],
            mss: 65483,
            window_scale: Some((7, 7)),
            sack: true,
            timestamp: Some(123_456),
            window: TcpWindow {
                snd_wl1: 1,
                snd_wnd: 2,
                max_window: 3,
                rcv_wnd: 4,
                rcv_wup: 5,
            },
            buffers: (2_626_560, 131_072),
            reuseaddr: false,
            v6only: false,
            options: vec![SocketOption {
                level: 6,
                name: 1,
                value: 1,
            }],
        });
        let json = serde_json::to_value(&kind).unwrap();
        assert_eq!(json["kind"], "tcp_connection", "{json}");
        assert_eq!(json["send_queue"], "UElORw0K", "{json}");
        let back: FdKind = serde_json::from_value(json).unwrap();
        assert_eq!(back, kind);
    }
}
