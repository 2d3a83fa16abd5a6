//! Services of one program added with `--share-pages`: their images store
//! once the pages they have in common (later images link the first one's
//! page store), each still wakes and answers as itself, removing the one
//! whose pages the others share leaves them restorable, and the generations
//! of a `--on-idle keep` member still work.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use persist_common::image::Image;
use persist_tests::{Sandbox, binary, wait_until};

fn hello(port: u16) -> Vec<String> {
    vec![
        binary("hello-server").display().to_string(),
        format!("127.0.0.1:{port}"),
    ]
}

/// Blocks allocated to the files of `images`, each file counted once
/// however many of them link it.
fn disk_bytes(images: &[&Path]) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    for image in images {
        for entry in std::fs::read_dir(image).unwrap() {
            let meta = entry.unwrap().metadata().unwrap();
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

fn inode(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

/// Wakes `name` on `port` and checks that the answer comes from its own
/// process (the pid the daemon shows running it).
fn answers_as_itself(sandbox: &Sandbox, name: &str, port: u16) {
    let answer = sandbox.http_get(port).unwrap();
    let pid = sandbox.running_pid(name).unwrap();
    assert!(
        answer.contains(&format!("hello from pid {pid}")),
        "{name} on {port}: {answer}"
    );
}

fn parked(sandbox: &Sandbox, name: &str) -> bool {
    sandbox
        .service(name)
        .is_ok_and(|s| s["state"] == "parked" && s["skeleton_pid"].is_i64())
}

#[test]
fn services_of_one_program_share_pages_and_stay_restorable_on_their_own() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let options = ["--share-pages", "--idle-timeout", "500ms"];
    // The first is built in full; the others are added at once, both deltas of it.
    sandbox
        .add_ok("first", 8800, &options, &hello(8800))
        .unwrap();
    std::thread::scope(|scope| {
        for (name, port) in [("second", 8801), ("third", 8802)] {
            let sandbox = &sandbox;
            scope.spawn(move || sandbox.add_ok(name, port, &options, &hello(port)).unwrap());
        }
    });

    let images = sandbox.state_dir().join("images");
    let first = images.join("first");
    let second = images.join("second");
    let third = images.join("third");
    let first_image = Image::open(&first).unwrap();
    assert!(
        first_image.manifest().base_stores.is_empty(),
        "the first is full"
    );
    for other in [&second, &third] {
        let image = Image::open(other).unwrap();
        assert_eq!(
            image.manifest().base_stores.len(),
            1,
            "{}: one base store, the first's pages",
            other.display()
        );
        assert_eq!(
            inode(&other.join("pages.base.0")),
            inode(&first.join("pages")),
            "{} links the first's page store",
            other.display()
        );
        let own = std::fs::metadata(other.join("pages")).unwrap().len();
        let full = std::fs::metadata(first.join("pages")).unwrap().len();
        assert!(
            own * 2 < full,
            "{} writes {own} bytes of pages of its own, the full image {full}",
            other.display()
        );
    }
    let one = disk_bytes(&[&first]);
    let two = disk_bytes(&[&first, &second]);
    let three = disk_bytes(&[&first, &second, &third]);
    assert!(two < one * 2, "two images take {two} bytes, one {one}");
    assert!(
        three < one * 2,
        "three images take {three} bytes, one {one}"
    );

    for (name, port) in [("first", 8800), ("second", 8801), ("third", 8802)] {
        answers_as_itself(&sandbox, name, port);
    }

    // Removing the first deletes its image; the others keep its pages.
    wait_until(Duration::from_secs(10), || {
        parked(&sandbox, "second") && parked(&sandbox, "third")
    })
    .expect("parked again when idle");
    sandbox.agent_ok(&["remove", "first"]).unwrap();
    assert!(!first.exists(), "remove deletes the image the daemon built");
    assert!(
        Image::open(&second).is_ok(),
        "the second's image is whole without the first's"
    );
    answers_as_itself(&sandbox, "second", 8801);
    answers_as_itself(&sandbox, "third", 8802);

    // A member added now is built in full (its family's root is gone), and
    // one added after it shares its pages.
    sandbox
        .add_ok("fourth", 8803, &options, &hello(8803))
        .unwrap();
    sandbox
        .add_ok("fifth", 8804, &options, &hello(8804))
        .unwrap();
    assert!(
        Image::open(&images.join("fourth"))
            .unwrap()
            .manifest()
            .base_stores
            .is_empty()
    );
    assert_eq!(
        inode(&images.join("fifth/pages.base.0")),
        inode(&images.join("fourth/pages"))
    );
    // The fourth took the first's slot in the SYN watcher's maps: its
    // wakes must reach it, not what the slot named before.
    answers_as_itself(&sandbox, "fourth", 8803);
    answers_as_itself(&sandbox, "fifth", 8804);
}

/// Counts requests: its state is what `--on-idle keep` keeps.
const COUNTER: &str = r#"
import http.server, sys
count = 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        count += 1
        body = f"count {count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

#[test]
fn a_member_kept_at_each_park_outlives_the_image_it_shared_pages_with() {
    persist_tests::require_root!();
    let sandbox = Sandbox::with_daemon().unwrap();
    let script = sandbox.state_dir().join("counter.py");
    std::fs::write(&script, COUNTER).unwrap();
    let command = |port: u16| {
        vec![
            "/usr/bin/python3".to_owned(),
            script.display().to_string(),
            port.to_string(),
        ]
    };
    let options = [
        "--share-pages",
        "--on-idle",
        "keep",
        "--idle-timeout",
        "500ms",
    ];
    sandbox
        .add_ok("root", 8810, &options, &command(8810))
        .unwrap();
    sandbox
        .add_ok("member", 8811, &options, &command(8811))
        .unwrap();
    let member = sandbox.state_dir().join("images/member");
    assert_eq!(
        inode(&member.join("pages.base.0")),
        inode(&sandbox.state_dir().join("images/root/pages")),
        "the member's image links the root's pages"
    );

    let get = |port: u16| sandbox.http_get(port).unwrap();
    assert!(get(8811).ends_with("count 1\n"));
    assert!(get(8811).ends_with("count 2\n"));
    wait_until(Duration::from_secs(15), || {
        parked(&sandbox, "member") && sandbox.service("member").unwrap()["generation"] == "1"
    })
    .expect("parked, its state kept as generation 1");

    sandbox.agent_ok(&["remove", "root"]).unwrap();
    let answer = get(8811);
    assert!(
        answer.ends_with("count 3\n"),
        "the kept state wakes without the root: {answer}"
    );
    wait_until(Duration::from_secs(15), || {
        parked(&sandbox, "member") && sandbox.service("member").unwrap()["generation"] == "2"
    })
    .expect("parked again, generation 2");
    sandbox
        .agent_ok(&["rollback", "member", "--to", "pristine"])
        .unwrap();
    let answer = get(8811);
    assert!(
        answer.ends_with("count 1\n"),
        "its pristine image, half of it the removed root's pages, restores: {answer}"
    );
}
