//! Makes every type and member name in an eBPF object's BTF one the kernel accepts.
//!
//! bpf-linker 0.10 rewrites the names of structs it emits (`Global<u32>` becomes
//! `Global_3C_u32_3E_`) but not of unions, so aya-ebpf 0.3's `Global<T>` (aya-log-ebpf's
//! `AYA_LOG_LEVEL` is one) leaves `MaybeUninit<u8>` in the object, and the kernel refuses the
//! whole BTF ("Invalid name"). aya then loads the programs without it, which is fine for
//! legacy maps but not for a BTF-defined one (`ORIG_BY_SOCK`, socket storage: its creation
//! needs the BTF). Here each such name is rewritten in place, byte for byte (every character
//! a C identifier may not hold becomes `_`), so no offset in the object changes.

use anyhow::{bail, Context as _, Result};

const BTF_MAGIC: u16 = 0xeb9f;

/// Rewrites the names in the `.BTF` section of the ELF object at `path`; returns how many.
pub fn sanitize_object(path: &std::path::Path) -> Result<usize> {
    let mut elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let Some((start, len)) = section(&elf, ".BTF")? else {
        return Ok(0);
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= elf.len())
        .context(".BTF section past the end of the file")?;
    let fixed = sanitize_btf(&mut elf[start..end])?;
    if fixed > 0 {
        std::fs::write(path, &elf).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(fixed)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    let s = b.get(at..at + 2).context("truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    let s = b.get(at..at + 4).context("truncated")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    let s = b.get(at..at + 8).context("truncated")?;
    Ok(u64::from_le_bytes(s.try_into()?))
}

/// `(offset, size)` of the section named `name` in a little-endian ELF64 file.
fn section(elf: &[u8], name: &str) -> Result<Option<(usize, usize)>> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        bail!("not a little-endian ELF64 object");
    }
    let shoff = u64_at(elf, 0x28)? as usize;
    let shentsize = u16_at(elf, 0x3a)? as usize;
    let shnum = u16_at(elf, 0x3c)? as usize;
    let shstrndx = u16_at(elf, 0x3e)? as usize;
    let header = |i: usize| shoff + i * shentsize;
    let names = u64_at(elf, header(shstrndx) + 0x18)? as usize;
    for i in 0..shnum {
        let h = header(i);
        let name_at = names + u32_at(elf, h)? as usize;
        let this = elf
            .get(name_at..)
            .and_then(|s| s.split(|&c| c == 0).next())
            .context("section name out of range")?;
        if this == name.as_bytes() {
            return Ok(Some((
                u64_at(elf, h + 0x18)? as usize,
                u64_at(elf, h + 0x20)? as usize,
            )));
        }
    }
    Ok(None)
}

/// Rewrites, in a raw BTF blob, the names of types and members that are not C identifiers.
fn sanitize_btf(btf: &mut [u8]) -> Result<usize> {
    if u16_at(btf, 0)? != BTF_MAGIC {
        bail!("no BTF magic");
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    let (type_off, type_len) = (u32_at(btf, 8)? as usize, u32_at(btf, 12)? as usize);
    let (str_off, str_len) = (u32_at(btf, 16)? as usize, u32_at(btf, 20)? as usize);
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let mut names = Vec::new();
    let mut at = types;
    while at < types + type_len {
        let name_off = u32_at(btf, at)?;
        let info = u32_at(btf, at + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        at += 12;
        // Names the kernel checks as identifiers: the type's own, and its members'.
        let (named, extra, member_size) = match kind {
            1 => (true, 4, 0),                     // INT
            2 | 9 | 10 | 11 | 18 => (false, 0, 0), // PTR, VOLATILE, CONST, RESTRICT, TYPE_TAG
            3 => (false, 12, 0),                   // ARRAY
            4 | 5 => (true, 0, 12),                // STRUCT, UNION
            6 => (true, 0, 8),                     // ENUM
            7 | 8 | 12 | 16 => (true, 0, 0),       // FWD, TYPEDEF, FUNC, FLOAT
            13 => (false, 0, 8),                   // FUNC_PROTO (parameter names)
            14 => (true, 4, 0),                    // VAR
            15 => (false, 0, 12),                  // DATASEC (its name may hold dots)
            17 => (false, 4, 0),                   // DECL_TAG
            19 => (true, 0, 12),                   // ENUM64
            _ => bail!("unknown BTF kind {kind}"),
        };
        if named {
            names.push(name_off);
        }
        at += extra;
        for m in 0..vlen {
            if member_size > 0 && kind != 15 {
                names.push(u32_at(btf, at + m * member_size)?);
            }
        }
        at += vlen * member_size;
    }
    names.sort_unstable();
    names.dedup();
    let mut fixed = 0;
    for off in names {
        let start = strings + off as usize;
        if off == 0 || start >= strings + str_len {
            continue;
        }
        let mut changed = false;
        for c in btf[start..strings + str_len].iter_mut() {
            if *c == 0 {
                break;
            }
            if !(c.is_ascii_alphanumeric() || *c == b'_') {
                *c = b'_';
                changed = true;
            }
        }
        if changed {
            fixed += 1;
        }
    }
    Ok(fixed)
}
