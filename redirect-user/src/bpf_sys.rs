//! The few `bpf(2)` commands aya 0.14 does not expose for our program types: creating a
//! link for any attach type, pinning and opening objects, and force-detaching a link.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context as _, Result};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_attach_type` values (include/uapi/linux/bpf.h) of the hooks we use.
pub mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_GETSOCKOPT: u32 = 21;
    pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const CGROUP_INET6_GETPEERNAME: u32 = 30;
    pub const SK_MSG_VERDICT: u32 = 7;
}

/// `union bpf_attr`, as raw words; every command uses a prefix of it and the kernel requires
/// the rest to be zero.
#[repr(C, align(8))]
struct Attr([u32; 32]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // Safety: `attr` is a zero-padded bpf_attr of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn path_cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup or netns fd) as a link; links
/// attached to a cgroup are always multi-attach, so other products' programs keep running.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = Attr([0; 32]);
    attr.0[0] = prog.as_raw_fd() as u32;
    attr.0[1] = target.as_raw_fd() as u32;
    attr.0[2] = attach;
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // Safety: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pins a program, map or link at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let c = path_cstring(path)?;
    let mut attr = Attr([0; 32]);
    let ptr = c.as_ptr() as u64;
    attr.0[0] = ptr as u32;
    attr.0[1] = (ptr >> 32) as u32;
    attr.0[2] = fd.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning at {}", path.display()))?;
    Ok(())
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = path_cstring(path)?;
    let mut attr = Attr([0; 32]);
    let ptr = c.as_ptr() as u64;
    attr.0[0] = ptr as u32;
    attr.0[1] = (ptr >> 32) as u32;
    let fd =
        bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening pin {}", path.display()))?;
    // Safety: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_DETACH`: detaches a link now, even if other processes still hold it open.
pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = Attr([0; 32]);
    attr.0[0] = link.as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// `BPF_PROG_ATTACH`: attaches `prog` to `target` (here: an sk_msg verdict program to a
/// sockhash). Replaces the program already attached, with no gap; it stays attached for as
/// long as the map lives (the map is pinned).
pub fn prog_attach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: u32,
) -> std::io::Result<()> {
    let mut attr = Attr([0; 32]);
    attr.0[0] = target.as_raw_fd() as u32;
    attr.0[1] = prog.as_raw_fd() as u32;
    attr.0[2] = attach;
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}
