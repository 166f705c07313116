//! A value the daemon sets when it loads the object (aya's `override_global`), read with a
//! volatile load so the compiler keeps the read.
//!
//! Ours rather than aya-ebpf 0.3's `Global<T>`: that one wraps the value in `MaybeUninit<T>`,
//! a union whose name (`MaybeUninit<u32>`) bpf-linker 0.10 leaves as it is in the object's
//! BTF, and the kernel refuses BTF with such a name ("Invalid name"). Without the object's
//! BTF the programs still load, but a BTF-defined map (`ORIG_BY_SOCK`, socket storage)
//! cannot be created. A plain struct's name is one bpf-linker makes valid.

/// A load-time constant of type `T`.
#[repr(transparent)]
pub struct Global<T>(T);

// SAFETY: the programs only read it; the loader writes it before any program runs.
unsafe impl<T> Sync for Global<T> {}

impl<T: Copy> Global<T> {
    /// The value the object carries when the loader does not override it.
    pub const fn new(value: T) -> Self {
        Self(value)
    }

    /// The value, as the loader set it.
    #[inline(always)]
    pub fn load(&self) -> T {
        // SAFETY: a valid, aligned `T` that lives as long as the program.
        unsafe { core::ptr::read_volatile(&self.0) }
    }
}
