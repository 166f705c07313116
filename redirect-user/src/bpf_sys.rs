//! The `bpf(2)` commands aya 0.14 gives us no way to make; everything else (loading, link
//! creation for connect4/6, getpeername4/6, sockops, sk_lookup and sk_msg, pinning links,
//! adopting pins) goes through aya.
//!
//! - `BPF_LINK_DETACH`: force-detaching a link whoever holds it (aya lacks it).
//! - `BPF_OBJ_GET`: opening a pinned link as a plain fd, to detach it (aya's
//!   `PinnedLink::from_pin` keeps its fd private).
//! - `BPF_LINK_CREATE` and `BPF_OBJ_PIN` for `cgroup/getsockopt` only: aya attaches it, but
//!   its `CgroupSockoptLink` cannot become an `FdLink`, so it cannot be pinned, and an
//!   unpinned link would detach when the daemon exits.
//! - `BPF_PROG_LOAD` of a three-instruction probe: whether `sk_lookup` may read a context field
//!   (aya's probes cover program types, map types and helpers, not fields).

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
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_CGROUP_GETSOCKOPT` (`enum bpf_attach_type`, include/uapi/linux/bpf.h).
pub const ATTACH_CGROUP_GETSOCKOPT: u32 = 21;
/// `BPF_CGROUP_SETSOCKOPT`.
pub const ATTACH_CGROUP_SETSOCKOPT: u32 = 22;

/// `union bpf_attr`, as raw words; every command uses a prefix of it and the kernel requires
/// the rest to be zero.
#[repr(C, align(8))]
struct Attr([u32; 32]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size we pass, and lives for the call;
    // the kernel reads (and for some commands writes) only within that size.
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

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup fd) as a link; links attached
/// to a cgroup are always multi-attach, so other products' programs keep running.
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
    // SAFETY: on success the kernel returned a new fd, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pins a link at `path` on a bpffs.
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
    // SAFETY: on success the kernel returned a new fd, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_DETACH`: detaches a link now, even if other processes still hold it open.
pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = Attr([0; 32]);
    attr.0[0] = link.as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

const BPF_PROG_LOAD: libc::c_long = 5;
/// `BPF_PROG_TYPE_SK_LOOKUP` and its attach type `BPF_SK_LOOKUP`.
const PROG_TYPE_SK_LOOKUP: u32 = 30;
const ATTACH_SK_LOOKUP: u32 = 36;
/// `offsetof(struct bpf_sk_lookup, ingress_ifindex)`.
const SK_LOOKUP_INGRESS_IFINDEX: i16 = 64;

/// Does the verifier let an `sk_lookup` program read `ingress_ifindex` (Linux 5.17)? Loads
/// (and closes) a three-instruction program: `r2 = ctx->ingress_ifindex; r0 = 1; exit`.
pub fn sk_lookup_reads_ingress_ifindex() -> std::io::Result<bool> {
    let insn = |code: u8, regs: u8, off: i16, imm: i32| -> u64 {
        u64::from(code)
            | (u64::from(regs) << 8)
            | (u64::from(off as u16) << 16)
            | (u64::from(imm as u32) << 32)
    };
    // BPF_LDX | BPF_MEM | BPF_W (dst r2, src r1); BPF_ALU64 | BPF_MOV | BPF_K (r0); BPF_EXIT.
    let insns = [
        insn(0x61, 0x12, SK_LOOKUP_INGRESS_IFINDEX, 0),
        insn(0xb7, 0, 0, 1),
        insn(0x95, 0, 0, 0),
    ];
    let license = c"GPL";
    let mut attr = Attr([0; 32]);
    attr.0[0] = PROG_TYPE_SK_LOOKUP;
    attr.0[1] = insns.len() as u32;
    let (i, l) = (insns.as_ptr() as u64, license.as_ptr() as u64);
    attr.0[2] = i as u32;
    attr.0[3] = (i >> 32) as u32;
    attr.0[4] = l as u32;
    attr.0[5] = (l >> 32) as u32;
    attr.0[17] = ATTACH_SK_LOOKUP;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            // SAFETY: on success the kernel returned a new fd, which nothing else owns.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            Ok(true)
        }
        // The verifier's refusal of the field (EACCES, or EINVAL for an unknown offset).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}
