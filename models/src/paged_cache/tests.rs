use super::*;

#[test]
fn paged_pool_allocates_all_or_nothing_and_frees_on_drop() {
    let pool = BlockPool::new(5);
    let a = pool.allocate(3).unwrap();
    assert_eq!(pool.free_blocks(), 2);
    assert!(pool.allocate(3).is_none());
    assert_eq!(pool.free_blocks(), 2, "a failed allocation takes nothing");
    let mut b = pool.allocate(2).unwrap();
    assert!(!b.grow(1));
    let mut ids: Vec<u32> = a.blocks().iter().chain(b.blocks()).copied().collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    drop(a);
    assert_eq!(pool.free_blocks(), 3);
    assert!(b.ensure_tokens(4 * 16, 16));
    assert_eq!(b.len(), 4);
    // Panicking while holding blocks still frees them.
    let pool2 = pool.clone();
    let r = std::panic::catch_unwind(move || {
        let _held = pool2.allocate(1).unwrap();
        panic!("boom");
    });
    assert!(r.is_err());
    drop(b);
    assert_eq!(pool.free_blocks(), 5);
}

fn block_is_zero(c: &PagedKvCache, b: u32) -> bool {
    c.block_is_zeroed(b).unwrap()
}

/// K/V are PHI: a released block's K/V are zeroed before the call that
/// released it returns — on release and removal, when a cached block is
/// evicted for reuse (before its new holder writes it), and on expiry —
/// while blocks the prefix cache keeps are left intact.
#[test]
fn released_blocks_are_zeroed_before_anyone_reuses_them() {
    let cfg = PagedCacheConfig {
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 4,
        block_size: 2,
        num_blocks: 4,
        dtype: KvDtype::BF16,
    };
    let dev = Device::Cpu;
    let write = |c: &mut PagedKvCache, seq: u64, len: usize| {
        let q = Tensor::ones((len, 2, 4), DType::F32, &dev).unwrap();
        let kv = Tensor::ones((len, 1, 4), DType::F32, &dev).unwrap();
        let span = [SeqSpan { seq: SeqId(seq), offset: 0, len, start_pos: 0 }];
        for layer in 0..2 {
            c.attend(layer, &span, &q, &kv, &kv, None).unwrap();
        }
    };
    // Without a prefix cache: released and removed sequences.
    let mut c = PagedKvCache::new(cfg).unwrap();
    write(&mut c, 1, 3);
    let held = c.block_table(SeqId(1)).to_vec();
    assert_eq!(held.len(), 2);
    assert!(held.iter().all(|&b| !block_is_zero(&c, b)));
    c.release(SeqId(1));
    assert!(held.iter().all(|&b| block_is_zero(&c, b)), "released blocks are zeroed");
    write(&mut c, 2, 4);
    let held = c.block_table(SeqId(2)).to_vec();
    c.remove(SeqId(2));
    assert!(held.iter().all(|&b| block_is_zero(&c, b)), "removed blocks are zeroed");

    // With a prefix cache: whole registered blocks stay cached (intact)
    // until they are evicted for reuse or expire.
    let mut c = PagedKvCache::new(cfg).unwrap().with_prefix_cache(true);
    let scope = PrefixScope::new("principal-a");
    let tokens: Vec<u32> = vec![5, 6, 7, 8, 9];
    assert_eq!(c.attach_cached_prefix(SeqId(1), &scope, &tokens), 0);
    write(&mut c, 1, 5);
    c.register_computed(SeqId(1), &tokens);
    let table = c.block_table(SeqId(1)).to_vec();
    assert_eq!(table.len(), 3);
    c.release(SeqId(1));
    assert_eq!(c.cached_blocks(), 2);
    assert!(!block_is_zero(&c, table[0]) && !block_is_zero(&c, table[1]), "cached blocks keep their K/V");
    assert!(block_is_zero(&c, table[2]), "the partial last block was not cached: zeroed");
    // Four blocks for a new sequence: the free ones, then both cached ones,
    // evicted, zeroed before `reserve` returns.
    assert!(c.reserve(SeqId(2), 8));
    assert_eq!(c.cached_blocks(), 0);
    assert!(c.block_table(SeqId(2)).iter().all(|&b| block_is_zero(&c, b)));
    c.release(SeqId(2));
    // Expiry.
    assert_eq!(c.attach_cached_prefix(SeqId(3), &scope, &tokens), 0);
    write(&mut c, 3, 5);
    c.register_computed(SeqId(3), &tokens);
    let table = c.block_table(SeqId(3)).to_vec();
    c.release(SeqId(3));
    assert!(!block_is_zero(&c, table[0]));
    assert_eq!(c.expire_cached(std::time::Instant::now() + std::time::Duration::from_secs(1)), 2);
    assert!(table.iter().all(|&b| block_is_zero(&c, b)), "expired blocks are zeroed");
}

