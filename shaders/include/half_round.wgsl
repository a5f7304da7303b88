// f32 values rounded to the nearest f16 value, ties to even (torch's `.half()`), still as f32.
// Done by hand because the conversion a driver applies when storing to an rgba16float texture
// may truncate instead (lavapipe does), and WGSL leaves pack2x16float's rounding open; a value
// already representable in f16 converts exactly either way. Normal range: drop the 13 low
// mantissa bits with round-half-even; below 2^-14 (f16 subnormals): the nearest multiple of
// 2^-24. Out of f16's range (past 65504) the store's own overflow rule applies.
// Branch-free, four lanes at once (llvmpipe runs both sides of a branch anyway).
fn half_round4(v: vec4<f32>) -> vec4<f32> {
    let b = bitcast<vec4<u32>>(v);
    let normal = bitcast<vec4<f32>>((b + 0x0fffu + ((b >> vec4<u32>(13u)) & vec4<u32>(1u))) & vec4<u32>(0xffffe000u));
    let subnormal = round(v * 16777216.0) * 5.9604644775390625e-8;
    return select(normal, subnormal, abs(v) < vec4<f32>(6.103515625e-5));
}
