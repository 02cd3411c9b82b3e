//! Portable scalar tile kernel: the reference the SIMD paths are tested against.
//! Same arithmetic as the SIMD paths: an exact integer dot product per group,
//! then `acc += isum·(d_w·d_x) + m_w·s_x` in f32.

use super::formats::Storage;
use super::pack::{read_scale, TileArgs, TILE_ROWS};

pub(crate) fn tile(a: &TileArgs<'_>, tile: &[u8], t: usize) {
    let l = a.layout;
    let g = l.group;
    let cols = a.acts.cols;
    let ng = a.acts.ngroups;
    let mut acc = vec![[0f32; TILE_ROWS]; a.m];
    let mut w = [0i32; 32];
    for gi in 0..ng {
        let gb = &tile[gi * l.group_bytes..(gi + 1) * l.group_bytes];
        for lane in 0..TILE_ROWS {
            for (e, we) in w[..g].iter_mut().enumerate() {
                *we = match l.storage {
                    Storage::Nib4 => {
                        let (s, within) = (e / 8, e % 8);
                        let byte = gb[s * 64 + lane * 4 + within % 4];
                        if within < 4 {
                            (byte & 0x0F) as i32
                        } else {
                            (byte >> 4) as i32
                        }
                    }
                    Storage::U8 => gb[(e / 4) * 64 + lane * 4 + e % 4] as i32,
                    Storage::I8 => gb[(e / 4) * 64 + lane * 4 + e % 4] as i8 as i32,
                };
            }
            let dw = read_scale(l, gb, 0, lane);
            let mw = if l.storage == Storage::I8 { 0.0 } else { read_scale(l, gb, 1, lane) };
            for (i, acc) in acc.iter_mut().enumerate() {
                let xq = &a.acts.q[i * cols + gi * g..i * cols + gi * g + g];
                let isum: i32 = w[..g].iter().zip(xq).map(|(&w, &x)| w * x as i32).sum();
                let ai = i * ng + gi;
                acc[lane] += isum as f32 * (dw * a.acts.d[ai]);
                if l.storage != Storage::I8 {
                    acc[lane] += mw * a.acts.s[ai];
                }
            }
        }
    }
    for (i, lanes) in acc.iter().enumerate() {
        a.store(i, t, lanes);
    }
}
