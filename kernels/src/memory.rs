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
