//! The layering rules of docs/ARCHITECTURE.md, "Layers and what each may import", checked on the
//! source text: no import circle among the files of `src/`, each layer imports only the layers
//! below it, `src/sample` never reaches `crate::train`, and the f64 references (`crate::reference`)
//! are the tests' oracle only: nothing outside `tests/` and `#[cfg(test)]` code imports them.
//!
//! A reference is any path `crate::a::b…`, `super::a…`, `self::a…` or, in a `mod.rs`, `child::…`
//! (imports and qualified uses alike, inside `use` groups too). It is resolved to the deepest file
//! module it names; `#[cfg(test)]` items and comments are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules and the top-level modules each may import (besides itself).
const LAYERS: &[(&str, &[&str])] = &[
    ("rng", &[]),
    ("diffusion", &[]),
    ("data", &[]),
    ("metrics", &[]),
    ("progress", &[]),
    ("dist", &[]),
    ("text", &[]),
    ("gpu", &[]),
    ("ops", &["gpu", "diffusion", "rng"]),
    ("nn", &["gpu", "ops", "rng", "diffusion"]),
    ("io", &["nn", "diffusion", "gpu", "data"]),
    (
        "sample",
        &[
            "text",
            "io",
            "nn",
            "ops",
            "gpu",
            "diffusion",
            "data",
            "rng",
            "metrics",
        ],
    ),
    (
        "train",
        &[
            "text",
            "sample",
            "io",
            "nn",
            "ops",
            "gpu",
            "diffusion",
            "data",
            "rng",
            "metrics",
            "progress",
            "dist",
        ],
    ),
    ("reference", &["rng", "diffusion", "data"]),
    (
        "bench",
        &[
            "text",
            "train",
            "sample",
            "io",
            "nn",
            "ops",
            "gpu",
            "diffusion",
            "data",
            "rng",
            "dist",
        ],
    ),
    ("cli", &["*"]),
    ("robustness", &["*"]),
];

/// A source file: its module path (`["ops", "gemm"]`) and whether it is a `mod.rs`/`lib.rs`.
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    is_dir_module: bool,
    text: String,
    /// `pub use` paths of a `mod.rs` whose last name its own code uses too (so they are imports).
    used_reexports: Vec<Vec<String>>,
}

fn collect(dir: &Path, src_root: &Path, out: &mut Vec<SourceFile>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, src_root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(src_root).unwrap();
            let mut module: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            let last = module.last().unwrap().clone();
            let is_dir_module = last == "mod" || last == "lib";
            if is_dir_module {
                module.pop();
            }
            if last == "main" && module.len() == 1 {
                continue; // the binary: a crate of its own, on top of everything
            }
            let mut text =
                strip_test_items(&strip_comments(&std::fs::read_to_string(&path).unwrap()));
            let mut reexports = Vec::new();
            if is_dir_module {
                (text, reexports) = strip_reexports(&text);
            }
            let used_reexports = reexports
                .into_iter()
                .filter(|p: &Vec<String>| {
                    let name = p.last().unwrap();
                    text.match_indices(name.as_str()).any(|(at, _)| {
                        let before = text[..at].chars().next_back();
                        let after = text[at + name.len()..].chars().next();
                        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
                    })
                })
                .collect();
            out.push(SourceFile {
                path: path.clone(),
                module,
                is_dir_module,
                text,
                used_reexports,
            });
        }
    }
}

/// Removes `//` and `/* */` comments and the contents of string literals (which may hold `::`).
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // A raw string r#"…"# is rare in src/; a plain string skips escaped quotes.
            out.push('"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // a char literal such as '{' must not count as a brace
            out.push_str("' '");
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            let end = src[i + 2..].find('\'').map_or(b.len(), |e| i + 3 + e);
            out.push_str("' '");
            i = end;
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Drops every item that follows `#[cfg(test)]`: up to its matching closing brace, or its `;`.
fn strip_test_items(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let brace = after.find('{');
        let semi = after.find(';');
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => s + 1,
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, Some(s)) => s + 1,
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Drops `pub use …;` and `pub(crate) use …;`: a `mod.rs` that re-exports its children's items
/// is their facade, not their user. Its own code must still not use them (that would be a
/// circle, since the children import what the `mod.rs` defines), and children import each other
/// by their own paths (`super::plan::Recorder`), never through the facade.
fn strip_reexports(src: &str) -> (String, Vec<Vec<String>>) {
    let mut out = String::with_capacity(src.len());
    let mut paths_out = Vec::new();
    let mut rest = src;
    loop {
        let at = [rest.find("pub use "), rest.find("pub(crate) use ")]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = at else { break };
        out.push_str(&rest[..at]);
        let end = rest[at..].find(';').map_or(rest.len(), |e| at + e + 1);
        let stmt = &rest[at..end];
        let body = &stmt[stmt.find("use ").unwrap() + 4..];
        paths_out.extend(paths(body));
        rest = &rest[end..];
    }
    out.push_str(rest);
    (out, paths_out)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path of at least two segments in `text`, with `use a::{b, c::d}` groups expanded.
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_word =
            is_ident(chars[i]) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':'));
        if !starts_word {
            i += 1;
            continue;
        }
        let (segments, end) = read_path(&chars, i, Vec::new(), &mut found);
        if segments.len() >= 2 {
            found.push(segments);
        }
        i = end.max(i + 1);
    }
    found
}

