//! The daemon exports Prometheus metrics of wakes, latencies and parked cost.

use std::time::Duration;

use persist_tests::{Sandbox, binary, wait_until};

/// The value of `metric` in a metrics page.
fn value(text: &str, metric: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(metric)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[test]
fn metrics_count_wakes_and_latencies() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--metrics", "127.0.0.1:9187"])
        .unwrap();
    let server = binary("hello-server").display().to_string();
    sandbox
        .agent_ok(&["add", "hello", "--port", "8200", "--exec", "--", &server])
        .unwrap();
    sandbox.http_get(8200).unwrap();

    // The supervisor records the wake once the command runs, which can be
    // a moment after the answer reached the client.
    let mut text = String::new();
    let _ = wait_until(Duration::from_secs(10), || {
        text = sandbox.metrics_page(9187);
        text.contains("persist_wakes_total{service=\"hello\"} 1")
    });
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

#[test]
fn parked_bytes_are_what_status_reports_for_the_skeleton() {
    persist_tests::require_root!();
    let mut sandbox = Sandbox::new().unwrap();
    sandbox
        .start_daemon_with(&["--metrics", "127.0.0.1:9188"])
        .unwrap();
    let server = binary("hello-server").display().to_string();
    sandbox
        .agent_ok(&[
            "add",
            "hello",
            "--port",
            "8201",
            "--",
            &server,
            "127.0.0.1:8201",
        ])
        .unwrap();
    wait_until(Duration::from_secs(10), || {
        sandbox.service("hello").unwrap()["skeleton_pid"].is_i64()
    })
    .expect("the parked service's skeleton is prepared");

    let status = sandbox.service("hello").unwrap();
    let reported = status["parked_bytes"].as_u64().unwrap();
    let parts: u64 = [
        "private_bytes",
        "page_table_bytes",
        "kernel_bytes",
        "agent_share_bytes",
    ]
    .iter()
    .map(|part| status["parked_cost"][part].as_u64().unwrap_or(0))
    .sum();
    assert_eq!(
        reported, parts,
        "the parked cost is the sum of its parts: {status}"
    );
    assert!(
        status["parked_cost"]["kernel_bytes"].as_u64() > Some(16 << 10),
        "kernel objects are counted, a kernel stack at least: {status}"
    );
    let text = sandbox.metrics_page(9188);
    let metric = value(&text, "persist_parked_bytes{service=\"hello\"}")
        .unwrap_or_else(|| panic!("no parked bytes metric for hello: {text}"))
        as u64;
    // Both are read live: the skeleton does not change while parked, but
    // the agent's own share moves a little as it serves the requests.
    assert!(
        metric.abs_diff(reported) * 20 < reported,
        "the metric says {metric} bytes parked, status {reported}: {text}"
    );
}
