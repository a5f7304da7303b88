//! Reference conv2d (f64): NHWC activations, torch weight layout [Co, Ci, KH, KW], stride and
//! per-side padding (zeros), forward and both backward passes.

/// Geometry of a reference conv: input n×h×w×ci, kernel co×ci×kh×kw, stride, pads (top, left,
/// bottom, right).
#[derive(Clone, Copy, Debug)]
pub struct Conv {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub ci: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: [usize; 4],
}

impl Conv {
    pub fn out_h(&self) -> usize {
        (self.h + self.pad[0] + self.pad[2] - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + self.pad[1] + self.pad[3] - self.kw) / self.stride + 1
    }
    /// Input pixel read by output (oy, ox) at tap (ky, kx), if inside the image.
    fn input_at(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ky) as isize - self.pad[0] as isize;
        let ix = (ox * self.stride + kx) as isize - self.pad[1] as isize;
        (iy >= 0 && ix >= 0 && (iy as usize) < self.h && (ix as usize) < self.w)
            .then_some((iy as usize, ix as usize))
    }
    fn w_index(&self, co: usize, ci: usize, ky: usize, kx: usize) -> usize {
        ((co * self.ci + ci) * self.kh + ky) * self.kw + kx
    }

    pub fn forward(&self, x: &[f64], wt: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
        let (oh, ow) = (self.out_h(), self.out_w());
        let mut y = vec![0.0; self.n * oh * ow * self.co];
        for n in 0..self.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..self.co {
                        let mut acc = bias.map_or(0.0, |b| b[co]);
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                if let Some((iy, ix)) = self.input_at(oy, ox, ky, kx) {
                                    for ci in 0..self.ci {
                                        acc += x[((n * self.h + iy) * self.w + ix) * self.ci + ci]
                                            * wt[self.w_index(co, ci, ky, kx)];
                                    }
                                }
                            }
                        }
                        y[((n * oh + oy) * ow + ox) * self.co + co] = acc;
                    }
                }
            }
        }
        y
    }

    /// (dx, dw, db) for upstream gradient dy [N, OH, OW, Co].
    pub fn backward(&self, x: &[f64], wt: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (oh, ow) = (self.out_h(), self.out_w());
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; wt.len()];
        let mut db = vec![0.0; self.co];
        for n in 0..self.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..self.co {
                        let g = dy[((n * oh + oy) * ow + ox) * self.co + co];
                        db[co] += g;
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                if let Some((iy, ix)) = self.input_at(oy, ox, ky, kx) {
                                    for ci in 0..self.ci {
                                        let xi = ((n * self.h + iy) * self.w + ix) * self.ci + ci;
                                        let wi = self.w_index(co, ci, ky, kx);
                                        dx[xi] += g * wt[wi];
                                        dw[wi] += g * x[xi];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (dx, dw, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn conv_backward_matches_finite_differences() {
        for conv in [
            Conv {
                n: 2,
                h: 5,
                w: 4,
                ci: 3,
                co: 2,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: [1; 4],
            },
            Conv {
                n: 1,
                h: 5,
                w: 6,
                ci: 2,
                co: 3,
                kh: 3,
                kw: 3,
                stride: 2,
                pad: [0, 0, 1, 1],
            },
            Conv {
                n: 2,
                h: 3,
                w: 3,
                ci: 2,
                co: 2,
                kh: 1,
                kw: 1,
                stride: 1,
                pad: [0; 4],
            },
        ] {
            let x = test_data(conv.n * conv.h * conv.w * conv.ci, 1);
            let w = test_data(conv.co * conv.ci * conv.kh * conv.kw, 2);
            let b = test_data(conv.co, 3);
            let dy = test_data(conv.n * conv.out_h() * conv.out_w() * conv.co, 4);
            let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
                conv.forward(x, w, Some(b))
                    .iter()
                    .zip(&dy)
                    .map(|(y, g)| y * g)
                    .sum()
            };
            let (dx, dw, db) = conv.backward(&x, &w, &dy);
            assert_gradients_match(
                "conv dx",
                &dx,
                &numeric_gradient(&x, 1e-6, |x| loss(x, &w, &b)),
                1e-7,
            );
            assert_gradients_match(
                "conv dw",
                &dw,
                &numeric_gradient(&w, 1e-6, |w| loss(&x, w, &b)),
                1e-7,
            );
            assert_gradients_match(
                "conv db",
                &db,
                &numeric_gradient(&b, 1e-6, |b| loss(&x, &w, b)),
                1e-7,
            );
        }
    }
}
