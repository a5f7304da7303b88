//! The shader table and the pipeline cache.
//!
//! Every WGSL file is compiled into the binary. Pieces several shaders share (the GEMM uniform
//! block, `linear_index`, `sigmoid`, the workgroup `tree_sum`) live once in `shaders/include/`
//! and are pasted where a shader says `//#include NAME`. A few kernels are templates: loops that
//! must be fully unrolled into separate variables (the subgroup GEMM's register tile) are written
//! once with `//#for` blocks and expanded for the lane count in use (see [`expand_template`]);
//! anything an `override` constant can express is an `override` instead, so those files are
//! plain WGSL once their includes are pasted.
//! Pipelines are keyed by shader + entry point + template values + `override` constants + the
//! element types of the bound tensors, and are all created while a plan is recorded, before the
//! first step runs.
//!
//! Element types. A storage binding that may hold f16 tensors (half-precision activations) is
//! declared with the element type `ElemN` (`ElemNx2`, `ElemNx4` for vectors), N its binding
//! number; it reads as `f32(x[i])` and is written through `to_elemN(v)` (`to_elemNx4`). The
//! recorder sets each N's type from the tensor it binds (f32 or f16, see [`binding_prelude`]), so
//! the f16 variant of a kernel is the same source specialized, never a copy; a binding declared
//! `array<f32>` refuses an f16 tensor by name (`Gpu::check`), rather than reading its bytes
//! as f32.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every shader of the project: (name, WGSL source).
pub const SHADERS: &[(&str, &str)] = &[
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("gemm", include_str!("../../shaders/gemm.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    (
        "attention_subgroup",
        include_str!("../../shaders/attention_subgroup.wgsl"),
    ),
    (
        "gemm_subgroup",
        include_str!("../../shaders/gemm_subgroup.wgsl"),
    ),
    ("pack", include_str!("../../shaders/pack.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    ("group_norm", include_str!("../../shaders/group_norm.wgsl")),
    ("layer_norm", include_str!("../../shaders/layer_norm.wgsl")),
    ("gelu", include_str!("../../shaders/gelu.wgsl")),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    (
        "softmax_subgroup",
        include_str!("../../shaders/softmax_subgroup.wgsl"),
    ),
    ("upsample", include_str!("../../shaders/upsample.wgsl")),
    (
        "timestep_embedding",
        include_str!("../../shaders/timestep_embedding.wgsl"),
    ),
    ("loss", include_str!("../../shaders/loss.wgsl")),
    ("adamw", include_str!("../../shaders/adamw.wgsl")),
    (
        "grad_scaler",
        include_str!("../../shaders/grad_scaler.wgsl"),
    ),
    ("noise", include_str!("../../shaders/noise.wgsl")),
    ("diffusion", include_str!("../../shaders/diffusion.wgsl")),
    ("samplers", include_str!("../../shaders/samplers.wgsl")),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("posterior", include_str!("../../shaders/posterior.wgsl")),
];

/// The shared pieces a shader pulls in with `//#include NAME`: (NAME, WGSL).
pub const INCLUDES: &[(&str, &str)] = &[
    (
        "adamw_hyper",
        include_str!("../../shaders/include/adamw_hyper.wgsl"),
    ),
    (
        "attention_common",
        include_str!("../../shaders/include/attention_common.wgsl"),
    ),
    (
        "gemm_params",
        include_str!("../../shaders/include/gemm_params.wgsl"),
    ),
    (
        "group_index",
        include_str!("../../shaders/include/group_index.wgsl"),
    ),
    (
        "half_round",
        include_str!("../../shaders/include/half_round.wgsl"),
    ),
    (
        "linear_index",
        include_str!("../../shaders/include/linear_index.wgsl"),
    ),
    (
        "sigmoid",
        include_str!("../../shaders/include/sigmoid.wgsl"),
    ),
    (
        "tree_sum",
        include_str!("../../shaders/include/tree_sum.wgsl"),
    ),
];

/// Names of the `@compute` entry points of a WGSL source (the `fn` following each attribute).
pub fn entry_points(src: &'static str) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("@compute") {
        rest = &rest[i..];
        if let Some(f) = rest.find("fn ") {
            let name: &str = rest[f + 3..]
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            if !name.is_empty() {
                out.push(name);
            }
            rest = &rest[f + 3..];
        } else {
            break;
        }
    }
    out
}

pub fn shader_source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub shader: &'static str,
    pub entry: &'static str,
    /// Template values (for `//#for` / `{{…}}` expansion), sorted by name.
    pub template: Vec<(&'static str, i64)>,
    /// WGSL `override` constants, sorted by name (values as f64 bits).
    pub constants: Vec<(&'static str, u64)>,
    /// Bit N set: binding N holds an f16 tensor (its `ElemN` is `f16`). Set by the recorder
    /// from the tensors bound.
    pub f16_bindings: u32,
}

impl KernelKey {
    pub fn new(shader: &'static str, entry: &'static str) -> KernelKey {
        KernelKey {
            shader,
            entry,
            template: Vec::new(),
            constants: Vec::new(),
            f16_bindings: 0,
        }
    }
    pub fn template(mut self, name: &'static str, value: i64) -> Self {
        self.template.push((name, value));
        self.template.sort();
        self
    }
    pub fn constant(mut self, name: &'static str, value: f64) -> Self {
        self.constants.push((name, value.to_bits()));
        self.constants.sort();
        self
    }
    /// The WGSL after pasting its includes and expanding its template, behind the element
    /// types of its bindings ([`binding_prelude`]).
    pub fn source(&self) -> Result<String, String> {
        let src = shader_source(self.shader)
            .ok_or_else(|| format!("unknown shader `{}`", self.shader))?;
        let body = expand_template(src, &self.template)?;
        Ok(binding_prelude(&body, self.f16_bindings) + &body)
    }
    pub fn constants_f64(&self) -> Vec<(&'static str, f64)> {
        self.constants
            .iter()
            .map(|(n, v)| (*n, f64::from_bits(*v)))
            .collect()
    }
}

type ModuleKey = (&'static str, Vec<(&'static str, i64)>, u32);

pub struct Kernels {
    device: wgpu::Device,
    modules: Mutex<HashMap<ModuleKey, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<KernelKey, Arc<wgpu::ComputePipeline>>>,
}

impl Kernels {
    pub fn new(device: &wgpu::Device) -> Kernels {
        Kernels {
            device: device.clone(),
            modules: Default::default(),
            pipelines: Default::default(),
        }
    }

    pub fn pipeline(&self, key: &KernelKey) -> Arc<wgpu::ComputePipeline> {
        if let Some(p) = self.pipelines.lock().unwrap().get(key) {
            return p.clone();
        }
        let module = {
            let mk = (key.shader, key.template.clone(), key.f16_bindings);
            let mut modules = self.modules.lock().unwrap();
            modules
                .entry(mk)
                .or_insert_with(|| {
                    let src = key
                        .source()
                        .unwrap_or_else(|e| panic!("shader template: {e}"));
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(key.shader),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    };
                    if std::env::var_os("WGPU_DIFFUSION_UNCHECKED_SHADERS").is_some() {
                        // SAFETY: opt-in experiment; every op validates its indices before recording.
                        Arc::new(unsafe {
                            self.device.create_shader_module_trusted(
                                desc,
                                wgpu::ShaderRuntimeChecks::unchecked(),
                            )
                        })
                    } else {
                        Arc::new(self.device.create_shader_module(desc))
                    }
                })
                .clone()
        };
        let constants = key.constants_f64();
        let pipeline = Arc::new(self.device.create_compute_pipeline(
            &wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            },
        ));
        self.pipelines
            .lock()
            .unwrap()
            .insert(key.clone(), pipeline.clone());
        pipeline
    }

    pub fn pipeline_count(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    /// Every kernel key built so far (the specializations a run uses; recorded in checkpoints).
    pub fn keys(&self) -> Vec<KernelKey> {
        let mut k: Vec<_> = self.pipelines.lock().unwrap().keys().cloned().collect();
        k.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        k
    }
}

/// The declarations in front of an expanded shader `body` for the element types of its
/// storage bindings: for each binding N that `body` declares with `ElemN`, the aliases `ElemN`,
/// `ElemNx2`, `ElemNx4` and the stores `to_elemN`, `to_elemNx2`, `to_elemNx4` from f32 values.
/// With bit N of `f16_bindings` set they are `f16` and round to nearest, ties to even (torch's
/// `.half()`, overflow to ±inf, see `half_round.wgsl`: WGSL leaves the rounding of an f32 to
/// f16 conversion open), behind `enable f16;`; otherwise `f32` and the identity.
pub fn binding_prelude(body: &str, f16_bindings: u32) -> String {
    let mut out = String::new();
    if f16_bindings != 0 {
        out.push_str("enable f16;\n");
        if !body.contains("fn half_round4(") {
            let round = INCLUDES
                .iter()
                .find(|(n, _)| *n == "half_round")
                .map_or("", |(_, s)| *s);
            out.push_str(round);
            out.push('\n');
        }
    }
    for n in 0..32u32 {
        if !body.contains(&format!("Elem{n}>")) && !body.contains(&format!("Elem{n}x")) {
            continue;
        }
        let half = f16_bindings & (1 << n) != 0;
        let (t, v) = if half { ("f16", "h") } else { ("f32", "f") };
        out.push_str(&format!(
            "alias Elem{n} = {t};\nalias Elem{n}x2 = vec2{v};\nalias Elem{n}x4 = vec4{v};\n"
        ));
        for (suffix, ty, lanes) in [
            ("", "f32", 1),
            ("x2", "vec2<f32>", 2),
            ("x4", "vec4<f32>", 4),
        ] {
            let value = if !half {
                "v".to_string()
            } else {
                match lanes {
                    1 => "f16(half_round4(vec4<f32>(v)).x)".to_string(),
                    2 => "vec2h(half_round4(vec4<f32>(v, 0.0, 0.0)).xy)".to_string(),
                    _ => "vec4h(half_round4(v))".to_string(),
                }
            };
            out.push_str(&format!(
                "fn to_elem{n}{suffix}(v: {ty}) -> Elem{n}{suffix} {{ return {value}; }}\n"
            ));
        }
    }
    out
}

/// Whether every declaration of storage binding `n` in `shader` takes f16 tensors (is declared
/// with `ElemN`). A shader without such a declaration reads an f16 tensor's bytes as f32.
pub fn binding_takes_f16(shader: &str, n: u32) -> bool {
    let Some(src) = shader_source(shader) else {
        return false;
    };
    // The shader's own lines and those of the pieces it includes (declarations may live there).
    let included = src.lines().filter_map(|l| {
        let name = l.trim().strip_prefix("//#include ")?.trim();
        INCLUDES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
    });
    let tag = format!("@binding({n})");
    let mut declared = false;
    let lines = std::iter::once(src).chain(included).flat_map(str::lines);
    for line in lines.filter(|l| l.contains(&tag)) {
        if !(line.contains(&format!("Elem{n}>")) || line.contains(&format!("Elem{n}x"))) {
            return false;
        }
        declared = true;
    }
    declared
}

/// The bindings of `shader` that take f16 tensors, as a mask (bit N: binding N).
pub fn f16_capable_bindings(shader: &str) -> u32 {
    (0..32)
        .filter(|&n| binding_takes_f16(shader, n))
        .fold(0, |m, n| m | (1 << n))
}

/// Expands a WGSL template.
///
/// * `{{expr}}` is replaced by the integer value of `expr` (names from `vars` and loop
///   variables, integer literals, `+ - * / %` and parentheses).
/// * Lines between `//#for NAME in A..B` and the matching `//#end` are repeated for NAME in
///   A..B (A and B are expressions as above); blocks nest.
/// * Lines between `//#if EXPR` and the matching `//#end` are kept when EXPR is not zero
///   (`==` and `!=` compare two expressions, giving 1 or 0).
/// * `//#include NAME` is replaced by the piece NAME of [`INCLUDES`], itself expanded.
pub fn expand_template(src: &str, vars: &[(&str, i64)]) -> Result<String, String> {
    let lines: Vec<&str> = src.lines().collect();
    let mut env: Vec<(String, i64)> = vars.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    let mut out = String::with_capacity(src.len() * 4);
    expand_lines(&lines, &mut env, &mut out)?;
    Ok(out)
}

fn expand_lines(
    lines: &[&str],
    env: &mut Vec<(String, i64)>,
    out: &mut String,
) -> Result<(), String> {
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(name) = trimmed.strip_prefix("//#include ") {
            let name = name.trim();
            let piece = INCLUDES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| *s)
                .ok_or_else(|| format!("unknown include `{name}` (shaders/include/)"))?;
            let piece_lines: Vec<&str> = piece.lines().collect();
            expand_lines(&piece_lines, env, out)?;
            i += 1;
            continue;
        }
        if let Some(cond) = trimmed.strip_prefix("//#if ") {
            let j = matching_end(lines, i)?;
            if eval(cond.trim(), env)? != 0 {
                expand_lines(&lines[i + 1..j], env, out)?;
            }
            i = j + 1;
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("//#for ") {
            let (name, range) = rest
                .split_once(" in ")
                .ok_or_else(|| format!("bad //#for line: {trimmed}"))?;
            let (a, b) = range
                .split_once("..")
                .ok_or_else(|| format!("bad //#for range: {trimmed}"))?;
            let (a, b) = (eval(a.trim(), env)?, eval(b.trim(), env)?);
            let j = matching_end(lines, i)?;
            for v in a..b {
                env.push((name.trim().to_string(), v));
                expand_lines(&lines[i + 1..j], env, out)?;
                env.pop();
            }
            i = j + 1;
            continue;
        }
        substitute(lines[i], env, out)?;
        out.push('\n');
        i += 1;
    }
    Ok(())
}

