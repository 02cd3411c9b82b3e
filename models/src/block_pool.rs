//! The block pool behind the paged KV cache, with an optional prefix cache.
//!
//! Blocks are handed out from a free list in O(1) and come back when the
//! [`SeqBlocks`] allocation holding them is dropped, so a cancelled, failed or
//! panicked request can never leak cache memory.
//!
//! Why a prefix cache: chat requests repeat their opening tokens (the chat
//! template's system prompt, a clinical app's fixed instructions, the earlier
//! turns of a conversation), and on a CPU every prompt token costs about as much
//! as a generated one. With the cache on, a block whose K/V have been computed
//! for every layer is *registered* under its exact contents — the tokens of the
//! block and, through the parent link, every token before it — and a later
//! sequence whose prompt starts with the same whole blocks attaches those blocks
//! instead of recomputing them. K/V at a position depend only on the tokens up to
//! it, and the kernels give every row the same result whatever it is batched
//! with, so a reused block holds exactly what recomputing it would write.
//!
//! Rules that keep sharing safe:
//! - Only whole, fully computed blocks are shared, and a sequence only ever
//!   writes positions past what it has computed, so a shared block is never
//!   written again while anyone holds it.
//! - Keys are exact (parent + the block's token ids), not hashes: a collision
//!   cannot hand one prompt another prompt's K/V.
//! - Sharing is scoped ([`PrefixScope`]): the server uses the caller's principal,
//!   so one caller can never attach — or time — another caller's cached blocks.
//!   A shared cache would let a caller learn, from a faster first token, whether
//!   someone else recently sent a given prompt: a PHI side channel.
//! - Registered blocks nobody holds stay cached but count as free: they sit in
//!   an LRU list and are taken (oldest first) only when the free list is empty,
//!   so caching never makes an allocation fail that would otherwise succeed.
//! - The token ids in the index are PHI: never printed, zeroized when dropped.
//! - Retention is bounded: [`BlockPool::expire_idle_before`] drops cached blocks
//!   nobody has held since a given instant (the server calls it with its idle
//!   limit, `scheduler.prefix_cache_idle_secs`), so a prompt's K/V do not stay
//!   reusable in memory for longer than that after its last use.
//!
//! Scrubbing: K/V are derived from the prompt and the completion, so they are
//! PHI too. A pool that tracks released blocks ([`BlockPool::track_released`];
//! the paged KV cache turns it on) lists every block whose contents stop
//! belonging to anyone — freed without being cached, evicted from the cache for
//! reuse, or expired — and the cache zeroes those blocks' K/V
//! ([`BlockPool::take_released`]) before it hands control back, so a finished
//! request's K/V outlive it only as cached prefix blocks, within the idle limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use zeroize::Zeroize;

/// Sequences share cached prefix blocks only within one scope. The server uses
/// the authenticated principal's id, so callers never share (or can time) each
/// other's prompts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrefixScope(Arc<str>);

impl PrefixScope {
    pub fn new(id: &str) -> Self {
        PrefixScope(Arc::from(id))
    }
}

/// The token ids of one whole block. PHI: no `Debug` contents, zeroized on drop.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BlockTokens(Box<[u32]>);

impl Drop for BlockTokens {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// What precedes a block: the scope's start, or the registered block before it
/// (by registration number, never reused, so a key whose parent was evicted can
/// no longer be reached from a root).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Parent {
    Root(PrefixScope),
    Block(u64),
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    parent: Parent,
    tokens: BlockTokens,
}

const NIL: u32 = u32::MAX;

/// An intrusive doubly linked list over block ids: O(1) push, pop and unlink.
struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Lru {
    fn new(n: usize) -> Self {
        Lru { prev: vec![NIL; n], next: vec![NIL; n], head: NIL, tail: NIL, len: 0 }
    }

    fn push_back(&mut self, b: u32) {
        let i = b as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.len += 1;
    }

    fn unlink(&mut self, b: u32) {
        let i = b as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let b = self.head;
        (b != NIL).then(|| {
            self.unlink(b);
            b
        })
    }
}

