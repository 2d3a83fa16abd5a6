//! Test fixture: process-wide state set to unusual values.
//!
//! `fixture-process DIR` sets its umask to 027, RLIMIT_NOFILE to 1000/2000,
//! RLIMIT_CORE to 0/0, a SIGUSR2 handler with SA_RESTART|SA_ONSTACK and
//! SIGWINCH in its mask, SIGHUP ignored, an alternate signal stack, an
//! ITIMER_REAL of 100 s repeating every 50 s (with a SIGALRM handler),
//! SIGUSR2 blocked and pending, and its working directory DIR. Then it
//! writes `DIR/ready`; on SIGUSR1 it checks all of that and writes
//! `DIR/result`: `OK` or `FAIL: what differs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static CHECK: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {}

extern "C" fn on_alarm(_: libc::c_int) {}

const ALTSTACK_LEN: usize = 64 * 1024;

fn sigaction(signal: libc::c_int, handler: libc::sighandler_t, flags: i32, mask: &[i32]) {
    // SAFETY: a zeroed sigaction is valid; the handler addresses are
    // extern "C" functions or SIG_IGN.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = flags;
        libc::sigemptyset(&mut action.sa_mask);
        for &s in mask {
            libc::sigaddset(&mut action.sa_mask, s);
        }
        assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
    }
}

fn current_action(signal: libc::c_int) -> libc::sigaction {
    // SAFETY: sigaction with a null new action only writes the old one.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(signal, std::ptr::null(), &mut old), 0);
        old
    }
}

fn setup(dir: &Path) -> usize {
    // SAFETY: umask, setrlimit, sigaltstack, setitimer, sigprocmask and
    // raise are called with valid arguments; the alternate stack is leaked
    // so it stays valid.
    unsafe {
        libc::umask(0o027);
        let nofile = libc::rlimit {
            rlim_cur: 1000,
            rlim_max: 2000,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &nofile), 0);
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_CORE, &core), 0);
        sigaction(
            libc::SIGUSR2,
            on_usr2 as *const () as libc::sighandler_t,
            libc::SA_RESTART | libc::SA_ONSTACK,
            &[libc::SIGWINCH],
        );
        sigaction(libc::SIGHUP, libc::SIG_IGN, 0, &[]);
        sigaction(
            libc::SIGALRM,
            on_alarm as *const () as libc::sighandler_t,
            0,
            &[],
        );
        sigaction(
            libc::SIGUSR1,
            on_usr1 as *const () as libc::sighandler_t,
            0,
            &[],
        );
        let stack = Box::leak(vec![0u8; ALTSTACK_LEN].into_boxed_slice());
        let ss = libc::stack_t {
            ss_sp: stack.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: ALTSTACK_LEN,
        };
        assert_eq!(libc::sigaltstack(&ss, std::ptr::null_mut()), 0);
        let timer = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 50,
                tv_usec: 0,
            },
            it_value: libc::timeval {
                tv_sec: 100,
                tv_usec: 0,
            },
        };
        assert_eq!(
            libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()),
            0
        );
        let mut blocked: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut blocked);
        libc::sigaddset(&mut blocked, libc::SIGUSR2);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut()),
            0
        );
        libc::raise(libc::SIGUSR2);
        std::env::set_current_dir(dir).expect("chdir");
        stack.as_ptr() as usize
    }
}

fn verify(dir: &Path, altstack: usize) -> Result<(), String> {
    // SAFETY: all calls below only read state into valid out-parameters
    // (umask is set back to the value it returned).
    unsafe {
        let mask = libc::umask(0o027);
        if mask != 0o027 {
            return Err(format!("umask is {mask:o}"));
        }
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if (limit.rlim_cur, limit.rlim_max) != (1000, 2000) {
            return Err(format!(
                "RLIMIT_NOFILE is {}/{}",
                limit.rlim_cur, limit.rlim_max
            ));
        }
        libc::getrlimit(libc::RLIMIT_CORE, &mut limit);
        if (limit.rlim_cur, limit.rlim_max) != (0, 0) {
            return Err(format!(
                "RLIMIT_CORE is {}/{}",
                limit.rlim_cur, limit.rlim_max
            ));
        }
        let usr2 = current_action(libc::SIGUSR2);
        if usr2.sa_sigaction != on_usr2 as *const () as libc::sighandler_t {
            return Err("SIGUSR2 handler changed".into());
        }
        if usr2.sa_flags & (libc::SA_RESTART | libc::SA_ONSTACK)
            != libc::SA_RESTART | libc::SA_ONSTACK
        {
            return Err(format!("SIGUSR2 flags are {:#x}", usr2.sa_flags));
        }
        if libc::sigismember(&usr2.sa_mask, libc::SIGWINCH) != 1 {
            return Err("SIGUSR2 handler mask lost SIGWINCH".into());
        }
        if current_action(libc::SIGHUP).sa_sigaction != libc::SIG_IGN {
            return Err("SIGHUP is no longer ignored".into());
        }
        let mut ss: libc::stack_t = std::mem::zeroed();
        libc::sigaltstack(std::ptr::null(), &mut ss);
        if ss.ss_sp as usize != altstack || ss.ss_size != ALTSTACK_LEN {
            return Err(format!("sigaltstack is {:p}/{}", ss.ss_sp, ss.ss_size));
        }
        let mut timer: libc::itimerval = std::mem::zeroed();
        libc::getitimer(libc::ITIMER_REAL, &mut timer);
        if timer.it_interval.tv_sec != 50
            || timer.it_value.tv_sec <= 0
            || timer.it_value.tv_sec > 100
        {
            return Err(format!(
                "ITIMER_REAL is {}s every {}s",
                timer.it_value.tv_sec, timer.it_interval.tv_sec
            ));
        }
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        if libc::sigismember(&pending, libc::SIGUSR2) != 1 {
            return Err("SIGUSR2 is no longer pending".into());
        }
        let mut blocked: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut blocked);
        if libc::sigismember(&blocked, libc::SIGUSR2) != 1 {
            return Err("SIGUSR2 is no longer blocked".into());
        }
    }
    let cwd = std::env::current_dir().map_err(|e| format!("getcwd: {e}"))?;
    if cwd != dir {
        return Err(format!("cwd is {}", cwd.display()));
    }
    Ok(())
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fixture-process DIR"));
    let dir = dir.canonicalize().expect("canonical DIR");
    let altstack = setup(&dir);
    let ready = dir.join("ready.tmp");
    fs::write(&ready, std::process::id().to_string()).expect("write ready");
    fs::rename(&ready, dir.join("ready")).expect("rename ready");
    loop {
        while !CHECK.swap(false, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = match verify(&dir, altstack) {
            Ok(()) => "OK".to_owned(),
            Err(what) => format!("FAIL: {what}"),
        };
        let tmp = dir.join("result.tmp");
        fs::write(&tmp, result).expect("write result");
        fs::rename(&tmp, dir.join("result")).expect("rename result");
    }
}