/// Index of the `//#end` closing the `//#for` or `//#if` block that opens at line `open`.
fn matching_end(lines: &[&str], open: usize) -> Result<usize, String> {
    let mut depth = 1;
    for (j, line) in lines.iter().enumerate().skip(open + 1) {
        let t = line.trim_start();
        if t.starts_with("//#for ") || t.starts_with("//#if ") {
            depth += 1;
        } else if t.starts_with("//#end") {
            depth -= 1;
            if depth == 0 {
                return Ok(j);
            }
        }
    }
    Err(format!("block without //#end: {}", lines[open].trim()))
}

fn substitute(line: &str, env: &[(String, i64)], out: &mut String) -> Result<(), String> {
    let mut rest = line;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| format!("unclosed {{{{ in: {line}"))?
            + start;
        let v = eval(&rest[start + 2..end], env)?;
        out.push_str(&v.to_string());
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(())
}

/// Integer expression evaluator for templates (precedence climbing).
fn eval(expr: &str, env: &[(String, i64)]) -> Result<i64, String> {
    let tokens: Vec<char> = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let mut pos = 0;
    let mut v = eval_sum(&tokens, &mut pos, env)?;
    if pos + 1 < tokens.len() && matches!(tokens[pos], '=' | '!') && tokens[pos + 1] == '=' {
        let equal = tokens[pos] == '=';
        pos += 2;
        let r = eval_sum(&tokens, &mut pos, env)?;
        v = ((v == r) == equal) as i64;
    }
    if pos != tokens.len() {
        return Err(format!("trailing input in template expression `{expr}`"));
    }
    Ok(v)
}

