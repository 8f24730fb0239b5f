//! Hard-sample selection with torch's ordering:
//! `torch.sort(losses, descending=True, stable=True).indices[:k]`.
//!
//! Order: NaN first (every NaN ties with every other NaN), then +inf, finite values descending,
//! -inf last; `-0.0` and `+0.0` tie; ties keep ascending position.

use crate::error::{Error, Result};

/// Maps a float to a `u32` whose *descending* order is torch's descending order.
/// All NaNs map to `u32::MAX`; `-0.0` maps like `+0.0`.
#[inline]
pub fn desc_key(x: f32) -> u32 {
    if x.is_nan() {
        return u32::MAX;
    }
    // -0.0 == 0.0, so this canonicalises the sign of zero.
    let bits = if x == 0.0 { 0u32 } else { x.to_bits() };
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The same idea for `f64` (used by the tracker's "hardest samples" ranking).
#[inline]
pub fn desc_key_f64(x: f64) -> u64 {
    if x.is_nan() {
        return u64::MAX;
    }
    let bits = if x == 0.0 { 0u64 } else { x.to_bits() };
    if bits & (1 << 63) != 0 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// `int(n * p)` as Python computes it (float product, truncation); `p` must lie in [0, 1].
pub fn kept_count(n: u64, p: f64) -> Result<u64> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::Value(format!("p must be in [0, 1], got {p}")));
    }
    // Python converts the int to the nearest double, multiplies, then truncates toward zero.
    Ok((n as f64 * p) as u64)
}

/// Positions of the `k` largest values, in torch's stable descending order; `0 <= k <= len`.
pub fn topk_desc(losses: &[f32], k: i64) -> Result<Vec<i64>> {
    let n = losses.len();
    let k = usize::try_from(k)
        .ok()
        .filter(|&k| k <= n)
        .ok_or_else(|| Error::Value(format!("k must be in [0, {n}] (len(losses)), got {k}")))?;
    if k == 0 {
        return Ok(Vec::new());
    }
    if n <= u32::MAX as usize {
        // Ascending order of ((!key) << 32 | position) is (key descending, position ascending).
        let mut keys: Vec<u64> = losses
            .iter()
            .enumerate()
            .map(|(i, &x)| (u64::from(!desc_key(x)) << 32) | i as u64)
            .collect();
        let top = partial_sort(&mut keys, k);
        Ok(top.iter().map(|&c| (c & 0xFFFF_FFFF) as i64).collect())
    } else {
        let mut keys: Vec<(u32, usize)> = losses
            .iter()
            .enumerate()
            .map(|(i, &x)| (!desc_key(x), i))
            .collect();
        Ok(partial_sort(&mut keys, k)
            .iter()
            .map(|&(_, i)| i as i64)
            .collect())
    }
}

/// Sorts the `k` smallest elements (all distinct) into `v[..k]` and returns that prefix.
fn partial_sort<T: Ord>(v: &mut [T], k: usize) -> &[T] {
    if k < v.len() && k <= v.len() / 2 {
        v.select_nth_unstable(k - 1);
        v[..k].sort_unstable();
    } else {
        v.sort_unstable();
    }
    &v[..k]
}

