//! Copies and dead weight that once crept in: a WGSL helper written again in another shader
//! (shared pieces live once in `shaders/include/`), a citation of a design file that is not in
//! the repository (the code cites docs/ARCHITECTURE.md), and a dependency nothing uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// Names of the functions a WGSL source defines that are not `@compute` entry points.
fn wgsl_helpers(src: &str) -> Vec<String> {
    let lines: Vec<&str> = src.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix("fn ") else {
            continue;
        };
        let entry = i > 0 && lines[i - 1].trim_start().starts_with("@compute");
        if !entry {
            out.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    out
}

#[test]
fn the_helper_finder_skips_entry_points() {
    let src = "fn a() {}\n@compute @workgroup_size(64)\nfn b() {}\nfn c() {}";
    assert_eq!(wgsl_helpers(src), vec!["a", "c"]);
}

#[test]
fn no_wgsl_helper_is_written_twice() {
    let mut shaders = Vec::new();
    files(&root().join("shaders"), "wgsl", &mut shaders);
    let mut defined: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in &shaders {
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        for f in wgsl_helpers(&std::fs::read_to_string(path).unwrap()) {
            defined.entry(f).or_default().push(name.clone());
        }
    }
    let twice: Vec<String> = defined
        .iter()
        .filter(|(_, at)| at.len() > 1)
        .map(|(f, at)| format!("`{f}` in {}", at.join(", ")))
        .collect();
    assert!(
        twice.is_empty(),
        "WGSL helpers defined in several shaders (put one copy in shaders/include/ and `//#include` it):\n{}",
        twice.join("\n")
    );
}

#[test]
fn nothing_cites_a_design_file_outside_the_repository() {
    let mut sources = Vec::new();
    for (dir, ext) in [
        ("src", "rs"),
        ("shaders", "wgsl"),
        ("tests", "rs"),
        ("docs", "md"),
    ] {
        files(&root().join(dir), ext, &mut sources);
    }
    sources.push(root().join("README.md"));
    let needle = ["DESIGN", ".md"].concat();
    let citing: Vec<String> = sources
        .iter()
        .filter(|p| std::fs::read_to_string(p).unwrap().contains(&needle))
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        citing.is_empty(),
        "these cite {needle}, which is not in the repository (cite docs/ARCHITECTURE.md): {citing:?}"
    );
}

#[test]
fn every_dependency_is_used_by_the_library_or_binary() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    let mut code = String::new();
    let mut src = Vec::new();
    files(&root().join("src"), "rs", &mut src);
    for p in src {
        code.push_str(&std::fs::read_to_string(p).unwrap());
    }
    let unused: Vec<String> = deps
        .lines()
        .filter_map(|l| l.split('=').next())
        .map(|name| name.trim().replace('-', "_"))
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .filter(|name| !code.contains(&format!("{name}::")))
        .collect();
    assert!(
        unused.is_empty(),
        "dependencies src/ never uses (drop them, or move them to [dev-dependencies]): {unused:?}"
    );
}
