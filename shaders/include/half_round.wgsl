// f32 values rounded to the nearest f16 value, ties to even (torch's `.half()`), still as f32.
// Done by hand because the conversion a driver applies when storing to an rgba16float texture
// may truncate instead (lavapipe does), and WGSL leaves pack2x16float's rounding open; a value
// already representable in f16 converts exactly either way. Normal range: drop the 13 low
// mantissa bits with round-half-even; below 2^-14 (f16 subnormals): the nearest multiple of
// 2^-24. From 65520 on (halfway past f16's largest, 65504) the result is ±inf, as in torch:
// left to a truncating store it would become 65504, and an overflow would not reach the
// GradScaler as inf.
// Branch-free, four lanes at once (llvmpipe runs both sides of a branch anyway).
fn half_round4(v: vec4<f32>) -> vec4<f32> {
    let b = bitcast<vec4<u32>>(v);
    let normal = bitcast<vec4<f32>>((b + 0x0fffu + ((b >> vec4<u32>(13u)) & vec4<u32>(1u))) & vec4<u32>(0xffffe000u));
    let subnormal = round(v * 16777216.0) * 5.9604644775390625e-8;
    let infinite = bitcast<vec4<f32>>((b & vec4<u32>(0x80000000u)) | vec4<u32>(0x7f800000u));
    let finite = select(normal, subnormal, abs(v) < vec4<f32>(6.103515625e-5));
    return select(finite, infinite, abs(v) >= vec4<f32>(65520.0));
}
