//! f64 references of `shaders/samplers.wgsl` and of the training targets in
//! `shaders/diffusion.wgsl` (v-prediction target, min-SNR-γ weights).

use crate::diffusion::PredictionType;
use crate::diffusion::scheduler::{SigmaStage, Update, VeUpdate};

/// The x0 estimate (before clipping) from x and the model output m with the step's (a, s).
fn x0_raw(prediction: PredictionType, a: f64, s: f64, x: f64, m: f64) -> f64 {
    match prediction {
        PredictionType::Epsilon => (x - s * m) / a,
        PredictionType::VPrediction => a * x - s * m,
        PredictionType::Sample => m,
    }
}

/// One sampler update in place on `x` (see [`Update`] for each formula).
#[allow(clippy::too_many_arguments)]
pub fn sampler_update(
    update: &Update,
    prediction: PredictionType,
    clip: Option<f64>,
    x: &mut [f64],
    m: &[f64],
    z: &[f64],
    aux0: &mut [f64],
    aux1: &mut [f64],
) {
    let clipped = |v: f64| match clip {
        Some(r) => v.clamp(-r, r),
        None => v,
    };
    for i in 0..x.len() {
        let xv = x[i];
        match *update {
            Update::Ddpm {
                a,
                s,
                c_x0,
                c_xt,
                sigma,
            } => {
                let x0 = clipped(x0_raw(prediction, a as f64, s as f64, xv, m[i]));
                x[i] = c_x0 as f64 * x0 + c_xt as f64 * xv + sigma as f64 * z[i];
            }
            Update::Ddim {
                a,
                s,
                c_x0,
                c_eps,
                sigma,
            } => {
                let (a, s) = (a as f64, s as f64);
                let raw = x0_raw(prediction, a, s, xv, m[i]);
                let eps = match prediction {
                    PredictionType::Epsilon => m[i],
                    PredictionType::VPrediction => a * m[i] + s * xv,
                    PredictionType::Sample => (xv - a * raw) / s,
                };
                x[i] = c_x0 as f64 * clipped(raw) + c_eps as f64 * eps + sigma as f64 * z[i];
            }
            Update::DpmSolver {
                a,
                s,
                c_x,
                c_d0,
                c_d1,
            } => {
                let x0 = clipped(x0_raw(prediction, a as f64, s as f64, xv, m[i]));
                x[i] = c_x as f64 * xv - c_d0 as f64 * x0 - c_d1 as f64 * (x0 - aux0[i]);
                aux0[i] = x0;
            }
            Update::Sigma {
                a,
                s,
                sigma,
                dt,
                stage,
            } => {
                let x0 = clipped(x0_raw(prediction, a as f64, s as f64, xv, m[i]));
                let d = (xv - x0) / sigma as f64;
                let dt = dt as f64;
                match stage {
                    SigmaStage::Euler => x[i] = xv + d * dt,
                    SigmaStage::HeunFirst => {
                        aux0[i] = xv;
                        aux1[i] = d;
                        x[i] = xv + d * dt;
                    }
                    SigmaStage::HeunSecond => x[i] = aux0[i] + (aux1[i] + d) / 2.0 * dt,
                }
            }
            Update::Ve(_) => panic!("a VE-SDE update needs the batch layout: use ve_update"),
            Update::Plms { .. } => panic!("a PLMS update needs its history: use plms_update"),
        }
    }
}

/// One PLMS update in place (see [`Update::Plms`]): `history` holds the earlier model outputs
/// (newest first), `saved` the first step's sample.
pub fn plms_update(
    update: &Update,
    prediction: PredictionType,
    x: &mut [f64],
    m: &[f64],
    history: &mut [Vec<f64>; 3],
    saved: &mut [f64],
) {
    let Update::Plms {
        a,
        s,
        c_sample,
        c_out,
        weights,
        append,
        save_base,
        use_saved,
    } = *update
    else {
        panic!("plms_update takes Update::Plms");
    };
    let w: Vec<f64> = weights.iter().map(|&v| v as f64).collect();
    for i in 0..x.len() {
        let base = if use_saved { saved[i] } else { x[i] };
        let mut eps =
            w[0] * m[i] + w[1] * history[0][i] + w[2] * history[1][i] + w[3] * history[2][i];
        if prediction == PredictionType::VPrediction {
            eps = a as f64 * eps + s as f64 * base;
        }
        if save_base {
            saved[i] = x[i];
        }
        if append {
            history[2][i] = history[1][i];
            history[1][i] = history[0][i];
            history[0][i] = m[i];
        }
        x[i] = c_sample as f64 * base - c_out as f64 * eps;
    }
}