/// Reads `a::b::c` or `a::b::{…}` from `i`; group members are pushed to `found` with the prefix.
fn read_path(
    chars: &[char],
    mut i: usize,
    mut prefix: Vec<String>,
    found: &mut Vec<Vec<String>>,
) -> (Vec<String>, usize) {
    loop {
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        if i == start {
            return (prefix, i);
        }
        prefix.push(chars[start..i].iter().collect());
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        if j + 1 < chars.len() && chars[j] == ':' && chars[j + 1] == ':' {
            j += 2;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if j < chars.len() && chars[j] == '{' {
                // a group: each member continues the prefix
                j += 1;
                loop {
                    while j < chars.len() && (chars[j].is_whitespace() || chars[j] == ',') {
                        j += 1;
                    }
                    if j >= chars.len() || chars[j] == '}' {
                        return (Vec::new(), j + 1);
                    }
                    let (member, end) = read_path(chars, j, prefix.clone(), found);
                    if !member.is_empty() {
                        found.push(member);
                    }
                    j = end.max(j + 1);
                    // skip `as alias`
                    while j < chars.len() && !matches!(chars[j], ',' | '}') {
                        j += 1;
                    }
                }
            }
            i = j;
        } else {
            return (prefix, i);
        }
    }
}

/// The file module that `path` (as written in `file`) names, if it names one of the crate's.
fn resolve(
    file: &SourceFile,
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut base: Vec<String> = match path[0].as_str() {
        "crate" => Vec::new(),
        "super" => file.module[..file.module.len().saturating_sub(1)].to_vec(),
        "self" => file.module.clone(),
        first if file.is_dir_module => {
            // `child::x` inside a mod.rs names a child module (a crate or a type otherwise)
            let mut child = file.module.clone();
            child.push(first.to_string());
            if !modules.contains(&child) {
                return None;
            }
            file.module.clone()
        }
        _ => return None,
    };
    let skip = if matches!(path[0].as_str(), "crate" | "super" | "self") {
        1
    } else {
        0
    };
    let mut deepest = if path[0] == "crate" {
        None
    } else {
        Some(base.clone())
    };
    for seg in &path[skip..] {
        base.push(seg.clone());
        if modules.contains(&base) {
            deepest = Some(base.clone());
        } else {
            break;
        }
    }
    deepest
}

fn layer_of(module: &[String]) -> String {
    let top = module.first().map(String::as_str).unwrap_or("");
    if top.starts_with("cli_") {
        "cli".into()
    } else {
        top.into()
    }
}

struct Graph {
    files: Vec<SourceFile>,
    /// file index -> files it references, with the path that does it
    edges: Vec<BTreeMap<usize, String>>,
}

fn graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    graph_of(files)
}

fn graph_of(files: Vec<SourceFile>) -> Graph {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let index: BTreeMap<Vec<String>, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.module.clone(), i))
        .collect();
    let mut edges = vec![BTreeMap::new(); files.len()];
    for (i, file) in files.iter().enumerate() {
        for path in paths(&file.text).iter().chain(&file.used_reexports) {
            if let Some(target) = resolve(file, path, &modules) {
                let j = index[&target];
                if j != i && !target.is_empty() {
                    edges[i].entry(j).or_insert_with(|| path.join("::"));
                }
            }
        }
    }
    Graph { files, edges }
}

