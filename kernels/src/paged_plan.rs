//! The host-side plan of one paged-attention step for the CUDA kernels.
//!
//! Why a plan: the GPU kernels need, per step, the cache slot of every new row,
//! the work items (one per decode token, one per tile of up to [`PREFILL_TILE`]
//! prompt rows) and the block tables. Building these on the host is cheap
//! (O(rows + blocks)); uploading them as ONE int32 buffer costs one copy per
//! step, and the same plan serves every layer of the step. The plan is plain
//! data, so it is built and tested without a GPU.
//!
//! Routing: a sequence contributing one token goes to the decode kernel (split
//! over partitions of at most [`DECODE_PARTITION`] keys, smaller when few sequences decode); longer
//! chunks go to the prefill kernel (causal within the chunk, reading the cached
//! prefix through the block table).

use crate::paged_attention::{PagedAttentionError, PagedGeometry, SeqChunk};

/// Query rows of one prefill tile (must equal `QTILE` in the `.cu` source).
pub const PREFILL_TILE: usize = 16;
/// Most keys per decode partition.
pub const DECODE_PARTITION: usize = 512;
/// Fewest keys per decode partition (below this a partition costs more to merge than it saves).
pub const MIN_DECODE_PARTITION: usize = 32;
/// Decode thread blocks wanted per step (about two per SM of a large GPU): when
/// few sequences decode (batch 1), their contexts are split into smaller
/// partitions so the whole GPU streams the KV cache.
pub const DECODE_TARGET_BLOCKS: usize = 256;

/// Where each part of the plan starts in [`PagedPlan::data`] and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanLayout {
    /// Rows of the step (length of the slot table at offset 0).
    pub rows: usize,
    pub num_decode: usize,
    pub decode_row: usize,
    pub decode_pos: usize,
    pub decode_bt: usize,
    pub num_tiles: usize,
    pub tile_row: usize,
    pub tile_pos: usize,
    pub tile_len: usize,
    pub tile_bt: usize,
    pub block_tables: usize,
    /// Most partitions any decode item needs (1: no partial buffers needed).
    pub max_parts: usize,
    /// Keys per decode partition.
    pub part_size: usize,
}

/// One step's plan: all int32 tables in one buffer, plus their layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedPlan {
    pub data: Vec<i32>,
    pub layout: PlanLayout,
}

fn shape_err(msg: impl Into<String>) -> PagedAttentionError {
    PagedAttentionError::Shape(msg.into())
}

fn as_i32(x: usize, what: &str) -> Result<i32, PagedAttentionError> {
    i32::try_from(x).map_err(|_| shape_err(format!("{what} {x} does not fit in 32 bits")))
}

