//! A data-parallel step's gradient exchange, overlapped with the backward pass.
//!
//! The flat gradient buffer is cut into buckets of `--bucket-mb` (25 MB, PyTorch DDP's default). For each
//! bucket the gradient plan's last step that binds any of it is found (`Plan::last_step_touching`):
//! after that step the bucket holds its final gradients for the step. The plan is then submitted
//! in segments ending at those steps, each followed by a copy of the buckets it finishes into
//! their own staging buffers. While the GPU runs the later segments (the rest of the backward
//! pass), the CPU maps each finished bucket, sums it across ranks in rank order
//! (`dist::World::sum_in_rank_order`) and queues the sum back into the gradient buffer with
//! `queue.write_buffer`, which wgpu performs before the next submit: the update plan's.
//!
//! Buckets are reduced from the end of the buffer to its start (the parameters near the output,
//! whose gradients backward finishes first), an order fixed by the buffer alone, so every rank
//! makes the same collective calls even if their plans differ in step count (split-K counts
//! follow a CPU adapter's worker count).

use std::time::Instant;

use anyhow::{Result, anyhow};

use crate::dist::World;
use crate::gpu::{Gpu, Plan, Tensor};

/// One bucket: its element range in the gradient buffer, the plan segment that finishes it and
/// the staging buffer it is read back through (one per bucket: a mapped buffer cannot take the
/// later segments' copies).
struct Bucket {
    begin: usize,
    len: usize,
    segment: usize,
    staging: wgpu::Buffer,
}

/// The buckets, where the gradient plan is cut, and the host copy of the gradients.
pub(super) struct GradExchange {
    buckets: Vec<Bucket>,
    /// The last step (inclusive) of each segment of the gradient plan, ascending.
    segment_ends: Vec<usize>,
    host: Vec<f32>,
}

impl GradExchange {
    /// Buckets of `bucket_mb` megabytes (`--bucket-mb`; 25 is PyTorch DDP's default).
    pub fn new(gpu: &Gpu, grads: &Tensor, plan: &Plan, bucket_mb: f64) -> GradExchange {
        let n = grads.numel();
        let per_bucket = ((bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1);
        let mut ranges: Vec<(usize, usize, usize)> = (0..n)
            .step_by(per_bucket)
            .map(|begin| {
                let len = per_bucket.min(n - begin);
                let view = grads.view(begin, &[len], "gradient bucket");
                // A bucket no step touches is final from the start (the plan's clear touches all).
                let ready = plan.last_step_touching(&view).unwrap_or(0);
                (begin, len, ready)
            })
            .collect();
        let mut segment_ends: Vec<usize> = ranges.iter().map(|r| r.2).collect();
        segment_ends.sort_unstable();
        segment_ends.dedup();
        // Reduced from the end of the buffer to the start.
        ranges.sort_by_key(|r| std::cmp::Reverse(r.0));
        let buckets = ranges
            .into_iter()
            .map(|(begin, len, ready)| {
                let label = "gradient bucket readback";
                gpu.admit_buffer((len * 4) as u64, label, &[len]);
                Bucket {
                    begin,
                    len,
                    segment: segment_ends.binary_search(&ready).expect("listed above"),
                    staging: gpu.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(label),
                        size: (len * 4) as u64,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    }),
                }
            })
            .collect();
        GradExchange {
            buckets,
            segment_ends,
            host: vec![0f32; n],
        }
    }

    /// (buckets, plan segments): how finely the exchange overlaps the backward pass.
    pub fn shape(&self) -> (usize, usize) {
        (self.buckets.len(), self.segment_ends.len())
    }

    /// Submits `plan` in segments and replaces `grads` by its sum over the ranks of `world`,
    /// bucket by bucket as the backward pass finishes them. Returns the CPU seconds spent
    /// reading back, reducing and uploading (the time the GPU may still be busy is not counted).
    pub fn run(&mut self, gpu: &Gpu, plan: &Plan, grads: &Tensor, world: &World) -> Result<f64> {
        let mut submitted = Vec::with_capacity(self.segment_ends.len() + 1);
        let mut start = 0;
        for (k, &last) in self.segment_ends.iter().enumerate() {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            plan.encode_range(start..last + 1, &mut enc);
            for b in self.buckets.iter().filter(|b| b.segment == k) {
                let offset = grads.byte_offset() + (b.begin * 4) as u64;
                enc.copy_buffer_to_buffer(
                    grads.buffer(),
                    offset,
                    &b.staging,
                    0,
                    (b.len * 4) as u64,
                );
            }
            submitted.push(gpu.submit_encoder(enc));
            start = last + 1;
        }
        if start < plan.step_count() {
            // Steps after the last that touches the gradients (none in the U-Net's plan).
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            plan.encode_range(start..plan.step_count(), &mut enc);
            gpu.submit_encoder(enc);
        }
        let mut busy = 0.0;
        for b in &self.buckets {
            let (tx, rx) = std::sync::mpsc::channel();
            let slice = b.staging.slice(..);
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            // Waits for this bucket's segment only: the GPU goes on with the later ones.
            let wait = |index: Option<wgpu::SubmissionIndex>| {
                gpu.device
                    .poll(wgpu::PollType::Wait {
                        submission_index: index,
                        timeout: None,
                    })
                    .map_err(|e| anyhow!("GPU error in the backward pass: {e}"))
            };
            wait(Some(submitted[b.segment].clone()))?;
            let mapped = match rx.try_recv() {
                Ok(r) => r,
                // The map callback may come in a later maintenance pass (a starved process).
                Err(_) => {
                    wait(None)?;
                    rx.recv().map_err(|e| anyhow!("gradient readback: {e}"))?
                }
            };
            mapped.map_err(|e| anyhow!("gradient readback: {e}"))?;
            let t = Instant::now();
            let part = &mut self.host[b.begin..b.begin + b.len];
            {
                let view = slice
                    .get_mapped_range()
                    .map_err(|e| anyhow!("gradient readback: {e}"))?;
                bytemuck::cast_slice_mut::<f32, u8>(part).copy_from_slice(&view);
            }
            b.staging.unmap();
            world.sum_in_rank_order(part);
            let offset = grads.byte_offset() + (b.begin * 4) as u64;
            gpu.queue
                .write_buffer(grads.buffer(), offset, bytemuck::cast_slice(part));
            busy += t.elapsed().as_secs_f64();
        }
        Ok(busy)
    }
}
