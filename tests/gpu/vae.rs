//! AutoencoderKL against diffusers 0.42.1 (`tools/make_vae_fixtures.py` wrote the fixtures): a
//! tiny random VAE with Stable Diffusion's block types, saved by diffusers' `save_pretrained`
//! (`tests/fixtures/vae/model/`), loaded here from that directory; the posterior's μ and
//! log-variance, z = μ + σ·ε with the fixture's ε, the reconstruction and the mode's
//! reconstruction; the loss (1/B) Σ|x − x̂| + 1e-6 · (1/B) Σ_b KL_b, both its terms, and every
//! parameter gradient of it, computed on the GPU; and the parameters after one Adam step. A second directory without mid-block attention
//! and without the quant convs loads and encodes too. On both GEMM paths.
//!
//! Tolerances: the fixture's float32 run differs from a float64 rerun by 1.4e-6 (μ) to 3e-6
//! (x̂) and 2.3e-6 relative L2 on the worst gradient; our sums run in other orders, so the
//! bounds are relative L2 ≤ 2e-5 on activations and ≤ 1e-4 on each gradient.

use std::path::{Path, PathBuf};

use wgpu_diffusion::io::model_dir::read_model_weights;
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::nn::{Vae, VaeConfig};
use wgpu_diffusion::ops::adamw::{AdamwConfig, AdamwHyper, HYPER_LEN, adamw_step, write_hyper};
use wgpu_diffusion::ops::loss::{l1_backward, l1_loss};
use wgpu_diffusion::ops::posterior::posterior_kl;

use crate::common::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae")
}

fn load(dir: &Path, g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>, batch: usize) -> Vae {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = VaeConfig::from_json(&text).unwrap();
    let vae = Vae::new(g, &config, batch).unwrap();
    let weights = read_model_weights(dir, &vae.params).unwrap();
    vae.params.write_values(g, &weights).unwrap();
    vae
}

/// [B, C, H, W] → [B, H, W, C]
fn to_nhwc(v: &[f32], [b, c, h, w]: [usize; 4]) -> Vec<f32> {
    wgpu_diffusion::sample::nchw_to_nhwc(v, [b, c, h, w])
}

/// [B, H, W, C] → [B, C, H, W]
fn to_nchw(v: &[f32], [b, h, w, c]: [usize; 4]) -> Vec<f32> {
    wgpu_diffusion::sample::nhwc_to_nchw(v, [b, h, w, c])
}

fn check(what: &str, ours: &[f32], reference: &[f32], bound: f64) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let e = rel_l2(ours, reference);
    if !what.contains("grad ") {
        eprintln!("{what}: relative L2 {e:.2e}");
    }
    assert!(
        e <= bound,
        "{what}: relative L2 {e:.3e} > {bound:.0e}\n  ours[..4] = {:?}\n  diffusers[..4] = {:?}",
        &ours[..ours.len().min(4)],
        &reference[..reference.len().min(4)]
    );
}

/// (μ, log-variance) NCHW from NHWC moments [B, s, s, 2L].
fn split_moments(m: &[f32], [b, s, l]: [usize; 3]) -> (Vec<f32>, Vec<f32>) {
    let (mut mean, mut logvar) = (Vec::new(), Vec::new());
    for px in m.chunks(2 * l) {
        mean.extend_from_slice(&px[..l]);
        logvar.extend_from_slice(&px[l..]);
    }
    (to_nchw(&mean, [b, s, s, l]), to_nchw(&logvar, [b, s, s, l]))
}

