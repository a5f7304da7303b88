// A learned embedding table (torch nn.Embedding) added to activations: diffusers' class
// conditioning adds `class_embedding(class_labels)` to the time embedding (UNet2DModel with
// num_class_embeds and class_embed_type None).
//   embedding_add_forward:  out[b, j] += table[labels[b] - first, j]  (labels of this part)
//   embedding_backward:     d_table[k, j] += Σ_{b : labels[b] = k} d_out[b, j]
// The backward sums each table entry's batch rows in ascending b, one invocation per entry: a
// fixed order, no atomics, so the gradient is bit-reproducible.

struct Params {
    batch: u32,
    dim: u32,
    rows: u32,   // rows of `table` (number of classes)
    first: u32,  // the label of `table`'s first row: a table larger than one storage binding
                 // (CLIP's 49408 x 768 tokens) is read in parts, one dispatch per part
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;        // [rows, dim]
@group(0) @binding(3) var<storage, read_write> out: array<Elem3>;    // [batch, dim]
@group(0) @binding(4) var<storage, read> d_out: array<Elem4>;        // [batch, dim]
@group(0) @binding(5) var<storage, read_write> d_table: array<f32>; // [rows, dim]

@compute @workgroup_size(64)
fn embedding_add_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.batch * p.dim) { return; }
    let b = i / p.dim;
    let j = i % p.dim;
    // Labels are validated on the host; a label outside this part belongs to another part
    // (or to no row at all) and adds nothing here.
    let label = labels[b];
    if (label < p.first || label - p.first >= p.rows) { return; }
    out[i] = to_elem3(f32(out[i]) + table[(label - p.first) * p.dim + j]);
}

@compute @workgroup_size(64)
fn embedding_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.rows * p.dim) { return; }
    let k = i / p.dim;
    let j = i % p.dim;
    var acc = 0.0;
    for (var b = 0u; b < p.batch; b = b + 1u) {
        if (labels[b] == k) { acc = acc + f32(d_out[b * p.dim + j]); }
    }
    d_table[i] = d_table[i] + acc;
}