/// One VE-SDE update on a batch of `images` (see [`VeUpdate`]): the corrector's step size from
/// the batch's mean norms of the score `m` and the noise `z`, then the element-wise step.
pub fn ve_update(update: &VeUpdate, images: usize, x: &mut [f64], m: &[f64], z: &[f64]) {
    let per = x.len() / images;
    let mean_norm = |v: &[f64]| {
        v.chunks(per)
            .map(|c| c.iter().map(|a| a * a).sum::<f64>().sqrt())
            .sum::<f64>()
            / images as f64
    };
    let to_range = |v: f64| 2.0 * v.clamp(0.0, 1.0) - 1.0;
    let e = match *update {
        VeUpdate::Corrector { snr } => (snr as f64 * mean_norm(z) / mean_norm(m)).powi(2) * 2.0,
        _ => 0.0,
    };
    for i in 0..x.len() {
        x[i] = match *update {
            VeUpdate::Corrector { .. } => x[i] + e * m[i] + (2.0 * e).sqrt() * z[i],
            VeUpdate::Predictor { diffusion, last } => {
                let d = diffusion as f64;
                let mean = x[i] + d * d * m[i];
                if last {
                    to_range(mean)
                } else {
                    mean + d * z[i]
                }
            }
            VeUpdate::Ode { c, last } => {
                let v = x[i] + c as f64 * m[i];
                if last { to_range(v) } else { v }
            }
        };
    }
}

/// v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 per sample (Salimans & Ho 2022).
pub fn v_target(x0: &[f64], noise: &[f64], timesteps: &[u32], alphas_cumprod: &[f64]) -> Vec<f64> {
    let per = x0.len() / timesteps.len();
    (0..x0.len())
        .map(|i| {
            let a = alphas_cumprod[timesteps[i / per] as usize];
            a.sqrt() * noise[i] - (1.0 - a).sqrt() * x0[i]
        })
        .collect()
}

/// EDM's training noise levels (Karras et al. 2022, Table 1): σ = exp(u·P_std + P_mean) and
/// the U-Net's timestep c_noise = ¼ ln σ, per sample.
pub fn edm_sigmas(draws: &[f64], p_mean: f64, p_std: f64) -> (Vec<f64>, Vec<f64>) {
    let sigmas: Vec<f64> = draws.iter().map(|u| (u * p_std + p_mean).exp()).collect();
    let c_noise = sigmas.iter().map(|s| 0.25 * s.ln()).collect();
    (sigmas, c_noise)
}

/// EDM's preconditioned input c_in·(x0 + σn) and F-target (x0 − c_skip·(x0 + σn))/c_out, from
/// the definitions of Table 1 (σ per sample).
pub fn edm_noised(
    x0: &[f64],
    noise: &[f64],
    sigmas: &[f64],
    sigma_data: f64,
) -> (Vec<f64>, Vec<f64>) {
    let per = x0.len() / sigmas.len();
    let sd2 = sigma_data * sigma_data;
    (0..x0.len())
        .map(|i| {
            let s = sigmas[i / per];
            let x = x0[i] + s * noise[i];
            let (c_skip, c_out, c_in) = (
                sd2 / (s * s + sd2),
                s * sigma_data / (s * s + sd2).sqrt(),
                1.0 / (s * s + sd2).sqrt(),
            );
            (c_in * x, (x0[i] - c_skip * x) / c_out)
        })
        .unzip()
}

/// The VE-SDE's training noise levels from u32 draws k in [0, 2^24): t = (k/2^24)(1 − ε) + ε,
/// σ = σ_min(σ_max/σ_min)^t, and the weights σ².
pub fn ve_sigmas(draws: &[u32], sigma_min: f64, sigma_max: f64, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let sigmas: Vec<f64> = draws
        .iter()
        .map(|&k| {
            let t = k as f64 / 16_777_216.0 * (1.0 - eps) + eps;
            sigma_min * (sigma_max / sigma_min).powf(t)
        })
        .collect();
    let weights = sigmas.iter().map(|s| s * s).collect();
    (sigmas, weights)
}

/// The VE-SDE's perturbed input (x0 + 1)/2 + σz and score target −z/σ (σ per sample).
pub fn ve_noised(x0: &[f64], z: &[f64], sigmas: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let per = x0.len() / sigmas.len();
    (0..x0.len())
        .map(|i| {
            let s = sigmas[i / per];
            ((x0[i] + 1.0) / 2.0 + s * z[i], -z[i] / s)
        })
        .unzip()
}

/// min-SNR-γ weights (Hang et al. 2023, eq. 10) per sample.
pub fn min_snr_weights(
    timesteps: &[u32],
    alphas_cumprod: &[f64],
    gamma: f64,
    prediction: PredictionType,
) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| {
            let a = alphas_cumprod[t as usize];
            let snr = a / (1.0 - a);
            let m = snr.min(gamma);
            match prediction {
                PredictionType::Epsilon => m / snr,
                PredictionType::VPrediction => m / (snr + 1.0),
                PredictionType::Sample => m,
            }
        })
        .collect()
}

/// Classifier-free guidance on a [cond; uncond] model output: u + s·(c − u).
pub fn guidance_combine(model_output: &[f64], scale: f64) -> Vec<f64> {
    let n = model_output.len() / 2;
    (0..n)
        .map(|i| {
            let (c, u) = (model_output[i], model_output[n + i]);
            u + scale * (c - u)
        })
        .collect()
}

/// Inpainting's known region: keep·(a·known + b·z) + (1 − keep)·x, known/keep per image.
pub fn inpaint_known(
    x: &[f64],
    z: &[f64],
    a: f64,
    b: f64,
    known: &[f64],
    keep: &[f64],
) -> Vec<f64> {
    let per = known.len();
    (0..x.len())
        .map(|i| {
            let k = keep[i % per];
            k * (a * known[i % per] + b * z[i]) + (1.0 - k) * x[i]
        })
        .collect()
}
