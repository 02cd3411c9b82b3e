//! Allocation of the large buffers every step reads: the paged KV cache and
//! the packed weights.
//!
//! Why: the KV cache is sized up front (1 GiB by default) but only the blocks
//! in use should cost RAM, so it is allocated as zeroed pages the OS maps on
//! first touch ([`zeroed_kv`]; `vec![bf16::ZERO; n]` writes, and so commits,
//! every element: a server used 1.3 GB of RSS at start-up, 0.3 GB with this).
//! Both buffers are also advised to use transparent huge pages: a decode step
//! reads KV blocks scattered over the cache right after megabytes of weights
//! went through the TLB, and 2 MiB pages make the cache a few dozen TLB
//! entries. That part is best effort and, on the development machine, had no
//! step-time effect we could measure; it costs nothing where THP is off.

/// Whether sensitive buffers (weights, KV cache) are locked in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockPolicy {
    /// Not locked (still excluded from core dumps).
    Off,
    /// Locked where the memlock limit allows; failures are counted.
    BestEffort,
    /// Locked, or the caller refuses to start (it checks [`protection_report`]).
    Required,
}

static POLICY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
static LOCKED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static LOCK_FAILED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static EXCLUDED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets how buffers allocated from now on are protected (process-wide; the
/// server sets `memory.lock` before it loads the model). Default: best effort.
pub fn set_lock_policy(policy: LockPolicy) {
    let v = match policy {
        LockPolicy::Off => 0,
        LockPolicy::BestEffort => 1,
        LockPolicy::Required => 2,
    };
    POLICY.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The current [`LockPolicy`].
pub fn lock_policy() -> LockPolicy {
    match POLICY.load(std::sync::atomic::Ordering::Relaxed) {
        0 => LockPolicy::Off,
        2 => LockPolicy::Required,
        _ => LockPolicy::BestEffort,
    }
}

/// What [`protect_sensitive`] achieved since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProtectionReport {
    /// Bytes locked in RAM (never swapped).
    pub locked_bytes: u64,
    /// Bytes whose locking failed (memlock limit too small).
    pub lock_failed_bytes: u64,
    /// Bytes marked `MADV_DONTDUMP` (left out of core dumps).
    pub excluded_bytes: u64,
}

/// The protection totals so far.
pub fn protection_report() -> ProtectionReport {
    use std::sync::atomic::Ordering::Relaxed;
    ProtectionReport {
        locked_bytes: LOCKED_BYTES.load(Relaxed),
        lock_failed_bytes: LOCK_FAILED_BYTES.load(Relaxed),
        excluded_bytes: EXCLUDED_BYTES.load(Relaxed),
    }
}

/// Protects a buffer that holds PHI-grade data (model weights, K/V): marks
/// its pages `MADV_DONTDUMP`, and, unless the policy is [`LockPolicy::Off`],
/// locks them in RAM as they are touched (`mlock2(MLOCK_ONFAULT)`, so a
/// lazily committed KV cache is not committed by locking it). The span is
/// rounded out to whole pages; neighbours sharing an edge page are protected
/// too, which only ever keeps more out of swap and dumps. Failures are
/// counted in [`protection_report`], never fatal here.
pub fn protect_sensitive<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = std::mem::size_of_val(buf);
        if bytes == 0 {
            return;
        }
        let page = 4096usize;
        let start = (buf.as_ptr() as usize) & !(page - 1);
        let end = (buf.as_ptr() as usize + bytes).next_multiple_of(page);
        // SAFETY: `start..end` is the page span of `buf`, memory mapped in this
        // process for at least the borrow; MADV_DONTDUMP only changes what a
        // core dump contains, never the contents or the mapping.
        if unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP) } == 0 {
            EXCLUDED_BYTES.fetch_add(bytes as u64, Relaxed);
        }
        if lock_policy() == LockPolicy::Off {
            return;
        }
        /// `MLOCK_ONFAULT` (linux/mman.h): lock pages as they are faulted in.
        const MLOCK_ONFAULT: libc::c_uint = 1;
        // SAFETY: as above; locking pins the pages in RAM and changes nothing
        // else; it is undone when the memory is unmapped or freed to the OS.
        let locked = unsafe { libc::mlock2(start as *const libc::c_void, end - start, MLOCK_ONFAULT) } == 0;
        if locked {
            LOCKED_BYTES.fetch_add(bytes as u64, Relaxed);
        } else {
            LOCK_FAILED_BYTES.fetch_add(bytes as u64, Relaxed);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Asks the kernel to back `buf` with transparent huge pages. Best effort:
/// the contents are unchanged whether or not the advice is taken. Buffers
/// smaller than one huge page are left alone.
pub fn advise_huge_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < HUGE {
            return;
        }
        let page = 4096usize;
        let start = (buf.as_ptr() as usize).next_multiple_of(page);
        let end = (buf.as_ptr() as usize + bytes) & !(page - 1);
        if end <= start {
            return;
        }
        // SAFETY: `start..end` lies inside `buf`, memory this process owns for
        // the borrow; MADV_HUGEPAGE only changes how future faults are served
        // (never the contents), and a failure leaves the pages as they were.
        let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// `n` zeros of a KV storage type, in memory the OS maps lazily: untouched
/// blocks of a large cache cost no RAM (`vec![bf16::ZERO; n]` would write, and
/// so commit, every element), and the pages are advised huge before the first
/// touch. `None` if `n` elements exceed the address space.
pub fn zeroed_kv<E: crate::paged_attention::KvElement>(n: usize) -> Option<Vec<E>> {
    if n == 0 || std::mem::size_of::<E>() == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<E>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (checked above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<E>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` comes from the global allocator with exactly the layout of
    // `n` elements of `E` (what `Vec` uses for capacity `n`), and all-zero bits
    // are a valid value (+0.0) of every `KvElement` (f32, f16, bf16: the trait
    // is sealed to those), so all `n` elements are initialized.
    let v = unsafe { Vec::from_raw_parts(ptr, n, n) };
    advise_huge_pages(&v);
    // K/V are derived from prompts and completions: PHI.
    protect_sensitive(&v);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn zeroed_kv_is_all_zero_and_writable() {
        for n in [0usize, 1, 1000, 3 << 20] {
            let mut v = zeroed_kv::<bf16>(n).unwrap();
            assert_eq!(v.len(), n);
            assert!(v.iter().step_by(997).all(|x| x.to_bits() == 0));
            if let Some(x) = v.last_mut() {
                *x = bf16::ONE;
            }
            let f = zeroed_kv::<f32>(n).unwrap();
            assert!(f.iter().all(|x| x.to_bits() == 0));
        }
        assert!(zeroed_kv::<f32>(usize::MAX / 2).is_none());
    }
}
