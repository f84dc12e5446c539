//! The crate's seeded randomness, below every other module: Gaussian noise
//! with one independent stream per sample (diffusion, zoo inits, latent
//! fitting, task draws) and the SplitMix64 mixer that derives seeds.
//!
//! Every sample of a batch has its own seed, so a request's noise does not
//! depend on which other requests share its batch. The draws come from a
//! counter-based generator (SplitMix64 over (seed, draw, element) counters)
//! evaluated with integer tensor ops on an accelerator and with plain
//! threaded Rust on the CPU (where libtorch's int64 passes are slow): no
//! global RNG state, so concurrent users cannot disturb each other, and the
//! integer part is identical on every device (only the final log/cos may
//! differ in the last bit between CPU and GPU).

use tch::{Device, Kind, Tensor};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;

/// FNV-1a's offset basis: where [`fnv1a`] starts unless salted.
pub const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;

/// FNV-1a over `bytes` from `basis` ([`FNV_OFFSET`], or it xor a salt):
/// stable keys of words and tasks, the same on every machine.
pub fn fnv1a(basis: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(basis, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    })
}

/// SplitMix64's output function (Steele, Lea & Flood 2014).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^ (z >> 31)
}

/// Logical right shift of int64 lanes (torch's `>>` is arithmetic).
fn shift_right_logical(z: &Tensor, k: u32) -> Tensor {
    let mask = (u64::MAX >> k) as i64;
    z.bitwise_right_shift_tensor_scalar(i64::from(k))
        .bitwise_and(mask)
}

/// SplitMix64 applied lane-wise to an int64 tensor (wrapping arithmetic).
fn splitmix64_tensor(x: &Tensor) -> Tensor {
    let z = x + GOLDEN as i64;
    let z = z.bitwise_xor_tensor(&shift_right_logical(&z, 30)) * MIX1 as i64;
    let z = z.bitwise_xor_tensor(&shift_right_logical(&z, 27)) * MIX2 as i64;
    z.bitwise_xor_tensor(&shift_right_logical(&z, 31))
}

/// Two uniforms in (0, 1) per lane, as f32, from the top and the next 24
/// bits of each 64-bit hash.
fn to_unit_pair(z: &Tensor) -> (Tensor, Tensor) {
    const SCALE: f64 = 1.0 / (1u64 << 24) as f64;
    let high = shift_right_logical(z, 40).to_kind(Kind::Float);
    let low = shift_right_logical(z, 16)
        .bitwise_and(0xFF_FFFF)
        .to_kind(Kind::Float);
    ((high + 0.5) * SCALE, (low + 0.5) * SCALE)
}

/// Box–Muller on the device: the pair counters hashed with tensor ops.
fn normals_on_device(offsets: &[i64], pairs: i64, per_sample: i64, device: Device) -> Tensor {
    // Non-blocking: a plain copy from pageable memory makes the host wait
    // for the device (CUDA stages the bytes before the call returns, so the
    // slice may go away at once).
    let offsets = Tensor::from_slice(offsets)
        .to_device_(device, Kind::Int64, true, false)
        .unsqueeze(1);
    let counters = Tensor::arange(pairs, (Kind::Int64, device)).unsqueeze(0) + offsets;
    let (u1, u2) = to_unit_pair(&splitmix64_tensor(&counters));
    let radius = (u1.log() * -2.0).sqrt();
    let angle = u2 * (2.0 * std::f64::consts::PI);
    Tensor::cat(&[&radius * angle.cos(), radius * angle.sin()], 1).narrow(1, 0, per_sample)
}

