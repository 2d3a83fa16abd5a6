//! The service files the daemon loads from `STATE_DIR/services/`.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use persist_agent::service::{
    KeepSkeleton, OnIdle, Prefetch, Readiness, ServiceMode, ServiceSpec, ServiceStore, SnapshotSpec,
};
use persist_agent::service_file::{self, ServiceFileError};

use super::{clear_files, scratch};

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
        declared_in: None,
    };
    let snapshot = |ready, on_idle, prefetch| SnapshotSpec {
        user: None,
        ready,
        ready_timeout: Duration::from_millis(10_500),
        warmup_requests: 0,
        warmup_command: matches!(prefetch, Prefetch::All).then(|| "true".to_owned()),
        on_idle,
        image: None,
        prefetch,
        accept_changed_files: matches!(prefetch, Prefetch::All),
        keep_skeleton: if matches!(prefetch, Prefetch::None) {
            KeepSkeleton::Never
        } else {
            KeepSkeleton::Auto
        },
        share_pages: matches!(prefetch, Prefetch::None),
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

/// A file of the services directory, loaded with the directory as a reload
/// and `check` load it. A service it declares must pass the checks a stored
/// one passes and survive the store's round trip; an error must name the
/// file, and a line the file has.
pub fn service_toml(data: &[u8]) {
    let dir = scratch().join("services.d");
    fs::create_dir_all(&dir).expect("creating the scratch services directory");
    clear_files(&dir);
    fs::write(dir.join("fuzz.toml"), data).expect("writing the scratch service file");
    let declared = service_file::load_dir(&dir).expect("the scratch services directory reads");
    for service in declared {
        match service.spec {
            Ok(spec) => {
                spec.check_settings()
                    .expect("a declared service passes the stored checks");
                assert_eq!(
                    round_trip(&spec),
                    spec,
                    "a declared service survives a round trip"
                );
            }
            Err(ServiceFileError::Invalid { path, line, .. }) => {
                assert_eq!(path, service.path, "the error names its file");
                let lines = data.split(|&b| b == b'\n').count();
                assert!(
                    line.is_none_or(|line| (1..=lines).contains(&line)),
                    "line {line:?} of a {lines}-line file"
                );
            }
            Err(ServiceFileError::Unreadable(_)) => {}
        }
    }
}

/// Service files as docs/services.md shows them, one per start mode.
pub fn toml_seeds() -> Vec<Vec<u8>> {
    [
        "port = 8000\ncommand = [\"sh\", \"-c\", \"exec true\"]\nready = \"http:/\"\nidle_timeout = \"30s\"\n",
        "port = 6379\naddr = \"127.0.0.1\"\ncommand = [\"true\"]\nuser = \"nobody\"\non_idle = \"keep\"\nidle_timeout = \"5m\"\nprefetch = \"all\"\nready_timeout = \"10s\"\nwarmup_requests = 3\naccept_changed_files = true\n",
        "port = 9000\nimage = \"/srv/images/api\"\nidle_timeout = \"10m\"\n",
        "port = 8080\nmode = \"exec\"\ncommand = [\"true\"]\nidle_timeout = \"1m\"\n",
        "port = 7000\nmode = \"inetd\"\ncommand = [\"cat\"]\n",
        "# a comment\n[table]\nport = 1\n",
    ]
    .map(|text| text.as_bytes().to_vec())
    .to_vec()
}
