//! The embedded MNIST training set (Y. LeCun and C. Cortes, CC BY-SA 3.0), vendored in
//! `data/mnist/` as the original gzipped IDX files and compiled into the binary, so `train`
//! works from any directory.

use std::io::Read;

use super::{DataError, Dataset};

const TRAIN_IMAGES_GZ: &[u8] = include_bytes!("../../data/mnist/train-images.idx3-ubyte.gz");
const TRAIN_LABELS_GZ: &[u8] = include_bytes!("../../data/mnist/train-labels.idx1-ubyte.gz");
const TEST_IMAGES_GZ: &[u8] = include_bytes!("../../data/mnist/t10k-images.idx3-ubyte.gz");

/// The 10,000 MNIST test digits, 28×28, in [-1, 1] (super-resolution evaluation).
pub fn test_images() -> Result<(usize, Vec<f32>), DataError> {
    let (n, rows, cols, pixels) = decode_idx3(&gunzip(TEST_IMAGES_GZ)?)?;
    if (rows, cols) != (28, 28) {
        return Err(DataError::Invalid("MNIST test images are not 28x28".into()));
    }
    Ok((n, pixels.iter().map(|&b| b as f32 / 127.5 - 1.0).collect()))
}

/// Decodes an IDX1 (ubyte) label file.
pub fn decode_idx1(bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let bad = |m: &str| DataError::Invalid(format!("MNIST label file: {m}"));
    if bytes.len() < 8 {
        return Err(bad("shorter than its 8-byte header"));
    }
    let word = |i: usize| {
        u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize
    };
    if word(0) != 0x0000_0801 {
        return Err(bad(&format!(
            "magic {:#010x}, expected 0x00000801 (ubyte, 1 dimension)",
            word(0)
        )));
    }
    if bytes.len() != 8 + word(4) {
        return Err(bad(&format!(
            "{} bytes, the header promises {}",
            bytes.len(),
            8 + word(4)
        )));
    }
    Ok(bytes[8..].to_vec())
}

/// Decodes an IDX3 (ubyte) image file: (count, rows, cols, pixels).
pub fn decode_idx3(bytes: &[u8]) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
    let bad = |m: &str| DataError::Invalid(format!("MNIST IDX file: {m}"));
    if bytes.len() < 16 {
        return Err(bad("shorter than its 16-byte header"));
    }
    let word = |i: usize| {
        u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize
    };
    if word(0) != 0x0000_0803 {
        return Err(bad(&format!(
            "magic {:#010x}, expected 0x00000803 (ubyte, 3 dimensions)",
            word(0)
        )));
    }
    let (n, rows, cols) = (word(4), word(8), word(12));
    let need = 16 + n * rows * cols;
    if bytes.len() != need {
        return Err(bad(&format!(
            "{} bytes, the header promises {need}",
            bytes.len()
        )));
    }
    Ok((n, rows, cols, bytes[16..].to_vec()))
}

pub fn gunzip(gz: &[u8]) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Invalid(format!("MNIST archive is corrupt: {e}")))?;
    Ok(out)
}

/// The 60,000 training digits at `size × size` (bilinear-resized when size ≠ 28) with
/// `channels` channels (1, or 3 for RGB models: grey replicated), in [-1, 1].
pub fn load(size: usize, channels: usize) -> Result<Dataset, DataError> {
    if channels != 1 && channels != 3 {
        return Err(DataError::Invalid(format!(
            "MNIST can feed models with 1 or 3 input channels, not {channels}"
        )));
    }
    let (n, rows, cols, pixels) = decode_idx3(&gunzip(TRAIN_IMAGES_GZ)?)?;
    let mut images = Vec::with_capacity(n * size * size * channels);
    for i in 0..n {
        let raw = &pixels[i * rows * cols..(i + 1) * rows * cols];
        let grey: Vec<f32> = if (rows, cols) == (size, size) {
            raw.iter().map(|&b| b as f32 / 127.5 - 1.0).collect()
        } else {
            let img = image::GrayImage::from_raw(cols as u32, rows as u32, raw.to_vec())
                .expect("IDX image size");
            super::to_model_input(image::DynamicImage::ImageLuma8(img), size, 1)
        };
        for v in grey {
            for _ in 0..channels {
                images.push(v);
            }
        }
    }
    let labels = decode_idx1(&gunzip(TRAIN_LABELS_GZ)?)?;
    if labels.len() != n || labels.iter().any(|&l| l > 9) {
        return Err(DataError::Invalid(
            "MNIST labels do not match the images".into(),
        ));
    }
    Ok(Dataset {
        size,
        channels,
        images,
        len: n,
        hflip: false,
        description: format!("MNIST train ({n} digits, embedded)"),
        labels: Some(labels.iter().map(|&l| l as u32).collect()),
        class_names: (0..10).map(|d| d.to_string()).collect(),
        captions: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_mnist_decodes() {
        let (n, r, c, px) = decode_idx3(&gunzip(TRAIN_IMAGES_GZ).unwrap()).unwrap();
        assert_eq!((n, r, c, px.len()), (60000, 28, 28, 60000 * 784));
        assert!(decode_idx3(&[0u8; 10]).is_err());
        assert!(gunzip(&TRAIN_IMAGES_GZ[..1000]).is_err());
        let labels = decode_idx1(&gunzip(TRAIN_LABELS_GZ).unwrap()).unwrap();
        assert_eq!(labels.len(), 60000);
        // The first training digits of MNIST are 5, 0, 4, 1, 9.
        assert_eq!(&labels[..5], &[5, 0, 4, 1, 9]);
        assert!(decode_idx1(&[0u8; 4]).is_err());
    }
}
