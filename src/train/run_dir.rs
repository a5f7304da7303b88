//! The folders and files of a run: checkpoints/, samples/, model/, config.toml, metrics.jsonl,
//! loss.png, finished.json.

use std::path::{Path, PathBuf};

/// The folders of a run.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    pub fn model(&self) -> PathBuf {
        self.root.join("model")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// Written last, when a run has reached its final step and written everything of its end
    /// (final checkpoint, model export, sample grid, loss plot): `{"step": N}`.
    pub fn finished_marker(&self) -> PathBuf {
        self.root.join("finished.json")
    }
    /// Whether the run ended cleanly at `step`: a run whose last checkpoint is its final step
    /// but that was killed before its end (an interrupted model export, no final grid) is not
    /// finished, and resuming it writes its end again.
    pub fn finished_at(&self, step: u64) -> bool {
        std::fs::read_to_string(self.finished_marker())
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            == Some(step)
    }
    /// Removes what a kill can leave behind: temporary files of an unfinished atomic write and
    /// a model export that never got renamed into place.
    pub fn remove_partial_files(&self) {
        // Killed between moving the old export aside and renaming the new one in: the old
        // export is whole, so it comes back.
        let old = self.root.join(".model.old.tmp");
        if !self.model().exists() && old.is_dir() {
            let _ = std::fs::rename(&old, self.model());
        }
        for dir in [self.root.clone(), self.checkpoints(), self.model()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let path = e.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        }
    }

    /// Checkpoint files, oldest first.
    pub fn list_checkpoints(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.checkpoints())
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Keeps the rows of `metrics.jsonl` up to step `up_to` (the checkpoint a run resumes from) and
/// drops the rest: rows logged after that checkpoint (the resumed run logs those steps again),
/// a row torn by a kill, and anything unreadable. Rewritten atomically; returns the (step, loss)
/// history kept.
pub fn truncate_metrics(path: &Path, up_to: u64) -> std::io::Result<Vec<(u64, f32)>> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut kept = String::new();
    let mut history = Vec::new();
    let mut last = 0;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // A step a GradScaler skipped may have a non-finite loss, written as null.
        let loss = v["loss"].as_f64();
        let logged = v.get("loss").is_some_and(|l| l.is_number() || l.is_null());
        let Some(step) = v["step"].as_u64().filter(|_| logged) else {
            continue;
        };
        // Steps only go up; a repeated or older step is a leftover of an earlier resume.
        if step > up_to || step <= last {
            continue;
        }
        last = step;
        if let Some(loss) = loss {
            history.push((step, loss as f32));
        }
        kept.push_str(line);
        kept.push('\n');
    }
    if kept.len() != text.len() {
        crate::io::atomic::atomic_write(path, kept.as_bytes()).map_err(std::io::Error::other)?;
    }
    Ok(history)
}

pub fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("run-{secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_cut_at_the_checkpoint_step_and_torn_rows_dropped() {
        let dir =
            std::env::temp_dir().join(format!("wgpu-diffusion-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let row = |s: u64| format!("{{\"step\":{s},\"loss\":0.{s}}}\n");
        // Steps 1..=6, then a resume from 4 that logged 5 again, then a torn row.
        let text: String = (1..=6).chain(5..=5).map(row).collect::<String>() + "{\"step\":7,\"lo";
        std::fs::write(&path, text).unwrap();
        let h = truncate_metrics(&path, 5).unwrap();
        assert_eq!(
            h.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept, (1..=5).map(row).collect::<String>());
        assert!(truncate_metrics(&path, 0).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert!(
            truncate_metrics(&dir.join("none.jsonl"), 3)
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