fn name(f: &SourceFile) -> String {
    f.path
        .strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn path_parser_reads_groups_and_relative_paths() {
    let text = "use crate::{gpu::{Gpu, Tensor}, ops::gemm as g};\nlet x = super::conv2d::tile(1);";
    let p = paths(text);
    let joined: Vec<String> = p.iter().map(|s| s.join("::")).collect();
    assert!(
        joined.contains(&"crate::gpu::Gpu".to_string()),
        "{joined:?}"
    );
    assert!(
        joined.contains(&"crate::ops::gemm".to_string()),
        "{joined:?}"
    );
    assert!(
        joined.contains(&"super::conv2d::tile".to_string()),
        "{joined:?}"
    );
    let stripped =
        strip_test_items("a\n#[cfg(test)]\nmod tests { use crate::reference::x; { } }\nb");
    assert!(!stripped.contains("reference"), "{stripped}");
    assert!(stripped.contains('b'));
}

/// Tarjan's strongly connected components of the file graph with two or more files: the circles.
fn strongly_connected(g: &Graph) -> Vec<Vec<usize>> {
    struct Tarjan<'a> {
        g: &'a Graph,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        found: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in self.g.edges[v].keys() {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    self.found.push(comp);
                }
            }
        }
    }
    let n = g.files.len();
    let mut t = Tarjan {
        g,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    t.found
}

#[test]
fn a_planted_circle_is_found() {
    let file = |module: &[&str], text: &str| SourceFile {
        path: Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("src/{}.rs", module.join("/"))),
        module: module.iter().map(|m| m.to_string()).collect(),
        is_dir_module: false,
        text: text.to_string(),
        used_reexports: Vec::new(),
    };
    let g = graph_of(vec![
        file(&["ops"], "pub mod gemm;"),
        file(&["ops", "gemm"], "use super::conv2d::SUBGROUP_ROW_BLOCKS;"),
        file(&["ops", "conv2d"], "use super::pack::pack_nhwc;"),
        file(&["ops", "pack"], "use crate::ops::gemm::MatRef;"),
        file(&["ops", "reduce"], "use crate::gpu::Tensor;"),
    ]);
    let circles = strongly_connected(&g);
    assert_eq!(circles.len(), 1, "{circles:?}");
    assert_eq!(circles[0].len(), 3, "{circles:?}");
}

#[test]
fn no_import_circle_among_src_files() {
    let g = graph();
    let circles = strongly_connected(&g);
    let report: Vec<String> = circles
        .iter()
        .map(|comp| {
            let set: BTreeSet<usize> = comp.iter().copied().collect();
            let mut lines = Vec::new();
            for &v in comp {
                for (w, via) in &g.edges[v] {
                    if set.contains(w) {
                        lines.push(format!(
                            "  {} -> {} ({via})",
                            name(&g.files[v]),
                            name(&g.files[*w])
                        ));
                    }
                }
            }
            lines.join("\n")
        })
        .collect();
    assert!(
        report.is_empty(),
        "import circles among src/ files:\n{}",
        report.join("\n\n")
    );
}

#[test]
fn each_layer_imports_only_the_layers_below_it() {
    let g = graph();
    let allowed: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    let mut bad = Vec::new();
    for (i, file) in g.files.iter().enumerate() {
        let from = layer_of(&file.module);
        if from.is_empty() {
            continue; // lib.rs declares the modules
        }
        let Some(may) = allowed.get(from.as_str()) else {
            bad.push(format!(
                "{}: module `{from}` has no row in LAYERS (tests/layering.rs) nor in docs/ARCHITECTURE.md",
                name(file)
            ));
            continue;
        };
        for (j, via) in &g.edges[i] {
            let to = layer_of(&g.files[*j].module);
            if to == from || may.contains(&"*") && to != "reference" {
                continue;
            }
            if !may.contains(&to.as_str()) {
                bad.push(format!(
                    "{} imports `{to}` ({via}): `{from}` may import {may:?}",
                    name(file)
                ));
            }
        }
    }
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn sampling_never_imports_training() {
    let g = graph();
    let mut bad = Vec::new();
    for (i, file) in g.files.iter().enumerate() {
        if file.module.first().is_some_and(|m| m == "sample") {
            for (j, via) in &g.edges[i] {
                if g.files[*j].module.first().is_some_and(|m| m == "train") {
                    bad.push(format!("{} -> {} ({via})", name(file), name(&g.files[*j])));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "src/sample imports crate::train:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_tests_import_the_f64_references() {
    let g = graph();
    let mut bad = Vec::new();
    for (i, file) in g.files.iter().enumerate() {
        if file.module.first().is_some_and(|m| m == "reference") {
            continue;
        }
        for (j, via) in &g.edges[i] {
            if g.files[*j].module.first().is_some_and(|m| m == "reference") {
                bad.push(format!("{} uses {via}", name(file)));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "product code imports the tests' f64 references (move what it needs out of src/reference):\n{}",
        bad.join("\n")
    );
}
