//! timestep_embedding.wgsl against reference::timestep_embedding, which computes the argument
//! t * freq in f32 exactly as the kernel (and torch) does and then takes f64 sin/cos of it. The
//! kernel's error is then only its range reduction (Cody-Waite, ~1 ulp of pi/2 ~ 1.2e-7 rad) and
//! its polynomials (~1 ulp of 1): outputs lie in [-1, 1] with max|ref| = 1, so atol 2e-6 (over 5x
//! that bound, 30x the 7e-8 observed on lavapipe, and below the brief's 1e-5 * max|ref|) and rtol 0
//! (sin near 0 is not relatively accurate after reducing arguments ~1000).

use crate::common::*;
use wgpu_diffusion::ops::timestep_embedding as te;
use wgpu_diffusion::reference::timestep_embedding as r;

const TIMESTEPS: [f64; 5] = [0.0, 1.0, 7.0, 999.0, 500.5];

#[test]
fn matches_reference() {
    let g = gpu();
    for &dim in &[1usize, 2, 3, 7, 32, 33, 128, 320] {
        for &(flip, shift) in &[(false, 1.0f32), (true, 0.0), (true, 1.0)] {
            if dim / 2 == 1 && shift == 1.0 {
                continue; // dim/2 - shift = 0: rejected (tested below)
            }
            let what = format!("dim {dim} flip {flip} shift {shift}");
            let tt = upload(&g, &[TIMESTEPS.len()], &TIMESTEPS, "t");
            let out = g.tensor(&[TIMESTEPS.len(), dim], "emb");
            run(&g, |rec| {
                te::timestep_embedding(rec, &tt, &out, flip, shift).unwrap()
            });
            let reference = r::timestep_embedding(&TIMESTEPS, dim, flip, shift);
            assert_close(&what, &read(&g, &out), &reference, 2e-6, 0.0);
        }
    }
}

#[test]
fn invalid_arguments_are_errors() {
    let g = gpu();
    let t = g.tensor(&[4], "t");
    let mut rec = g.recorder();
    let e = te::timestep_embedding(&mut rec, &t, &g.tensor(&[3, 8], "out"), false, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("timestep_embedding") && e.contains("`timesteps`"),
        "{e}"
    );
    let e = te::timestep_embedding(&mut rec, &t, &g.tensor(&[4, 2], "out"), false, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-zero"), "{e}");
    let e = te::timestep_embedding(&mut rec, &t, &t, false, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 2"), "{e}");
    assert!(rec.is_empty());
}
