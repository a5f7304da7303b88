//! PNG output: sample grids and the loss curve (drawn directly into pixels, no plotting crate).

use std::path::Path;

use anyhow::{Context, Result};

/// Saves `images` (NHWC f32 in [-1, 1], `shape` = [N, H, W, C]) as a grid `cols` wide, each
/// image scaled up by an integer factor to at least 64 px and separated by 2 px.
pub fn save_grid(images: &[f32], shape: [usize; 4], cols: usize, path: &Path) -> Result<()> {
    let [n, h, w, c] = shape;
    let rows = n.div_ceil(cols);
    let scale = 64usize.div_ceil(h.max(w)).max(1);
    let pad = 2;
    let (cw, ch) = (w * scale + pad, h * scale + pad);
    let (width, height) = (cols * cw + pad, rows * ch + pad);
    let mut img =
        image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255, 255, 255]));
    for i in 0..n {
        let (gx, gy) = (pad + (i % cols) * cw, pad + (i / cols) * ch);
        for y in 0..h * scale {
            for x in 0..w * scale {
                let base = ((i * h + y / scale) * w + x / scale) * c;
                let px = |k: usize| {
                    ((images[base + k.min(c - 1)].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                };
                img.put_pixel(
                    (gx + x) as u32,
                    (gy + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    save_png(&img, path)
}

fn save_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding PNG")?;
    super::checkpoint::atomic_write(path, &bytes)
}

/// The loss per step (light) and its moving average (dark), log-scaled y axis.
pub fn loss_plot(history: &[(u64, f32)], path: &Path) -> Result<()> {
    let (width, height, margin) = (800u32, 400u32, 40u32);
    let mut img = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let points: Vec<(u64, f64)> = history
        .iter()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .map(|&(s, l)| (s, (l as f64).log10()))
        .collect();
    // Axes.
    for x in margin..width - margin / 2 {
        img.put_pixel(x, height - margin, image::Rgb([0, 0, 0]));
    }
    for y in margin / 2..height - margin {
        img.put_pixel(margin, y, image::Rgb([0, 0, 0]));
    }
    if points.len() >= 2 {
        let (s0, s1) = (points[0].0 as f64, points[points.len() - 1].0 as f64);
        let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let span = (hi - lo).max(1e-6);
        let to_px = |s: f64, l: f64| {
            let x = margin as f64
                + (s - s0) / (s1 - s0).max(1.0) * (width - margin - margin / 2) as f64;
            let y =
                (height - margin) as f64 - (l - lo) / span * (height - margin - margin / 2) as f64;
            (x, y)
        };
        let k = (points.len() / 50).max(1);
        let smooth: Vec<(u64, f64)> = (0..points.len())
            .map(|i| {
                let a = i.saturating_sub(k);
                let window = &points[a..=i];
                (
                    points[i].0,
                    window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64,
                )
            })
            .collect();
        for (series, color) in [(&points, [170, 190, 230]), (&smooth, [20, 60, 160])] {
            for w in series.windows(2) {
                let (a, b) = (to_px(w[0].0 as f64, w[0].1), to_px(w[1].0 as f64, w[1].1));
                let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
                for t in 0..=n {
                    let f = t as f64 / n as f64;
                    let (x, y) = (a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f);
                    if x >= 0.0 && y >= 0.0 && (x as u32) < width && (y as u32) < height {
                        img.put_pixel(x as u32, y as u32, image::Rgb(color));
                    }
                }
            }
        }
        // Decade ticks on the y axis.
        let mut d = lo.floor();
        while d <= hi.ceil() {
            let (_, y) = to_px(s0, d);
            if y >= (margin / 2) as f64 && y <= (height - margin) as f64 {
                for x in margin - 6..margin {
                    img.put_pixel(x, y as u32, image::Rgb([0, 0, 0]));
                }
            }
            d += 1.0;
        }
    }
    save_png(&img, path)
}