#[test]
fn autoencoder_kl_matches_diffusers_forward_and_backward() {
    let fx = LoadedTensors::read(&fixtures().join("ref_vae_tiny_s0.safetensors")).unwrap();
    let get = |name: &str| fx.get(name).unwrap().1;
    for g in gemm_paths() {
        let vae = load(&fixtures().join("model"), &g, 2);
        assert_eq!(vae.params.count(), 43_421, "PyTorch's parameter count");
        let c = &vae.config;
        let (s, ls, l) = (c.sample_size, c.latent_size(), c.latent_channels);
        let path = g.gemm_path.to_string();
        g.write(&vae.sample.value, &to_nhwc(&get("x0"), [2, 1, s, s]))
            .unwrap();
        g.write(&vae.eps, &to_nhwc(&get("eps"), [2, l, ls, ls]))
            .unwrap();
        g.write(&vae.params.grads, &vec![0.0; vae.params.len])
            .unwrap();
        // The KL term's gradient alone (the loss weighs it by 1e-6, below the tolerance of the
        // whole gradient): d kl_mean / dθ of the encoder against the fixture's grad_kl.*, and
        // nothing reaches the decoder.
        run(&g, |rec| {
            vae.forward(rec).unwrap();
            rec.clear(&vae.params.grads);
            rec.clear(&vae.output.grad);
            vae.backward(rec, 1.0).unwrap();
        });
        let grads = read(&g, &vae.params.grads);
        for (spec, ours) in vae.params.unflatten(&grads) {
            match fx.get(&format!("grad_kl.{}", spec.name)) {
                Ok((_, want)) if !spec.name.ends_with("to_k.bias") => {
                    check(&format!("{path}: grad_kl {}", spec.name), ours, &want, 1e-4)
                }
                Ok(_) => {}
                Err(_) => assert!(
                    ours.iter().all(|v| *v == 0.0),
                    "{path}: the KL term reached `{}`",
                    spec.name
                ),
            }
        }
        // loss = (1/B) Σ|x − x̂| + 1e-6 · (1/B) Σ_b KL_b, and its gradient, all on the GPU.
        let rec_loss = g.tensor(&[1], "rec loss");
        let kl = g.tensor(&[1], "kl mean");
        run(&g, |rec| {
            rec.clear(&vae.params.grads);
            vae.forward(rec).unwrap();
            l1_loss(rec, &vae.output.value, &vae.sample.value, &rec_loss).unwrap();
            posterior_kl(rec, &vae.moments.value, &kl).unwrap();
            l1_backward(
                rec,
                &vae.output.value,
                &vae.sample.value,
                1.0,
                &vae.output.grad,
            )
            .unwrap();
            vae.backward(rec, 1e-6).unwrap();
        });
        let (ours_rec, ours_kl) = (read(&g, &rec_loss)[0], read(&g, &kl)[0]);
        check(
            &format!("{path}: rec_loss"),
            &[ours_rec],
            &get("rec_loss"),
            2e-6,
        );
        check(
            &format!("{path}: kl_mean"),
            &[ours_kl],
            &get("kl_mean"),
            2e-6,
        );
        let loss = ours_rec as f64 + 1e-6 * ours_kl as f64;
        check(&format!("{path}: loss"), &[loss as f32], &get("loss"), 2e-6);
        let (mean, logvar) = split_moments(&read(&g, &vae.moments.value), [2, ls, l]);
        check(&format!("{path}: mean"), &mean, &get("mean"), 2e-5);
        check(&format!("{path}: logvar"), &logvar, &get("logvar"), 2e-5);
        let z = to_nchw(&read(&g, &vae.latent.value), [2, ls, ls, l]);
        check(&format!("{path}: z"), &z, &get("z"), 2e-5);
        let x_rec = to_nchw(&read(&g, &vae.output.value), [2, s, s, 1]);
        check(&format!("{path}: x_rec"), &x_rec, &get("x_rec"), 2e-5);

        // Every parameter gradient of the whole loss.
        let grads = read(&g, &vae.params.grads);
        let mut worst = (String::new(), 0.0f64);
        for (spec, ours) in vae.params.unflatten(&grads) {
            let name = &spec.name;
            let want = get(&format!("grad.{name}"));
            // `to_k.bias` has an analytically zero gradient (softmax ignores a constant per
            // query): both sides are rounding noise there.
            if name.ends_with("to_k.bias") {
                continue;
            }
            let e = rel_l2(ours, &want);
            if e > worst.1 {
                worst = (name.clone(), e);
            }
            check(&format!("{path}: grad {name}"), ours, &want, 1e-4);
        }
        eprintln!(
            "{path}: worst gradient relative L2 {:.2e} ({})",
            worst.1, worst.0
        );

        // The posterior's mode: ε = 0, z = μ.
        g.write(&vae.eps, &vec![0.0; 2 * ls * ls * l]).unwrap();
        run(&g, |rec| vae.forward(rec).unwrap());
        let x_mode = to_nchw(&read(&g, &vae.output.value), [2, s, s, 1]);
        check(
            &format!("{path}: x_rec_mode"),
            &x_mode,
            &get("x_rec_mode"),
            2e-5,
        );

        // One Adam step as CompVis trains the VAE (torch.optim.Adam, betas (0.5, 0.9), eps 1e-8,
        // lr 1e-3, no weight decay): on a first step each parameter moves by about lr·sign(g).
        let adam = AdamwConfig {
            beta1: 0.5,
            beta2: 0.9,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let hyper = g.tensor(&[HYPER_LEN], "adam hyper");
        write_hyper(&g, &hyper, &AdamwHyper::new(&adam, 1e-3, 1, 0.0)).unwrap();
        let grad_scale = g.tensor_from(&[2], &[1.0, 0.0], "grad scale").unwrap();
        let n = vae.params.len;
        let (m, v) = (g.tensor(&[n], "exp_avg"), g.tensor(&[n], "exp_avg_sq"));
        let p = &vae.params;
        run(&g, |rec| {
            adamw_step(rec, &hyper, &grad_scale, &p.grads, p.params(), &m, &v).unwrap();
        });
        let after = read(&g, p.params());
        let mut worst_step = 0.0f64;
        for (spec, ours) in p.unflatten(&after) {
            // Rounding noise drives to_k.bias's step (its true gradient is 0), in diffusers too.
            if spec.name.ends_with("to_k.bias") {
                continue;
            }
            let want = get(&format!("after_adam.{}", spec.name));
            let d = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .fold(0.0, f64::max);
            worst_step = worst_step.max(d);
            assert!(
                d <= 1e-5,
                "{path}: after Adam `{}` differs by {d:.2e} (1 % of lr allowed)",
                spec.name
            );
        }
        eprintln!("{path}: parameters after one Adam step within {worst_step:.2e}");
    }
}

/// A second directory diffusers saved: no mid-block attention, no quant convs, two resnets per
/// encoder block, three levels.
#[test]
fn a_vae_without_attention_or_quant_convs_loads_and_encodes() {
    let fx = LoadedTensors::read(&fixtures().join("ref_vae_tiny_s0.safetensors")).unwrap();
    let get = |name: &str| fx.get(name).unwrap().1;
    let g = gpu();
    let vae = load(&fixtures().join("model_noattn"), &g, 2);
    assert_eq!(vae.params.count(), 21_173, "PyTorch's parameter count");
    let c = &vae.config;
    let (s, ls, l) = (c.sample_size, c.latent_size(), c.latent_channels);
    assert!(!c.mid_block_add_attention && !c.use_quant_conv && !c.use_post_quant_conv);
    g.write(&vae.sample.value, &to_nhwc(&get("x0"), [2, 1, s, s]))
        .unwrap();
    g.write(&vae.eps, &vec![0.0; 2 * ls * ls * l]).unwrap();
    run(&g, |rec| vae.forward(rec).unwrap());
    let (mean, logvar) = split_moments(&read(&g, &vae.moments.value), [2, ls, l]);
    check("noattn: mean", &mean, &get("noattn.mean"), 2e-5);
    check("noattn: logvar", &logvar, &get("noattn.logvar"), 2e-5);
    let x_mode = to_nchw(&read(&g, &vae.output.value), [2, s, s, 1]);
    check(
        "noattn: x_rec_mode",
        &x_mode,
        &get("noattn.x_rec_mode"),
        2e-5,
    );
}

/// The backward pass of a VAE without quant convs (the encoder's output is the posterior's
/// moments, z goes straight into the decoder), which no PyTorch fixture covers: the gradient of
/// L = Σ r·x̂ + ½·KL_mean (r fixed random, ε fixed) against central differences of L computed on
/// the GPU, for the largest-gradient elements of the parameters next to the missing convs and
/// at both ends. L is summed in f64 from f32 outputs; with h = 1e-2 the difference quotient's
/// rounding (~1e-6 / 2h) and curvature errors stay below 1 % of these gradients.
#[test]
fn a_vae_without_quant_convs_has_the_gradient_of_finite_differences() {
    let g = gpu();
    let vae = load(&fixtures().join("model_noattn"), &g, 2);
    let c = &vae.config;
    let (s, ls, l) = (c.sample_size, c.latent_size(), c.latent_channels);
    let x: Vec<f32> = random(2 * s * s, 71).iter().map(|v| *v as f32).collect();
    let eps: Vec<f32> = random(2 * ls * ls * l, 72)
        .iter()
        .map(|v| *v as f32)
        .collect();
    let r: Vec<f32> = random(2 * s * s, 73).iter().map(|v| *v as f32).collect();
    g.write(&vae.sample.value, &x).unwrap();
    g.write(&vae.eps, &eps).unwrap();
    let kl = g.tensor(&[1], "kl mean");
    let mut rec = g.recorder();
    vae.forward(&mut rec).unwrap();
    posterior_kl(&mut rec, &vae.moments.value, &kl).unwrap();
    let forward = rec.finish();
    let objective = |g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>| {
        g.run(&[&forward]).unwrap();
        let out = read(g, &vae.output.value);
        let dot: f64 = out.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum();
        dot + 0.5 * read(g, &kl)[0] as f64
    };
    objective(&g);
    g.write(&vae.output.grad, &r).unwrap();
    run(&g, |rec| {
        rec.clear(&vae.params.grads);
        vae.backward(rec, 0.5).unwrap();
    });
    let grads = read(&g, &vae.params.grads);
    let mut params = read(&g, vae.params.params());
    let h = 1e-2f32;
    for name in [
        "encoder.conv_in.weight",
        "encoder.conv_out.weight",
        "encoder.conv_out.bias",
        "decoder.conv_in.weight",
        "decoder.conv_in.bias",
        "decoder.conv_out.weight",
    ] {
        let spec = vae.params.spec(name).unwrap();
        let range = spec.offset..spec.offset + spec.numel();
        let mut by_size: Vec<usize> = range.collect();
        by_size.sort_by(|a, b| grads[*b].abs().total_cmp(&grads[*a].abs()));
        for &i in &by_size[..2] {
            let at = params[i];
            params[i] = at + h;
            vae.params.write_values(&g, &params).unwrap();
            let up = objective(&g);
            params[i] = at - h;
            vae.params.write_values(&g, &params).unwrap();
            let down = objective(&g);
            params[i] = at;
            let numeric = (up - down) / (2.0 * h as f64);
            let analytic = grads[i] as f64;
            eprintln!(
                "{name}[{}]: analytic {analytic:.6}, numeric {numeric:.6}",
                i - spec.offset
            );
            assert!(
                (analytic - numeric).abs() <= 1e-2 * analytic.abs().max(0.1),
                "{name}[{}]: analytic {analytic}, central differences {numeric}",
                i - spec.offset
            );
        }
    }
    vae.params.write_values(&g, &params).unwrap();
}

/// The `mnist-vae` preset has the parameter count the issue gives for it (953,413), and a VAE
/// directory whose weights do not fit its config is an error naming the tensors.
#[test]
fn the_mnist_vae_preset_and_weights_that_do_not_fit() {
    let g = gpu();
    let preset = VaeConfig::preset("mnist-vae").unwrap();
    let vae = Vae::new(&g, &preset, 1).unwrap();
    assert_eq!(vae.params.count(), 953_413);
    let e = read_model_weights(&fixtures().join("model"), &vae.params)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not fit") || e.contains("does not have"),
        "{e}"
    );
}

