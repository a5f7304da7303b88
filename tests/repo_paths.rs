//! Everything the README, the docs and the tools name must exist: each `--example NAME` an
//! `examples/NAME.rs`, each `--bench NAME` a `benches/NAME.rs`, each `tools/…` and `docs/…` path a
//! file or folder of this repository. (`examples/` was once deleted by an unrelated commit and
//! nothing noticed; `cargo build --all-targets` in CI builds what this test finds.)

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// What `text` names: (kind, name) with kind `example`, `bench` or `path`.
fn named(text: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (flag, kind) in [("--example ", "example"), ("--bench ", "bench")] {
        for (at, _) in text.match_indices(flag) {
            let name: String = text[at + flag.len()..]
                .chars()
                .take_while(|&c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                .collect();
            // `--example NAME` in prose names no example
            if !name.is_empty() && name.chars().any(|c| c.is_ascii_lowercase()) {
                out.push((kind, name));
            }
        }
    }
    for dir in ["tools/", "docs/"] {
        for (at, _) in text.match_indices(dir) {
            // `../shared/tools/…` and other folders' `tools/` are not ours
            if text[..at].chars().next_back().is_some_and(path_char) {
                continue;
            }
            let path: String = text[at..].chars().take_while(|&c| path_char(c)).collect();
            let path = path.trim_end_matches(['.', ',']).to_string();
            if path.len() > dir.len() {
                out.push(("path", path));
            }
        }
    }
    out
}

fn missing(text: &str, root: &Path) -> Vec<String> {
    named(text)
        .into_iter()
        .filter(|(kind, name)| match *kind {
            "example" => {
                !root.join("examples").join(format!("{name}.rs")).is_file()
                    && !root.join("examples").join(name).join("main.rs").is_file()
            }
            "bench" => !root.join("benches").join(format!("{name}.rs")).is_file(),
            _ => !root.join(name).exists(),
        })
        .map(|(kind, name)| format!("{kind} `{name}`"))
        .collect()
}

/// The files whose commands and paths users and CI follow.
fn sources() -> Vec<PathBuf> {
    let r = root();
    let mut files = vec![r.join("README.md"), r.join(".ci/run")];
    for dir in ["tools", "docs"] {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(r.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "sh" || e == "md" || e == "py")
            })
            .collect();
        entries.sort();
        files.extend(entries);
    }
    files
}

#[test]
fn a_missing_example_or_path_is_reported() {
    let text = "cargo run --release --example inpaint_digit -- runs/x\n\
                cargo bench --bench no_such_bench\n\
                see docs/ARCHITECTURE.md, tools/kill_soak.sh, tools/gone.sh and \
                ../shared/tools/lavapipe_probe/run.sh (not ours).";
    let got = missing(text, &root());
    assert_eq!(
        got,
        vec!["bench `no_such_bench`", "path `tools/gone.sh`"],
        "{got:?}"
    );
}

#[test]
fn everything_the_readme_tools_and_docs_name_exists() {
    let mut problems = Vec::new();
    for file in sources() {
        let text = std::fs::read_to_string(&file).unwrap();
        for m in missing(&text, &root()) {
            problems.push(format!(
                "{} names {m}, which does not exist",
                file.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
