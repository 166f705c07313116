//! The `bpf(2)` commands aya 0.16 gives us no way to make; everything else (loading, link
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
//! - A throw-away splice for [`crate::kernel::splice_check`]: a sockhash, a ten-instruction `sk_msg`
//!   program attached to it, and its entries (never pinned: it goes with its fds).

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
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_ATTACH: libc::c_long = 8;
const MAP_TYPE_SOCKHASH: u32 = 18;
const PROG_TYPE_SK_MSG: u32 = 16;
const ATTACH_SK_MSG_VERDICT: u32 = 7;
const FUNC_MSG_REDIRECT_HASH: i32 = 71;
/// `offsetof(struct sk_msg_md, local_port)`.
const SK_MSG_LOCAL_PORT: i16 = 64;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from((src << 4) | dst) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// `BPF_PROG_LOAD`'s attribute for `insns` of `prog_type` (GPL, no log).
fn prog_load_attr(prog_type: u32, insns: &[u64], expected_attach: u32) -> Attr {
    let license = c"GPL";
    let mut attr = Attr([0; 32]);
    attr.0[0] = prog_type;
    attr.0[1] = insns.len() as u32;
    let (i, l) = (insns.as_ptr() as u64, license.as_ptr() as u64);
    attr.0[2] = i as u32;
    attr.0[3] = (i >> 32) as u32;
    attr.0[4] = l as u32;
    attr.0[5] = (l >> 32) as u32;
    attr.0[17] = expected_attach;
    attr
}

fn new_fd(fd: libc::c_long) -> OwnedFd {
    // SAFETY: on success these commands return a new fd, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// A sockhash with an `sk_msg` program that sends every message a socket sends into the
/// receive queue of the socket stored under the sender's local port
/// (`bpf_msg_redirect_hash(.., BPF_F_INGRESS)`), as redirectd's `rd_sk_msg` sends a proxy's
/// data to its peer's. Nothing is pinned: it goes when dropped.
pub struct SpliceMap {
    map: OwnedFd,
    _prog: OwnedFd,
}

impl SpliceMap {
    pub fn new() -> std::io::Result<Self> {
        let mut attr = Attr([0; 32]);
        attr.0[..4].copy_from_slice(&[MAP_TYPE_SOCKHASH, 4, 4, 16]);
        let map = new_fd(bpf(BPF_MAP_CREATE, &mut attr)?);
        let fd = map.as_raw_fd();
        let insns = [
            insn(0xbf, 6, 1, 0, 0),                      // r6 = ctx
            insn(0x61, 2, 1, SK_MSG_LOCAL_PORT, 0),      // r2 = ctx->local_port
            insn(0x63, 10, 2, -4, 0),                    // *(u32 *)(r10 - 4) = r2
            insn(0xbf, 1, 6, 0, 0),                      // r1 = ctx
            insn(0x18, 2, 1, 0, fd),                     // r2 = the map (pseudo map fd)
            0,                                           //   (ld_imm64's second half)
            insn(0xbf, 3, 10, 0, 0),                     // r3 = r10
            insn(0x07, 3, 0, 0, -4),                     // r3 += -4 (&key)
            insn(0xb7, 4, 0, 0, 1),                      // r4 = BPF_F_INGRESS
            insn(0x85, 0, 0, 0, FUNC_MSG_REDIRECT_HASH), // call
            insn(0x95, 0, 0, 0, 0),                      // exit
        ];
        let mut attr = prog_load_attr(PROG_TYPE_SK_MSG, &insns, 0);
        let prog = new_fd(bpf(BPF_PROG_LOAD, &mut attr)?);
        let mut attr = Attr([0; 32]);
        attr.0[..3].copy_from_slice(&[fd as u32, prog.as_raw_fd() as u32, ATTACH_SK_MSG_VERDICT]);
        bpf(BPF_PROG_ATTACH, &mut attr)?;
        Ok(Self { map, _prog: prog })
    }

    /// Stores socket `sock` under `key`.
    pub fn put(&self, key: u32, sock: BorrowedFd<'_>) -> std::io::Result<()> {
        let value = sock.as_raw_fd() as u32;
        let (k, v) = (&key as *const u32 as u64, &value as *const u32 as u64);
        let mut attr = Attr([0; 32]);
        attr.0[..6].copy_from_slice(&[
            self.map.as_raw_fd() as u32,
            0,
            k as u32,
            (k >> 32) as u32,
            v as u32,
            (v >> 32) as u32,
        ]);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }
}

/// `BPF_PROG_TYPE_SK_LOOKUP` and its attach type `BPF_SK_LOOKUP`.
const PROG_TYPE_SK_LOOKUP: u32 = 30;
const ATTACH_SK_LOOKUP: u32 = 36;
/// `offsetof(struct bpf_sk_lookup, ingress_ifindex)`.
const SK_LOOKUP_INGRESS_IFINDEX: i16 = 64;

/// Does the verifier let an `sk_lookup` program read `ingress_ifindex` (Linux 5.17)? Loads
/// (and closes) a three-instruction program: `r2 = ctx->ingress_ifindex; r0 = 1; exit`.
pub fn sk_lookup_reads_ingress_ifindex() -> std::io::Result<bool> {
    // BPF_LDX | BPF_MEM | BPF_W (dst r2, src r1); BPF_ALU64 | BPF_MOV | BPF_K (r0); BPF_EXIT.
    let insns = [
        insn(0x61, 2, 1, SK_LOOKUP_INGRESS_IFINDEX, 0),
        insn(0xb7, 0, 0, 0, 1),
        insn(0x95, 0, 0, 0, 0),
    ];
    let mut attr = prog_load_attr(PROG_TYPE_SK_LOOKUP, &insns, ATTACH_SK_LOOKUP);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            drop(new_fd(fd));
            Ok(true)
        }
        // The verifier's refusal of the field (EACCES, or EINVAL for an unknown offset).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}