/// The prefix index: registered blocks by exact key.
struct PrefixIndex {
    by_key: HashMap<BlockKey, u32>,
    /// Per block: its key and registration number while registered.
    entries: Vec<Option<(BlockKey, u64)>>,
    /// Registered blocks no sequence holds, least recently released first.
    idle: Lru,
    /// Per block: when it joined `idle` (None while held or unregistered).
    idle_since: Vec<Option<Instant>>,
    next_registration: u64,
}

impl PrefixIndex {
    fn new(n: usize) -> Self {
        PrefixIndex {
            by_key: HashMap::new(),
            entries: vec![None; n],
            idle: Lru::new(n),
            idle_since: vec![None; n],
            next_registration: 0,
        }
    }

    fn make_idle(&mut self, b: u32) {
        self.idle.push_back(b);
        self.idle_since[b as usize] = Some(Instant::now());
    }

    fn take_idle(&mut self, b: u32) {
        self.idle.unlink(b);
        self.idle_since[b as usize] = None;
    }

    /// Evicts the least recently released idle block (unregistered, token ids
    /// zeroized) and returns it for reuse.
    fn evict_oldest_idle(&mut self) -> Option<u32> {
        let b = self.idle.pop_front()?;
        self.idle_since[b as usize] = None;
        self.unregister(b);
        Some(b)
    }

    fn unregister(&mut self, b: u32) {
        if let Some((key, _)) = self.entries[b as usize].take() {
            self.by_key.remove(&key);
        }
    }
}

struct PoolState {
    /// Blocks holding nothing anyone can reuse.
    free: Vec<u32>,
    /// Blocks whose contents no longer belong to a holder or to the prefix
    /// cache and have not been zeroed yet (None: not tracked).
    released: Option<Vec<u32>>,
    /// Holders per block (sequences whose table contains it).
    refs: Vec<u32>,
    prefix: Option<PrefixIndex>,
}

impl PoolState {
    /// Blocks an allocation can take: free ones plus cached ones nobody holds.
    fn available(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, |p| p.idle.len)
    }

    /// Takes one block (a free one, else the least recently used idle cached one).
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.prefix.as_mut()?.evict_oldest_idle()?;
                // Its cached K/V were another prompt's: zeroed before reuse.
                self.mark_released(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Adds a holder to a registered block.
    fn hold_cached(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            if let Some(p) = self.prefix.as_mut() {
                p.take_idle(b);
            }
        }
        self.refs[b as usize] += 1;
    }

    /// Drops one holder of `b`; an unheld block becomes idle (registered) or free.
    fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block released more often than held");
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        match self.prefix.as_mut() {
            Some(p) if p.entries[b as usize].is_some() => p.make_idle(b),
            _ => {
                self.free.push(b);
                self.mark_released(b);
            }
        }
    }

    fn mark_released(&mut self, b: u32) {
        if let Some(r) = self.released.as_mut() {
            r.push(b);
        }
    }
}

struct PoolInner {
    state: Mutex<PoolState>,
    total: usize,
}

/// A pool of `total` block ids with an O(1) free list. Cloning shares the pool.
#[derive(Clone)]
pub struct BlockPool(Arc<PoolInner>);

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockPool")
            .field("total", &self.total_blocks())
            .field("free", &self.free_blocks())
            .field("cached", &self.cached_blocks())
            .finish()
    }
}

impl BlockPool {
    /// A pool without a prefix cache.
    pub fn new(total_blocks: usize) -> Self {
        Self::build(total_blocks, false)
    }

    /// A pool whose fully computed blocks can be reused by later sequences of the
    /// same [`PrefixScope`] (see the module documentation).
    pub fn with_prefix_cache(total_blocks: usize) -> Self {
        Self::build(total_blocks, true)
    }

