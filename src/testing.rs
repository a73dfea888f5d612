//! What the property and fuzz tests share: a seeded generator, so every
//! run of `cargo test` tries the same inputs (a failure reproduces), and
//! the iteration budget, fixed in CI and longer on demand:
//!
//! ```sh
//! WSGATE_FUZZ_SCALE=100 cargo test --lib fuzz   # 100 times the CI budget
//! WSGATE_FUZZ_SEED=7 cargo test --lib fuzz      # other inputs
//! ```

/// SplitMix64: tiny, fast, and good enough to drive input generation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`, mixed with `WSGATE_FUZZ_SEED` when set.
    pub fn new(seed: u64) -> Self {
        let extra = std::env::var("WSGATE_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        Self(seed ^ extra.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// `seed` changed a little: bytes flipped, dropped, repeated, or
    /// spliced in from `dictionary` (the tokens a parser cares about).
    pub fn mutate(&mut self, seed: &[u8], dictionary: &[&[u8]]) -> Vec<u8> {
        let mut out = seed.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(5) {
                0 if !out.is_empty() => {
                    let i = at.min(out.len() - 1);
                    out[i] ^= 1 << self.below(8);
                }
                1 if !out.is_empty() => {
                    let end = (at + 1 + self.below(8)).min(out.len());
                    out.drain(at.min(end)..end);
                }
                2 if !dictionary.is_empty() => {
                    let word = dictionary[self.below(dictionary.len())];
                    out.splice(at..at, word.iter().copied());
                }
                3 => {
                    let b = self.next_u64() as u8;
                    out.insert(at, b);
                }
                _ => {
                    let end = (at + self.below(16)).min(out.len());
                    let copy = out[at..end].to_vec();
                    out.splice(at..at, copy);
                }
            }
        }
        out
    }
}

/// How many iterations a test runs: `ci` times `WSGATE_FUZZ_SCALE` (1).
pub fn iterations(ci: usize) -> usize {
    let scale = std::env::var("WSGATE_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    ci.saturating_mul(scale.max(1))
}
