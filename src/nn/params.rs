//! All parameters in one flat buffer (and gradients, AdamW moments and EMA weights in buffers of
//! the same layout), each parameter a view at an offset aligned for binding. One dispatch then
//! updates or reduces everything (AdamW, EMA, gradient norm).
//!
//! A store built for sampling (inside `gpu::no_grad`) keeps no gradient buffer, and when the
//! model is larger than one buffer of the adapter (SD 1.5's U-Net is 3.4 GB; lavapipe's buffers
//! end at 2 GiB) its values are split over several buffers at parameter boundaries: the flat
//! layout (offsets) is the same, only where a parameter's view lives differs.

use std::collections::HashMap;
use std::sync::Arc;

use crate::gpu::{Gpu, GpuError, Tensor, grad_enabled};

/// A named parameter: diffusers' state-dict name and torch shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset in the flat buffers, in elements.
    pub offset: usize,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Parameter views must start at a multiple of 256 bytes (the usual
/// min_storage_buffer_offset_alignment); padding elements stay zero and receive zero gradients.
pub const PARAM_ALIGN: usize = 64;

#[derive(Clone)]
pub struct ParamStore {
    pub specs: Vec<ParamSpec>,
    index: HashMap<String, usize>,
    /// Total elements including alignment padding.
    pub len: usize,
    /// (offset, length) ranges covering the flat buffers, each within the adapter's storage
    /// binding limit and starting at a parameter: whole-model ops (AdamW, EMA, the gradient
    /// norm) run once per range, so models larger than one binding (cifar32 on lavapipe's
    /// 128 MiB) still train.
    pub chunks: Vec<(usize, usize)>,
    /// The values: (first layout offset, buffer) per segment; one segment unless a sampling
    /// store outgrew one buffer (see the module note).
    segments: Vec<(usize, Tensor)>,
    /// The gradients (no storage in a sampling store: `Gpu::grad_tensor`).
    pub grads: Tensor,
}

/// Splits a layout of `len` elements into runs of whole parameters of at most `max` elements
/// each: (first offset, length) per run.
fn segment_layout(
    specs: &[ParamSpec],
    len: usize,
    max: usize,
) -> Result<Vec<(usize, usize)>, String> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, sp) in specs.iter().enumerate() {
        let end = specs.get(i + 1).map_or(len, |next| next.offset);
        let padded = end - sp.offset;
        if padded > max {
            return Err(format!(
                "parameter `{}` ({} values) exceeds this adapter's largest buffer ({max} floats)",
                sp.name,
                sp.numel()
            ));
        }
        match runs.last_mut() {
            Some((_, l)) if *l + padded <= max => *l += padded,
            _ => runs.push((sp.offset, padded)),
        }
    }
    Ok(runs)
}

impl ParamStore {
    pub fn new(
        gpu: &Arc<Gpu>,
        named_shapes: &[(String, Vec<usize>)],
    ) -> Result<ParamStore, GpuError> {
        Self::with_frozen(gpu, named_shapes, &[])
    }

