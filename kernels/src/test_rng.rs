//! A tiny deterministic generator for the kernels' tests (xorshift32): the
//! inputs only need to be varied and reproducible, not random.

pub(crate) struct XorShift32(pub u32);

impl XorShift32 {
    pub fn next_u32(&mut self) -> u32 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        self.0 = s;
        s
    }

    /// A value in `[-scale / 2, scale / 2]`.
    pub fn centered(&mut self, scale: f32) -> f32 {
        (self.next_u32() as f32 / u32::MAX as f32 - 0.5) * scale
    }
}
