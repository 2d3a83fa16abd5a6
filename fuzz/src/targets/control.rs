//! Messages of the control socket.

use persist_agent::control::{
    HistoryEntry, ParkedCost, Reply, Request, ServiceStatus, history_table, status_table,
};

use super::service::specs;

/// Flag in the first byte: the rest is a reply (as the CLI reads it), not
/// a request (as the daemon reads it).
const REPLY: u8 = 1;

/// A control message: a request decoded as the daemon decodes it, an
/// added service validated; or a reply decoded and shown as the CLI does.
/// Either must survive a round trip.
pub fn control(data: &[u8]) {
    let Some((&flags, line)) = data.split_first() else {
        return;
    };
    if flags & REPLY == 0 {
        let Ok(request) = Request::decode(line) else {
            return;
        };
        if let Request::Add { spec } = &request {
            let _ = spec.validate();
        }
        let json = serde_json::to_vec(&request).expect("a request always serialises");
        let again = Request::decode(&json).expect("an encoded request decodes");
        assert_eq!(
            serde_json::to_vec(&again).expect("a request always serialises"),
            json,
            "a request survives a round trip"
        );
    } else {
        let Ok(reply) = Reply::decode(line) else {
            return;
        };
        let _ = status_table(&reply.services);
        let _ = history_table(&reply.history);
        let json = serde_json::to_vec(&reply).expect("a reply always serialises");
        let again = Reply::decode(&json).expect("an encoded reply decodes");
        assert_eq!(
            again.history, reply.history,
            "a history survives a round trip"
        );
        assert_eq!(
            again.services, reply.services,
            "a reply survives a round trip"
        );
    }
}

/// Every request the CLI sends, and replies as the daemon writes them.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut requests: Vec<Request> = specs()
        .into_iter()
        .map(|spec| Request::Add { spec })
        .collect();
    requests.extend([
        Request::Remove { name: "web".into() },
        Request::Status { names: Vec::new() },
        Request::Status {
            names: vec!["web".into()],
        },
        Request::Park { name: "web".into() },
        Request::Wake { name: "web".into() },
        Request::History { name: "web".into() },
        Request::Rollback {
            name: "web".into(),
            to: Some("pristine".into()),
        },
        Request::Snapshot {
            name: "web".into(),
            tag: Some("before-migration".into()),
        },
    ]);
    let status = ServiceStatus {
        name: "web".into(),
        addr: "127.0.0.1".into(),
        port: 8000,
        mode: "snapshot".into(),
        state: "parked".into(),
        pid: Some(4242),
        syns: 12,
        wakes: 3,
        last_wake_us: Some(1800),
        last_event_us: Some(40),
        last_resume_us: Some(900),
        last_faults: Some(17),
        last_fault_pages: Some(34),
        last_filled_pages: Some(1000),
        last_prefetch_pages: Some(200),
        rss_bytes: 8 << 20,
        pids: Vec::new(),
        pss_bytes: 0,
        parked_bytes: 1 << 20,
        skeleton_pid: Some(4243),
        skeleton: Some("prepared".into()),
        keep_skeleton: Some("auto".into()),
        skeleton_bytes: Some(300 << 10),
        parked_cost: Some(ParkedCost {
            private_bytes: 16 << 10,
            page_table_bytes: 40 << 10,
            kernel_bytes: 90 << 10,
            agent_share_bytes: 8 << 10,
        }),
        error: Some("wake failed: image is corrupt".into()),
        generation: Some("2".into()),
        note: Some("rebuilt: image was taken on kernel 6.1, this is 6.18".into()),
    };
    let replies = [
        Reply::ok("added web on 127.0.0.1:8000 (parked)"),
        Reply::error("no service named web"),
        Reply {
            services: vec![
                status.clone(),
                ServiceStatus {
                    name: "idle".into(),
                    state: "running".into(),
                    pid: None,
                    last_wake_us: None,
                    error: None,
                    ..status
                },
            ],
            ..Reply::default()
        },
        Reply {
            history: vec![HistoryEntry {
                generation: "2".into(),
                created_unix_ms: Some(1_764_800_000_000),
                new_bytes: Some(81920),
                wakes: Some(1),
                bad: Some("killed by SIGSEGV 0.2 s after its wake".into()),
                tag: None,
                running: false,
                next: false,
            }],
            ..Reply::default()
        },
    ];
    let line = |flags: u8, mut json: Vec<u8>| {
        json.push(b'\n');
        [vec![flags], json].concat()
    };
    requests
        .iter()
        .map(|request| {
            line(
                0,
                serde_json::to_vec(request).expect("a request serialises"),
            )
        })
        .chain(replies.iter().map(|reply| {
            line(
                REPLY,
                serde_json::to_vec(reply).expect("a reply serialises"),
            )
        }))
        .collect()
}