fn eval_sum(t: &[char], p: &mut usize, env: &[(String, i64)]) -> Result<i64, String> {
    let mut v = eval_product(t, p, env)?;
    while *p < t.len() && (t[*p] == '+' || t[*p] == '-') {
        let op = t[*p];
        *p += 1;
        let r = eval_product(t, p, env)?;
        v = if op == '+' { v + r } else { v - r };
    }
    Ok(v)
}

fn eval_product(t: &[char], p: &mut usize, env: &[(String, i64)]) -> Result<i64, String> {
    let mut v = eval_atom(t, p, env)?;
    while *p < t.len() && matches!(t[*p], '*' | '/' | '%') {
        let op = t[*p];
        *p += 1;
        let r = eval_atom(t, p, env)?;
        v = match op {
            '*' => v * r,
            '/' => v.checked_div(r).ok_or("division by zero in template")?,
            _ => v.checked_rem(r).ok_or("division by zero in template")?,
        };
    }
    Ok(v)
}

fn eval_atom(t: &[char], p: &mut usize, env: &[(String, i64)]) -> Result<i64, String> {
    if *p >= t.len() {
        return Err("unexpected end of template expression".into());
    }
    if t[*p] == '(' {
        *p += 1;
        let v = eval_sum(t, p, env)?;
        if *p >= t.len() || t[*p] != ')' {
            return Err("missing ) in template expression".into());
        }
        *p += 1;
        return Ok(v);
    }
    let start = *p;
    while *p < t.len() && (t[*p].is_alphanumeric() || t[*p] == '_') {
        *p += 1;
    }
    let word: String = t[start..*p].iter().collect();
    if word.is_empty() {
        return Err(format!("unexpected `{}` in template expression", t[*p]));
    }
    if let Ok(n) = word.parse::<i64>() {
        return Ok(n);
    }
    env.iter()
        .rev()
        .find(|(n, _)| *n == word)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("unknown template name `{word}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_expands_nested_loops_and_expressions() {
        let src =
            "a\n//#for i in 0..N\n//#for j in 0..2\nx{{i*2+j}} = {{(i+1)%N}};\n//#end\n//#end\nb";
        let out = expand_template(src, &[("N", 2)]).unwrap();
        assert_eq!(out, "a\nx0 = 1;\nx1 = 1;\nx2 = 0;\nx3 = 0;\nb\n");
        assert!(expand_template("//#for i in 0..2\n", &[]).is_err());
        let conditional = "//#for i in 0..3\n//#if i % 2 == 0\ne{{i}}\n//#end\n//#if i != 0\nn{{i}}\n//#end\n//#end";
        assert_eq!(
            expand_template(conditional, &[]).unwrap(),
            "e0\nn1\ne2\nn2\n"
        );
        assert!(expand_template("//#if 1\n", &[]).is_err());
        assert!(expand_template("{{M}}", &[]).is_err());
    }

    #[test]
    fn binding_prelude_types_each_declared_binding_from_the_mask() {
        let body = "@group(0) @binding(1) var<storage, read> x: array<Elem1>;\n\
                    @group(0) @binding(3) var<storage, read_write> y: array<Elem3x4>;\n";
        let f32_only = binding_prelude(body, 0);
        assert!(!f32_only.contains("enable f16"), "{f32_only}");
        assert!(
            f32_only.contains("alias Elem1 = f32;") && f32_only.contains("alias Elem3x4 = vec4f;")
        );
        assert!(f32_only.contains("fn to_elem1(v: f32) -> Elem1 { return v; }"));
        assert!(
            !f32_only.contains("Elem2"),
            "undeclared bindings get nothing: {f32_only}"
        );
        let mixed = binding_prelude(body, 1 << 3);
        assert!(mixed.starts_with("enable f16;\n"), "{mixed}");
        assert!(mixed.contains("alias Elem1 = f32;") && mixed.contains("alias Elem3x4 = vec4h;"));
        assert!(
            mixed.contains("fn half_round4("),
            "f16 stores round explicitly: {mixed}"
        );
        assert!(mixed.contains("-> Elem3x4 { return vec4h(half_round4(v)); }"));
        assert!(binding_takes_f16("elementwise", 1) && binding_takes_f16("elementwise", 6));
        assert!(!binding_takes_f16("adamw", 1), "optimizer state stays f32");
        assert!(
            !binding_takes_f16("elementwise", 0),
            "the parameter block is no tensor"
        );
    }

    #[test]
    fn includes_are_pasted_and_unknown_ones_named() {
        let out = expand_template("a\n//#include sigmoid\nb", &[]).unwrap();
        assert!(
            out.starts_with("a\nfn sigmoid(") && out.ends_with("}\nb\n"),
            "{out}"
        );
        let e = expand_template("//#include nothing_like_it", &[]).unwrap_err();
        assert!(e.contains("nothing_like_it"), "{e}");
    }
}
