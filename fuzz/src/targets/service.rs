//! The service files the daemon loads from `STATE_DIR/services/`.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use persist_agent::service::{
    OnIdle, Prefetch, Readiness, ServiceMode, ServiceSpec, ServiceStore, SnapshotSpec,
};

use super::scratch;

/// A service file, loaded from a services directory as the daemon loads
/// it, then validated as `add` validates it. A loaded service must survive
/// a round trip through the form the store saves.
pub fn service(data: &[u8]) {
    let state = scratch().join("state");
    let store = ServiceStore::open(&state).expect("creating the scratch services directory");
    let path = state.join("services").join("fuzz.json");
    fs::write(&path, data).expect("writing the scratch service file");
    let loaded = store
        .load_all()
        .expect("the scratch services directory reads");
    for spec in loaded.into_iter().filter_map(|(_, spec)| spec.ok()) {
        let _ = spec.validate();
        assert_eq!(round_trip(&spec), spec, "a service survives a round trip");
    }
}

/// `spec` saved as [`ServiceStore::save`] writes it, then parsed again.
pub(super) fn round_trip(spec: &ServiceSpec) -> ServiceSpec {
    let json = serde_json::to_vec_pretty(spec).expect("a service always serialises");
    serde_json::from_slice(&json).expect("a saved service parses")
}

/// Service files as `add` saves them: every mode, readiness, idle policy
/// and prefetch, a prebuilt image, a user.
pub fn seeds() -> Vec<Vec<u8>> {
    specs()
        .iter()
        .map(|spec| serde_json::to_vec_pretty(spec).expect("a service always serialises"))
        .collect()
}

pub(super) fn specs() -> Vec<ServiceSpec> {
    let base = |name: &str, mode| ServiceSpec {
        name: name.into(),
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 8000,
        mode,
        idle_timeout: Some(Duration::from_secs(30)),
        command: vec!["sh".into(), "-c".into(), "exec true".into()],
        snapshot: None,
    };
    let snapshot = |ready, on_idle, prefetch| SnapshotSpec {
        user: None,
        ready,
        ready_timeout: Duration::from_millis(10_500),
        warmup_requests: 0,
        on_idle,
        image: None,
        prefetch,
        accept_changed_files: matches!(prefetch, Prefetch::All),
    };
    vec![
        base("exec", ServiceMode::Exec),
        ServiceSpec {
            idle_timeout: None,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 65535,
            ..base("inetd.1", ServiceMode::Inetd)
        },
        ServiceSpec {
            snapshot: Some(snapshot(
                Readiness::Http {
                    path: "/health?x=1".into(),
                },
                OnIdle::Keep,
                Prefetch::Recorded,
            )),
            ..base("web", ServiceMode::Snapshot)
        },
        ServiceSpec {
            snapshot: Some(SnapshotSpec {
                user: Some("nobody".into()),
                warmup_requests: 20,
                ..snapshot(Readiness::Notify, OnIdle::Fresh, Prefetch::All)
            }),
            idle_timeout: Some(Duration::from_micros(1_000_001)),
            ..base("notify_2", ServiceMode::Snapshot)
        },
        ServiceSpec {
            snapshot: Some(SnapshotSpec {
                image: Some("/var/lib/persist/images/prebuilt".into()),
                ..snapshot(Readiness::Tcp, OnIdle::Fresh, Prefetch::None)
            }),
            command: vec![],
            ..base("prebuilt", ServiceMode::Snapshot)
        },
    ]
}