/// The same stream as [`normals_on_device`], computed in Rust on up to
/// `tch::get_num_threads()` threads: row `i`, pair `j` hashes `offsets[i] + j`,
/// and its two normals land at `j` and `pairs + j`.
fn normals_on_cpu(offsets: &[i64], per_sample: usize) -> Tensor {
    /// Pairs per unit of work: big enough to amortize a thread hand-off.
    const MIN_PIECE: usize = 1 << 14;
    let pairs = per_sample.div_ceil(2);
    let shape = [offsets.len() as i64, per_sample as i64];
    let len = offsets.len() * per_sample;
    let out = Tensor::empty(shape, (Kind::Float, Device::Cpu));
    if len == 0 {
        return out;
    }
    // SAFETY: `out` is a fresh, contiguous f32 CPU tensor of `len` elements
    // that nothing else references until this function returns it, so its
    // storage may be written through one exclusive slice (this saves a
    // 4-byte-per-value zeroing and copy per draw).
    let values: &mut [f32] =
        unsafe { std::slice::from_raw_parts_mut(out.data_ptr().cast::<f32>(), len) };
    let threads = usize::try_from(tch::get_num_threads())
        .unwrap_or(1)
        .clamp(1, 64);
    let piece = (offsets.len() * pairs).div_ceil(threads).max(MIN_PIECE);
    // Cut every row into (cos half, sin half) pieces of `piece` pairs.
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    for (row, &offset) in values.chunks_mut(per_sample.max(1)).zip(offsets) {
        let (cos_half, sin_half) = row.split_at_mut(pairs);
        let mut sin_chunks = sin_half.chunks_mut(piece);
        for (k, cos) in cos_half.chunks_mut(piece).enumerate() {
            let first = (offset as u64).wrapping_add((k * piece) as u64);
            pieces.push(Piece {
                first,
                cos,
                sin: sin_chunks.next().unwrap_or_default(),
            });
        }
    }
    if threads == 1 || pieces.len() == 1 {
        pieces.into_iter().for_each(Piece::fill);
    } else {
        let mut shares: Vec<Vec<Piece<'_>>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, p) in pieces.into_iter().enumerate() {
            shares[i % threads].push(p);
        }
        std::thread::scope(|scope| {
            for share in shares {
                scope.spawn(move || share.into_iter().for_each(Piece::fill));
            }
        });
    }
    out
}

/// A run of consecutive pair counters and the two output slices it fills.
struct Piece<'a> {
    first: u64,
    cos: &'a mut [f32],
    /// As long as `cos`, or one shorter at the end of an odd-sized row.
    sin: &'a mut [f32],
}

impl Piece<'_> {
    fn fill(self) {
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        let mut u1 = [0f32; LANES];
        let mut u2 = [0f32; LANES];
        let mut cos_out = [0f32; LANES];
        let mut sin_out = [0f32; LANES];
        for (block, cos_chunk) in self.cos.chunks_mut(LANES).enumerate() {
            let base = self.first.wrapping_add((block * LANES) as u64);
            for lane in 0..LANES {
                let z = splitmix64(base.wrapping_add(lane as u64));
                u1[lane] = ((z >> 40) as f32 + 0.5) * SCALE;
                u2[lane] = (((z >> 16) & 0xFF_FFFF) as f32 + 0.5) * SCALE;
            }
            // Branch-free float work on fixed-size arrays: vectorized.
            for lane in 0..LANES {
                let radius = (-2.0 * ln_unit(u1[lane])).sqrt();
                let (sin, cos) = sin_cos_turns(u2[lane]);
                cos_out[lane] = radius * cos;
                sin_out[lane] = radius * sin;
            }
            let n = cos_chunk.len();
            cos_chunk.copy_from_slice(&cos_out[..n]);
            let start = block * LANES;
            if start < self.sin.len() {
                let end = (start + n).min(self.sin.len());
                self.sin[start..end].copy_from_slice(&sin_out[..end - start]);
            }
        }
    }
}

/// Pairs handled together (lets the compiler vectorize the float part).
const LANES: usize = 8;

/// ln u for u in (0, 1], to f32 accuracy: u = m·2^e with m in [√½, √2),
/// ln m = 2·atanh(s) with s = (m − 1)/(m + 1) (|s| ≤ 0.172), odd series to
/// s¹¹ (truncation < 1e-9).
#[inline]
fn ln_unit(u: f32) -> f32 {
    const SQRT_HALF_BITS: i32 = 0x3F35_04F3;
    let bits = u.to_bits() as i32;
    let e = (bits - SQRT_HALF_BITS) >> 23;
    let m = f32::from_bits((bits - (e << 23)) as u32);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series =
        1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 / 11.0))));
    e as f32 * std::f32::consts::LN_2 + 2.0 * s * series
}

