//! The counter-based random numbers the product draws on the CPU, bit for bit those of
//! `shaders/noise.wgsl` (docs/rng.md): Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel
//! random numbers: as easy as 1, 2, 3", SC'11) keyed by the run seed, one stream per (purpose,
//! step). Also the SplitMix64 sequence that benchmarks and tests fill tensors with. A leaf: the
//! tests' f64 references (`crate::reference::noise`) build on these words too.

/// Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011, section 3.2; the same
/// constants as Random123's `PHILOX_M4x32_0/1` and `PHILOX_W32_0/1`).
pub const PHILOX_M0: u32 = 0xD251_1F53;
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
pub const PHILOX_W0: u32 = 0x9E37_79B9;
pub const PHILOX_W1: u32 = 0xBB67_AE85;

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32 round: two 32x32->64 multiplies, the high halves xored with the other counter
/// words and the key, and a word permutation (Random123 `_philox4x32round`).
fn round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M0, ctr[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// Philox4x32 with `rounds` rounds; the key is bumped by the Weyl constants between rounds.
pub fn philox4x32(rounds: u32, mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for r in 0..rounds {
        if r > 0 {
            key = [
                key[0].wrapping_add(PHILOX_W0),
                key[1].wrapping_add(PHILOX_W1),
            ];
        }
        ctr = round(ctr, key);
    }
    ctr
}

/// Philox4x32-10, the variant Random123 recommends (and curand / torch's CUDA generator use).
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox4x32(10, ctr, key)
}

/// The Philox key of a run seed: (low 32 bits, high 32 bits).
pub fn key_of(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The counter of the 4-word block holding element `index` of stream (`purpose`, `step`).
pub fn counter_of(purpose: u32, step: u32, index: u32) -> [u32; 4] {
    [index / 4, step, purpose, 0]
}

/// The raw 32-bit random word of element `index` in stream (`seed`, `purpose`, `step`):
/// word `index % 4` of Philox4x32-10(counter (index / 4, step, purpose, 0), key (seed lo, seed hi)).
pub fn random_u32(seed: u64, purpose: u32, step: u32, index: u32) -> u32 {
    philox4x32_10(counter_of(purpose, step, index), key_of(seed))[(index % 4) as usize]
}

/// Deterministic pseudo-random test data (SplitMix64), uniform in [-1, 1).
pub fn test_data(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}
