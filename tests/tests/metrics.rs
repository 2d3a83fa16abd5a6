//! The daemon exports Prometheus metrics of wakes, latencies and parked cost.

use std::io::{Read, Write};
use std::net::TcpStream;

use persist_tests::{Sandbox, binary};

#[test]
fn metrics_count_wakes_and_latencies() {
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--metrics", "127.0.0.1:9187"])
        .unwrap();
    let server = binary("hello-server").display().to_string();
    sandbox
        .agent_ok(&["add", "hello", "--port", "8200", "--exec", "--", &server])
        .unwrap();
    sandbox.http_get(8200).unwrap();

    let text = sandbox
        .netns
        .enter(|| {
            let mut stream = TcpStream::connect(("127.0.0.1", 9187)).unwrap();
            stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            text
        })
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("persist_wakes_total{service=\"hello\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("persist_wake_latency_seconds_count{service=\"hello\"} 1"),
        "{text}"
    );
    assert!(text.contains("persist_syns{service=\"hello\"} 1"), "{text}");
    assert!(
        text.contains("persist_running{service=\"hello\"} 1"),
        "{text}"
    );
}
