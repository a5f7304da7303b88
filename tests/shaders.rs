//! Every shader, with every specialization the runtime builds, parses and validates with naga
//! and translates to MSL (Metal) and HLSL (DX12) — the back ends CI cannot run. No GPU needed.

use wgpu_diffusion::gpu::{KernelKey, SHADERS, f16_capable_bindings};

fn validate(key: &KernelKey) {
    let src = key
        .source()
        .unwrap_or_else(|e| panic!("{key:?}: template: {e}"));
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{key:?}: {}", e.emit_to_string(&src)));
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    let info = validator
        .validate(&module)
        .unwrap_or_else(|e| panic!("{key:?}: {}", e.emit_to_string(&src)));
    let mut constants = naga::back::PipelineConstants::default();
    for (name, value) in key.constants_f64() {
        constants.insert(name.to_string(), value);
    }
    let entry = Some((naga::ShaderStage::Compute, key.entry));
    let (module, info) =
        naga::back::pipeline_constants::process_overrides(&module, &info, entry, &constants)
            .unwrap_or_else(|e| panic!("{key:?}: overrides: {e}"));
    let msl_pipeline = naga::back::msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, key.entry.to_string())),
        ..Default::default()
    };
    naga::back::msl::write_string(&module, &info, &Default::default(), &msl_pipeline)
        .unwrap_or_else(|e| panic!("{key:?}: MSL: {e}"));
    // DX12 has f16 from shader model 6.2 on (what wgpu asks for with SHADER_F16).
    let hlsl_options = naga::back::hlsl::Options {
        shader_model: if key.f16_bindings != 0 {
            naga::back::hlsl::ShaderModel::V6_2
        } else {
            naga::back::hlsl::ShaderModel::V6_0
        },
        ..Default::default()
    };
    let hlsl_pipeline = naga::back::hlsl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, key.entry.to_string())),
    };
    let mut out = String::new();
    naga::back::hlsl::Writer::new(&mut out, &hlsl_options, &hlsl_pipeline)
        .write(&module, &info, None)
        .unwrap_or_else(|e| panic!("{key:?}: HLSL: {e}"));
}

#[test]
fn every_kernel_specialization_validates_and_translates() {
    let keys = wgpu_diffusion::ops::variants::all_kernel_keys();
    let mut half = 0;
    for key in &keys {
        validate(key);
        // With f16 tensors at every binding that takes them: a module holds all of a shader's
        // entry points, so each must compile whatever the bound tensors' types.
        let f16_bindings = f16_capable_bindings(key.shader);
        if f16_bindings != 0 {
            validate(&KernelKey {
                f16_bindings,
                ..key.clone()
            });
            half += 1;
        }
    }
    // Every shader file is covered by at least one specialization.
    for (name, _) in SHADERS {
        assert!(
            keys.iter().any(|k| k.shader == *name),
            "shader `{name}` has no kernel key in ops::variants::all_kernel_keys()"
        );
    }
    eprintln!(
        "validated {} kernel specializations, {half} of them also with f16 bindings",
        keys.len()
    );
}

/// Templates are for what an `override` cannot express (register tiles unrolled into separate
/// variables, binding types); every other shader is plain WGSL once its `//#include`s are
/// pasted, and validates with no template values.
#[test]
fn only_register_tile_kernels_are_templates() {
    // pack: its texture's format (rgba32float or, for half-precision operands, rgba16float).
    const TEMPLATES: [&str; 4] = ["gemm_subgroup", "attention_subgroup", "attention", "pack"];
    for (name, src) in SHADERS {
        let templated = src.contains("//#for") || src.contains("//#if") || src.contains("{{");
        if TEMPLATES.contains(name) {
            assert!(
                templated,
                "`{name}` is plain WGSL now: drop it from TEMPLATES"
            );
            continue;
        }
        assert!(
            !templated,
            "shader `{name}` uses template syntax: use an `override` constant (or add it to TEMPLATES if it unrolls a register tile)"
        );
        for entry in wgpu_diffusion::gpu::entry_points(src) {
            validate(&KernelKey::new(name, entry));
        }
    }
}
