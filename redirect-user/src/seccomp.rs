//! The daemon's seccomp filter: an allow-list of the system calls `redirectd run` makes once
//! its programs are loaded and its pins are in place (every thread, for the rest of its life).
//! Any other call fails with `EPERM`, and the kernel logs it (audit record type 1326, with the
//! call's number), so an operator sees what was refused.
//!
//! The list was taken from the daemon's own calls across the whole test suite (run with
//! `--seccomp log`, which lets every call through and logs the ones not on the list), and is
//! checked by running the whole suite with the filter on. Left out on purpose: starting
//! programs (`execve`), mounting (the bpffs is mounted before the filter), loading modules,
//! `ptrace`, keyrings, `bpf`'s friends `perf_event_open` and `userfaultfd`, rebooting,
//! namespaces of its own (`unshare`, `clone` with namespace flags is not told apart: threads
//! need `clone`), changing ids.

use anyhow::{bail, Context as _, Result};

/// What the filter does with a call not on the list (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refuse it with `EPERM`, and log it.
    Enforce,
    /// Let it through, and log it (to find a call the list misses).
    Log,
    /// No filter.
    Off,
}

/// The system calls allowed, by what needs them: x86_64's (`libc::SYS_*`; some of these
/// legacy calls do not exist elsewhere).
#[cfg(target_arch = "x86_64")]
pub const ALLOWED: &[(&str, &[libc::c_long])] = &[
    (
        "memory and threads (the Rust runtime, tokio)",
        &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_futex,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getppid,
            libc::SYS_tgkill,
            libc::SYS_prctl,
            libc::SYS_getrandom,
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
            libc::SYS_capget,
            libc::SYS_uname,
            libc::SYS_prlimit64,
        ],
    ),
    (
        "event loop (tokio)",
        &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
            libc::SYS_eventfd2,
            libc::SYS_pipe2,
            libc::SYS_ppoll,
            libc::SYS_poll,
        ],
    ),
    (
        "files: the pods file, /proc, cgroups, bpffs pins, status and CNI state",
        &[
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_close,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_pread64,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_stat,
            libc::SYS_lstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_statfs,
            libc::SYS_fstatfs,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_getdents64,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_chmod,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fcntl,
            libc::SYS_ioctl,
            libc::SYS_dup,
            libc::SYS_dup3,
            libc::SYS_getcwd,
        ],
    ),
    (
        "sockets: netlink, the metrics and CNI servers, the Kubernetes API, proxies' listeners",
        &[
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_shutdown,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
        ],
    ),
    (
        "pods: entering their network namespaces, a running proxy's listener, BPF",
        &[
            libc::SYS_setns,
            libc::SYS_pidfd_open,
            libc::SYS_pidfd_getfd,
            libc::SYS_bpf,
        ],
    ),
];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;

/// x32 system calls on x86_64 carry this bit; none is allowed.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// `struct seccomp_data` offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;

#[cfg(target_arch = "x86_64")]
fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

#[cfg(target_arch = "x86_64")]
fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The filter program for `mode` (not `Off`): a call of another architecture kills the
/// process (its numbers mean other calls), one on [`ALLOWED`] passes, any other gets
/// `refused`.
#[cfg(target_arch = "x86_64")]
pub fn program(mode: Mode) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let refused = match mode {
        Mode::Log => RET_LOG,
        _ => RET_ERRNO | libc::EPERM as u32,
    };
    let mut p = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, OFF_ARCH),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET | BPF_K, RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, OFF_NR),
    ];
    if cfg!(target_arch = "x86_64") {
        p.push(jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 0, 1));
        p.push(stmt(BPF_RET | BPF_K, refused));
    }
    for nr in ALLOWED.iter().flat_map(|(_, calls)| calls.iter()) {
        // Equal: fall through to the next instruction, allow; else skip it.
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, *nr as u32, 0, 1));
        p.push(stmt(BPF_RET | BPF_K, RET_ALLOW));
    }
    p.push(stmt(BPF_RET | BPF_K, refused));
    p
}

