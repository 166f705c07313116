//! Where a field of a kernel struct sits on the running kernel, read from its BTF
//! (`/sys/kernel/btf/vmlinux`). The kernel programs are built without CO-RE relocations, so a
//! field they must read from a socket (through `bpf_probe_read_kernel`) is found here and
//! handed to them at load as a global.
//!
//! Only what that needs is parsed: the header, the string section, and the type records
//! walked by their kinds' sizes (the format: the kernel's Documentation/bpf/btf.rst).

use anyhow::{bail, Context, Result};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// The running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A BTF blob, its type records indexed by id.
struct Types<'a> {
    btf: &'a [u8],
    strings: &'a [u8],
    /// Each type record's offset in `btf`, by type id (id 0 is `void`).
    records: Vec<usize>,
}

impl<'a> Types<'a> {
    fn parse(btf: &'a [u8]) -> Result<Self> {
        let mut t = Types {
            btf,
            strings: &[],
            records: vec![0],
        };
        if t.u16_at(0)? != BTF_MAGIC {
            bail!("not little-endian BTF (bad magic)");
        }
        let hdr_len = t.u32_at(4)? as usize;
        let (type_off, type_len) = (t.u32_at(8)? as usize, t.u32_at(12)? as usize);
        let (str_off, str_len) = (t.u32_at(16)? as usize, t.u32_at(20)? as usize);
        t.strings = btf
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?;
        let (mut o, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while o < end {
            t.records.push(o);
            let info = t.u32_at(o + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            o += 12
                + match kind {
                    1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                    3 => 12,                      // ARRAY
                    4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                    6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                    2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG
                    k => bail!("BTF kind {k} unknown to this reader"),
                };
        }
        Ok(t)
    }

    fn u16_at(&self, o: usize) -> Result<u16> {
        let b = self.btf.get(o..o + 2).context("BTF truncated")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, o: usize) -> Result<u32> {
        let b = self.btf.get(o..o + 4).context("BTF truncated")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    }

    fn kind(&self, rec: usize) -> Result<u32> {
        Ok((self.u32_at(rec + 4)? >> 24) & 0x1f)
    }

    /// `member`'s byte offset in the struct or union at `rec`, looking into anonymous
    /// members (whose fields are the outer type's).
    fn member(&self, rec: usize, member: &str, depth: u32) -> Result<Option<u32>> {
        let info = self.u32_at(rec + 4)?;
        let (vlen, bitfields) = ((info & 0xffff) as usize, info >> 31 == 1);
        for i in 0..vlen {
            let m = rec + 12 + 12 * i;
            let name_off = self.u32_at(m)?;
            let bits = self.u32_at(m + 8)?;
            let bits = if bitfields { bits & 0xff_ffff } else { bits };
            if self.name(name_off) == member.as_bytes() {
                return Ok(Some(bits / 8));
            }
            let Some(&inner) = self.records.get(self.u32_at(m + 4)? as usize) else {
                continue;
            };
            if name_off == 0 && depth < 8 && matches!(self.kind(inner)?, KIND_STRUCT | KIND_UNION) {
                if let Some(off) = self.member(inner, member, depth + 1)? {
                    return Ok(Some(bits / 8 + off));
                }
            }
        }
        Ok(None)
    }
}

/// The byte offset of `member` in `struct strukt` in the BTF blob `btf` (a member of a nested
/// anonymous struct or union counts as the outer struct's).
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Result<u32> {
    let types = Types::parse(btf)?;
    for &rec in &types.records[1..] {
        if types.kind(rec)? == KIND_STRUCT && types.name(types.u32_at(rec)?) == strukt.as_bytes() {
            return types
                .member(rec, member, 0)?
                .with_context(|| format!("struct {strukt} has no member {member} in this BTF"));
        }
    }
    bail!("struct {strukt} is not in this BTF")
}

/// The offset of `icsk_ulp_ops` (a socket's upper-layer protocol: kTLS, MPTCP's subflows)
/// in the running kernel's `struct inet_connection_sock`, which a TCP socket begins with.
pub fn ulp_ops_offset() -> Result<u32> {
    let btf = std::fs::read(VMLINUX_BTF).with_context(|| format!("reading {VMLINUX_BTF}"))?;
    member_offset(&btf, "inet_connection_sock", "icsk_ulp_ops")
        .context("finding inet_connection_sock.icsk_ulp_ops")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's offsets, checked against what they must be: `struct sock` starts
    /// `inet_sock` (offset 0 of `sk`), and the ULP pointer lies after it.
    #[test]
    fn finds_the_ulp_pointer_on_this_kernel() {
        let btf = std::fs::read(VMLINUX_BTF).expect("this kernel's BTF");
        assert_eq!(member_offset(&btf, "inet_sock", "sk").unwrap(), 0);
        assert_eq!(member_offset(&btf, "tcp_sock", "inet_conn").unwrap(), 0);
        let ulp = ulp_ops_offset().unwrap();
        let inet = member_offset(&btf, "inet_connection_sock", "icsk_inet").unwrap();
        assert_eq!(inet, 0);
        assert!(ulp > 700 && ulp.is_multiple_of(8), "icsk_ulp_ops at {ulp}");
        // A member inside an anonymous union of struct sock (`__sk_common`'s skc_daddr is in
        // one) is found through it.
        assert!(member_offset(&btf, "sock_common", "skc_daddr").is_ok());
        assert!(member_offset(&btf, "inet_connection_sock", "no_such_member").is_err());
        assert!(member_offset(&btf, "no_such_struct", "x").is_err());
        assert!(member_offset(b"nonsense here, not BTF", "a", "b").is_err());
    }
}
