//! MT19937 as used by numpy's legacy `RandomState(int)`, and its 1-D `shuffle`.
//!
//! Seeding is the reference `init_genrand`; `shuffle` swaps `x[i]` with `x[j]` for
//! `i = n-1 .. 1`, where `j` is a bounded draw in `[0, i]` by masked rejection
//! (numpy's `random_interval`: 32-bit draws while `i <= 2^32-1`, 64-bit draws above).

use crate::error::{Error, Result};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

pub struct Mt19937 {
    state: [u32; N],
    pos: usize,
}

impl Mt19937 {
    /// `init_genrand(seed)`.
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = seed;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, pos: N }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & UPPER_MASK) | (self.state[(i + 1) % N] & LOWER_MASK);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= MATRIX_A;
            }
            self.state[i] = v;
        }
        self.pos = 0;
    }

    /// `genrand_int32`.
    pub fn next_u32(&mut self) -> u32 {
        if self.pos >= N {
            self.twist();
        }
        let mut y = self.state[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// numpy's `next_uint64` for MT19937: high word first.
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (hi << 32) | lo
    }

    /// numpy's `random_interval(max)`: uniform in `[0, max]` by masked rejection.
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        mask |= mask >> 1;
        mask |= mask >> 2;
        mask |= mask >> 4;
        mask |= mask >> 8;
        mask |= mask >> 16;
        mask |= mask >> 32;
        if max <= u64::from(u32::MAX) {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        } else {
            loop {
                let v = self.next_u64() & mask;
                if v <= max {
                    return v;
                }
            }
        }
    }
}

/// Checks a seed the way `RandomState(seed)` does.
pub fn check_seed(seed: i64) -> Result<u32> {
    u32::try_from(seed)
        .map_err(|_| Error::Value(format!("seed must be between 0 and 2**32 - 1, got {seed}")))
}

/// `x = np.arange(n); np.random.RandomState(seed).shuffle(x); x`.
pub fn legacy_shuffle(n: usize, seed: u32) -> Vec<i64> {
    let mut x: Vec<i64> = (0..n as i64).collect();
    let mut rng = Mt19937::new(seed);
    for i in (1..n).rev() {
        let j = rng.interval(i as u64) as usize;
        x.swap(i, j);
    }
    x
}

/// DomainBed's in/out split: `keys = legacy_shuffle(n, seed)`, `n_out = int(n * fraction)`,
/// returns `(keys[:n_out], keys[n_out:])`.
pub fn split_in_out(n: usize, holdout_fraction: f64, seed: u32) -> Result<(Vec<i64>, Vec<i64>)> {
    if !(0.0..=1.0).contains(&holdout_fraction) {
        return Err(Error::Value(format!(
            "holdout_fraction must be in [0, 1], got {holdout_fraction}"
        )));
    }
    let mut keys = legacy_shuffle(n, seed);
    let n_out = ((n as f64 * holdout_fraction) as usize).min(n);
    let inner = keys.split_off(n_out);
    Ok((keys, inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_outputs_of_init_genrand_5489() {
        // The first outputs of the reference generator seeded with 5489.
        let mut mt = Mt19937::new(5489);
        let first: Vec<u32> = (0..5).map(|_| mt.next_u32()).collect();
        assert_eq!(
            first,
            vec![
                3_499_211_612,
                581_869_302,
                3_890_346_734,
                3_586_334_585,
                545_404_204
            ]
        );
        // The 10000th output of the reference generator seeded with 5489.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn numpy_shuffle_vectors() {
        assert_eq!(
            legacy_shuffle(10, 894_182_419),
            vec![2, 3, 8, 1, 4, 5, 0, 9, 6, 7]
        );
        assert_eq!(legacy_shuffle(10, 0), vec![2, 8, 4, 9, 1, 6, 7, 3, 0, 5]);
        assert_eq!(legacy_shuffle(0, 0), Vec::<i64>::new());
        assert_eq!(legacy_shuffle(1, 7), vec![0]);
    }

    #[test]
    fn split_partitions_the_shuffle() {
        let (out, inn) = split_in_out(10, 0.2, 894_182_419).unwrap();
        assert_eq!(out, vec![2, 3]);
        assert_eq!(inn, vec![8, 1, 4, 5, 0, 9, 6, 7]);
        assert!(split_in_out(10, 1.2, 0).is_err());
        assert!(check_seed(-1).is_err());
        assert!(check_seed(1 << 32).is_err());
        assert_eq!(check_seed((1 << 32) - 1).unwrap(), u32::MAX);
    }
}
