//! Scalar math shared by the kernels (and the sampler): written so that loops
//! calling it vectorize.

/// `e^x` for `x <= 0`, relative error below 3e-7; exactly 0 below -87 (where `f32` underflows) and for `-inf`.
///
/// Cody–Waite reduction `x = i·ln2 + f` with `f` in [-ln2/2, ln2/2], a degree-7
/// Taylor polynomial for `e^f`, and `2^i` written into the exponent bits.
/// Only selects and bit casts (no saturating float→int conversion), so loops
/// over the vocabulary vectorize.
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355/512, exact: i·LN2_HI is exact for |i| <= 126
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let xc = if x < -87.0 { -87.0 } else { x };
    let z = xc * std::f32::consts::LOG2_E + ROUND;
    let fi = z - ROUND; // round(x·log2 e), in [-126, 0]
    let i = (z.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let f = (xc - fi * LN2_HI) - fi * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits((i.wrapping_add(127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}
