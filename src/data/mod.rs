//! Training data: the embedded MNIST (compiled into the binary) or a folder of images, decoded
//! once into memory as f32 in [-1, 1] at the model's size, and served in a seeded, shuffled order
//! by a background thread so the GPU never waits for the CPU.

pub mod captions;
pub mod folder;
pub mod mnist;
pub mod resize;

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The largest image file, side and decoded size accepted: far beyond any training image, small
/// enough that a hostile header cannot make the decoder allocate gigabytes.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
pub const MAX_IMAGE_SIDE: u32 = 16384;
pub const MAX_IMAGE_ALLOC: u64 = 512 << 20;

/// Decodes a PNG or JPEG from memory with bounded dimensions and allocations; a decoder that
/// panics on a malformed file becomes an error too.
pub fn decode_image(bytes: &[u8]) -> Result<image::DynamicImage, String> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    let decode = move || -> Result<image::DynamicImage, String> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?;
        reader.limits(limits);
        if reader.format().is_none() {
            return Err("not a PNG or JPEG file".into());
        }
        reader.decode().map_err(|e| e.to_string())
    };
    std::panic::catch_unwind(decode)
        .unwrap_or_else(|_| Err("the image decoder failed on this file (malformed)".into()))
}

/// Reads and decodes an image file (see [`decode_image`]); the error names the file.
pub fn open_image(path: &std::path::Path) -> Result<image::DynamicImage, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "{}: {len} bytes, more than the {} MiB an image may have",
            path.display(),
            MAX_IMAGE_FILE_BYTES >> 20
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode_image(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Images as NHWC f32 in [-1, 1], all `size × size × channels`.
#[derive(Debug)]
pub struct Dataset {
    pub size: usize,
    pub channels: usize,
    pub images: Vec<f32>,
    pub len: usize,
    /// Random horizontal flips at batch time.
    pub hflip: bool,
    pub description: String,
    /// Class index of each image (MNIST's digit, or the sub-folder of an image folder).
    pub labels: Option<Vec<u32>>,
    /// The class names, by index (MNIST: "0".."9"; folders: sub-folder names, sorted).
    pub class_names: Vec<String>,
    /// Each image's caption (a folder's metadata.jsonl), for text-conditional runs.
    pub captions: Option<Vec<String>>,
}

impl Dataset {
    pub fn image_len(&self) -> usize {
        self.size * self.size * self.channels
    }
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * self.image_len()..(i + 1) * self.image_len()]
    }
}

/// SplitMix64: the CPU-side seeded generator for the data order (cheap, deterministic).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order of epoch `epoch`: a Fisher–Yates shuffle keyed by (seed, epoch) alone, so any
/// position of the run can be recomputed when it resumes.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..len as u32).collect();
    let mut s = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x5DEE_CE66_D1CE_4E5B;
    for i in (1..len).rev() {
        let j = (splitmix(&mut s) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// A batch ready for upload and the data position after it.
pub struct Batch {
    pub data: Vec<f32>,
    /// The images' class labels (empty when the data set has none).
    pub labels: Vec<u32>,
    /// Number of images consumed since the start of the run, after this batch.
    pub position: u64,
}

/// Serves batches in order from `position` (images consumed so far) on a background thread.
pub struct Loader {
    rx: Receiver<Batch>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    pub fn start(data: std::sync::Arc<Dataset>, batch: usize, seed: u64, position: u64) -> Loader {
        let (tx, rx): (SyncSender<Batch>, Receiver<Batch>) = sync_channel(3);
        let handle = std::thread::spawn(move || {
            let mut pos = position;
            loop {
                let (b, labels) = make_batch(&data, batch, seed, pos);
                pos += batch as u64;
                if tx
                    .send(Batch {
                        data: b,
                        labels,
                        position: pos,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        Loader {
            rx,
            handle: Some(handle),
        }
    }

    pub fn next(&self) -> Batch {
        self.rx.recv().expect("the data thread ended unexpectedly")
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the receiver ends the thread at its next send.
        let (_, rx) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The batch starting at image `position` of the endless shuffled stream.
pub fn make_batch(data: &Dataset, batch: usize, seed: u64, position: u64) -> (Vec<f32>, Vec<u32>) {
    let il = data.image_len();
    let mut out = Vec::with_capacity(batch * il);
    let mut labels = Vec::new();
    let mut cached: Option<(u64, Vec<u32>)> = None;
    for k in 0..batch as u64 {
        let p = position + k;
        let epoch = p / data.len as u64;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached = Some((epoch, epoch_order(data.len, seed, epoch)));
        }
        let idx = cached.as_ref().unwrap().1[(p % data.len as u64) as usize] as usize;
        let img = data.image(idx);
        if let Some(l) = &data.labels {
            labels.push(l[idx]);
        }
        let mut flip_state = seed ^ p.wrapping_mul(0x2545_F491_4F6C_DD1D);
        if data.hflip && splitmix(&mut flip_state) & 1 == 1 {
            let (s, c) = (data.size, data.channels);
            for y in 0..s {
                for x in (0..s).rev() {
                    out.extend_from_slice(&img[(y * s + x) * c..(y * s + x + 1) * c]);
                }
            }
        } else {
            out.extend_from_slice(img);
        }
    }
    (out, labels)
}

/// Resizes a `w × h × channels` u8 image to `size × size` (shorter side to `size` with a
/// triangle filter, then a centre crop) and maps it to [-1, 1].
pub fn to_model_input(img: image::DynamicImage, size: usize, channels: usize) -> Vec<f32> {
    let (w, h) = (img.width(), img.height());
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let resized = if (w, h) == (nw, nh) {
        img
    } else {
        img.resize_exact(nw, nh, image::imageops::FilterType::Triangle)
    };
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let cropped = resized.crop_imm(x0, y0, size as u32, size as u32);
    let bytes: Vec<u8> = if channels == 1 {
        cropped.to_luma8().into_raw()
    } else {
        cropped.to_rgb8().into_raw()
    };
    bytes.iter().map(|&b| b as f32 / 127.5 - 1.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(1000, 7, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_eq!(a, epoch_order(1000, 7, 0));
        assert_ne!(a, epoch_order(1000, 7, 1));
        assert_ne!(a, epoch_order(1000, 8, 0));
    }

    #[test]
    fn batches_resume_at_any_position() {
        let data = Dataset {
            size: 2,
            channels: 1,
            images: (0..40).map(|v| v as f32).collect(),
            len: 10,
            hflip: true,
            description: String::new(),
            labels: Some((0..10).map(|v| v % 3).collect()),
            class_names: vec!["a".into(), "b".into(), "c".into()],
            captions: None,
        };
        let whole = make_batch(&data, 7, 3, 5);
        let (p1, l1) = make_batch(&data, 3, 3, 5);
        let (p2, l2) = make_batch(&data, 4, 3, 8);
        assert_eq!(whole.0, [p1, p2].concat());
        assert_eq!(whole.1, [l1, l2].concat());
        // Each label belongs to its image (image i holds values 4i..4i+3, label i % 3).
        for (k, &l) in whole.1.iter().enumerate() {
            let first = whole.0[k * 4].min(whole.0[k * 4 + 1]);
            assert_eq!((first as u32 / 4) % 3, l);
        }
    }
}
