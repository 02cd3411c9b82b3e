use super::*;

const BS: usize = 4;

fn scope(s: &str) -> PrefixScope {
    PrefixScope::new(s)
}

/// A sequence that computed `tokens` and registered its whole blocks.
fn computed_seq(pool: &BlockPool, sc: &PrefixScope, tokens: &[u32]) -> SeqBlocks {
    let mut a = pool.empty_allocation();
    let covered = a.attach_cached_prefix(sc, tokens, BS);
    assert!(a.ensure_tokens(tokens.len(), BS));
    assert!(covered <= tokens.len());
    a.register_computed(tokens, BS);
    a
}

#[test]
fn prefix_cache_shares_whole_blocks_of_the_same_scope_only() {
    let pool = BlockPool::with_prefix_cache(16);
    let a_tokens: Vec<u32> = (0..10).collect(); // two whole blocks and a partial one
    let a = computed_seq(&pool, &scope("alice"), &a_tokens);
    assert_eq!(pool.cached_blocks(), 2, "only whole blocks are registered");

    // Same scope, same first 8 tokens: both whole blocks are attached.
    let mut b = pool.empty_allocation();
    let b_tokens: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
    assert_eq!(b.attach_cached_prefix(&scope("alice"), &b_tokens, BS), 8);
    assert_eq!(b.blocks(), &a.blocks()[..2]);

    // Another scope with the very same tokens gets nothing.
    let mut c = pool.empty_allocation();
    assert_eq!(c.attach_cached_prefix(&scope("bob"), &a_tokens, BS), 0);
    assert!(c.is_empty());

    // A difference in the second block stops the match after the first.
    let mut d = pool.empty_allocation();
    let d_tokens: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 6, 7 + 100, 8];
    assert_eq!(d.attach_cached_prefix(&scope("alice"), &d_tokens, BS), 4);
    assert_eq!(d.blocks(), &a.blocks()[..1]);

    // A difference in the first block matches nothing, even if later blocks agree.
    let mut e = pool.empty_allocation();
    let e_tokens: Vec<u32> = vec![50, 1, 2, 3, 4, 5, 6, 7];
    assert_eq!(e.attach_cached_prefix(&scope("alice"), &e_tokens, BS), 0);
}

#[test]
fn prefix_cache_idle_blocks_count_as_free_and_are_evicted_oldest_first() {
    let pool = BlockPool::with_prefix_cache(6);
    let sc = scope("s");
    let first: Vec<u32> = (0..8).collect();
    let second: Vec<u32> = (100..108).collect();
    drop(computed_seq(&pool, &sc, &first));
    drop(computed_seq(&pool, &sc, &second));
    // Four idle cached blocks and two never used: all six are available.
    assert_eq!(pool.cached_blocks(), 4);
    assert_eq!(pool.free_blocks(), 6);
    assert_eq!(pool.used_blocks(), 0);

    // Taking three blocks uses the two free ones, then evicts the oldest idle
    // block. A sequence's blocks go idle last block first, so that is the
    // second block of `first`: its first block still matches.
    let held = pool.allocate(3).unwrap();
    assert_eq!(pool.free_blocks(), 3);
    assert_eq!(pool.cached_blocks(), 3);
    let mut probe = pool.empty_allocation();
    assert_eq!(probe.attach_cached_prefix(&sc, &first, BS), 4, "the leaf goes before its prefix");
    let mut probe2 = pool.empty_allocation();
    assert_eq!(probe2.attach_cached_prefix(&sc, &second, BS), 8, "newer entries survive");
    assert_eq!(pool.free_blocks(), 0, "attached idle blocks are held again");
    drop(probe2);
    drop(probe);

    // Idle now, newest last: second[1], second[0], first[0]. Two more blocks
    // evict both of `second`'s, the third one `first`'s last cached block.
    let held2 = pool.allocate(2).unwrap();
    let mut probe3 = pool.empty_allocation();
    assert_eq!(probe3.attach_cached_prefix(&sc, &second, BS), 0);
    let mut probe4 = pool.empty_allocation();
    assert_eq!(probe4.attach_cached_prefix(&sc, &first, BS), 4);
    // Held blocks are never evicted: nothing is left to take.
    assert!(pool.allocate(1).is_none());
    drop(probe4);
    let last = pool.allocate(1).unwrap();
    let mut probe5 = pool.empty_allocation();
    assert_eq!(probe5.attach_cached_prefix(&sc, &first, BS), 0);
    drop((probe3, probe5, last, held2));

    // Caching never makes an allocation fail that an uncached pool would grant.
    drop(held);
    let all = pool.allocate(6).unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(pool.cached_blocks(), 0);
    assert!(pool.allocate(1).is_none());
    drop(all);
    assert_eq!(pool.free_blocks(), 6);
}

#[test]
fn prefix_cache_shared_blocks_stay_held_until_their_last_holder_leaves() {
    let pool = BlockPool::with_prefix_cache(8);
    let sc = scope("s");
    let tokens: Vec<u32> = (0..8).collect();
    let a = computed_seq(&pool, &sc, &tokens);
    let mut b = pool.empty_allocation();
    assert_eq!(b.attach_cached_prefix(&sc, &tokens, BS), 8);
    assert!(b.ensure_tokens(9, BS));
    assert_eq!(pool.used_blocks(), 3, "two shared blocks plus b's own third");
    drop(a);
    assert_eq!(pool.used_blocks(), 3, "b still holds the shared blocks");
    drop(b);
    assert_eq!(pool.used_blocks(), 0);
    assert_eq!(pool.cached_blocks(), 2);
}

