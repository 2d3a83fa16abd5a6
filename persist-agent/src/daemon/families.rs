//! Services of one program that share stored pages (`add --share-pages`).
//!
//! Two services are of one *family* when they would start the same way: the
//! same command once the port is taken out of its arguments, the same
//! address, user, readiness check and warm-up. (The daemon starts every
//! command with its own environment and working directory, so those match
//! too.) A family's first image built in full is its *root*; each later
//! member's image is a delta of the root's: a page equal, at the same
//! address, to one the root stored is referred to in the root's page store,
//! which the member's image hard-links, and only the other pages are
//! written. Sameness of the family only picks the root to compare with: a
//! page is shared only when its bytes are equal, so a wrong guess costs disk,
//! never correctness.
//!
//! The members run with address-space layout randomisation off: started
//! alike, they then lay out their memory alike, and most of their pages
//! (code relocations, libraries' data, the heap) are byte for byte equal.
//!
//! Every image stays whole on its own: the hard link keeps the root's page
//! store for as long as any member links it, whether the root service is
//! removed, rebuilt or its generations pruned. The root is chosen again
//! (the next member built in full) once the root service is removed, and
//! after a daemon restart from the members whose images are full.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::service::{ServiceMode, ServiceSpec};

/// What services of one family have in common.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FamilyKey {
    /// The command, the port in its arguments replaced by `{port}`.
    command: Vec<String>,
    addr: IpAddr,
    user: Option<String>,
    /// The readiness check and warm-up, as text.
    readiness: String,
}

/// The family of `spec`, when it shares pages: a snapshot-mode service
/// with `share_pages`, whose image the daemon builds.
pub fn family_of(spec: &ServiceSpec) -> Option<FamilyKey> {
    let snapshot = spec.snapshot.as_ref()?;
    if spec.mode != ServiceMode::Snapshot || !snapshot.share_pages || snapshot.image.is_some() {
        return None;
    }
    let port = spec.port.to_string();
    Some(FamilyKey {
        command: spec
            .command
            .iter()
            .map(|arg| without_port(arg, &port))
            .collect(),
        addr: spec.addr,
        user: snapshot.user.clone(),
        readiness: format!(
            "{:?} {} warm-up requests, warm-up command {:?}",
            snapshot.ready, snapshot.warmup_requests, snapshot.warmup_command
        ),
    })
}

/// `arg` with every occurrence of the decimal `port` that is not part of a
/// longer number replaced by `{port}`.
fn without_port(arg: &str, port: &str) -> String {
    let bytes = arg.as_bytes();
    let mut out = String::with_capacity(arg.len());
    let mut index = 0;
    while index < arg.len() {
        let rest = &arg[index..];
        let before_is_digit = index > 0 && bytes[index - 1].is_ascii_digit();
        let after = index + port.len();
        let after_is_digit = bytes.get(after).is_some_and(u8::is_ascii_digit);
        if rest.starts_with(port) && !before_is_digit && !after_is_digit {
            out.push_str("{port}");
            index = after;
        } else {
            let next = rest.chars().next().expect("index is below the length");
            out.push(next);
            index += next.len_utf8();
        }
    }
    out
}

/// The root of each family: the service whose image is full and which
/// later members' images are deltas of.
#[derive(Debug, Default)]
pub struct Families {
    roots: Mutex<HashMap<FamilyKey, String>>,
}

impl Families {
    /// The root of `family`, unless it is `name` itself (which is then
    /// rebuilt in full).
    pub fn root_for(&self, family: &FamilyKey, name: &str) -> Option<String> {
        self.roots
            .lock()
            .expect("lock")
            .get(family)
            .filter(|root| *root != name)
            .cloned()
    }

    /// Makes `name`, whose image is full, the root of `family` if it has
    /// none.
    pub fn offer_root(&self, family: FamilyKey, name: &str) {
        self.roots
            .lock()
            .expect("lock")
            .entry(family)
            .or_insert_with(|| name.to_owned());
    }