/// Batches of `batch` MNIST training digits on mnist-vae's 32×32 canvas, by first index.
fn mnist_vae_batches(batch: usize) -> impl Fn(usize) -> Vec<f32> {
    let data = wgpu_diffusion::data::mnist::load(28, 1).unwrap();
    let per = 28 * 28;
    move |first| {
        wgpu_diffusion::train::vae_trainer::pad_digits(
            &data.images[first * per..(first + batch) * per],
            batch,
            28,
            2,
        )
    }
}

/// The `mnist-vae` preset trained for a few steps on MNIST padded to 32×32: the loss falls, the
/// reconstructions of held-out digits get better, and the same seed and data give the same bits.
#[test]
fn training_the_mnist_vae_lowers_its_loss() {
    use wgpu_diffusion::train::vae_trainer::{VaeTrainConfig, VaeTrainer, crop_psnr};
    let g = gpu();
    let (config, batch) = (VaeConfig::preset("mnist-vae").unwrap(), 8);
    let digits = mnist_vae_batches(batch);
    let cfg = VaeTrainConfig {
        batch_size: batch,
        lr: 2e-3,
        ..Default::default()
    };
    let init = wgpu_diffusion::nn::init::default_init(
        &VaeTrainer::new(g.clone(), cfg.clone(), &config)
            .unwrap()
            .vae
            .params,
        0,
    );
    let mut t = VaeTrainer::new(g.clone(), cfg.clone(), &config).unwrap();
    t.set_weights(&init).unwrap();
    let held_out = digits(50_000);
    let reconstruct = |t: &VaeTrainer| {
        g.write(&t.vae.sample.value, &held_out).unwrap();
        g.write(&t.vae.eps, &vec![0.0; t.vae.eps.numel()]).unwrap();
        run(&g, |rec| t.vae.forward(rec).unwrap());
        crop_psnr(&held_out, &read(&g, &t.vae.output.value), batch, 32, 28)
    };
    let psnr_before = reconstruct(&t);
    let mut losses = Vec::new();
    for step in 0..30 {
        losses.push(t.train_step(&digits(step * batch)).unwrap().0);
    }
    let psnr_after = reconstruct(&t);
    let (first, last) = (
        losses[..5].iter().sum::<f32>() / 5.0,
        losses[25..].iter().sum::<f32>() / 5.0,
    );
    eprintln!(
        "mnist-vae: loss {first:.1} -> {last:.1}, held-out PSNR {psnr_before:.2} -> {psnr_after:.2} dB"
    );
    assert!(last < 0.7 * first, "the loss did not fall: {losses:?}");
    assert!(
        psnr_after > psnr_before + 1.0,
        "PSNR {psnr_before} -> {psnr_after}"
    );
    // Determinism: a second trainer from the same weights, seed and data, bit for bit.
    let mut u = VaeTrainer::new(g.clone(), cfg, &config).unwrap();
    u.set_weights(&init).unwrap();
    for (step, want) in losses.iter().take(3).enumerate() {
        let got = u.train_step(&digits(step * batch)).unwrap().0;
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "step {step}: {got} vs {want}"
        );
    }
}

