//! The discrete Laplace distribution (two-sided geometric), sampled exactly
//! with integer arithmetic: Canonne, Kamath and Steinke, "The Discrete
//! Gaussian for Differential Privacy" (NeurIPS 2020), algorithms 1 and 2.
//!
//! `P(Y = y) ∝ exp(-|y| / scale)` over the integers. Adding it to a count of
//! sensitivity Δ with `scale = Δ / ε` is ε-differentially private, like the
//! continuous Laplace mechanism, but with no floating-point output whose low
//! bits could reveal the true value.

use rand::RngCore;

/// Denominator of the scale: scales are multiples of 10⁻⁶.
const SCALE_DENOMINATOR: u128 = 1_000_000;

/// A scale `t / s` as a ratio of integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scale {
    t: u128,
    s: u128,
}

impl Scale {
    /// The smallest multiple of 10⁻⁶ that is strictly greater than `scale`
    /// (rounding up only adds noise); `scale` must be finite and positive.
    pub(super) fn at_least(scale: f64) -> Scale {
        let t = (scale * SCALE_DENOMINATOR as f64).ceil();
        // `as` saturates; config checks keep scales far below that.
        let t = (t as u128).saturating_add(1);
        Scale {
            t,
            s: SCALE_DENOMINATOR,
        }
    }

    /// An exact ratio, for tests.
    #[cfg(test)]
    pub(super) fn ratio(t: u128, s: u128) -> Scale {
        Scale { t, s }
    }

    /// The scale as a float (for documentation and tests).
    #[cfg(test)]
    pub(super) fn value(&self) -> f64 {
        self.t as f64 / self.s as f64
    }
}

/// A uniform integer in `[0, n)`, exactly (rejection sampling); `n > 0`.
fn uniform_below<R: RngCore + ?Sized>(rng: &mut R, n: u128) -> u128 {
    if n <= 1 {
        return 0;
    }
    let bits = 128 - (n - 1).leading_zeros();
    let mask = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    loop {
        let x = if bits > 64 {
            ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128
        } else {
            rng.next_u64() as u128
        } & mask;
        if x < n {
            return x;
        }
    }
}

/// Bernoulli(n / d), exactly; `n ≤ d`, `d > 0`.
fn bernoulli<R: RngCore + ?Sized>(rng: &mut R, n: u128, d: u128) -> bool {
    uniform_below(rng, d) < n
}

/// Bernoulli(exp(-n / d)) for `0 ≤ n / d ≤ 1` (algorithm 1).
fn bernoulli_exp_small<R: RngCore + ?Sized>(rng: &mut R, n: u128, d: u128) -> bool {
    let mut k: u128 = 1;
    loop {
        // Bernoulli(γ / k) with γ = n / d.
        if !bernoulli(rng, n, d.saturating_mul(k)) {
            break;
        }
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(-1)).
fn bernoulli_exp_one<R: RngCore + ?Sized>(rng: &mut R) -> bool {
    bernoulli_exp_small(rng, 1, 1)
}

/// One sample of the discrete Laplace distribution of `scale` (algorithm 2).
pub(super) fn discrete_laplace<R: RngCore + ?Sized>(rng: &mut R, scale: Scale) -> i128 {
    let Scale { t, s } = scale;
    loop {
        let u = uniform_below(rng, t);
        if !bernoulli_exp_small(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_one(rng) {
            v += 1;
        }
        // x is geometric with parameter 1 - exp(-1/t); y = ⌊x / s⌋ is
        // geometric with parameter 1 - exp(-s/t).
        let x = u.saturating_add(t.saturating_mul(v));
        let y = (x / s).min(i128::MAX as u128) as i128;
        let negative = rng.next_u32() & 1 == 1;
        if negative && y == 0 {
            continue;
        }
        return if negative { -y } else { y };
    }
}

/// `count` plus discrete Laplace noise of `scale`, clamped at 0.
pub(super) fn noisy_count<R: RngCore + ?Sized>(rng: &mut R, count: u64, scale: Scale) -> u64 {
    let noisy = count as i128 + discrete_laplace(rng, scale);
    noisy.clamp(0, u64::MAX as i128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The sampler follows the distribution: P(0) = (1-α)/(1+α) and
    /// variance 2α/(1-α)² with α = exp(-1/scale), mean 0.
    #[test]
    fn discrete_laplace_has_the_right_distribution() {
        for (scale, seed) in [(Scale::ratio(2, 1), 1u64), (Scale::ratio(3, 2), 2)] {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = 40_000;
            let xs: Vec<i128> = (0..n).map(|_| discrete_laplace(&mut rng, scale)).collect();
            let a = (-1.0 / scale.value()).exp();
            let p0 = (1.0 - a) / (1.0 + a);
            let var = 2.0 * a / (1.0 - a).powi(2);
            let zeros = xs.iter().filter(|&&x| x == 0).count() as f64 / n as f64;
            let mean = xs.iter().sum::<i128>() as f64 / n as f64;
            let v = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            assert!((zeros - p0).abs() < 0.01, "P(0) {zeros} vs {p0}");
            assert!(mean.abs() < 0.1, "mean {mean}");
            assert!((v / var - 1.0).abs() < 0.06, "variance {v} vs {var}");
            let pos = xs.iter().filter(|&&x| x > 0).count();
            let neg = xs.iter().filter(|&&x| x < 0).count();
            assert!((pos as f64 / neg as f64 - 1.0).abs() < 0.05);
        }
    }

    #[test]
    fn scales_round_up_and_counts_stay_non_negative() {
        let s = Scale::at_least(2.5);
        assert!(s.value() > 2.5 && s.value() < 2.500_01);
        let mut rng = StdRng::seed_from_u64(3);
        let counts: Vec<u64> = (0..1000).map(|_| noisy_count(&mut rng, 0, s)).collect();
        assert!(counts.iter().any(|&c| c > 0));
        assert!(
            counts.iter().filter(|&&c| c == 0).count() > 400,
            "about half clamp to 0"
        );
    }

    #[test]
    fn uniform_is_in_range() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[uniform_below(&mut rng, 5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (900..1100).contains(&c)), "{seen:?}");
        assert!(uniform_below(&mut rng, u128::MAX) < u128::MAX);
    }
}