/// Installs `program` on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`), asking
/// the kernel to log refused calls. Needs `no_new_privs` (set with the capabilities).
#[cfg(target_arch = "x86_64")]
pub fn install_program(program: &[libc::sock_filter]) -> Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).context("seccomp filter too long")?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: seccomp(2) reads `prog`, which outlives the call; the kernel copies the filter.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC | libc::SECCOMP_FILTER_FLAG_LOG,
            &prog as *const libc::sock_fprog,
        )
    };
    match rc {
        0 => Ok(()),
        rc if rc > 0 => bail!("seccomp: thread {rc} could not take the filter"),
        _ => Err(std::io::Error::last_os_error()).context("seccomp(SECCOMP_SET_MODE_FILTER)"),
    }
}

/// Installs the daemon's filter as `mode` says.
#[cfg(target_arch = "x86_64")]
pub fn install(mode: Mode) -> Result<()> {
    if mode == Mode::Off {
        log::warn!("--seccomp off: the daemon runs without a system-call filter");
        return Ok(());
    }
    install_program(&program(mode)).context("installing the seccomp filter (--seccomp)")?;
    let calls: usize = ALLOWED.iter().map(|(_, c)| c.len()).sum();
    log::info!("seccomp filter on ({mode:?}): {calls} system calls allowed");
    Ok(())
}

/// On other architectures there is no allow-list yet: the daemon refuses to start unless told
/// to run without a filter.
#[cfg(not(target_arch = "x86_64"))]
pub fn install(mode: Mode) -> Result<()> {
    if mode == Mode::Off {
        log::warn!("--seccomp off: the daemon runs without a system-call filter");
        return Ok(());
    }
    bail!("--seccomp {mode:?}: the system-call allow-list is built for x86_64 only; run with --seccomp off on this architecture")
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn no_call_is_listed_twice() {
        let mut all: Vec<_> = ALLOWED.iter().flat_map(|(_, c)| c.iter()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    /// Runs `f` in a forked child after installing the enforcing filter there; returns the
    /// child's exit code. Only raw system calls run in the child (the test harness has
    /// threads; nothing may take a lock after fork).
    fn in_filtered_child(f: fn() -> i32) -> i32 {
        let prog = program(Mode::Enforce);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr().cast_mut(),
        };
        // SAFETY: fork; the child makes only raw system calls and _exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(100);
                }
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                ) != 0
                {
                    libc::_exit(101);
                }
                libc::_exit(f());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "child died: {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }

    /// 0 if the call failed with EPERM, 1 if it did anything else.
    fn eperm(rc: libc::c_long) -> i32 {
        // SAFETY: reads this thread's errno.
        let errno = unsafe { *libc::__errno_location() };
        i32::from(!(rc == -1 && errno == libc::EPERM))
    }

    // The calls tried under the filter: raw system calls with harmless or invalid arguments.
    fn try_execve() -> i32 {
        // SAFETY: a path that does not exist; no argv or envp.
        eperm(unsafe { libc::syscall(libc::SYS_execve, c"/nonexistent/x".as_ptr(), 0, 0) })
    }
    fn try_ptrace() -> i32 {
        // SAFETY: PTRACE_TRACEME of the forked child itself.
        eperm(unsafe { libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0) })
    }
    fn try_unshare() -> i32 {
        // SAFETY: a mount namespace of the forked child's own.
        eperm(unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS) })
    }
    fn try_mount() -> i32 {
        // SAFETY: onto a path that does not exist.
        eperm(unsafe {
            libc::syscall(
                libc::SYS_mount,
                c"none".as_ptr(),
                c"/nonexistent".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                0,
            )
        })
    }
    fn try_getpid() -> i32 {
        // SAFETY: no arguments.
        i32::from(unsafe { libc::syscall(libc::SYS_getpid) } <= 0)
    }

    #[test]
    fn the_filter_refuses_what_is_not_listed_and_allows_what_is() {
        // Not listed: each refused with EPERM (each would do something else unfiltered).
        assert_eq!(in_filtered_child(try_execve), 0, "execve");
        assert_eq!(in_filtered_child(try_ptrace), 0, "ptrace");
        assert_eq!(in_filtered_child(try_unshare), 0, "unshare");
        assert_eq!(in_filtered_child(try_mount), 0, "mount");
        // Listed: works.
        assert_eq!(in_filtered_child(try_getpid), 0, "getpid");
    }
}
