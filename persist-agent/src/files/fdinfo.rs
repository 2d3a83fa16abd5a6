//! Parsing `/proc/PID/fdinfo/N`.
//!
//! Every fdinfo file starts with `pos`, `flags` (octal) and `mnt_id`/`ino`
//! lines; eventfd, timerfd, signalfd, epoll and inotify files add lines of
//! their own, in the formats of `fs/eventfd.c`, `fs/timerfd.c`,
//! `fs/signalfd.c`, `fs/eventpoll.c` and `fs/notify/fdinfo.c`.

use persist_common::image::EpollWatch;

/// The parsed text of one fdinfo file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfoText {
    /// File position.
    pub pos: u64,
    /// `O_*` flags, `O_CLOEXEC` included.
    pub flags: u32,
    /// Inode number.
    pub ino: u64,
    /// Every line as a (key, rest) pair, in order, for the kind-specific parsers.
    lines: Vec<(String, String)>,
}

impl FdInfoText {
    /// Parses the text of an fdinfo file; `None` if a mandatory line is missing.
    pub fn parse(text: &str) -> Option<Self> {
        let mut info = Self::default();
        let (mut pos, mut flags) = (None, None);
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let rest = rest.trim();
            match key {
                "pos" => pos = rest.parse().ok(),
                "flags" => flags = u32::from_str_radix(rest, 8).ok(),
                "ino" => info.ino = rest.parse().unwrap_or(0),
                _ => {}
            }
            info.lines.push((key.to_owned(), rest.to_owned()));
        }
        info.pos = pos?;
        info.flags = flags?;
        Some(info)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// eventfd: the counter (`eventfd-count`, hex) and semaphore mode.
    pub fn eventfd(&self) -> Option<(u64, bool)> {
        let count = u64::from_str_radix(self.value("eventfd-count")?, 16).ok()?;
        let semaphore = self.value("eventfd-semaphore").is_some_and(|v| v == "1");
        Some((count, semaphore))
    }

    /// signalfd: the signal mask (`sigmask`, hex).
    pub fn signalfd_mask(&self) -> Option<u64> {
        u64::from_str_radix(self.value("sigmask")?, 16).ok()
    }

    /// timerfd settings.
    pub fn timerfd(&self) -> Option<TimerfdText> {
        Some(TimerfdText {
            clock: self.value("clockid")?.parse().ok()?,
            ticks: self.value("ticks")?.parse().ok()?,
            settime_flags: i32::from_str_radix(self.value("settime flags")?, 8).ok()?,
            value_ns: timespec_ns(self.value("it_value")?)?,
            interval_ns: timespec_ns(self.value("it_interval")?)?,
        })
    }

    /// epoll: every watch, with the inode of the watched file.
    ///
    /// Lines look like
    /// `tfd:        5 events:       19 data:                5  pos:0 ino:3068 sdev:f`
    /// with events and data in hex and ino in hex.
    pub fn epoll_watches(&self) -> Option<Vec<(EpollWatch, u64)>> {
        let mut watches = Vec::new();
        for (key, rest) in &self.lines {
            if key != "tfd" {
                continue;
            }
            let mut words = rest.split_whitespace();
            let fd = words.next()?.parse().ok()?;
            let (mut events, mut data, mut ino) = (None, None, 0);
            while let Some(word) = words.next() {
                match word {
                    "events:" => events = u32::from_str_radix(words.next()?, 16).ok(),
                    "data:" => data = u64::from_str_radix(words.next()?, 16).ok(),
                    other => {
                        if let Some(hex) = other.strip_prefix("ino:") {
                            ino = u64::from_str_radix(hex, 16).ok()?;
                        }
                    }
                }
            }
            watches.push((
                EpollWatch {
                    fd,
                    events: events?,
                    data: data?,
                    file_fd: None,
                },
                ino,
            ));
        }
        Some(watches)
    }