#[test]
fn prefix_cache_a_duplicate_block_is_not_registered_twice_and_is_freed() {
    let pool = BlockPool::with_prefix_cache(8);
    let sc = scope("s");
    let tokens: Vec<u32> = (0..8).collect();
    // Two sequences compute the same prompt side by side (neither could attach).
    let mut a = pool.empty_allocation();
    let mut b = pool.empty_allocation();
    assert_eq!(a.attach_cached_prefix(&sc, &tokens, BS), 0);
    assert_eq!(b.attach_cached_prefix(&sc, &tokens, BS), 0);
    assert!(a.ensure_tokens(8, BS) && b.ensure_tokens(8, BS));
    a.register_computed(&tokens, BS);
    b.register_computed(&tokens, BS);
    assert_eq!(pool.cached_blocks(), 2);
    let b_blocks = b.blocks().to_vec();
    drop(b);
    // b's duplicates went back to the free list, not to the idle cache.
    assert_eq!(pool.free_blocks(), 8 - 2);
    let mut c = pool.empty_allocation();
    assert_eq!(c.attach_cached_prefix(&sc, &tokens, BS), 8);
    assert_eq!(c.blocks(), a.blocks());
    assert!(b_blocks.iter().all(|x| !c.blocks().contains(x)));
}

#[test]
fn prefix_cache_registers_only_what_was_computed_and_is_incremental() {
    let pool = BlockPool::with_prefix_cache(8);
    let sc = scope("s");
    let tokens: Vec<u32> = (0..12).collect();
    let mut a = pool.empty_allocation();
    assert_eq!(a.attach_cached_prefix(&sc, &tokens, BS), 0);
    assert!(a.ensure_tokens(12, BS));
    a.register_computed(&tokens[..3], BS);
    assert_eq!(pool.cached_blocks(), 0, "a partly computed block is not shared");
    a.register_computed(&tokens[..5], BS);
    assert_eq!(pool.cached_blocks(), 1);
    a.register_computed(&tokens[..12], BS);
    assert_eq!(pool.cached_blocks(), 3);
    let mut b = pool.empty_allocation();
    assert_eq!(b.attach_cached_prefix(&sc, &tokens, BS), 12);
}

#[test]
fn pool_without_prefix_cache_never_shares() {
    let pool = BlockPool::new(8);
    let sc = scope("s");
    let tokens: Vec<u32> = (0..8).collect();
    let a = computed_seq(&pool, &sc, &tokens);
    let mut b = pool.empty_allocation();
    assert_eq!(b.attach_cached_prefix(&sc, &tokens, BS), 0);
    assert_eq!(pool.cached_blocks(), 0);
    drop(a);
    assert_eq!(pool.free_blocks(), 8);
}

#[test]
fn prefix_cache_expires_blocks_idle_since_before_the_cutoff() {
    let pool = BlockPool::with_prefix_cache(8);
    let sc = scope("s");
    let old: Vec<u32> = (0..8).collect();
    let held_tokens: Vec<u32> = (100..104).collect();
    drop(computed_seq(&pool, &sc, &old));
    let before_nothing = std::time::Instant::now() - std::time::Duration::from_secs(60);
    assert_eq!(pool.expire_idle_before(before_nothing), 0, "nothing has been idle that long");
    // A held cached block never expires, however old the cutoff.
    let held = computed_seq(&pool, &sc, &held_tokens);
    let cutoff = std::time::Instant::now() + std::time::Duration::from_millis(1);
    assert_eq!(pool.cached_blocks(), 3);
    assert_eq!(pool.expire_idle_before(cutoff), 2);
    assert_eq!(pool.cached_blocks(), 1);
    assert_eq!(pool.free_blocks(), 7, "expired blocks are free");
    let mut probe = pool.empty_allocation();
    assert_eq!(probe.attach_cached_prefix(&sc, &old, BS), 0, "expired blocks are no longer reusable");
    let mut probe2 = pool.empty_allocation();
    assert_eq!(probe2.attach_cached_prefix(&sc, &held_tokens, BS), 4);
    drop((probe, probe2, held));
    assert_eq!(pool.free_blocks(), 8);
}

/// The released list: nothing unless tracking is on; then every block whose
/// contents stop belonging to anyone, once, and never a block that is still
/// held or still cached.
#[test]
fn released_blocks_are_listed_once_and_cached_ones_are_not() {
    let untracked = BlockPool::new(4);
    drop(untracked.allocate(2).unwrap());
    assert!(untracked.take_released().is_empty());

    let pool = BlockPool::with_prefix_cache(4);
    pool.track_released();
    let tokens: Vec<u32> = (0..6).collect(); // one whole block and a partial one
    let a = computed_seq(&pool, &scope("alice"), &tokens);
    let (cached, partial) = (a.blocks()[0], a.blocks()[1]);
    let shared = {
        let mut b = pool.empty_allocation();
        assert_eq!(b.attach_cached_prefix(&scope("alice"), &tokens, BS), 4);
        b
    };
    drop(a);
    assert_eq!(pool.take_released(), vec![partial], "the cached block is still held by the other sequence");
    drop(shared);
    assert!(pool.take_released().is_empty(), "an idle cached block keeps its contents");
    // Four blocks: three free ones, then the cached one, evicted.
    let all = pool.allocate(4).unwrap();
    assert_eq!(pool.take_released(), vec![cached]);
    drop(all);
    let mut released = pool.take_released();
    released.sort_unstable();
    assert_eq!(released, vec![0, 1, 2, 3]);
    assert!(pool.take_released().is_empty(), "each release is listed once");
}
