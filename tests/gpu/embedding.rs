//! embedding.wgsl against reference::embedding: odd batch/dim/table sizes, repeated labels
//! (the backward sums several rows into one entry), accumulation into an existing gradient.
//! One f32 add per element forward; the backward adds ≤ B terms: rtol 1e-6, atol 1e-6.

use crate::common::*;
use wgpu_diffusion::ops::embedding as op;
use wgpu_diffusion::reference::embedding as r;

#[test]
fn embedding_forward_backward() {
    let g = gpu();
    for (batch, dim, rows) in [(1, 1, 1), (3, 7, 2), (7, 33, 11), (32, 128, 11)] {
        let labels: Vec<u32> = (0..batch as u32)
            .map(|b| (b * 7 + 3) % rows as u32)
            .collect();
        let table = random(rows * dim, 11 + dim as u64);
        let out0 = random(batch * dim, 12 + dim as u64);
        let dout = random(batch * dim, 13 + dim as u64);
        let dtab0 = random(rows * dim, 14 + dim as u64);
        let tl = g.tensor(&[batch], "labels");
        g.write_u32(&tl, &labels).unwrap();
        let tt = upload(&g, &[rows, dim], &table, "table");
        let to = upload(&g, &[batch, dim], &out0, "out");
        let td = upload(&g, &[batch, dim], &dout, "d out");
        let tg = upload(&g, &[rows, dim], &dtab0, "d table");
        run(&g, |rec| {
            op::embedding_add_forward(rec, &tl, &tt, &to).unwrap();
            op::embedding_backward(rec, &tl, &td, &tg).unwrap();
        });
        let what = format!("B{batch} D{dim} K{rows}");
        assert_close(
            &format!("embedding forward {what}"),
            &read(&g, &to),
            &r::embedding_add_forward(&labels, &table, dim, &out0),
            1e-6,
            1e-6,
        );
        assert_close(
            &format!("embedding backward {what}"),
            &read(&g, &tg),
            &r::embedding_backward(&labels, &dout, dim, &dtab0),
            1e-6,
            1e-6,
        );
    }
    let tl = g.tensor(&[3], "labels");
    let tt = g.tensor(&[4, 5], "table");
    let wrong = g.tensor(&[3, 6], "wrong columns");
    let mut rec = g.recorder();
    assert!(op::embedding_add_forward(&mut rec, &tl, &tt, &wrong).is_err());
}