    /// As [`ParamStore::new`], with `frozen` parameters (torch's `requires_grad=False`, e.g. a
    /// fourier embedding's random weights) laid out after all the others and outside every
    /// chunk: AdamW, the EMA and the gradient norm never touch them, so they keep their loaded
    /// values exactly (their EMA copy stays what it was initialised to).
    pub fn with_frozen(
        gpu: &Arc<Gpu>,
        named_shapes: &[(String, Vec<usize>)],
        frozen: &[(String, Vec<usize>)],
    ) -> Result<ParamStore, GpuError> {
        let align = PARAM_ALIGN.max(gpu.limits.min_storage_buffer_offset_alignment as usize / 4);
        let mut specs = Vec::with_capacity(named_shapes.len() + frozen.len());
        let mut offset = 0;
        for (name, shape) in named_shapes.iter().chain(frozen) {
            specs.push(ParamSpec {
                name: name.clone(),
                shape: shape.clone(),
                offset,
            });
            offset += shape.iter().product::<usize>().next_multiple_of(align);
        }
        let max_binding = (gpu.limits.max_storage_buffer_binding_size as usize / 4) / align * align;
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        for sp in &specs[..named_shapes.len()] {
            let len = sp.numel().next_multiple_of(align);
            if len > max_binding && !grad_enabled() {
                // Sampling: no AdamW, EMA or gradient norm runs over chunks; the ops that
                // read a large parameter (CLIP's token table) take it in parts.
                chunks.clear();
                break;
            }
            if len > max_binding {
                return Err(GpuError::Invalid(format!(
                    "parameter `{}` ({} values) exceeds this adapter's storage binding limit of {max_binding} floats",
                    sp.name,
                    sp.numel()
                )));
            }
            match chunks.last_mut() {
                Some((_, l)) if *l + len <= max_binding => *l += len,
                _ => chunks.push((sp.offset, len)),
            }
        }
        let index = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        // Training keeps one buffer (AdamW, EMA and checkpoints address the whole layout); a
        // sampling store may be split (see the module note).
        let segments = if grad_enabled() || offset * 4 <= gpu.limits.max_buffer_size as usize {
            vec![(0, gpu.tensor(&[offset], "parameters"))]
        } else {
            let max = (gpu.limits.max_buffer_size as usize / 4) / align * align;
            segment_layout(&specs, offset, max)
                .map_err(GpuError::Invalid)?
                .into_iter()
                .enumerate()
                .map(|(i, (start, l))| (start, gpu.tensor(&[l], &format!("parameters {i}"))))
                .collect()
        };
        Ok(ParamStore {
            specs,
            index,
            len: offset,
            chunks,
            segments,
            grads: gpu.grad_tensor(&[offset], "gradients"),
        })
    }

    /// The one buffer of the values. Every store is one buffer except a sampling store larger
    /// than the adapter's largest buffer, which only the model itself ([`get`](Self::get)) and
    /// [`write_values`](Self::write_values) address.
    pub fn params(&self) -> &Tensor {
        match self.segments.as_slice() {
            [(_, one)] => one,
            _ => panic!("a parameter store split over buffers has no single buffer"),
        }
    }

    /// Uploads `flat` (the whole layout) into the value buffers.
    pub fn write_values(&self, gpu: &Gpu, flat: &[f32]) -> Result<(), GpuError> {
        if flat.len() != self.len {
            return Err(GpuError::Invalid(format!(
                "{} parameter values given for a layout of {}",
                flat.len(),
                self.len
            )));
        }
        for (start, t) in &self.segments {
            gpu.write(t, &flat[*start..start + t.numel()])?;
        }
        Ok(())
    }

    /// The buffers holding the values (one but for a split sampling store).
    pub fn value_buffers(&self) -> Vec<Tensor> {
        self.segments.iter().map(|(_, t)| t.clone()).collect()
    }

    /// The segment holding layout offset `offset`: (its first offset, its buffer).
    fn segment(&self, offset: usize) -> &(usize, Tensor) {
        let i = self.segments.partition_point(|(start, _)| *start <= offset);
        &self.segments[i - 1]
    }

