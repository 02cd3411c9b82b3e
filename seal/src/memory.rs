//! Locked, non-dumpable memory for plaintext weights, and process hardening.
//!
//! Decrypted weights are PHI. They live only in anonymous private mappings that are
//! excluded from core dumps (`MADV_DONTDUMP`), not inherited by forked children
//! (`MADV_DONTFORK`), pinned in RAM with `mlock` where `RLIMIT_MEMLOCK` allows (so
//! they never reach swap), and overwritten with zeros before they are unmapped.
//! The only `unsafe` code of the sealed-weights layer is here, in small wrappers.

use std::ops::Range;
use std::sync::{Arc, Once};

use salus_models::source::WeightBuffer;
use zeroize::Zeroize;

use super::SealError;

/// A zero-initialised, page-aligned anonymous mapping for plaintext bytes.
///
/// Zeroized, unlocked and unmapped on drop. Not `Clone`: share it through
/// [`LockedSlice`] / `Arc`.
pub struct LockedBuffer {
    ptr: *mut u8,
    len: usize,
    locked: bool,
}

// SAFETY: the buffer exclusively owns its mapping; `&LockedBuffer` only hands out
// shared slices and `&mut LockedBuffer` a unique one, exactly like `Vec<u8>`.
unsafe impl Send for LockedBuffer {}
// SAFETY: see `Send`; no interior mutability.
unsafe impl Sync for LockedBuffer {}

static MLOCK_WARNING: Once = Once::new();

impl LockedBuffer {
    /// Maps `len` zeroed bytes, marks them `MADV_DONTDUMP` and `MADV_DONTFORK`, and
    /// tries to `mlock` them (warning once through `tracing` when the limit is too low).
    pub fn new(len: usize) -> Result<Self, SealError> {
        if len == 0 {
            return Ok(LockedBuffer { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, locked: false });
        }
        // SAFETY: anonymous private mapping with no address hint; the kernel checks
        // `len` and returns MAP_FAILED on error, which we test before using it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SealError::Memory(format!(
                "cannot map {len} bytes for plaintext weights: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut buf = LockedBuffer { ptr: ptr.cast(), len, locked: false };
        for (advice, name) in [(libc::MADV_DONTDUMP, "MADV_DONTDUMP"), (libc::MADV_DONTFORK, "MADV_DONTFORK")] {
            // SAFETY: `ptr..ptr+len` is exactly the mapping created above.
            if unsafe { libc::madvise(ptr, len, advice) } != 0 {
                // `buf` unmaps on drop.
                return Err(SealError::Memory(format!("madvise({name}) failed: {}", std::io::Error::last_os_error())));
            }
        }
        // SAFETY: locking the pages of our own live mapping; failure is reported, not fatal.
        if unsafe { libc::mlock(ptr, len) } == 0 {
            buf.locked = true;
        } else {
            let err = std::io::Error::last_os_error();
            MLOCK_WARNING.call_once(|| {
                tracing::warn!(
                    bytes = len,
                    error = %err,
                    memlock_limit = %memlock_limit_text(),
                    "cannot mlock plaintext weights: they may be swapped to disk; raise the limit \
                     (ulimit -l {} or more, LimitMEMLOCK= in systemd, --ulimit memlock= in docker) \
                     or grant CAP_IPC_LOCK",
                    len.div_ceil(1024)
                );
            });
        }
        Ok(buf)
    }

    /// Whether the pages are pinned in RAM (`mlock` succeeded).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (zero-filled by mmap, or
        // dangling with len 0) for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees uniqueness.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for LockedBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        self.as_mut_slice().zeroize();
        if self.locked {
            // SAFETY: unlocking the range we locked in `new`.
            unsafe { libc::munlock(self.ptr.cast(), self.len) };
        }
        // SAFETY: unmapping exactly the mapping created in `new`; no slice into it
        // outlives `self` (they borrow from it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl WeightBuffer for LockedBuffer {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for LockedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedBuffer({} bytes, locked={})", self.len, self.locked)
    }
}

/// One file's bytes inside a shared [`LockedBuffer`] (a sealed model decrypts into
/// one buffer; each part is a range of it). The buffer is zeroized when the last
/// slice drops.
pub struct LockedSlice {
    buf: Arc<LockedBuffer>,
    range: Range<usize>,
}

impl LockedSlice {
    /// Panics never: callers pass ranges validated against the buffer; an invalid
    /// range is clamped to empty.
    pub fn new(buf: Arc<LockedBuffer>, range: Range<usize>) -> Self {
        let range = if range.start <= range.end && range.end <= buf.len() { range } else { 0..0 };
        LockedSlice { buf, range }
    }
}

impl WeightBuffer for LockedSlice {
    fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.range.clone()]
    }
}

fn memlock_limit_text() -> String {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return "unknown".into();
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} KiB", lim.rlim_cur / 1024)
    }
}

/// Start-up hardening: no core dumps, no ptrace attach by other unprivileged
/// processes, so a crash or a debugger cannot copy decrypted weights or PHI out.
/// Sets `PR_SET_DUMPABLE` to 0 and `RLIMIT_CORE` to 0 (soft and hard).
pub fn harden_process() -> Result<(), SealError> {
    let core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &core) } != 0 {
        return Err(SealError::Memory(format!("setrlimit(RLIMIT_CORE, 0): {}", std::io::Error::last_os_error())));
    }
    // SAFETY: PR_SET_DUMPABLE takes one integer argument; the rest are ignored.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(SealError::Memory(format!("prctl(PR_SET_DUMPABLE, 0): {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Reads the current dumpable flag and core limit (for tests and start-up logs).
pub fn process_hardening_state() -> (bool, u64) {
    // SAFETY: PR_GET_DUMPABLE takes no further arguments and returns the flag.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } != 0;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) };
    (dumpable, lim.rlim_cur)
}
