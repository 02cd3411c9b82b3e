//! Errors of the kernel layer. Messages name the argument and the sizes
//! involved, never data values.

/// Why a kernel call or a weight repack was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// The row width is not a positive multiple of the block size of the type.
    #[error("{dtype}: row width {cols} is not a positive multiple of the block size {block}")]
    BadWidth { dtype: &'static str, cols: usize, block: usize },
    /// The weight byte buffer does not hold exactly `rows * cols` elements of the type.
    #[error("{dtype}: weight buffer has {got} bytes, expected {expected} for {rows}x{cols}")]
    BadWeightBytes { dtype: &'static str, rows: usize, cols: usize, got: usize, expected: usize },
    /// An input or output slice has the wrong length.
    #[error("{what}: length {got}, expected {expected}")]
    BadLength { what: &'static str, got: usize, expected: usize },
    /// The matrix has zero rows.
    #[error("matrix has no rows")]
    NoRows,
    /// The requested SIMD path is not available on this CPU.
    #[error("kernel path {0} is not supported by this CPU")]
    PathUnavailable(&'static str),
    /// Matrices stacked with [`crate::QuantMatrix::concat_rows`] differ in type,
    /// width or scale format, or a part other than the last does not fill whole
    /// 16-row tiles.
    #[error("cannot stack matrices: {0}")]
    Concat(&'static str),
    /// A GGML type id this crate has no kernel for.
    #[error("GGML type {0} has no kernel here")]
    UnsupportedType(String),
}