    /// One store holding `first`'s parameters at their own offsets, then `second`'s at
    /// `first.len` + theirs (names must differ: a jointly trained text encoder's carry a prefix).
    /// Either part's layout is thus a contiguous range of the joint one, so its values copy in
    /// and out as one range. `first`'s chunks are kept; `second`'s are shifted and kept when
    /// `second_trainable`, otherwise its parameters stay frozen (outside every chunk: AdamW,
    /// EMA and the gradient norm never touch them). New zeroed buffers; the parts' own are not
    /// shared.
    pub fn concat(
        gpu: &Arc<Gpu>,
        first: &ParamStore,
        second: &ParamStore,
        second_trainable: bool,
    ) -> Result<ParamStore, GpuError> {
        let shifted = second.specs.iter().map(|s| ParamSpec {
            offset: s.offset + first.len,
            ..s.clone()
        });
        let specs: Vec<ParamSpec> = first.specs.iter().cloned().chain(shifted).collect();
        let mut index = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            if index.insert(s.name.clone(), i).is_some() {
                return Err(GpuError::Invalid(format!(
                    "parameter `{}` is declared by both models of a joint store",
                    s.name
                )));
            }
        }
        let mut chunks = first.chunks.clone();
        if second_trainable {
            chunks.extend(second.chunks.iter().map(|&(o, l)| (o + first.len, l)));
        }
        let len = first.len + second.len;
        Ok(ParamStore {
            specs,
            index,
            len,
            chunks,
            segments: vec![(0, gpu.tensor(&[len], "parameters"))],
            grads: gpu.grad_tensor(&[len], "gradients"),
        })
    }

    /// The parameters in `range` of the layout (one model of a [`concat`](Self::concat)
    /// store) as a store of their own, names without `strip`: its params and grads are views of
    /// this store's, its offsets relative to `range.start` (the part's standalone layout).
    pub fn part(&self, range: std::ops::Range<usize>, strip: &str) -> ParamStore {
        let specs: Vec<ParamSpec> = self
            .specs
            .iter()
            .filter(|s| range.contains(&s.offset))
            .map(|s| ParamSpec {
                name: s.name.strip_prefix(strip).unwrap_or(&s.name).to_string(),
                shape: s.shape.clone(),
                offset: s.offset - range.start,
            })
            .collect();
        let index = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let len = range.len();
        ParamStore {
            specs,
            index,
            len,
            chunks: self
                .chunks
                .iter()
                .filter(|(o, _)| range.contains(o))
                .map(|&(o, l)| (o - range.start, l))
                .collect(),
            segments: vec![(
                0,
                self.params()
                    .view(range.start, &[len], self.params().label()),
            )],
            grads: self.grads.view(range.start, &[len], self.grads.label()),
        }
    }

    /// `buffer` (of the flat layout) as one view per chunk.
    pub fn chunk_views(&self, buffer: &Tensor) -> Vec<Tensor> {
        self.chunks
            .iter()
            .map(|&(o, l)| buffer.view(o, &[l], buffer.label()))
            .collect()
    }

    /// Number of real parameters (without padding).
    pub fn count(&self) -> usize {
        self.specs.iter().map(|s| s.numel()).sum()
    }

    pub fn spec(&self, name: &str) -> Option<&ParamSpec> {
        self.index.get(name).map(|&i| &self.specs[i])
    }

    /// (parameter view, gradient view) of `name`. Panics on an unknown name: the model asks only
    /// for names it declared itself.
    pub fn get(&self, name: &str) -> (Tensor, Tensor) {
        let s = self
            .spec(name)
            .unwrap_or_else(|| panic!("parameter `{name}` was not declared"));
        let (start, values) = self.segment(s.offset);
        (
            values.view(s.offset - start, &s.shape, name),
            self.grads.view(s.offset, &s.shape, &format!("grad {name}")),
        )
    }

    /// A view of `name` in another buffer of the same layout (EMA weights, AdamW moments).
    pub fn view_in(&self, buffer: &Tensor, name: &str) -> Option<Tensor> {
        self.spec(name)
            .map(|s| buffer.view(s.offset, &s.shape, name))
    }

    /// Gathers named f32 values into the flat layout (missing names are errors).
    pub fn flatten(
        &self,
        mut get: impl FnMut(&ParamSpec) -> Result<Vec<f32>, String>,
    ) -> Result<Vec<f32>, String> {
        let mut flat = vec![0.0f32; self.len];
        for s in &self.specs {
            let v = get(s)?;
            if v.len() != s.numel() {
                return Err(format!(
                    "`{}` has {} values, the model expects shape {:?} ({})",
                    s.name,
                    v.len(),
                    s.shape,
                    s.numel()
                ));
            }
            flat[s.offset..s.offset + v.len()].copy_from_slice(&v);
        }
        Ok(flat)
    }

    /// Splits a flat vector back into (name, shape, values).
    pub fn unflatten<'a>(
        &'a self,
        flat: &'a [f32],
    ) -> impl Iterator<Item = (&'a ParamSpec, &'a [f32])> + 'a {
        self.specs
            .iter()
            .map(move |s| (s, &flat[s.offset..s.offset + s.numel()]))
    }
}
