//! Captions of a text-conditional run: MNIST's digits described by templates ("a handwritten
//! seven", "the digit 7", …), one drawn per image each time it is seen, or the `text` of each
//! image of a folder's `metadata.jsonl` (the image-folder convention of diffusers'
//! `train_text_to_image.py`: one JSON object per line with `file_name` and `text`).

/// The digit names the templates use, by label.
pub const DIGIT_WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// MNIST caption templates: `{w}` is the digit's name, `{d}` its numeral.
pub const MNIST_TEMPLATES: [&str; 6] = [
    "a handwritten {w}",
    "the digit {d}",
    "a {w}",
    "the number {w}",
    "a handwritten digit {d}",
    "{w}",
];

/// Where a run's captions come from: each image's label picks them.
#[derive(Clone, Debug, PartialEq)]
pub enum Captions {
    /// Label k is digit k, described by any of [`MNIST_TEMPLATES`].
    MnistTemplates,
    /// Label i is the i-th caption (one per image of a folder with metadata.jsonl).
    PerImage(Vec<String>),
}

impl Captions {
    /// The caption choices of every label.
    pub fn choices(&self) -> usize {
        match self {
            Captions::MnistTemplates => MNIST_TEMPLATES.len(),
            Captions::PerImage(_) => 1,
        }
    }

    /// Choice `choice` (taken modulo [`choices`](Self::choices)) of `label`'s captions.
    pub fn caption(&self, label: u32, choice: u32) -> String {
        match self {
            Captions::MnistTemplates => {
                let k = label as usize % 10;
                let t = MNIST_TEMPLATES[choice as usize % MNIST_TEMPLATES.len()];
                t.replace("{w}", DIGIT_WORDS[k])
                    .replace("{d}", &k.to_string())
            }
            Captions::PerImage(texts) => texts[label as usize].clone(),
        }
    }

    /// Every caption this source can give (what a tokenizer learned from captions must cover).
    pub fn all(&self) -> Vec<String> {
        match self {
            Captions::MnistTemplates => (0..10u32)
                .flat_map(|k| (0..MNIST_TEMPLATES.len() as u32).map(move |c| (k, c)))
                .map(|(k, c)| self.caption(k, c))
                .collect(),
            Captions::PerImage(texts) => texts.clone(),
        }
    }
}

/// One caption per image from a folder's `metadata.jsonl`, in the order of `files` (paths
/// relative to the folder, `/`-separated): the rows' `file_name` must cover every image. Errors
/// name the line.
pub fn read_metadata_jsonl(text: &str, files: &[String]) -> Result<Vec<String>, String> {
    let mut by_file = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("metadata.jsonl line {}: not JSON ({e})", i + 1))?;
        let field = |k: &str| {
            row.get(k).and_then(|v| v.as_str()).ok_or_else(|| {
                format!(
                    "metadata.jsonl line {}: no string `{k}` (each row needs `file_name` and `text`)",
                    i + 1
                )
            })
        };
        let (file, caption) = (field("file_name")?, field("text")?);
        by_file.insert(
            file.trim_start_matches("./").to_string(),
            caption.to_string(),
        );
    }
    files
        .iter()
        .map(|f| {
            by_file.get(f).cloned().ok_or_else(|| {
                format!("metadata.jsonl has no row for `{f}`: every image needs a caption")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_templates_name_the_digit() {
        let c = Captions::MnistTemplates;
        assert_eq!(c.caption(7, 0), "a handwritten seven");
        assert_eq!(c.caption(7, 1), "the digit 7");
        assert_eq!(c.caption(3, 7), "the digit 3");
        assert_eq!(c.all().len(), 60);
    }

    #[test]
    fn metadata_rows_cover_every_image() {
        let text = "{\"file_name\": \"a.png\", \"text\": \"a cat\"}\n\n{\"file_name\": \"./b/c.png\", \"text\": \"a dog\"}\n";
        let files = ["b/c.png".to_string(), "a.png".to_string()];
        assert_eq!(
            read_metadata_jsonl(text, &files).unwrap(),
            ["a dog", "a cat"]
        );
        let missing = read_metadata_jsonl(text, &["d.png".into()]).unwrap_err();
        assert!(missing.contains("`d.png`"), "{missing}");
        let bad = read_metadata_jsonl("{\"file_name\": 3}", &files).unwrap_err();
        assert!(bad.contains("line 1") && bad.contains("file_name"), "{bad}");
    }
}
