//! Every kernel specialization the runtime can build: the list `tests/shaders.rs` validates with
//! naga. Apart from `ops/mod.rs` (whose helpers every op imports) so that no file of `ops` both
//! serves and imports the others.

use crate::gpu::{KernelKey, SHADERS, entry_points};

/// Every kernel specialization the runtime can build (validated by `tests/shaders.rs`): the
/// GEMM family with its tile constants and templates, and every entry point of the others.
pub fn all_kernel_keys() -> Vec<KernelKey> {
    let mut keys = super::tiles::kernel_keys();
    for (shader, src) in SHADERS {
        if *shader == "gemm" || *shader == "gemm_subgroup" {
            continue;
        }
        if *shader == "attention_subgroup" || *shader == "attention" {
            use super::attention::{FusedKernel, MAX_FUSED_HEAD_DIM, kernel_key};
            let kernels = if *shader == "attention" {
                vec![FusedKernel::Portable]
            } else {
                vec![
                    FusedKernel::Subgroup { lanes: 8 },
                    FusedKernel::Subgroup { lanes: 16 },
                ]
            };
            for kernel in kernels {
                for head_dim in (4..=MAX_FUSED_HEAD_DIM).step_by(4) {
                    keys.extend(
                        entry_points(src)
                            .into_iter()
                            .map(|e| kernel_key(e, kernel, head_dim)),
                    );
                }
            }
            continue;
        }
        if *shader == "pack" {
            for half in [false, true] {
                keys.extend(
                    entry_points(src)
                        .into_iter()
                        .map(|e| super::pack::pack_key(e, half)),
                );
            }
            continue;
        }
        if *shader == "softmax_subgroup" {
            for lanes in [8, 16] {
                keys.extend(
                    entry_points(src)
                        .into_iter()
                        .map(|e| KernelKey::new(shader, e).constant("LANES", lanes as f64)),
                );
            }
            continue;
        }
        keys.extend(
            entry_points(src)
                .into_iter()
                .map(|e| KernelKey::new(shader, e)),
        );
    }
    keys
}
