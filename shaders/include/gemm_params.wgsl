// The uniform block of every GEMM-shaped kernel (gemm.wgsl and gemm_subgroup.wgsl: the GEMM and
// the three conv2d passes); mirrors `GemmParams` in src/ops/tiles.rs field for field.
struct Params {
    m: u32, n: u32, k: u32, batch_inner: u32,
    a_offset: u32, a_ld: u32, a_batch_outer: u32, a_batch_inner: u32,
    b_offset: u32, b_ld: u32, b_batch_outer: u32, b_batch_inner: u32,
    c_offset: u32, c_ld: u32, c_batch_outer: u32, c_batch_inner: u32,
    trans_a: u32, trans_b: u32, has_bias: u32, k_chunk: u32,
    // bias_at: the subgroup backward-weight pass with has_bias writes Σ dy at this offset of
    // each output slice; the portable path sums the bias gradient separately and ignores it.
    // b_fold_taps: implicit conv, subgroup path: taps per column block of the packed weights
    // (pack_conv_weight folds a texture taller than the adapter allows at whole taps).
    alpha: f32, beta: f32, bias_at: u32, b_fold_taps: u32,
    // conv2d geometry (NHWC activations)
    batch: u32, in_h: u32, in_w: u32, in_c: u32,
    out_h: u32, out_w: u32, out_c: u32, kernel_h: u32,
    kernel_w: u32, stride: u32, pad_top: u32, pad_left: u32,
    // Implicit conv, subgroup path: A's NHWC texture folds each image row into a_fold_parts
    // texture rows of 2^a_fold_shift pixels (a_fold_parts <= 1: not folded; pack_nhwc_layout).
    a_fold_parts: u32, a_fold_shift: u32, _pad0: u32, _pad1: u32,
}
