//! posterior.wgsl against reference::posterior on odd shapes (pixels × latent channels), with
//! log-variances inside and outside the clamp [−30, 20] and ε = 0 (the mode). One exp, one
//! multiply-add per element (WGSL's exp is not specified to the bit): rtol 2e-6, atol 1e-6.

use crate::common::*;
use wgpu_diffusion::ops::posterior as op;
use wgpu_diffusion::reference::posterior as r;

#[test]
fn posterior_sample_forward_backward() {
    let g = gpu();
    for (pixels, latent) in [(1, 1), (7, 3), (33, 4), (257, 5)] {
        let scaled: Vec<f64> = random(pixels * 2 * latent, latent as u64)
            .iter()
            .map(|v| 3.0 * v)
            .collect();
        let mut moments = f32_round(&scaled);
        moments[latent] = -40.0; // clamped from below: σ = e^-15, no gradient
        if pixels > 1 {
            moments[3 * latent] = 25.0; // clamped from above
        }
        let eps = random(pixels * latent, 100 + latent as u64);
        let dz = random(pixels * latent, 200 + latent as u64);
        let tm = upload(&g, &[pixels, 2 * latent], &moments, "moments");
        let te = upload(&g, &[pixels, latent], &eps, "eps");
        let tz = g.tensor(&[pixels, latent], "z");
        let tdz = upload(&g, &[pixels, latent], &dz, "dz");
        let tdm = upload(
            &g,
            &[pixels, 2 * latent],
            &vec![7.0; 2 * pixels * latent],
            "dmoments",
        );
        let zeros = g.tensor(&[pixels, latent], "eps = 0");
        let tmode = g.tensor(&[pixels, latent], "mode");
        run(&g, |rec| {
            op::posterior_sample(rec, &tm, &te, &tz).unwrap();
            op::posterior_sample_backward(rec, &tm, &te, &tdz, &tdm).unwrap();
            op::posterior_sample(rec, &tm, &zeros, &tmode).unwrap();
        });
        let what = format!("P{pixels} L{latent}");
        assert_close(
            &format!("posterior_sample {what}"),
            &read(&g, &tz),
            &r::posterior_sample(&moments, &eps, latent),
            1e-6,
            2e-6,
        );
        assert_close(
            &format!("posterior_sample_backward {what}"),
            &read(&g, &tdm),
            &r::posterior_sample_backward(&moments, &eps, &dz, latent),
            1e-6,
            2e-6,
        );
        let means: Vec<f64> = (0..pixels * latent)
            .map(|i| moments[(i / latent) * 2 * latent + i % latent])
            .collect();
        assert_close(
            &format!("posterior mode {what}"),
            &read(&g, &tmode),
            &means,
            0.0,
            0.0,
        );
    }
}

#[test]
fn posterior_shapes_are_checked() {
    let g = gpu();
    let mut rec = g.recorder();
    let odd = g.tensor(&[2, 3], "moments with 3 channels");
    let z = g.tensor(&[2, 1], "z");
    let e = op::posterior_sample(&mut rec, &odd, &z, &z)
        .unwrap_err()
        .to_string();
    assert!(e.contains("even"), "{e}");
    let m = g.tensor(&[2, 4], "moments");
    let wrong = g.tensor(&[2, 3], "z with 3 channels");
    let e = op::posterior_sample(&mut rec, &m, &z, &wrong)
        .unwrap_err()
        .to_string();
    assert!(e.contains("z"), "{e}");
    assert!(rec.is_empty(), "nothing is recorded by a failing call");
}

/// The KL term (1/B) Σ ½(μ² + exp(logvar) − 1 − logvar) and its gradient added into the moments'
/// gradient, against the reference, with clamped log-variances and more than one chunk of
/// latents. One exp per element and a fixed-order sum: rtol 1e-5 on the sum, 2e-6 elementwise.
#[test]
fn posterior_kl_and_its_gradient_match_reference() {
    let g = gpu();
    for (batch, pixels, latent) in [(1, 1, 1), (2, 7, 3), (3, 700, 4)] {
        let p = batch * pixels;
        let scaled: Vec<f64> = random(p * 2 * latent, 7 + latent as u64)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let mut moments = f32_round(&scaled);
        moments[latent] = -40.0;
        let before = random(p * 2 * latent, 8 + latent as u64);
        let tm = upload(&g, &[batch, pixels, 2 * latent], &moments, "moments");
        let kl = g.tensor(&[1], "kl");
        // Without a GradScaler, and with one whose scale (its state's first word) is 8.
        for scale in [None, Some(8.0)] {
            let td = upload(&g, &[batch, pixels, 2 * latent], &before, "dmoments");
            let state = scale.map(|s| {
                upload(
                    &g,
                    &[8],
                    &[s, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                    "scaler state",
                )
            });
            run(&g, |rec| {
                op::posterior_kl(rec, &tm, &kl).unwrap();
                op::posterior_kl_backward(rec, &tm, 0.3, state.as_ref(), &td).unwrap();
            });
            let what = format!("B{batch} P{pixels} L{latent} loss scale {scale:?}");
            assert_close(
                &format!("posterior_kl {what}"),
                &read(&g, &kl),
                &[r::posterior_kl(&moments, latent, batch)],
                1e-6,
                1e-5,
            );
            let want: Vec<f64> = r::posterior_kl_backward(&moments, latent, batch, 0.3)
                .iter()
                .zip(&before)
                .map(|(d, b)| d * scale.unwrap_or(1.0) + b)
                .collect();
            assert_close(
                &format!("posterior_kl_backward {what}"),
                &read(&g, &td),
                &want,
                1e-6,
                2e-6 * scale.unwrap_or(1.0),
            );
        }
    }
}