    /// inotify: every watch, in the order fdinfo lists them (not by wd).
    ///
    /// Lines look like `inotify wd:1 ino:98c094 sdev:fe00000 mask:4000180
    /// ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:94c09800d6e48350`,
    /// every number in hex; the handle part is missing when the file system
    /// cannot encode one.
    pub fn inotify_watches(&self) -> Option<Vec<InotifyWatchText>> {
        let mut watches = Vec::new();
        for (key, rest) in &self.lines {
            if key != "inotify wd" {
                continue;
            }
            let mut words = rest.split_whitespace();
            let wd = i32::from_str_radix(words.next()?, 16).ok()?;
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|word| word.strip_prefix(name)?.strip_prefix(':'))
            };
            let hex = |name: &str| u64::from_str_radix(field(name)?, 16).ok();
            let handle = match (field("fhandle-type"), field("f_handle")) {
                (Some(kind), Some(bytes)) => {
                    Some((i32::from_str_radix(kind, 16).ok()?, hex_bytes(bytes)?))
                }
                _ => None,
            };
            watches.push(InotifyWatchText {
                wd,
                ino: hex("ino")?,
                sdev: u32::try_from(hex("sdev")?).ok()?,
                mask: u32::try_from(hex("mask")?).ok()?,
                handle,
            });
        }
        Some(watches)
    }

    /// UNIX sockets: descriptors in flight in the receive queue (`scm_fds`).
    pub fn scm_fds(&self) -> u64 {
        self.value("scm_fds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// One inotify watch as fdinfo shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InotifyWatchText {
    /// Watch descriptor.
    pub wd: i32,
    /// Inode number of the watched file.
    pub ino: u64,
    /// Device of its file system, in the kernel's encoding (major << 20 | minor).
    pub sdev: u32,
    /// Watched events with `IN_ONESHOT` and `IN_EXCL_UNLINK`.
    pub mask: u32,
    /// The file handle's type and bytes, for `open_by_handle_at`.
    pub handle: Option<(i32, Vec<u8>)>,
}

/// Parses a string of hex digit pairs.
fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// Parsed timerfd lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerfdText {
    /// `clockid`.
    pub clock: i32,
    /// Expirations not yet read.
    pub ticks: u64,
    /// `TFD_TIMER_*` flags of the last settime.
    pub settime_flags: i32,
    /// Time to the next expiry.
    pub value_ns: u64,
    /// Interval.
    pub interval_ns: u64,
}

/// Parses `(sec, nsec)`.
fn timespec_ns(text: &str) -> Option<u64> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    let (sec, nsec) = inner.split_once(',')?;
    let sec: u64 = sec.trim().parse().ok()?;
    let nsec: u64 = nsec.trim().parse().ok()?;
    Some(sec * 1_000_000_000 + nsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_eventfd() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t1038\neventfd-count:               1a\neventfd-id: 1\neventfd-semaphore: 1\n";
        let info = FdInfoText::parse(text).unwrap();
        assert_eq!(info.flags, 0o2004002);
        assert_eq!(info.ino, 1038);
        assert_eq!(info.eventfd(), Some((26, true)));
    }

    #[test]
    fn parses_timerfd() {
        let text = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\nclockid: 1\nticks: 3\nsettime flags: 01\nit_value: (0, 49406829)\nit_interval: (1, 5)\n";
        let timer = FdInfoText::parse(text).unwrap().timerfd().unwrap();
        assert_eq!(
            timer,
            TimerfdText {
                clock: 1,
                ticks: 3,
                settime_flags: 1,
                value_ns: 49_406_829,
                interval_ns: 1_000_000_005
            }
        );
    }

    #[test]
    fn parses_epoll_and_signalfd() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
            tfd:        3 events: 80000019 data:                3  pos:0 ino:40e sdev:10\n\
            tfd:       12 events:       19 data:     deadbeef0001  pos:0 ino:3068 sdev:f\n\
            sigmask:\t0000000000004000\n";
        let info = FdInfoText::parse(text).unwrap();
        let watches = info.epoll_watches().unwrap();
        assert_eq!(watches.len(), 2);
        assert_eq!(
            watches[0],
            (
                EpollWatch {
                    fd: 3,
                    events: 0x8000_0019,
                    data: 3,
                    file_fd: None,
                },
                0x40e
            )
        );
        assert_eq!(
            watches[1],
            (
                EpollWatch {
                    fd: 12,
                    events: 0x19,
                    data: 0xdead_beef_0001,
                    file_fd: None,
                },
                0x3068
            )
        );
        assert_eq!(info.signalfd_mask(), Some(0x4000));
    }

    #[test]
    fn parses_inotify_watches() {
        let text = "pos:\t0\nflags:\t04000\nmnt_id:\t17\nino:\t1038\n\
            inotify wd:2 ino:1 sdev:15 mask:100 ignored_mask:0 fhandle-bytes:c fhandle-type:81 f_handle:010000000000000000000000\n\
            inotify wd:1f ino:98c094 sdev:fe00000 mask:4000180 ignored_mask:0\n";
        let watches = FdInfoText::parse(text).unwrap().inotify_watches().unwrap();
        assert_eq!(
            watches,
            vec![
                InotifyWatchText {
                    wd: 2,
                    ino: 1,
                    sdev: 0x15,
                    mask: 0x100,
                    handle: Some((0x81, vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
                },
                InotifyWatchText {
                    wd: 0x1f,
                    ino: 0x98_c094,
                    sdev: 0xfe0_0000,
                    mask: 0x400_0180,
                    handle: None,
                },
            ]
        );
    }

    #[test]
    fn rejects_missing_flags() {
        assert!(FdInfoText::parse("pos:\t0\n").is_none());
    }
}