/// `precision = "f16"` (half-precision operands and a GradScaler, `train-vae --precision f16`):
/// the mnist-vae's loss falls as in f32 (by 30 % over 30 steps); a batch that overflows f16
/// (pixels of 1e6) is a skipped step that changes nothing but the scaler (scale halved, one
/// skip, Adam's step count unchanged, the parameters bit for bit), after which the run goes on;
/// and a checkpoint restored into a new trainer continues bit for bit, scale included.
#[test]
fn a_half_precision_vae_run_learns_skips_an_overflow_and_resumes_identically() {
    use wgpu_diffusion::gpu::Precision;
    use wgpu_diffusion::train::vae_trainer::{VaeTrainConfig, VaeTrainer};
    let g = half_gpus().pop().unwrap();
    let (config, batch) = (VaeConfig::preset("mnist-vae").unwrap(), 8);
    let digits = mnist_vae_batches(batch);
    let cfg = VaeTrainConfig {
        batch_size: batch,
        lr: 2e-3,
        precision: Precision::F16,
        ..Default::default()
    };
    let f32_gpu = gpu();
    let e = VaeTrainer::new(f32_gpu.clone(), cfg.clone(), &config)
        .err()
        .unwrap();
    assert!(e.to_string().contains("--precision f16"), "{e}");
    let mut t = VaeTrainer::new(g.clone(), cfg.clone(), &config).unwrap();
    let init = wgpu_diffusion::nn::init::default_init(&t.vae.params, 0);
    t.set_weights(&init).unwrap();
    let mut losses = Vec::new();
    for step in 0..30 {
        losses.push(t.train_step(&digits(step * batch)).unwrap().0);
    }
    let (first, last) = (
        losses[..5].iter().sum::<f32>() / 5.0,
        losses[25..].iter().sum::<f32>() / 5.0,
    );
    eprintln!("mnist-vae in f16: loss {first:.1} -> {last:.1}");
    assert!(last < 0.7 * first, "the loss did not fall: {losses:?}");
    // The loss sums over each image, so its gradient × 2^16 overflows f16 at first: the scaler
    // backs off in the first steps (measured: 3 skips, to 8192), as torch's would.
    let before = t.scaler_state().unwrap();
    eprintln!(
        "scale {} after {} skipped steps",
        before.scale, before.skipped_total
    );
    assert!(
        before.skipped_total < 10 && before.skipped_in_row == 0,
        "{before:?}"
    );
    let taken = 30 - before.skipped_total as u64;
    assert_eq!(t.optimizer_steps(), taken);

    // An overflowing batch: skipped, only the scaler moves.
    let params_before = read(&g, t.vae.params.params());
    let huge = vec![1e6; digits(0).len()];
    t.train_step(&huge).unwrap();
    let state = t.scaler_state().unwrap();
    assert_eq!(
        (state.scale, state.skipped_total, state.skipped_in_row),
        (before.scale / 2.0, before.skipped_total + 1, 1)
    );
    assert_eq!((t.step, t.optimizer_steps()), (31, taken));
    let params_after = read(&g, t.vae.params.params());
    assert!(
        params_before
            .iter()
            .zip(&params_after)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "a skipped step changed the parameters"
    );
    let (loss, _, _) = t.train_step(&digits(31 * batch)).unwrap();
    assert!(
        loss.is_finite() && t.optimizer_steps() == taken + 1,
        "{loss}"
    );

    // A checkpoint restored into a new trainer continues bit for bit.
    let path = std::env::temp_dir().join(format!("f16-vae-{}.safetensors", std::process::id()));
    std::fs::write(&path, t.checkpoint_bytes(Default::default()).unwrap()).unwrap();
    let mut u = VaeTrainer::new(g.clone(), cfg, &config).unwrap();
    u.restore(&LoadedTensors::read(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(u.scaler_state(), t.scaler_state());
    for step in 32..34 {
        let a = t.train_step(&digits(step * batch)).unwrap().0;
        let b = u.train_step(&digits(step * batch)).unwrap().0;
        assert_eq!(a.to_bits(), b.to_bits(), "step {step}: {a} vs {b}");
    }
    assert_eq!(
        read(&g, t.vae.params.params()),
        read(&g, u.vae.params.params())
    );
}