    fn build(total_blocks: usize, prefix_cache: bool) -> Self {
        // Reverse so that low ids are handed out first (easier to read in tests).
        let free: Vec<u32> = (0..total_blocks as u32).rev().collect();
        let state = PoolState {
            free,
            released: None,
            refs: vec![0; total_blocks],
            prefix: prefix_cache.then(|| PrefixIndex::new(total_blocks)),
        };
        BlockPool(Arc::new(PoolInner { state: Mutex::new(state), total: total_blocks }))
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        // Every update keeps the state consistent before anything can panic, so
        // a poisoned lock is still usable.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn has_prefix_cache(&self) -> bool {
        self.state().prefix.is_some()
    }

    pub fn total_blocks(&self) -> usize {
        self.0.total
    }

    /// Blocks an allocation can take now (free, or cached and held by nobody).
    pub fn free_blocks(&self) -> usize {
        self.state().available()
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks() - self.free_blocks()
    }

    /// Registered blocks (held or idle): what the prefix cache can hand out.
    pub fn cached_blocks(&self) -> usize {
        self.state().prefix.as_ref().map_or(0, |p| p.by_key.len())
    }

    /// Drops every cached block nobody has held since before `cutoff`: it is
    /// unregistered (its token ids zeroized) and returns to the free list.
    /// Returns how many were dropped.
    pub fn expire_idle_before(&self, cutoff: Instant) -> usize {
        let mut st = self.state();
        let st = &mut *st;
        let Some(p) = st.prefix.as_mut() else { return 0 };
        let mut expired = Vec::new();
        // The idle list is in release order, so the expired blocks lead it.
        while p.idle.head != NIL && p.idle_since[p.idle.head as usize].is_some_and(|t| t < cutoff) {
            expired.push(p.evict_oldest_idle().expect("the list is not empty"));
        }
        for &b in &expired {
            st.free.push(b);
            st.mark_released(b);
        }
        expired.len()
    }

    /// From now on, lists the blocks whose contents stop belonging to anyone
    /// (see the module documentation), for [`Self::take_released`].
    pub fn track_released(&self) {
        let mut st = self.state();
        if st.released.is_none() {
            st.released = Some(Vec::new());
        }
    }

    /// The blocks released since the last call, each once (empty when not
    /// tracking). The caller zeroes their contents before any holder writes
    /// them: a block taken again since its release is listed too, because its
    /// new holder has not written anything yet as long as the caller scrubs
    /// right after each operation that can release blocks.
    pub fn take_released(&self) -> Vec<u32> {
        let mut st = self.state();
        let Some(r) = st.released.as_mut() else { return Vec::new() };
        let mut out = std::mem::take(r);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// An allocation holding no blocks yet.
    pub fn empty_allocation(&self) -> SeqBlocks {
        SeqBlocks { pool: self.clone(), blocks: Vec::new(), scope: None, indexed: 0, last_registration: None }
    }

    /// Allocates `n` blocks, all or nothing.
    pub fn allocate(&self, n: usize) -> Option<SeqBlocks> {
        let mut a = self.empty_allocation();
        a.grow(n).then_some(a)
    }
}

/// Blocks held by one sequence, in position order. Returned to the pool on drop.
pub struct SeqBlocks {
    pool: BlockPool,
    blocks: Vec<u32>,
    /// Scope for registering this sequence's blocks (None: never registered).
    scope: Option<PrefixScope>,
    /// Leading blocks already looked up in or offered to the prefix index.
    indexed: usize,
    /// Registration number of the block that precedes block `indexed`.
    last_registration: Option<u64>,
}

impl std::fmt::Debug for SeqBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqBlocks").field("blocks", &self.blocks.len()).field("indexed", &self.indexed).finish()
    }
}

impl SeqBlocks {
    /// The block table: physical block ids in position order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Adds `n` blocks, all or nothing. Returns false when the pool has fewer free.
    pub fn grow(&mut self, n: usize) -> bool {
        let mut st = self.pool.state();
        if st.available() < n {
            return false;
        }
        for _ in 0..n {
            let b = st.take().expect("availability checked under the same lock");
            self.blocks.push(b);
        }
        true
    }

