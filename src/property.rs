//! What the property tests share (test builds only): how far they go, and their generator.
//!
//! `ARS_PROPERTY_SCALE` multiplies their cases (default 1, a few seconds) and
//! `ARS_PROPERTY_SEED` varies their inputs (default 0, the same every run);
//! `ARS_PROPERTY_SCALE=500 cargo test --release --lib property` is the long run.

/// `(scale, seed)` from the environment.
pub fn scale() -> (usize, u64) {
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let scale = number("ARS_PROPERTY_SCALE").unwrap_or(1).max(1) as usize;
    let seed = number("ARS_PROPERTY_SEED").unwrap_or(0);
    if scale > 1 || seed != 0 {
        eprintln!("property tests: scale {scale}, seed {seed}");
    }
    (scale, seed)
}

/// A small deterministic generator (xorshift64), so the property tests need no crate.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
