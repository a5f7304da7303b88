//! A folder of PNG/JPEG images (searched recursively) as a training set.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, to_model_input};

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| DataError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let p = entry.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Loads every PNG/JPEG under `dir`, converted to `channels`, resized and centre-cropped to
/// `size`. Unreadable files are skipped and counted (returned as warnings) unless `strict`.
pub fn load(
    dir: &Path,
    size: usize,
    channels: usize,
    hflip: bool,
    strict: bool,
) -> Result<(Dataset, Vec<String>), DataError> {
    if !dir.is_dir() {
        return Err(DataError::Invalid(format!(
            "--data {}: not a directory",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(DataError::Invalid(format!(
            "--data {}: no PNG or JPEG images found (searched recursively)",
            dir.display()
        )));
    }
    // Classes: the first sub-folder under `dir` of each file, sorted by name. Files at the top
    // level have none, so such a folder has no labels.
    let class_of = |f: &Path| -> Option<String> {
        let rel = f.strip_prefix(dir).ok()?;
        let mut parts = rel.components();
        let first = parts.next()?;
        parts.next()?;
        Some(first.as_os_str().to_string_lossy().to_string())
    };
    let mut class_names: Vec<String> = files.iter().filter_map(|f| class_of(f)).collect();
    class_names.sort();
    class_names.dedup();
    let all_in_classes = files.iter().all(|f| class_of(f).is_some());
    let mut images = Vec::with_capacity(files.len() * size * size * channels);
    let mut labels = Vec::new();
    let mut skipped = Vec::new();
    // Each loaded image's path below `dir`, `/`-separated (metadata.jsonl's `file_name`).
    let mut loaded = Vec::new();
    for f in &files {
        match super::open_image(f) {
            Ok(img) => {
                images.extend(to_model_input(img, size, channels));
                let rel = f.strip_prefix(dir).unwrap_or(f);
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                loaded.push(parts.join("/"));
                if let Some(c) = class_of(f) {
                    labels.push(class_names.binary_search(&c).expect("listed") as u32);
                }
            }
            Err(msg) => {
                if strict {
                    return Err(DataError::Invalid(format!(
                        "unreadable image (--strict): {msg}"
                    )));
                }
                skipped.push(msg);
            }
        }
    }
    let len = files.len() - skipped.len();
    if len == 0 {
        return Err(DataError::Invalid(format!(
            "--data {}: none of the {} image files could be read",
            dir.display(),
            files.len()
        )));
    }
    let metadata = dir.join("metadata.jsonl");
    let captions = match std::fs::read_to_string(&metadata) {
        Ok(text) => Some(
            super::captions::read_metadata_jsonl(&text, &loaded)
                .map_err(|e| DataError::Invalid(format!("{}: {e}", dir.display())))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(DataError::Io {
                path: metadata.display().to_string(),
                source,
            });
        }
    };
    let description = format!(
        "{} ({len} images{})",
        dir.display(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(", {} skipped", skipped.len())
        }
    );
    Ok((
        Dataset {
            size,
            channels,
            images,
            len,
            hflip,
            description,
            labels: all_in_classes.then_some(labels),
            class_names: if all_in_classes {
                class_names
            } else {
                Vec::new()
            },
            captions,
        },
        skipped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_with_corrupt_and_empty_cases() {
        let dir =
            std::env::temp_dir().join(format!("wgpu-diffusion-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        assert!(
            load(&dir, 8, 1, false, false)
                .unwrap_err()
                .to_string()
                .contains("no PNG or JPEG")
        );
        image::RgbImage::from_pixel(12, 10, image::Rgb([255, 0, 0]))
            .save(dir.join("sub/a.png"))
            .unwrap();
        std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
        let (d, skipped) = load(&dir, 8, 3, false, false).unwrap();
        assert_eq!((d.len, skipped.len()), (1, 1));
        // broken.png sits at the top level: no classes.
        assert!(d.labels.is_none());
        assert_eq!(d.images.len(), 8 * 8 * 3);
        assert!((d.images[0] - 1.0).abs() < 1e-6 && (d.images[1] + 1.0).abs() < 1e-6);
        assert!(
            load(&dir, 8, 3, false, true)
                .unwrap_err()
                .to_string()
                .contains("--strict")
        );
        std::fs::remove_file(dir.join("broken.png")).unwrap();
        std::fs::create_dir_all(dir.join("apples")).unwrap();
        image::RgbImage::from_pixel(9, 9, image::Rgb([0, 0, 255]))
            .save(dir.join("apples/b.png"))
            .unwrap();
        let (d, _) = load(&dir, 8, 3, false, false).unwrap();
        assert_eq!(d.class_names, vec!["apples".to_string(), "sub".to_string()]);
        assert_eq!(d.labels, Some(vec![0, 1]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
