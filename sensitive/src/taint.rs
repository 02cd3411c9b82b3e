//! [`Phi`]: the taint type for protected health information (prompt and completion
//! text). Its `Debug` prints `[PHI]`; it has no `Display` and no `Serialize`, so
//! it cannot reach a log line, an error message or a metric label by accident.
//! Code that must read the text calls [`Phi::expose`], which is easy to grep for.

use zeroize::Zeroize;

/// Text (or other data) that may contain PHI. Zeroized on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Phi<T: Zeroize = String>(T);

impl<T: Zeroize> Phi<T> {
    pub fn new(value: T) -> Self {
        Phi(value)
    }
    /// Borrow the sensitive value. Every call site is a place PHI flows through.
    pub fn expose(&self) -> &T {
        &self.0
    }
    /// Mutable access to the sensitive value.
    pub fn expose_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: Zeroize> From<T> for Phi<T> {
    fn from(value: T) -> Self {
        Phi(value)
    }
}

impl<T: Zeroize> std::fmt::Debug for Phi<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[PHI]")
    }
}

impl<T: Zeroize> Drop for Phi<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_text() {
        let p = Phi::new(String::from("patient John Doe, MRN 12345"));
        assert_eq!(format!("{p:?}"), "[PHI]");
        assert_eq!(format!("{:?}", Some(&p)), "Some([PHI])");
        assert_eq!(p.expose(), "patient John Doe, MRN 12345");
    }
}