/// Prefaulting commits memory without changing what the cache holds, and
/// never touches a cache that already holds K/V.
#[test]
fn prefault_keeps_the_cache_zero_and_skips_a_cache_in_use() {
    let cfg = PagedCacheConfig {
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 4,
        block_size: 2,
        num_blocks: 600,
        dtype: KvDtype::BF16,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    c.prefault();
    assert!((0..600).all(|b| block_is_zero(&c, b)));
    let q = Tensor::ones((3, 2, 4), DType::F32, &Device::Cpu).unwrap();
    let kv = Tensor::ones((3, 1, 4), DType::F32, &Device::Cpu).unwrap();
    let span = [SeqSpan { seq: SeqId(1), offset: 0, len: 3, start_pos: 0 }];
    let before = c.attend(0, &span, &q, &kv, &kv, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    c.prefault();
    let table = c.block_table(SeqId(1)).to_vec();
    assert!(table.iter().all(|&b| !block_is_zero(&c, b)), "a cache in use is left alone");
    let decode = [SeqSpan { seq: SeqId(1), offset: 0, len: 1, start_pos: 3 }];
    let q1 = q.narrow(0, 0, 1).unwrap();
    let kv1 = kv.narrow(0, 0, 1).unwrap();
    let after = c.attend(0, &decode, &q1, &kv1, &kv1, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // All keys and values are ones, so every output is 1 before and after.
    assert!(before.iter().chain(&after).all(|x| (*x - 1.0).abs() < 1e-6));
    // Blocks only the prefix cache keeps are left alone too.
    let mut c = PagedKvCache::new(cfg).unwrap().with_prefix_cache(true);
    let tokens = [1u32, 2, 3];
    c.attach_cached_prefix(SeqId(1), &PrefixScope::new("p"), &tokens);
    c.attend(0, &span, &q, &kv, &kv, None).unwrap();
    c.attend(1, &span, &q, &kv, &kv, None).unwrap();
    c.register_computed(SeqId(1), &tokens);
    let cached = c.block_table(SeqId(1))[0];
    c.release(SeqId(1));
    assert_eq!(c.cached_blocks(), 1);
    c.prefault();
    assert!(!block_is_zero(&c, cached));
    let per = c.cfg.geometry().block_elems();
    let LayerStore::BF16(k, _) = &c.layers[0] else { panic!("bf16 cache") };
    assert!(k[cached as usize * per..(cached as usize + 1) * per].iter().all(|x| x.to_f32() == 1.0), "cached K intact");
}

#[test]
fn paged_capacity_sizes_the_pool() {
    let per = PagedCacheConfig::bytes_per_block(2, 2, 8, 4, KvDtype::F16);
    assert_eq!(per, 2 * 2 * 2 * 8 * 4 * 2);
    let c = PagedCacheConfig::from_capacity_on(2, 2, 8, 4, KvDtype::F16, KvCapacity::Bytes(per * 10 + 7), &Device::Cpu)
        .unwrap();
    assert_eq!(c.num_blocks, 10);
    assert_eq!(c.capacity_tokens(), 40);
    assert!(
        PagedCacheConfig::from_capacity_on(2, 2, 8, 4, KvDtype::F16, KvCapacity::Bytes(per - 1), &Device::Cpu).is_err()
    );
    assert!(PagedCacheConfig::from_capacity_on(
        2,
        2,
        8,
        4,
        KvDtype::F16,
        KvCapacity::FractionOfFree(1.5),
        &Device::Cpu
    )
    .is_err());
}

#[test]
fn paged_cache_reserve_release_and_exhaustion() {
    let cfg = PagedCacheConfig {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 4,
        block_size: 2,
        num_blocks: 3,
        dtype: KvDtype::F32,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let q = Tensor::ones((5, 2, 4), DType::F32, &Device::Cpu).unwrap();
    let kv = Tensor::ones((5, 1, 4), DType::F32, &Device::Cpu).unwrap();
    let span = [SeqSpan { seq: SeqId(1), offset: 0, len: 5, start_pos: 0 }];
    let out = c.attend(0, &span, &q, &kv, &kv, None).unwrap();
    assert_eq!(out.dims(), &[5, 8]);
    assert_eq!(c.seq_len(SeqId(1)), 5);
    assert_eq!(c.free_blocks(), 0);
    let q1 = q.narrow(0, 0, 1).unwrap();
    let kv1 = kv.narrow(0, 0, 1).unwrap();
    let other = [SeqSpan { seq: SeqId(2), offset: 0, len: 1, start_pos: 0 }];
    assert!(matches!(c.attend(0, &other, &q1, &kv1, &kv1, None), Err(ModelError::CacheExhausted(_))));
    let wrong = [SeqSpan { seq: SeqId(1), offset: 0, len: 1, start_pos: 4 }];
    assert!(matches!(c.attend(0, &wrong, &q1, &kv1, &kv1, None), Err(ModelError::InvalidBatch(_))));
    c.remove(SeqId(1));
    assert_eq!(c.free_blocks(), 3);
    assert_eq!(c.seq_len(SeqId(1)), 0);
    assert!(c.reserve(SeqId(3), 6));
    assert!(!c.reserve(SeqId(4), 1));
    assert_eq!(c.block_table(SeqId(3)).len(), 3);
    c.release(SeqId(3));
    assert_eq!(c.free_blocks(), 3);
}
