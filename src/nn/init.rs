//! Default parameter initialisation with PyTorch's distributions (seeded, CPU, once at start):
//! Conv2d and Linear weights and biases U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with a = √5),
//! GroupNorm weight 1 and bias 0, the class embedding N(0, 1), a fourier time projection N(0, 1)·16. Not torch's random stream, the same distribution.

use super::ParamStore;

pub fn default_init(store: &ParamStore, seed: u64) -> Vec<f32> {
    let mut state = seed ^ 0x1A2B_3C4D_5E6F_7081;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0
    };
    let mut flat = vec![0.0f32; store.len];
    let mut fan_in_of: std::collections::HashMap<String, usize> = Default::default();
    for s in &store.specs {
        if s.name.ends_with(".weight") && s.shape.len() >= 2 {
            fan_in_of.insert(
                s.name.trim_end_matches(".weight").to_string(),
                s.shape[1..].iter().product(),
            );
        }
    }
    for s in &store.specs {
        let prefix = s.name.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        let out = &mut flat[s.offset..s.offset + s.numel()];
        // torch nn.Embedding: N(0, 1); GaussianFourierProjection(scale 16): N(0, 1)·16 (frozen).
        // Box–Muller on the same uniform stream.
        let normal_scale = match s.name.as_str() {
            "class_embedding.weight" => Some(1.0),
            "time_proj.weight" => Some(16.0),
            _ => None,
        };
        if let Some(scale) = normal_scale {
            for v in out.iter_mut() {
                let (u1, u2) = ((uniform() + 1.0) / 2.0, (uniform() + 1.0) / 2.0);
                *v = (scale
                    * (-2.0 * (1.0 - u1).max(1e-300).ln()).sqrt()
                    * (std::f64::consts::TAU * u2).cos()) as f32;
            }
            continue;
        }
        match fan_in_of.get(prefix) {
            Some(&fan_in) => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                for v in out.iter_mut() {
                    *v = (uniform() * bound) as f32;
                }
            }
            // Norm layers (1-D weight without a matching matrix): weight 1, bias 0.
            None => {
                let value = if s.name.ends_with(".weight") {
                    1.0
                } else {
                    0.0
                };
                out.fill(value);
            }
        }
    }
    flat
}

/// transformers' initialisation of a `CLIPTextModel` (`CLIPPreTrainedModel._init_weights`,
/// initializer_factor 1) for a text encoder trained from scratch: token and position embeddings
/// N(0, 0.02²); attention q/k/v and the MLP's fc2 N(0, (d^-½·(2L)^-½)²), out_proj N(0, 1/d),
/// fc1 N(0, 1/(2d)); Linear biases 0, LayerNorm weight 1 and bias 0. `store` is the encoder's
/// own layout (names without a prefix), `flat` its values. Seeded, CPU; torch's distributions,
/// not its random stream.
pub fn clip_text_init(
    store: &ParamStore,
    flat: &mut [f32],
    hidden: usize,
    layers: usize,
    seed: u64,
) {
    let mut state = seed ^ 0x5EED_C11F_7E47_0001;
    let mut uniform01 = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let d = hidden as f64;
    let in_proj = d.powf(-0.5) * (2.0 * layers as f64).powf(-0.5);
    for s in &store.specs {
        let n = &s.name;
        let std = if n.ends_with("embedding.weight") {
            Some(0.02)
        } else if n.ends_with("proj.weight") && !n.ends_with("out_proj.weight") {
            Some(in_proj)
        } else if n.ends_with("out_proj.weight") {
            Some(d.powf(-0.5))
        } else if n.ends_with("fc1.weight") {
            Some((2.0 * d).powf(-0.5))
        } else if n.ends_with("fc2.weight") {
            Some(in_proj)
        } else {
            None
        };
        let out = &mut flat[s.offset..s.offset + s.numel()];
        match std {
            Some(std) => {
                for v in out.iter_mut() {
                    let (u1, u2) = (uniform01(), uniform01());
                    *v =
                        (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
                }
            }
            // LayerNorm weights 1; every bias 0.
            None => out.fill(
                if n.ends_with("norm1.weight")
                    || n.ends_with("norm2.weight")
                    || n.ends_with("final_layer_norm.weight")
                {
                    1.0
                } else {
                    0.0
                },
            ),
        }
    }
}