    /// Forgets `name` as a root: it is removed.
    pub fn forget(&self, name: &str) {
        self.roots
            .lock()
            .expect("lock")
            .retain(|_, root| root != name);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::{KeepSkeleton, OnIdle, Prefetch, Readiness, SnapshotSpec};

    fn spec(name: &str, port: u16, command: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            addr: std::net::Ipv4Addr::LOCALHOST.into(),
            port,
            mode: ServiceMode::Snapshot,
            idle_timeout: None,
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            snapshot: Some(SnapshotSpec {
                user: None,
                ready: Readiness::Tcp,
                ready_timeout: Duration::from_secs(30),
                warmup_requests: 0,
                warmup_command: None,
                on_idle: OnIdle::Fresh,
                image: None,
                prefetch: Prefetch::Recorded,
                accept_changed_files: false,
                keep_skeleton: KeepSkeleton::Auto,
                share_pages: true,
            }),
            declared_in: None,
        }
    }

    #[test]
    fn the_port_is_taken_out_of_whole_numbers_only() {
        assert_eq!(without_port("127.0.0.1:8080", "8080"), "127.0.0.1:{port}");
        assert_eq!(without_port("--port=8080", "8080"), "--port={port}");
        assert_eq!(without_port("18080", "8080"), "18080");
        assert_eq!(without_port("80801", "8080"), "80801");
        assert_eq!(without_port("a8080b8080", "8080"), "a{port}b{port}");
        assert_eq!(without_port("é8080", "8080"), "é{port}");
    }

    #[test]
    fn services_differing_only_in_the_port_are_one_family() {
        let one = spec("one", 8080, &["/srv/app", "127.0.0.1:8080"]);
        let two = spec("two", 9090, &["/srv/app", "127.0.0.1:9090"]);
        assert_eq!(family_of(&one), family_of(&two));
        assert!(family_of(&one).is_some());
    }

    #[test]
    fn another_argument_user_or_readiness_is_another_family() {
        let base = spec("one", 8080, &["/srv/app", "127.0.0.1:8080"]);
        let other_arg = spec("two", 9090, &["/srv/app", "127.0.0.2:9090"]);
        assert_ne!(family_of(&base), family_of(&other_arg));
        let mut other_user = spec("three", 9091, &["/srv/app", "127.0.0.1:9091"]);
        other_user.snapshot.as_mut().unwrap().user = Some("nobody".into());
        assert_ne!(family_of(&base), family_of(&other_user));
        let mut warmed = spec("four", 9092, &["/srv/app", "127.0.0.1:9092"]);
        warmed.snapshot.as_mut().unwrap().warmup_requests = 3;
        assert_ne!(family_of(&base), family_of(&warmed));
    }

    #[test]
    fn only_services_that_ask_and_whose_image_is_built_share() {
        let mut plain = spec("one", 8080, &["/srv/app"]);
        plain.snapshot.as_mut().unwrap().share_pages = false;
        assert_eq!(family_of(&plain), None);
        let mut prebuilt = spec("two", 8081, &["/srv/app"]);
        let snapshot: &mut SnapshotSpec = prebuilt.snapshot.as_mut().unwrap();
        snapshot.image = Some("/var/lib/images/app".into());
        assert_eq!(family_of(&prebuilt), None);
    }

    #[test]
    fn a_root_is_kept_until_forgotten_and_never_its_own_base() {
        let families = Families::default();
        let key = family_of(&spec("one", 8080, &["/srv/app"])).unwrap();
        assert_eq!(families.root_for(&key, "one"), None);
        families.offer_root(key.clone(), "one");
        families.offer_root(key.clone(), "two");
        assert_eq!(families.root_for(&key, "two").as_deref(), Some("one"));
        assert_eq!(families.root_for(&key, "one"), None, "not its own base");
        families.forget("one");
        assert_eq!(families.root_for(&key, "two"), None);
        families.offer_root(key.clone(), "two");
        assert_eq!(families.root_for(&key, "three").as_deref(), Some("two"));
    }
}
