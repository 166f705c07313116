//! Addresses as the programs handle them: network byte order words, IPv4 in word 0.

use redirect_common::{OrigDst, SockKey, AF_INET, AF_INET6, PASSTHROUGH4, PASSTHROUGH6};

/// `127.0.0.1` in network byte order, as a `u32` read from memory.
pub const LOCALHOST4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `127.0.0.6` (Istio's inbound passthrough source) in network byte order.
pub const PASSTHROUGH4_BE: u32 = u32::from_ne_bytes(PASSTHROUGH4);
/// Last word of `::6` (whose first three are 0), network byte order.
pub const PASSTHROUGH6_LAST_BE: u32 = u32::from_ne_bytes([
    PASSTHROUGH6[12],
    PASSTHROUGH6[13],
    PASSTHROUGH6[14],
    PASSTHROUGH6[15],
]);
/// `::ffff:0:0/96` marker word (word 2 of a v4-mapped IPv6 address), network byte order.
pub const V4_MAPPED_WORD_BE: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// Last word of `::1`, network byte order.
pub const LOOPBACK6_LAST_BE: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// A TCP endpoint: address words in network byte order and port in network byte order.
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub family: u16,
}

impl Endpoint {
    #[inline(always)]
    pub fn v4(addr_be: u32, port_be: u16) -> Self {
        Self {
            addr_be: [addr_be, 0, 0, 0],
            port_be,
            family: AF_INET,
        }
    }

    #[inline(always)]
    pub fn v6(addr_be: [u32; 4], port_be: u16) -> Self {
        Self {
            addr_be,
            port_be,
            family: AF_INET6,
        }
    }

    /// This destination as recorded for a captured socket of pod `pod_id`.
    #[inline(always)]
    pub fn orig_dst(&self, pod_id: u32, netns_cookie: u64) -> OrigDst {
        OrigDst {
            addr_be: self.addr_be,
            port_be: self.port_be,
            family: self.family,
            pod_id,
            netns_cookie,
        }
    }

    /// Port in host order.
    #[inline(always)]
    pub fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }

    /// 127.0.0.0/8 or ::1.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        if self.family == AF_INET {
            self.addr_be[0].to_ne_bytes()[0] == 127
        } else {
            is_loopback6(&self.addr_be)
        }
    }

    /// Exactly 127.0.0.1 (or ::1): Istio's "destination not 127.0.0.1".
    #[inline(always)]
    pub fn is_localhost(&self) -> bool {
        if self.family == AF_INET {
            self.addr_be[0] == LOCALHOST4_BE
        } else {
            is_loopback6(&self.addr_be)
        }
    }

    /// Where the kernel sends a connection to this address: an unspecified one (0.0.0.0,
    /// `::`) goes to the socket's own address `src`, or to loopback if it has none.
    #[inline(always)]
    pub fn or_local(&self, src: &Endpoint) -> Endpoint {
        if !self.is_unspecified() {
            return *self;
        }
        let addr_be = if !src.is_unspecified() {
            src.addr_be
        } else if self.family == AF_INET {
            [LOCALHOST4_BE, 0, 0, 0]
        } else {
            [0, 0, 0, LOOPBACK6_LAST_BE]
        };
        Endpoint { addr_be, ..*self }
    }

    /// 0.0.0.0 or `::`: a socket's local address before it is bound.
    #[inline(always)]
    pub fn is_unspecified(&self) -> bool {
        if self.family == AF_INET {
            self.addr_be[0] == 0
        } else {
            self.addr_be[0] == 0
                && self.addr_be[1] == 0
                && self.addr_be[2] == 0
                && self.addr_be[3] == 0
        }
    }

    /// Istio's inbound passthrough source: 127.0.0.6 or ::6.
    #[inline(always)]
    pub fn is_passthrough_source(&self) -> bool {
        if self.family == AF_INET {
            self.addr_be[0] == PASSTHROUGH4_BE
        } else {
            self.addr_be[0] == 0
                && self.addr_be[1] == 0
                && self.addr_be[2] == 0
                && self.addr_be[3] == PASSTHROUGH6_LAST_BE
        }
    }

    /// The address as 16 bytes in network order, IPv4 as `::ffff:a.b.c.d` (the key form of
    /// `ADDR_RULES`).
    #[inline(always)]
    pub fn addr16(&self) -> [u8; 16] {
        let w = if self.family == AF_INET {
            [0, 0, V4_MAPPED_WORD_BE, self.addr_be[0]]
        } else {
            self.addr_be
        };
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            out[i * 4] = b[0];
            out[i * 4 + 1] = b[1];
            out[i * 4 + 2] = b[2];
            out[i * 4 + 3] = b[3];
            i += 1;
        }
        out
    }
}

