//! `exp` for f32 written so loops over it vectorize (libm's `expf` is a call per element).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two (Cody–Waite) so `x − n·ln2` stays exact for the n that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
// 1.5 · 2^23: adding and subtracting it rounds to the nearest integer without a libm call.
const ROUND: f32 = 12_582_912.0;

/// e^x with a relative error below 2e-7 over the range where the result is a normal f32;
/// 0 below about −87.3, +∞ above about 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Selects rather than `clamp`, and no float-to-int conversion (Rust's saturating `as`):
    // both keep LLVM from vectorizing loops that call this. NaN passes through to the result.
    let x = if x < -87.336_55 { -87.336_55 } else { x };
    let x = if x > 88.722_83 { 88.722_83 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor terms to r^7 on |r| ≤ ln2/2 (truncation below 1e-8 relative).
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n sits in the low mantissa bits of `shifted` (1.5·2^23 + n). 2^n is assembled in the
    // exponent bits in two halves, so n = 128 at the top of the range does not overflow first.
    let ni = (shifted.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let half = ni >> 1;
    let s1 = f32::from_bits((half.wrapping_add(127) as u32) << 23);
    let s2 = f32::from_bits((ni.wrapping_sub(half).wrapping_add(127) as u32) << 23);
    p * s1 * s2
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn matches_libm_across_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        for x in [0.0f32, 1.0, -1.0, 1e-8, -1e-8, 0.5, -0.5] {
            let want = (x as f64).exp();
            assert!(((exp(x) as f64 - want) / want).abs() < 2e-7, "exp({x})");
        }
    }

    #[test]
    fn saturates_at_the_ends() {
        assert_eq!(exp(-1000.0), exp(-87.336_55));
        assert!(exp(-1000.0) < 1.2e-38);
        assert!(exp(1000.0) > 1e38);
        assert_eq!(exp(f32::NEG_INFINITY), exp(-1000.0));
        assert!(exp(f32::NAN).is_nan());
    }
}