    /// Grows the allocation to hold at least `tokens` tokens of `block_size`-token blocks.
    pub fn ensure_tokens(&mut self, tokens: usize, block_size: usize) -> bool {
        let need = tokens.div_ceil(block_size);
        need <= self.blocks.len() || self.grow(need - self.blocks.len())
    }

    /// Starts an empty allocation from the longest run of whole blocks of
    /// `tokens` that `scope` has cached, and remembers `scope` for registering
    /// this sequence's own blocks later. Returns the number of tokens covered (a
    /// multiple of `block_size`; 0 when the pool has no prefix cache, or when
    /// the allocation already holds blocks).
    pub fn attach_cached_prefix(&mut self, scope: &PrefixScope, tokens: &[u32], block_size: usize) -> usize {
        if !self.blocks.is_empty() || block_size == 0 {
            return 0;
        }
        let mut st = self.pool.state();
        let Some(prefix) = st.prefix.as_ref() else { return 0 };
        self.scope = Some(scope.clone());
        let mut parent = Parent::Root(scope.clone());
        let mut found = Vec::new();
        for chunk in tokens.chunks_exact(block_size) {
            let key = BlockKey { parent, tokens: BlockTokens(chunk.into()) };
            let Some(&b) = prefix.by_key.get(&key) else { break };
            let registration = prefix.entries[b as usize].as_ref().expect("indexed blocks are registered").1;
            found.push((b, registration));
            parent = Parent::Block(registration);
        }
        for &(b, _) in &found {
            st.hold_cached(b);
        }
        self.blocks.extend(found.iter().map(|&(b, _)| b));
        self.indexed = found.len();
        self.last_registration = found.last().map(|&(_, r)| r);
        found.len() * block_size
    }

    /// Registers this sequence's whole blocks among `computed` — the tokens
    /// whose K/V are in the cache for every layer — so later sequences of its
    /// scope can reuse them. A block whose contents another block already
    /// holds is left unregistered (it is freed normally). Cheap when no new
    /// block has filled.
    pub fn register_computed(&mut self, computed: &[u32], block_size: usize) {
        if block_size == 0 {
            return;
        }
        let full = (computed.len() / block_size).min(self.blocks.len());
        if full <= self.indexed {
            return;
        }
        let Some(scope) = self.scope.clone() else { return };
        let mut st = self.pool.state();
        let Some(prefix) = st.prefix.as_mut() else { return };
        for i in self.indexed..full {
            let parent = match self.last_registration {
                Some(r) => Parent::Block(r),
                None => Parent::Root(scope.clone()),
            };
            let key = BlockKey { parent, tokens: BlockTokens(computed[i * block_size..(i + 1) * block_size].into()) };
            let registration = match prefix.by_key.get(&key) {
                Some(&other) => prefix.entries[other as usize].as_ref().expect("indexed blocks are registered").1,
                None => {
                    let b = self.blocks[i];
                    let r = prefix.next_registration;
                    prefix.next_registration += 1;
                    // A block is registered at most once: it is new to this
                    // sequence (past `indexed`) and held by nobody else.
                    debug_assert!(prefix.entries[b as usize].is_none());
                    prefix.entries[b as usize] = Some((key.clone(), r));
                    prefix.by_key.insert(key, b);
                    r
                }
            };
            self.last_registration = Some(registration);
        }
        self.indexed = full;
    }
}

impl Drop for SeqBlocks {
    fn drop(&mut self) {
        if !self.blocks.is_empty() {
            let mut st = self.pool.state();
            // Last block first: the idle list then evicts a prefix's extensions
            // before the prefix itself, which other prompts are likelier to share.
            for b in self.blocks.drain(..).rev() {
                st.release(b);
            }
        }
    }
}

#[cfg(test)]
mod tests;