impl PagedPlan {
    /// Validates `seqs` against the geometry (rows in range and disjoint, block
    /// tables long enough, block ids in range) and builds the plan.
    pub fn build(
        geom: &PagedGeometry,
        rows: usize,
        seqs: &[SeqChunk<'_>],
        sliding_window: Option<usize>,
    ) -> Result<Self, PagedAttentionError> {
        if geom.block_size == 0 || geom.num_kv_heads == 0 || geom.head_dim == 0 {
            return Err(shape_err("block_size, num_kv_heads and head_dim must be > 0"));
        }
        if sliding_window == Some(0) {
            return Err(shape_err("sliding window must be > 0"));
        }
        let bs = geom.block_size;
        let mut slots = vec![-1i32; rows];
        let (mut dec_row, mut dec_pos, mut dec_bt) = (Vec::new(), Vec::new(), Vec::new());
        let (mut t_row, mut t_pos, mut t_len, mut t_bt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut tables: Vec<i32> = Vec::new();
        let mut max_visible = 1usize;
        for s in seqs {
            if s.len == 0 {
                return Err(shape_err("a sequence contributes no tokens"));
            }
            if s.row + s.len > rows {
                return Err(shape_err(format!("rows {}..{} exceed the {rows} input rows", s.row, s.row + s.len)));
            }
            let needed = geom.blocks_for(s.start_pos + s.len);
            if s.block_table.len() < needed {
                return Err(PagedAttentionError::BlockTableTooShort { needed, have: s.block_table.len() });
            }
            let table = &s.block_table[..needed];
            if let Some(&id) = table.iter().find(|&&id| id as usize >= geom.num_blocks) {
                return Err(PagedAttentionError::BlockOutOfRange { id, num_blocks: geom.num_blocks });
            }
            for t in 0..s.len {
                let pos = s.start_pos + t;
                if slots[s.row + t] != -1 {
                    return Err(shape_err("sequences overlap in the input rows"));
                }
                slots[s.row + t] = as_i32(table[pos / bs] as usize * bs + pos % bs, "cache slot")?;
            }
            let bt_off = as_i32(tables.len(), "block table offset")?;
            for &id in table {
                tables.push(as_i32(id as usize, "block id")?);
            }
            if s.len == 1 {
                let ctx = s.start_pos + 1;
                max_visible = max_visible.max(sliding_window.map_or(ctx, |w| ctx.min(w)));
                dec_row.push(as_i32(s.row, "row")?);
                dec_pos.push(as_i32(s.start_pos, "position")?);
                dec_bt.push(bt_off);
            } else {
                for t0 in (0..s.len).step_by(PREFILL_TILE) {
                    t_row.push(as_i32(s.row + t0, "row")?);
                    t_pos.push(as_i32(s.start_pos + t0, "position")?);
                    t_len.push((PREFILL_TILE.min(s.len - t0)) as i32);
                    t_bt.push(bt_off);
                }
            }
        }
        // Partition size: the largest that still gives about DECODE_TARGET_BLOCKS
        // blocks (one block per item, KV head and partition), within bounds.
        let base_blocks = (dec_row.len() * geom.num_kv_heads).max(1);
        let want_parts = DECODE_TARGET_BLOCKS.div_ceil(base_blocks);
        let part_size = max_visible
            .div_ceil(want_parts)
            .next_multiple_of(MIN_DECODE_PARTITION)
            .clamp(MIN_DECODE_PARTITION, DECODE_PARTITION);
        let max_parts = max_visible.div_ceil(part_size);
        let mut data = slots;
        let mut layout = PlanLayout {
            rows,
            num_decode: dec_row.len(),
            num_tiles: t_row.len(),
            max_parts,
            part_size,
            ..Default::default()
        };
        let mut put = |v: Vec<i32>| {
            let at = data.len();
            data.extend(v);
            at
        };
        layout.decode_row = put(dec_row);
        layout.decode_pos = put(dec_pos);
        layout.decode_bt = put(dec_bt);
        layout.tile_row = put(t_row);
        layout.tile_pos = put(t_pos);
        layout.tile_len = put(t_len);
        layout.tile_bt = put(t_bt);
        layout.block_tables = put(tables);
        // Never empty: a zero-length device buffer cannot be allocated.
        if data.is_empty() {
            data.push(0);
        }
        Ok(PagedPlan { data, layout })
    }

    /// Cache slot (`block * block_size + slot`) of every row; -1 for rows no sequence covers.
    pub fn slots(&self) -> &[i32] {
        &self.data[..self.layout.rows]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom() -> PagedGeometry {
        PagedGeometry { num_blocks: 8, block_size: 4, num_kv_heads: 2, head_dim: 8 }
    }

    #[test]
    fn plan_routes_decode_and_prefill_and_maps_slots() {
        let t1 = [5u32, 2];
        let t2 = [7u32, 0, 1, 3, 4, 6];
        let seqs = [
            // A decode token at position 5 (block 2, slot 1).
            SeqChunk { block_table: &t1, row: 0, len: 1, start_pos: 5 },
            // A prefill chunk of 20 rows at positions 3..23: two tiles.
            SeqChunk { block_table: &t2, row: 1, len: 20, start_pos: 3 },
        ];
        let p = PagedPlan::build(&geom(), 22, &seqs, None).unwrap();
        let l = p.layout;
        assert_eq!(p.slots()[0], 2 * 4 + 1);
        // Row 1 is position 3: block t2[0] = 7, slot 3.
        assert_eq!(p.slots()[1], 7 * 4 + 3);
        // Row 2 is position 4: block t2[1] = 0, slot 0.
        assert_eq!(p.slots()[2], 0);
        assert_eq!(p.slots()[21], -1, "row 21 belongs to no sequence");
        assert_eq!((l.num_decode, l.num_tiles, l.max_parts), (1, 2, 1));
        assert_eq!(&p.data[l.decode_row..l.decode_row + 1], &[0]);
        assert_eq!(&p.data[l.decode_pos..l.decode_pos + 1], &[5]);
        assert_eq!(&p.data[l.tile_row..l.tile_row + 2], &[1, 17]);
        assert_eq!(&p.data[l.tile_pos..l.tile_pos + 2], &[3, 19]);
        assert_eq!(&p.data[l.tile_len..l.tile_len + 2], &[16, 4]);
        let bt2 = p.data[l.tile_bt] as usize;
        assert_eq!(&p.data[l.block_tables + bt2..l.block_tables + bt2 + 6], &[7, 0, 1, 3, 4, 6]);
        let bt1 = p.data[l.decode_bt] as usize;
        assert_eq!(&p.data[l.block_tables + bt1..l.block_tables + bt1 + 2], &[5, 2]);
    }

    #[test]
    fn plan_partitions_long_decodes_within_the_window() {
        let g = PagedGeometry { num_blocks: 400, block_size: 4, num_kv_heads: 1, head_dim: 8 };
        let table: Vec<u32> = (0..400).collect();
        let s = [SeqChunk { block_table: &table, row: 0, len: 1, start_pos: 1200 }];
        // One sequence, one KV head: split into the smallest partitions.
        let l = PagedPlan::build(&g, 1, &s, None).unwrap().layout;
        assert_eq!((l.part_size, l.max_parts), (MIN_DECODE_PARTITION, 1201usize.div_ceil(MIN_DECODE_PARTITION)));
        let l = PagedPlan::build(&g, 1, &s, Some(100)).unwrap().layout;
        assert_eq!((l.part_size, l.max_parts), (32, 4));
        // Many decoding sequences fill the GPU alone: the largest partitions.
        let many: Vec<SeqChunk<'_>> =
            (0..300).map(|i| SeqChunk { block_table: &table, row: i, len: 1, start_pos: 1200 }).collect();
        let l = PagedPlan::build(&g, 300, &many, None).unwrap().layout;
        assert_eq!((l.part_size, l.max_parts), (DECODE_PARTITION, 3));
    }

    #[test]
    fn plan_rejects_bad_input() {
        let t = [1u32];
        let bad_block = [9u32];
        let g = geom();
        let ok = |row, len, start_pos, table: &'static [u32]| SeqChunk { block_table: table, row, len, start_pos };
        assert!(PagedPlan::build(&g, 2, &[ok(0, 1, 0, &[1])], None).is_ok());
        assert!(matches!(
            PagedPlan::build(&g, 8, &[SeqChunk { block_table: &t, row: 0, len: 5, start_pos: 0 }], None),
            Err(PagedAttentionError::BlockTableTooShort { needed: 2, have: 1 })
        ));
        assert!(matches!(
            PagedPlan::build(&g, 2, &[SeqChunk { block_table: &bad_block, row: 0, len: 1, start_pos: 0 }], None),
            Err(PagedAttentionError::BlockOutOfRange { id: 9, .. })
        ));
        assert!(PagedPlan::build(&g, 1, &[ok(0, 2, 0, &[1])], None).is_err(), "rows beyond the input");
        assert!(PagedPlan::build(&g, 4, &[ok(0, 2, 0, &[1]), ok(1, 1, 0, &[2])], None).is_err(), "overlapping rows");
        assert!(PagedPlan::build(&g, 1, &[ok(0, 1, 0, &[1])], Some(0)).is_err(), "zero window");
    }
}