/// For every domain id present, ascending, the top `int(n_d * p)` positions of that domain's rows
/// (torch's stable descending order within the domain), concatenated.
pub fn topk_per_domain(losses: &[f32], domains: &[i64], p: f64) -> Result<Vec<i64>> {
    if losses.len() != domains.len() {
        return Err(Error::Value(format!(
            "losses and domain_ids must have the same length, got {} and {}",
            losses.len(),
            domains.len()
        )));
    }
    // Validate p even when the batch is empty.
    kept_count(0, p)?;
    // Sort by (domain, key descending, position); positions make every element distinct.
    let mut rows: Vec<(i64, u32, usize)> = losses
        .iter()
        .zip(domains)
        .enumerate()
        .map(|(i, (&x, &d))| (d, !desc_key(x), i))
        .collect();
    rows.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let d = rows[start].0;
        let mut end = start;
        while end < rows.len() && rows[end].0 == d {
            end += 1;
        }
        let keep = kept_count((end - start) as u64, p)? as usize;
        out.extend(rows[start..start + keep].iter().map(|r| r.2 as i64));
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward reference: a stable sort with an explicit comparator.
    fn reference(losses: &[f32], k: usize) -> Vec<i64> {
        let mut idx: Vec<usize> = (0..losses.len()).collect();
        idx.sort_by(|&a, &b| {
            let (x, y) = (losses[a], losses[b]);
            match (x.is_nan(), y.is_nan()) {
                (true, true) => std::cmp::Ordering::Equal,
                (true, false) => std::cmp::Ordering::Less,
                (false, true) => std::cmp::Ordering::Greater,
                _ => y.partial_cmp(&x).unwrap(),
            }
        });
        idx[..k].iter().map(|&i| i as i64).collect()
    }

    #[test]
    fn torch_reference_vector() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let v = [
            1.0, nan, -0.0, 2.0, 0.0, -inf, 2.0, inf, nan, 1.0, -0.0, 0.0,
        ];
        assert_eq!(
            topk_desc(&v, 12).unwrap(),
            vec![1, 8, 7, 3, 6, 0, 9, 2, 4, 10, 11, 5]
        );
        assert_eq!(topk_desc(&v, 3).unwrap(), vec![1, 8, 7]);
        assert_eq!(topk_desc(&v, 0).unwrap(), Vec::<i64>::new());
        assert!(topk_desc(&v, 13).is_err());
        assert_eq!(
            topk_desc(&v, -1).unwrap_err(),
            Error::Value("k must be in [0, 12] (len(losses)), got -1".into())
        );
    }

    #[test]
    fn key_is_monotone() {
        let vals = [
            f32::NEG_INFINITY,
            -f32::MAX,
            -1.0,
            -f32::MIN_POSITIVE,
            -1e-45,
            0.0,
            1e-45,
            f32::MIN_POSITIVE,
            1.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(desc_key(w[0]) < desc_key(w[1]), "{} vs {}", w[0], w[1]);
        }
        assert_eq!(desc_key(-0.0), desc_key(0.0));
        assert_eq!(desc_key(f32::NAN), desc_key(-f32::NAN));
        assert!(desc_key(f32::INFINITY) < desc_key(f32::NAN));
    }

    #[test]
    fn matches_reference_on_pseudo_random_ties() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let palette = [
            0.0,
            -0.0,
            1.0,
            2.5,
            -3.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for n in [0usize, 1, 2, 5, 16, 17, 96, 160, 1000] {
            let v: Vec<f32> = (0..n).map(|_| palette[(next() % 8) as usize]).collect();
            for k in [0, n / 3, n / 2, n] {
                let got = topk_desc(&v, k as i64).unwrap();
                assert_eq!(got, reference(&v, k), "n={n} k={k}");
            }
        }
    }

    #[test]
    fn kept_count_floors_like_python() {
        assert_eq!(kept_count(96, 0.2).unwrap(), 19);
        assert_eq!(kept_count(96, 0.25).unwrap(), 24);
        assert_eq!(kept_count(96, 0.3).unwrap(), 28);
        assert_eq!(kept_count(160, 0.3).unwrap(), 48);
        assert_eq!(kept_count(160, 0.2).unwrap(), 32);
        assert!(kept_count(10, 1.5).is_err());
        assert!(kept_count(10, f64::NAN).is_err());
    }

    #[test]
    fn per_domain_groups_in_domain_order() {
        let losses = [0.5, 3.0, 1.0, 2.0, 4.0, 0.0];
        let domains = [1, 0, 1, 0, 1, 0];
        // domain 0: rows 1,3,5 -> keep int(3*0.7)=2 -> [1,3]; domain 1: rows 0,2,4 -> [4,2]
        assert_eq!(
            topk_per_domain(&losses, &domains, 0.7).unwrap(),
            vec![1, 3, 4, 2]
        );
        assert!(topk_per_domain(&losses, &domains[..2], 0.5).is_err());
    }
}