/// (sin 2πu, cos 2πu) for u in [0, 1]: reduced to x = 2π(u − q/4), |x| ≤ π/4,
/// Taylor polynomials to x⁹ and x¹⁰ (truncation < 2e-9), then rotated by
/// the quadrant q with selects.
#[inline]
fn sin_cos_turns(u: f32) -> (f32, f32) {
    let q = (u * 4.0).round();
    let x = (u - q * 0.25) * std::f32::consts::TAU;
    let x2 = x * x;
    let s = x * (1.0 - x2 / 6.0 * (1.0 - x2 / 20.0 * (1.0 - x2 / 42.0 * (1.0 - x2 / 72.0))));
    let c = 1.0
        - x2 / 2.0 * (1.0 - x2 / 12.0 * (1.0 - x2 / 30.0 * (1.0 - x2 / 56.0 * (1.0 - x2 / 90.0))));
    let quadrant = q as i32;
    let odd = quadrant & 1 == 1;
    let sin_sign = if quadrant & 2 == 2 { -1.0 } else { 1.0 };
    let cos_sign = if (quadrant + 1) & 2 == 2 { -1.0 } else { 1.0 };
    let (sin, cos) = if odd { (c, s) } else { (s, c) };
    (sin_sign * sin, cos_sign * cos)
}

/// Per-sample seeded standard normal draws.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    keys: Vec<u64>,
    draws: u64,
}

impl SeededNoise {
    /// One stream per seed; `stream` separates independent uses of the same
    /// seeds (e.g. sampling vs. training).
    pub fn new(seeds: &[u64], stream: u64) -> Self {
        Self {
            keys: seeds
                .iter()
                .map(|&s| splitmix64(s ^ splitmix64(stream.wrapping_add(0x5EED))))
                .collect(),
            draws: 0,
        }
    }

    /// Moves to draw number `draws` (0 = the first draw): the stream is a
    /// function of the draw count, so any position can be reached directly.
    pub fn seek(&mut self, draws: u64) {
        self.draws = draws;
    }

    /// Number of samples (seeds).
    pub fn batch(&self) -> usize {
        self.keys.len()
    }

    /// The next draw: a [B, dims...] f32 tensor of independent N(0, 1)
    /// values on `device`, row i from seed i. Each call gives fresh values.
    pub fn draw(&mut self, dims: &[i64], device: Device) -> Tensor {
        Self::draw_all(&mut [self], dims, device)
    }

    /// The next draw of each of `streams`, their rows stacked in order:
    /// the same values as drawing from each in turn, from one pass of the
    /// generator over all rows (on the CPU that pass spreads over the
    /// intra-op threads, which one single-row stream at a time cannot).
    pub fn draw_all(streams: &mut [&mut SeededNoise], dims: &[i64], device: Device) -> Tensor {
        let per_sample: i64 = dims.iter().product();
        // One hash gives a pair of uniforms, and Box–Muller turns the pair
        // into two normals (r·cos θ and r·sin θ).
        let pairs = (per_sample + 1) / 2;
        let mut offsets: Vec<i64> = Vec::new();
        for stream in streams.iter_mut() {
            let draws = stream.draws;
            offsets.extend(
                stream
                    .keys
                    .iter()
                    .map(|&k| splitmix64(k.wrapping_add(draws.wrapping_mul(GOLDEN))) as i64),
            );
            stream.draws += 1;
        }
        let normal = if device == Device::Cpu {
            normals_on_cpu(&offsets, per_sample as usize)
        } else {
            normals_on_device(&offsets, pairs, per_sample, device)
        };
        let mut shape = vec![offsets.len() as i64];
        shape.extend_from_slice(dims);
        normal.reshape(shape.as_slice())
    }