#[inline(always)]
pub fn is_loopback6(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == LOOPBACK6_LAST_BE
}

/// `::ffff:a.b.c.d`: an IPv4 peer on an IPv6 socket.
#[inline(always)]
pub fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD_BE
}

/// Reads one 32-bit word of a context array. Volatile, so the compiler cannot merge two
/// adjacent words into one 64-bit load, which the verifier rejects for context fields.
///
/// # Safety
/// `p` must point at a readable context field.
#[inline(always)]
pub unsafe fn ctx_word(p: *const u32) -> u32 {
    // SAFETY: the caller promises `p` points at a readable context field.
    unsafe { core::ptr::read_volatile(p) }
}

/// Reads a 4-word context array (an IPv6 address) one word at a time.
///
/// # Safety
/// `p` must point at a readable `[u32; 4]` context field.
#[inline(always)]
pub unsafe fn ctx_addr6(p: *const [u32; 4]) -> [u32; 4] {
    let w = p as *const u32;
    // SAFETY: the caller promises `p` points at a readable `[u32; 4]`: four readable words.
    unsafe {
        [
            ctx_word(w),
            ctx_word(w.add(1)),
            ctx_word(w.add(2)),
            ctx_word(w.add(3)),
        ]
    }
}

/// Writes a 4-word context array (an IPv6 address) one word at a time (volatile, so the
/// stores are not merged into 64-bit ones the verifier rejects).
///
/// # Safety
/// `p` must point at a writable `[u32; 4]` context field.
#[inline(always)]
pub unsafe fn ctx_write_addr6(p: *mut [u32; 4], a: [u32; 4]) {
    let w = p as *mut u32;
    // SAFETY: the caller promises `p` points at a writable `[u32; 4]`: four writable words.
    unsafe {
        core::ptr::write_volatile(w, a[0]);
        core::ptr::write_volatile(w.add(1), a[1]);
        core::ptr::write_volatile(w.add(2), a[2]);
        core::ptr::write_volatile(w.add(3), a[3]);
    }
}

/// A socket's two ends as a program context reports them (both address forms, since an
/// IPv6 socket may carry an IPv4-mapped connection).
#[derive(Clone, Copy)]
pub struct RawEnds {
    pub family: u32,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port_be: u16,
    pub remote_port_be: u16,
}

/// The [`SockKey`] of a socket from its own ends (IPv4-mapped IPv6 connections are keyed as
/// IPv4, like their peers).
#[inline(always)]
pub fn sock_key(netns_cookie: u64, ends: &RawEnds) -> SockKey {
    let RawEnds {
        family,
        local,
        remote,
        local_ip4,
        remote_ip4,
        local_port_be,
        remote_port_be,
    } = *ends;
    let v6 = family == AF_INET6 as u32 && !is_v4_mapped(&remote);
    let (l, r) = if v6 {
        (
            Endpoint::v6(local, local_port_be),
            Endpoint::v6(remote, remote_port_be),
        )
    } else {
        (
            Endpoint::v4(local_ip4, local_port_be),
            Endpoint::v4(remote_ip4, remote_port_be),
        )
    };
    let pod_local = l.is_loopback()
        || l.is_passthrough_source()
        || r.is_loopback()
        || r.is_passthrough_source();
    SockKey {
        netns_cookie: if pod_local { netns_cookie } else { 0 },
        local_addr_be: l.addr_be,
        remote_addr_be: r.addr_be,
        local_port_be,
        remote_port_be,
        family: if v6 { AF_INET6 as u32 } else { AF_INET as u32 },
    }
}

/// The key of `k`'s peer: the same connection seen from the other end.
#[inline(always)]
pub fn peer_key(k: &SockKey) -> SockKey {
    SockKey {
        netns_cookie: k.netns_cookie,
        local_addr_be: k.remote_addr_be,
        remote_addr_be: k.local_addr_be,
        local_port_be: k.remote_port_be,
        remote_port_be: k.local_port_be,
        family: k.family,
    }
}
