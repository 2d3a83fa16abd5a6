//! Credentials, set last in every thread (they are per thread in Linux):
//! bounding set, securebits, groups, gids, uids, capabilities, ambient
//! capabilities and no_new_privs.

use persist_common::image::Credentials;

use super::table::TableBuilder;

const SECBIT_KEEP_CAPS: u64 = 1 << 4;
const LINUX_CAPABILITY_VERSION_3: u64 = 0x2008_0522;

/// Our own credentials, in the image's terms, from /proc/self/status: read
/// once, as the agent never changes them (a tree's prepare asked for them
/// once per process, ~0.1 ms each).
pub fn own() -> Option<Credentials> {
    static OWN: std::sync::OnceLock<Option<Credentials>> = std::sync::OnceLock::new();
    OWN.get_or_init(|| {
        let status = procfs::process::Process::myself().ok()?.status().ok()?;
        from_status(&status, 0)
    })
    .clone()
}

/// The credentials a `/proc/PID/status` shows, in the image's terms, with
/// `securebits` (which status does not show); `None` if a field is missing.
pub(crate) fn from_status(
    status: &procfs::process::Status,
    securebits: u32,
) -> Option<Credentials> {
    Some(Credentials {
        uids: [status.ruid, status.euid, status.suid, status.fuid],
        gids: [status.rgid, status.egid, status.sgid, status.fgid],
        groups: status.groups.iter().map(|&g| g as u32).collect(),
        cap_inheritable: status.capinh,
        cap_permitted: status.capprm,
        cap_effective: status.capeff,
        cap_bounding: status.capbnd?,
        cap_ambient: status.capamb?,
        no_new_privs: status.nonewprivs? != 0,
        securebits,
    })
}

fn same_ignoring_securebits(a: &Credentials, b: &Credentials) -> bool {
    let mut a_groups = a.groups.clone();
    let mut b_groups = b.groups.clone();
    a_groups.sort_unstable();
    b_groups.sort_unstable();
    a.uids == b.uids
        && a.gids == b.gids
        && a_groups == b_groups
        && a.cap_inheritable == b.cap_inheritable
        && a.cap_permitted == b.cap_permitted
        && a.cap_effective == b.cap_effective
        && a.cap_bounding == b.cap_bounding
        && a.cap_ambient == b.cap_ambient
        && a.no_new_privs == b.no_new_privs
}

/// Appends the calls that give the calling thread `target` credentials,
/// starting from `current` (the agent's, inherited by the fork). Nothing is
/// added when they are the same.
pub fn append(t: &mut TableBuilder, target: &Credentials, current: &Credentials) {
    if same_ignoring_securebits(target, current) && target.securebits == 0 {
        return;
    }
    for cap in 0..64u64 {
        let bit = 1u64 << cap;
        if current.cap_bounding & bit != 0 && target.cap_bounding & bit == 0 {
            t.call(
                format!("drop capability {cap} from the bounding set"),
                libc::SYS_prctl,
                &[libc::PR_CAPBSET_DROP as u64, cap],
            );
        }
    }
    t.call(
        "securebits with KEEP_CAPS",
        libc::SYS_prctl,
        &[
            libc::PR_SET_SECUREBITS as u64,
            u64::from(target.securebits) | SECBIT_KEEP_CAPS,
        ],
    );
    let groups: Vec<u8> = target.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let groups_addr = t.data(&groups);
    t.call(
        "setgroups",
        libc::SYS_setgroups,
        &[target.groups.len() as u64, groups_addr],
    );
    let [rgid, egid, sgid, fsgid] = target.gids.map(u64::from);
    t.call("setresgid", libc::SYS_setresgid, &[rgid, egid, sgid]);
    t.call("setfsgid", libc::SYS_setfsgid, &[fsgid]);
    let [ruid, euid, suid, fsuid] = target.uids.map(u64::from);
    t.call("setresuid", libc::SYS_setresuid, &[ruid, euid, suid]);
    t.call("setfsuid", libc::SYS_setfsuid, &[fsuid]);
    let header = t.words(&[LINUX_CAPABILITY_VERSION_3]);
    let lo = |v: u64| v & 0xffff_ffff;
    let hi = |v: u64| v >> 32;
    // struct __user_cap_data_struct[2]: {effective, permitted, inheritable} x2.
    let data = t.words(&[
        lo(target.cap_effective) | (lo(target.cap_permitted) << 32),
        lo(target.cap_inheritable) | (hi(target.cap_effective) << 32),
        hi(target.cap_permitted) | (hi(target.cap_inheritable) << 32),
    ]);
    t.call("capset", libc::SYS_capset, &[header, data]);
    for cap in 0..64u64 {
        if target.cap_ambient & (1 << cap) != 0 {
            t.call(
                format!("raise ambient capability {cap}"),
                libc::SYS_prctl,
                &[
                    libc::PR_CAP_AMBIENT as u64,
                    libc::PR_CAP_AMBIENT_RAISE as u64,
                    cap,
                ],
            );
        }
    }
    t.call(
        "keepcaps as recorded",
        libc::SYS_prctl,
        &[
            libc::PR_SET_KEEPCAPS as u64,
            u64::from(u64::from(target.securebits) & SECBIT_KEEP_CAPS != 0),
        ],
    );
    if target.no_new_privs {
        t.call(
            "no_new_privs",
            libc::SYS_prctl,
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
        );
    }
}