    /// Moves past the next draw without computing it (the stream stays
    /// where [`Self::draw`] would leave it).
    pub fn skip(&mut self) {
        self.draws += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_splitmix_matches_the_scalar_reference() {
        let inputs: Vec<u64> = vec![0, 1, 42, u64::MAX, GOLDEN, 1 << 63, 123_456_789_012_345];
        let as_i64: Vec<i64> = inputs.iter().map(|&x| x as i64).collect();
        let out = splitmix64_tensor(&Tensor::from_slice(&as_i64));
        for (i, &x) in inputs.iter().enumerate() {
            assert_eq!(
                out.int64_value(&[i as i64]) as u64,
                splitmix64(x),
                "input {x}"
            );
        }
    }

    #[test]
    fn the_fast_ln_and_sincos_are_accurate() {
        for i in 0..=100_000u32 {
            let u = (i as f32 + 0.5) / 100_001.0;
            let ln = ln_unit(u);
            assert!(
                (ln - u.ln()).abs() <= 2e-6 * u.ln().abs().max(1.0),
                "ln {u}: {ln}"
            );
            let (sin, cos) = sin_cos_turns(u);
            let (s, c) = (u as f64 * std::f64::consts::TAU).sin_cos();
            assert!(
                (sin as f64 - s).abs() < 1e-6 && (cos as f64 - c).abs() < 1e-6,
                "{u}"
            );
        }
        let tiny = 0.5 / (1u32 << 24) as f32;
        assert!((ln_unit(tiny) - tiny.ln()).abs() < 1e-5);
        assert_eq!(ln_unit(1.0), 0.0);
    }

    #[test]
    fn the_cpu_path_matches_the_tensor_path() {
        // Odd and even sizes, several rows, pieces that split a row.
        for per_sample in [1i64, 7, 64, 40_001] {
            let offsets = [3i64, -5, i64::MAX];
            let pairs = (per_sample + 1) / 2;
            let rust = normals_on_cpu(&offsets, per_sample as usize);
            let tensor = normals_on_device(&offsets, pairs, per_sample, Device::Cpu);
            assert_eq!(rust.size(), tensor.size());
            let diff = (&rust - &tensor).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "size {per_sample}: max difference {diff}");
        }
    }

    #[test]
    fn draws_are_standard_normal_and_independent() {
        let mut noise = SeededNoise::new(&[1, 2], 0);
        let a = noise.draw(&[100_000], Device::Cpu);
        let b = noise.draw(&[100_000], Device::Cpu);
        assert_eq!(a.size(), [2, 100_000]);
        let all = Tensor::cat(&[a.reshape([-1]), b.reshape([-1])], 0).to_kind(Kind::Double);
        let mean = all.mean(Kind::Double).double_value(&[]);
        let var = all.var(false).double_value(&[]);
        let kurt = (all.pow_tensor_scalar(4))
            .mean(Kind::Double)
            .double_value(&[]);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert!((kurt - 3.0).abs() < 0.05, "fourth moment {kurt}");
        // Rows, draws and lanes are uncorrelated.
        let corr = |x: &Tensor, y: &Tensor| (x * y).mean(Kind::Double).double_value(&[]);
        assert!(corr(&a.get(0), &a.get(1)).abs() < 0.02);
        assert!(corr(&a.get(0), &b.get(0)).abs() < 0.02);
        assert!(
            corr(
                &a.get(0).narrow(0, 0, 99_999),
                &a.get(0).narrow(0, 1, 99_999)
            )
            .abs()
                < 0.02
        );
    }

    #[test]
    fn drawing_streams_together_gives_each_its_own_draw() {
        let mut a = SeededNoise::new(&[1, 2], 0);
        let mut b = SeededNoise::new(&[3], 0);
        let mut a_alone = a.clone();
        let mut b_alone = b.clone();
        b.skip();
        let _skipped = b_alone.draw(&[5], Device::Cpu);
        let together = SeededNoise::draw_all(&mut [&mut a, &mut b], &[5], Device::Cpu);
        let apart = Tensor::cat(
            &[
                a_alone.draw(&[5], Device::Cpu),
                b_alone.draw(&[5], Device::Cpu),
            ],
            0,
        );
        assert_eq!(together.size(), [3, 5]);
        assert!(together.equal(&apart));
        assert!(
            a.draw(&[5], Device::Cpu)
                .equal(&a_alone.draw(&[5], Device::Cpu))
        );
    }

    #[test]
    fn a_seed_gives_the_same_stream_whatever_its_batch() {
        let alone = SeededNoise::new(&[7], 3).draw(&[64], Device::Cpu);
        let mut batched = SeededNoise::new(&[9, 7, 8], 3);
        let together = batched.draw(&[64], Device::Cpu);
        assert!(together.get(1).equal(&alone.get(0)));
        assert!(!together.get(0).equal(&alone.get(0)));
        let other_stream = SeededNoise::new(&[7], 4).draw(&[64], Device::Cpu);
        assert!(!other_stream.equal(&alone));
    }
}
