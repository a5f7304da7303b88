//! PNG output: sample grids and single images (NHWC f32 in [-1, 1]), written atomically.

use std::path::Path;

use anyhow::{Context, Result};

use super::atomic::atomic_write;

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

/// Saves one image (NHWC f32 in [-1, 1], `[H, W, C]`) at its own resolution: 8-bit grayscale
/// for one channel, RGB for three.
pub fn save_image(pixels: &[f32], [h, w, c]: [usize; 3], path: &Path) -> Result<()> {
    let byte = |v: f32| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
    let dynamic = if c == 1 {
        let data: Vec<u8> = pixels.iter().map(|&v| byte(v)).collect();
        image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(w as u32, h as u32, data).context("image size")?,
        )
    } else {
        let data: Vec<u8> = pixels
            .chunks(c)
            .flat_map(|p| [byte(p[0]), byte(p[1.min(c - 1)]), byte(p[2.min(c - 1)])])
            .collect();
        image::DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w as u32, h as u32, data).context("image size")?,
        )
    };
    let mut bytes = Vec::new();
    dynamic
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding PNG")?;
    atomic_write(path, &bytes)
}

pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding PNG")?;
    atomic_write(path, &bytes)
}
