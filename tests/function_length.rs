//! No function in `src/` runs past ~120 lines (a long function mixes concerns a reader has to
//! untangle: split it by what it does). `UNet::build` may stay long: it reads like diffusers'
//! own `UNet2DModel.__init__`, block by block.

use std::path::{Path, PathBuf};

const MAX_LINES: usize = 120;
/// (file, function) pairs allowed past the limit, with the reason above.
const ALLOWED: &[(&str, &str)] = &[("src/nn/unet.rs", "build")];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (name, first line, line count) of every `fn` with a body in `text`. Braces inside strings,
/// chars and comments are skipped.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        let Some(at) = find_fn_keyword(t) else {
            continue;
        };
        let name: String = t[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        if let Some(end) = body_end(&lines, i) {
            found.push((name, i + 1, end - i + 1));
        }
    }
    found
}

/// Where `fn ` starts as an item keyword in a trimmed line (after `pub`, `async`, … or at the
/// start), if it does.
fn find_fn_keyword(t: &str) -> Option<usize> {
    let mut rest = t;
    let mut offset = 0;
    loop {
        if rest.starts_with("fn ") {
            return Some(offset);
        }
        let word_end = rest.find(' ')?;
        let word = &rest[..word_end];
        let qualifier = word.starts_with("pub")
            || matches!(word, "const" | "async" | "unsafe" | "extern" | "default");
        if !qualifier {
            return None;
        }
        offset += word_end + 1;
        rest = &rest[word_end + 1..];
    }
}

/// The line of the brace closing the body that opens at or after line `start`; None for a
/// declaration without a body (`fn f();` in a trait).
fn body_end(lines: &[&str], start: usize) -> Option<usize> {
    let mut depth = 0i64;
    let mut opened = false;
    for (j, line) in lines.iter().enumerate().skip(start) {
        let mut chars = line.chars().peekable();
        let mut in_str = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' if in_str => {
                    chars.next();
                }
                '"' => in_str = !in_str,
                '/' if !in_str && chars.peek() == Some(&'/') => break,
                '\'' if !in_str => {
                    // a char literal such as '{' (lifetimes have no closing quote nearby)
                    let ahead: String = chars.clone().take(3).collect();
                    if ahead.len() >= 2 && ahead.chars().nth(1) == Some('\'') {
                        chars.next();
                        chars.next();
                    }
                }
                '{' if !in_str => {
                    depth += 1;
                    opened = true;
                }
                '}' if !in_str => {
                    depth -= 1;
                    if opened && depth == 0 {
                        return Some(j);
                    }
                }
                ';' if !in_str && !opened => return None,
                _ => {}
            }
        }
    }
    None
}

#[test]
fn the_measure_counts_a_body() {
    let text = "pub(crate) fn short() {\n    let s = \"}\";\n    let c = '{';\n}\n\nfn decl();\n";
    assert_eq!(functions(text), vec![("short".to_string(), 1, 4)]);
}

#[test]
fn no_function_in_src_is_over_120_lines() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut long = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        for (name, line, count) in functions(&text) {
            if count > MAX_LINES && !ALLOWED.contains(&(rel.as_str(), name.as_str())) {
                long.push(format!("{rel}:{line} `{name}` is {count} lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_LINES} lines (split them by what they do):\n{}",
        long.join("\n")
    );
}
