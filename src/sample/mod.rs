//! Sampling: diffusers' loop `x = noise·init_noise_sigma; for t: x = step(unet(scale(x, t), t),
//! t, x)` on the GPU. One U-Net evaluation and its update are recorded once into a plan and
//! replayed with new per-step constants (timestep, coefficients, RNG step) written before each
//! submit: one submit per evaluation, nothing read back until the batch is done.
//!
//! The latent `x` is kept apart from the U-Net's input (`scale_model_input` writes that input),
//! so conditioning fits in between: a batched conditional/unconditional forward whose outputs
//! are combined before the update, and a hook after the update that replaces a known region.

pub mod latent;
pub mod source;
pub mod text;

use std::sync::Arc;

use anyhow::{Result, bail};

use crate::diffusion::scheduler::{ModelEval, SamplerKind, SamplingSchedule};
use crate::gpu::{Gpu, Plan, Recorder, Tensor};
use crate::nn::{UNet, UNetConfig};
use crate::ops::elementwise::{copy_channels, scale};
use crate::ops::noise::{purpose, random_normal, write_rng_state};
use crate::ops::samplers::{
    COEFFS_LEN, UpdateBuffers, guidance_combine, inpaint_known, renoise, sampler_update,
    scale_model_input,
};
use crate::ops::upsample::upsample_bicubic_forward;

pub use latent::{LatentCodec, LatentVae};
pub use source::ModelSource;
pub use text::{PromptEncoder, TextConditioning};

/// Where the noise of a batch comes from.
pub enum Noise<'a> {
    /// The GPU RNG: image k's initial noise is stream (SAMPLING, step 2^32−1) at k·numel, and
    /// its noise of scheduler step i is stream (SAMPLING, i) at k·numel, whatever the batch.
    Seeded(u64),
    /// Given values, NHWC: `initial` for the batch; `steps[i]` for scheduler step i (when the
    /// sampler draws per-step noise).
    Given {
        initial: &'a [f32],
        steps: Option<Vec<&'a [f32]>>,
    },
}

/// What conditions sampling besides class labels.
#[derive(Clone, Debug, Default)]
pub struct SamplerOptions {
    /// Classifier-free guidance scale (the model must have a null class): conditional and
    /// unconditional branches in one U-Net batch of 2B.
    pub guidance: Option<f32>,
    /// Inpainting (RePaint; a schedule from [`SamplingSchedule::repaint`]): the original image
    /// and the keep mask (1 = keep, 0 = regenerate), one image each, NHWC [H, W, C].
    pub inpaint: Option<(Vec<f32>, Vec<f32>)>,
    /// Latent diffusion: the VAE whose latents the U-Net denoises; each batch is decoded on the
    /// GPU after its last step, and the images are what a batch returns.
    pub vae: Option<LatentVae>,
    /// A text-conditional U-Net (UNet2DConditionModel): the context rows per image (the
    /// tokenizer's length, 77 for CLIP), given before sampling by [`Sampler::set_context`].
    pub context_tokens: Option<usize>,
    /// Images of (height, width) instead of the model's square size (`--height/--width`): the
    /// U-Net (and the VAE) are built for it; with a VAE the latents are 1/downscale of it.
    pub size: Option<(usize, usize)>,
}

/// A sampler bound to a U-Net of a fixed batch size.
pub struct Sampler {
    gpu: Arc<Gpu>,
    pub unet: UNet,
    pub schedule: SamplingSchedule,
    /// Classifier-free guidance scale; the U-Net then runs a batch of 2B (conditional first).
    pub guidance: Option<f32>,
    batch: usize,
    x: Tensor,
    z: Tensor,
    coeffs: Tensor,
    rng_state: Tensor,
    /// The texture packs of the U-Net's weights, run after each write of them
    /// ([`Recorder::freeze`]).
    weight_packs: Plan,
    step_plan: Plan,
    reset_plan: Plan,
    /// Inpainting's jump back up: x ← a·x + b·z.
    renoise_plan: Option<Plan>,
    /// Super-resolution models: the batch's low-resolution input and its bicubic upsampling.
    sr: Option<SuperResolution>,
    /// Latent diffusion: the VAE and its plan decoding x into images.
    decoder: Option<Decoder>,
}

struct SuperResolution {
    low: Tensor,
    upsample_plan: Plan,
    /// A low-resolution batch was given for the next `sample_batch`.
    ready: bool,
}

impl Sampler {
    pub fn new(
        gpu: &Arc<Gpu>,
        model: &UNetConfig,
        schedule: SamplingSchedule,
        batch: usize,
        options: &SamplerOptions,
    ) -> Result<Sampler> {
        let guidance = options.guidance;
        check_sampling_setup(model, batch, guidance)?;
        check_model_and_schedule(model, &schedule, options)?;
        let copies = if guidance.is_some() { 2 } else { 1 };
        let unet_size = unet_input_size(model, options)?;
        let unet = inference_unet(
            gpu,
            model,
            batch * copies,
            options.context_tokens,
            unet_size,
        )?;
        let shape = unet.output.shape().to_vec();
        let shape = [&[batch], &shape[1..]].concat();
        let x = gpu.tensor(&shape, "sampling x");
        let z = gpu.tensor(&shape, "sampling step noise");
        let aux0 = gpu.tensor(&shape, "sampler state 0");
        let aux1 = gpu.tensor(&shape, "sampler state 1");
        // PLMS keeps three earlier model outputs and its first sample.
        let plms = schedule.settings.kind == SamplerKind::Pndm;
        let aux2 = gpu.tensor(if plms { &shape } else { &[4] }, "sampler state 2");
        let aux3 = gpu.tensor(if plms { &shape } else { &[4] }, "sampler state 3");
        let coeffs = gpu.tensor(&[COEFFS_LEN], "sampler coefficients");
        let rng_state = gpu.tensor(&[4], "sampling rng");
        let settings = &schedule.settings;
        let clip = settings
            .clip_sample
            .then_some(settings.clip_sample_range as f32);
        // The step plan: U-Net input, U-Net, (guidance), update, (inpainting's known region).
        // The weights' texture packs go to a setup plan that runs when they are written.
        let mut rec = gpu.recorder();
        rec.freeze(&unet.params.value_buffers());
        rec.recycle_packs(PACKS_PER_SIZE);
        let sr = record_model_input(&mut rec, model, &unet, &x, &coeffs, &shape, copies)?;
        unet.forward(&mut rec)?;
        let guided = record_guidance(&mut rec, &unet, guidance, &shape)?;
        sampler_update(
            &mut rec,
            settings.kind,
            settings.x0_form(),
            clip,
            &UpdateBuffers {
                x: &x,
                model_output: &guided,
                z: &z,
                coeffs: &coeffs,
                aux0: &aux0,
                aux1: &aux1,
                aux2: &aux2,
                aux3: &aux3,
            },
        )?;
        let renoise_plan = match &options.inpaint {
            Some((known, keep)) => Some(record_inpainting(
                &mut rec,
                &shape[1..],
                known,
                keep,
                &x,
                &z,
                &coeffs,
            )?),
            None => None,
        };
        let (weight_packs, step_plan) = rec.finish_with_setup();
        let mut rec = gpu.recorder();
        rec.clear(&aux0);
        rec.clear(&aux1);
        rec.clear(&aux2);
        rec.clear(&aux3);
        rec.clear(&z);
        let reset_plan = rec.finish();
        let decoder = options
            .vae
            .as_ref()
            .map(|vae| Decoder::new(gpu, vae, &x, options.size))
            .transpose()?;
        Ok(Sampler {
            gpu: gpu.clone(),
            unet,
            schedule,
            guidance,
            batch,
            x,
            z,
            coeffs,
            rng_state,
            weight_packs,
            step_plan,
            reset_plan,
            renoise_plan,
            sr,
            decoder,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// [B, H, W, C] of a batch of images (NHWC): the decoded images of a latent model.
    pub fn image_shape(&self) -> [usize; 4] {
        let s = match &self.decoder {
            Some(d) => d.images.shape(),
            None => self.x.shape(),
        };
        [s[0], s[1], s[2], s[3]]
    }

    /// [B, H, W, C] of x, the sampled variable (a latent model's latents).
    pub fn latent_shape(&self) -> [usize; 4] {
        let s = self.x.shape();
        [s[0], s[1], s[2], s[3]]
    }

    /// Elements of one image's x (its noise stream's stride).
    fn image_numel(&self) -> usize {
        self.x.numel() / self.batch()
    }

    pub fn kind(&self) -> SamplerKind {
        self.schedule.settings.kind
    }

    /// U-Net evaluations per batch.
    pub fn evaluations(&self) -> usize {
        self.schedule.evals.len()
    }

    /// Super-resolution models: the next batch's low-resolution images, NHWC [B, S/k, S/k, C]
    /// in [-1, 1] (upsampled once on the GPU; every step sees it beside x).
    pub fn set_lowres(&mut self, low: &[f32]) -> Result<()> {
        let Some(sr) = &mut self.sr else {
            bail!("the model is not a super-resolution model: it takes no low-resolution input");
        };
        self.gpu.write(&sr.low, low)?;
        self.gpu.submit(&[&sr.upsample_plan]);
        sr.ready = true;
        Ok(())
    }

    /// A text-conditional model's context: `cond` [1, tokens, width] (the prompt's encoder
    /// output) for every image, or [batch, tokens, width] (a prompt per image), and with
    /// guidance `uncond` (the negative or empty prompt's, likewise) for the unconditional half
    /// of the U-Net's batch, as StableDiffusionPipeline batches them.
    pub fn set_context(&self, cond: &Tensor, uncond: Option<&Tensor>) -> Result<()> {
        let Some(context) = &self.unet.encoder_hidden_states else {
            bail!("the U-Net has no cross-attention: it takes no prompt");
        };
        let per_image = context.value.numel() / self.unet.batch;
        let rows = |t: &Tensor| -> Result<Vec<Tensor>> {
            let n = t.numel();
            if n == per_image {
                Ok(vec![t.clone(); self.batch])
            } else if n == per_image * self.batch {
                let at = |i: usize| t.view(i * per_image, &[per_image], t.label());
                Ok((0..self.batch).map(at).collect())
            } else {
                bail!(
                    "a context of {n} values, the U-Net attends to {per_image} per image ({:?}) for {} image(s)",
                    &context.shape()[1..],
                    self.batch
                )
            }
        };
        let mut sources = rows(cond)?;
        match (self.guidance, uncond) {
            (Some(_), Some(u)) => sources.extend(rows(u)?),
            (None, None) => {}
            (Some(_), None) => bail!("guided sampling needs the unconditional context too"),
            (None, Some(_)) => bail!("an unconditional context is only used with guidance"),
        }
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        for (i, src) in sources.into_iter().enumerate() {
            enc.copy_buffer_to_buffer(
                src.buffer(),
                src.byte_offset(),
                context.value.buffer(),
                context.value.byte_offset() + (i * per_image * 4) as u64,
                src.byte_len(),
            );
        }
        self.gpu.submit_encoder(enc);
        Ok(())
    }

    /// One U-Net evaluation's plan (and a latent model's decode), each dispatch timed in its
    /// own submit (`sample --profile`).
    pub fn profile(&self) -> crate::gpu::PlanProfile {
        let mut plans = vec![&self.step_plan];
        if let Some(d) = &self.decoder {
            plans.push(&d.plan);
        }
        crate::gpu::PlanProfile::of(&self.gpu, &plans)
    }

    /// The final x of the last batch (a latent model's latents before decoding), NHWC.
    pub fn read_latents(&self) -> Result<Vec<f32>> {
        Ok(self.gpu.read(&self.x)?)
    }

    /// Uploads weights in the U-Net's flat parameter layout.
    pub fn set_weights(&self, flat: &[f32]) -> Result<()> {
        self.unet.params.write_values(&self.gpu, flat)?;
        Ok(self.gpu.run(&[&self.weight_packs])?)
    }

    /// Copies weights from a flat parameter buffer of the same layout (a trainer's EMA).
    pub fn copy_weights_from(&self, weights: &Tensor) {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(
            weights.buffer(),
            weights.byte_offset(),
            self.unet.params.params().buffer(),
            self.unet.params.params().byte_offset(),
            weights.byte_len(),
        );
        self.weight_packs.encode(&mut enc);
        self.gpu.submit_encoder(enc);
    }

    /// A one-dispatch plan drawing this batch's slice of a noise stream into `out`.
    fn noise_plan(&self, first_image: usize, out: &Tensor) -> Result<Plan> {
        let first = first_image
            .checked_mul(self.image_numel())
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "image index {first_image} is beyond what the sampling noise stream addresses (2^32 values per step)"
                )
            })?;
        let mut rec = self.gpu.recorder();
        random_normal(&mut rec, &self.rng_state, purpose::SAMPLING, first, out)?;
        Ok(rec.finish())
    }

    /// Samples one batch whose first image has index `first_image` (which keys its seeded
    /// noise) and returns the final x, NHWC [B, H, W, C] (a latent model: x decoded, the
    /// images of [`Sampler::image_shape`]). `labels` are the batch's classes
    /// (required by a class-conditional model, refused by others). `on_eval(e)` is called when U-Net
    /// evaluation `e` and its update have finished.
    pub fn sample_batch(
        &mut self,
        first_image: usize,
        noise: &Noise,
        labels: Option<&[u32]>,
        on_eval: &mut dyn FnMut(usize),
    ) -> Result<Vec<f32>> {
        self.take_lowres()?;
        self.write_class_labels(labels)?;
        let g = self.gpu.clone();
        // Nothing is submitted when a plan was past the adapter's limits or the device is lost.
        g.check()?;
        g.submit(&[&self.reset_plan]);
        self.draw_initial_x(first_image, noise)?;
        // Seeded step noise is drawn by its own plan, submitted ahead of each step that adds
        // noise and of each RePaint jump.
        let step_noise_plan = match noise {
            Noise::Seeded(_) => Some(self.noise_plan(first_image, &self.z)?),
            Noise::Given { .. } => None,
        };
        let mut in_flight: Option<wgpu::SubmissionIndex> = None;
        let mut renoise_count = 0u32;
        for (e, eval) in self.schedule.evals.iter().enumerate() {
            self.submit_renoise_jumps(
                &eval.renoise_before,
                noise,
                step_noise_plan.as_ref(),
                &mut renoise_count,
            )?;
            let idx = self.submit_evaluation(eval, noise, step_noise_plan.as_ref())?;
            // Keep one evaluation queued behind the running one: the GPU never idles and
            // progress reports what has finished.
            if let Some(prev) = in_flight.replace(idx) {
                g.device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(prev),
                        timeout: None,
                    })
                    .map_err(|err| anyhow::anyhow!("GPU error while sampling: {err}"))?;
                on_eval(e - 1);
            }
        }
        let out = match &self.decoder {
            Some(d) => {
                g.submit(&[&d.plan]);
                g.read(&d.images)?
            }
            None => g.read(&self.x)?,
        };
        on_eval(self.schedule.evals.len() - 1);
        Ok(out)
    }

    /// A super-resolution model samples a batch only after `set_lowres` gave its
    /// low-resolution images, and each batch uses them up.
    fn take_lowres(&mut self) -> Result<()> {
        if let Some(sr) = &mut self.sr {
            if !sr.ready {
                bail!(
                    "a super-resolution model needs the batch's low-resolution images (set_lowres)"
                );
            }
            sr.ready = false;
        }
        Ok(())
    }

    /// Checks the batch's class labels against the model and writes them, followed by the null
    /// class for the unconditional half of a guided batch.
    fn write_class_labels(&self, labels: Option<&[u32]>) -> Result<()> {
        let cfg = &self.unet.config;
        match (&self.unet.class_labels, labels) {
            (Some(t), Some(l)) => {
                let k = cfg.num_class_embeds.unwrap_or(0);
                if l.len() != self.batch {
                    bail!("{} class labels for a batch of {}", l.len(), self.batch);
                }
                if let Some(&bad) = l.iter().find(|&&c| c as usize >= k) {
                    bail!(
                        "class {bad} is out of range: the model has classes 0..{}",
                        k - 1
                    );
                }
                let mut all = l.to_vec();
                if self.guidance.is_some() {
                    let null = cfg.null_class.expect("checked in new") as u32;
                    all.extend(std::iter::repeat_n(null, self.batch));
                }
                self.gpu.write_u32(t, &all)?;
            }
            (None, None) => {}
            (Some(_), None) => bail!("the model is class-conditional: give the class labels"),
            (None, Some(_)) => {
                bail!("the model is not class-conditional: it takes no class labels")
            }
        }
        Ok(())
    }

    /// x ← initial noise · init_noise_sigma: drawn from the seeded stream's initial-noise step
    /// (2^32−1), or the given values.
    fn draw_initial_x(&self, first_image: usize, noise: &Noise) -> Result<()> {
        let g = &self.gpu;
        let sigma0 = self.schedule.init_noise_sigma;
        match noise {
            Noise::Seeded(seed) => {
                write_rng_state(g, &self.rng_state, *seed, u32::MAX)?;
                let init = self.noise_plan(first_image, &self.x)?;
                let mut rec = g.recorder();
                if sigma0 != 1.0 {
                    scale(&mut rec, sigma0, &self.x)?;
                }
                g.submit(&[&init, &rec.finish()]);
            }
            Noise::Given { initial, .. } => {
                // diffusers: latents = noise * init_noise_sigma, in float32.
                let scaled: Vec<f32> = initial.iter().map(|v| v * sigma0).collect();
                g.write(&self.x, &scaled)?;
            }
        }
        Ok(())
    }

    /// Inpainting's jumps back up before an evaluation: x ← a·x + b·z for each (a, b), each
    /// with fresh noise from its own stream.
    fn submit_renoise_jumps(
        &self,
        jumps: &[(f32, f32)],
        noise: &Noise,
        step_noise_plan: Option<&Plan>,
        renoise_count: &mut u32,
    ) -> Result<()> {
        let g = &self.gpu;
        for &(a, b) in jumps {
            let (Some(plan), Some(noise_plan), Noise::Seeded(seed)) =
                (&self.renoise_plan, step_noise_plan, noise)
            else {
                bail!("inpainting draws its noise from the seeded GPU RNG (no --noise)");
            };
            let mut c = [0.0f32; COEFFS_LEN];
            c[5] = a;
            c[6] = b;
            g.write(&self.coeffs, &c)?;
            // Streams of the jumps: steps from 2^31 up, apart from the denoising steps'.
            write_rng_state(g, &self.rng_state, *seed, (1 << 31) + *renoise_count)?;
            *renoise_count += 1;
            g.submit(&[noise_plan, plan]);
        }
        Ok(())
    }

    /// Writes one evaluation's timestep, coefficients and step noise (or the RNG step of the
    /// noise plan submitted with it) and submits the step plan.
    fn submit_evaluation(
        &self,
        eval: &ModelEval,
        noise: &Noise,
        step_noise_plan: Option<&Plan>,
    ) -> Result<wgpu::SubmissionIndex> {
        let g = &self.gpu;
        g.write(&self.unet.timesteps, &vec![eval.timestep; self.unet.batch])?;
        g.write(&self.coeffs, &eval.kernel_coeffs())?;
        let mut plans: Vec<&Plan> = Vec::with_capacity(2);
        if eval.adds_noise {
            match (noise, step_noise_plan) {
                (Noise::Seeded(seed), Some(p)) => {
                    write_rng_state(g, &self.rng_state, *seed, eval.step as u32)?;
                    plans.push(p);
                }
                (Noise::Given { steps: Some(s), .. }, _) => {
                    let z = s
                        .get(eval.step)
                        .ok_or_else(|| anyhow::anyhow!("no step noise for step {}", eval.step))?;
                    g.write(&self.z, z)?;
                }
                _ => bail!(
                    "the {} sampler adds noise at every step: give the per-step noise too (--step-noise) or sample from a seed",
                    self.kind().diffusers_class()
                ),
            }
        }
        plans.push(&self.step_plan);
        Ok(g.submit(&plans))
    }
}

/// Refuses a schedule of the other family than the model (VE-SDE vs the rest) and a VAE that
/// does not fit the U-Net or the task, before anything is allocated.
fn check_model_and_schedule(
    model: &UNetConfig,
    schedule: &SamplingSchedule,
    options: &SamplerOptions,
) -> Result<()> {
    match (schedule.settings.ve.is_some(), model.is_fourier()) {
        (true, false) => bail!(
            "a VE-SDE model (ScoreSdeVeScheduler) needs a U-Net with time_embedding_type \"fourier\" (it takes σ and returns the score); this one's is \"{}\"",
            model.time_embedding_type
        ),
        (false, true) => bail!(
            "a U-Net with fourier time features returns a score (its output divided by σ): it samples with a ScoreSdeVeScheduler (--sampler pc or ode), not {}",
            schedule.settings.class_name()
        ),
        _ => {}
    }
    if let Some(vae) = &options.vae {
        vae.check_fits(model)?;
        if options.inpaint.is_some() {
            bail!(
                "inpainting works on images, not on a VAE's latents: it is not supported for latent diffusion models"
            );
        }
    }
    Ok(())
}

/// A latent sampler's decoder: the VAE and the plan decoding x into `images`, the whole batch
/// at once, or one image after another (the same VAE buffers each time) when a batch of the
/// decoder's largest activation would not fit one storage binding — row bands split one image,
/// not a batch (SD's 512 × 512 decoder holds 256 MiB per image at its widest).
struct Decoder {
    /// The VAE the plan decodes with (its buffers live as long as the plan reads them).
    _vae: LatentCodec,
    plan: Plan,
    /// The decoded batch, NHWC.
    images: Tensor,
}

impl Decoder {
    fn new(
        gpu: &Arc<Gpu>,
        vae: &LatentVae,
        x: &Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<Decoder> {
        let batch = x.shape()[0];
        let s = vae.config.sample_size;
        let widest = vae
            .config
            .largest_decoder_activation(size.unwrap_or((s, s)))
            * 4;
        let max_binding = gpu.limits.max_storage_buffer_binding_size as usize;
        let per_image = batch > 1 && batch * widest > max_binding;
        let codec = vae.load(gpu, if per_image { 1 } else { batch }, size, true)?;
        let mut rec = gpu.recorder();
        rec.freeze(&codec.vae.params.value_buffers());
        rec.recycle_packs(PACKS_PER_SIZE);
        let images = if per_image {
            let one = codec.output().shape().to_vec();
            let images = gpu.tensor(&[&[batch], &one[1..]].concat(), "decoded images");
            let (latent_len, image_len) = (x.numel() / batch, codec.output().numel());
            for i in 0..batch {
                let latent = x.view(
                    i * latent_len,
                    &[1, x.shape()[1], x.shape()[2], x.shape()[3]],
                    "latent",
                );
                codec.record_decode(&mut rec, &latent)?;
                rec.copy(
                    codec.output(),
                    &images.view(i * image_len, &one, "decoded image"),
                )?;
            }
            images
        } else {
            codec.record_decode(&mut rec, x)?;
            codec.output().clone()
        };
        // The VAE's weights are written by `load`: pack them now, once.
        let (packs, plan) = rec.finish_with_setup();
        gpu.run(&[&packs])?;
        Ok(Decoder {
            _vae: codec,
            plan,
            images,
        })
    }
}

/// Cached activation packs per texture size in a sampling plan ([`Recorder::recycle_packs`]):
/// a forward pass reads each pack in the op that made it (Q, K and V share their input's), so
/// two are plenty.
const PACKS_PER_SIZE: usize = 2;

/// The U-Net in eval mode for batches of `batch`: a UNet2DConditionModel attends to
/// `context_tokens` rows of context per image, which only it takes.
fn inference_unet(
    gpu: &Arc<Gpu>,
    model: &UNetConfig,
    batch: usize,
    context_tokens: Option<usize>,
    size: Option<(usize, usize)>,
) -> Result<UNet> {
    match (&model.cross_attention, context_tokens) {
        (Some(_), None) => {
            bail!("the U-Net attends to text (UNet2DConditionModel): it samples from a prompt")
        }
        (None, Some(_)) => bail!("the U-Net has no cross-attention: it takes no prompt"),
        _ => {}
    }
    let _no_grad = crate::gpu::no_grad();
    Ok(match (context_tokens, size) {
        (tokens, Some(size)) => UNet::for_inference_at(gpu, model, batch, tokens, size)?,
        (Some(tokens), None) => UNet::conditional(gpu, model, batch, tokens, false)?,
        (None, None) => UNet::for_inference(gpu, model, batch)?,
    })
}

/// The U-Net's input size when the images are not the model's square size: the requested
/// (height, width), or with a VAE that size over the VAE's downscale (so each side a multiple of
/// downscale · 2^(U-Net levels − 1): 64 for SD 1.x). Refuses sizes for super-resolution and
/// inpainting, whose inputs fix the size.
fn unet_input_size(model: &UNetConfig, options: &SamplerOptions) -> Result<Option<(usize, usize)>> {
    let Some((h, w)) = options.size else {
        return Ok(None);
    };
    if model.sr_scale.is_some() || options.inpaint.is_some() {
        bail!(
            "--height/--width: super-resolution and inpainting take the size of their input image; drop them"
        );
    }
    let Some(vae) = &options.vae else {
        model
            .check_input_size((h, w))
            .map_err(|e| anyhow::anyhow!("--height {h} --width {w}: {e}"))?;
        return Ok(Some((h, w)));
    };
    let (f, m) = (vae.config.downscale(), model.size_multiple());
    if h == 0 || w == 0 || !h.is_multiple_of(f * m) || !w.is_multiple_of(f * m) {
        bail!(
            "--height {h} --width {w}: each must be a multiple of {} (the VAE's {f}× downscale times the U-Net's {m} for its {} levels)",
            f * m,
            model.block_out_channels.len()
        );
    }
    let latent = (h / f, w / f);
    model
        .check_input_size(latent)
        .map_err(|e| anyhow::anyhow!("--height {h} --width {w}: latents of {latent:?}: {e}"))?;
    Ok(Some(latent))
}

/// Refuses, before anything is allocated, a batch, model and guidance that cannot sample
/// together.
fn check_sampling_setup(model: &UNetConfig, batch: usize, guidance: Option<f32>) -> Result<()> {
    if batch == 0 {
        bail!("the sampling batch size must be at least 1");
    }
    let expect_in = model.out_channels * if model.sr_scale.is_some() { 2 } else { 1 };
    if model.in_channels != expect_in {
        bail!(
            "the model maps {} input channels to {} output channels; sampling needs them equal (twice as many inputs for super-resolution)",
            model.in_channels,
            model.out_channels
        );
    }
    if model.sr_scale.is_some() && guidance.is_some() {
        bail!("guidance is not supported for super-resolution models");
    }
    if let Some(s) = guidance {
        if !s.is_finite() {
            bail!("the guidance scale must be a finite number, is {s}");
        }
        // A text model's unconditional branch is the negative (or empty) prompt.
        if model.cross_attention.is_none() && model.num_class_embeds.is_none() {
            bail!("guidance needs a class-conditional model; this one has no num_class_embeds");
        }
        if model.cross_attention.is_none() && model.null_class.is_none() {
            bail!(
                "guidance scale {s} needs a model trained with label dropout (an unconditional null class); this model has none: use guidance scale 1 (conditional only)"
            );
        }
    }
    Ok(())
}

/// Records what fills the U-Net's input from x: `scale_model_input` (into each of the
/// `copies` halves of a guided batch), or for a super-resolution model the channel
/// concatenation of scaled x and the bicubic upsampling of the low-resolution batch, whose own
/// plan (run once per batch by `set_lowres`) is returned with it.
fn record_model_input(
    rec: &mut Recorder,
    model: &UNetConfig,
    unet: &UNet,
    x: &Tensor,
    coeffs: &Tensor,
    shape: &[usize],
    copies: usize,
) -> Result<Option<SuperResolution>> {
    let Some(k) = model.sr_scale else {
        scale_model_input(rec, x, coeffs, &unet.sample.value, copies)?;
        return Ok(None);
    };
    let gpu = rec.gpu.clone();
    let batch = shape[0];
    // cat([scale_model_input(x), bicubic(LR)]) along channels.
    let s = model.sample_size;
    let c = model.out_channels;
    let low = gpu.tensor(&[batch, s / k, s / k, c], "sr: low resolution");
    let up = gpu.tensor(shape, "sr: bicubic upsampled");
    let scaled = gpu.tensor(shape, "sr: scaled x");
    scale_model_input(rec, x, coeffs, &scaled, 1)?;
    copy_channels(rec, &scaled, 0, &unet.sample.value, 0, c, false)?;
    copy_channels(rec, &up, 0, &unet.sample.value, c, c, false)?;
    let mut r = gpu.recorder();
    upsample_bicubic_forward(&mut r, &low, k, &up)?;
    Ok(Some(SuperResolution {
        low,
        upsample_plan: r.finish(),
        ready: false,
    }))
}

/// The model output the update reads: the U-Net's own, or with classifier-free guidance the
/// combination of its conditional and unconditional halves (recorded here).
fn record_guidance(
    rec: &mut Recorder,
    unet: &UNet,
    guidance: Option<f32>,
    shape: &[usize],
) -> Result<Tensor> {
    Ok(match guidance {
        Some(scale) => {
            let g = rec.gpu.tensor(shape, "guided model output");
            guidance_combine(rec, &unet.output.value, scale, &g)?;
            g
        }
        None => unet.output.value.clone(),
    })
}

/// Inpainting: records, after the update, the replacement of the known region (the original
/// noised to the step's level) and returns the separate plan of RePaint's jump back up.
fn record_inpainting(
    rec: &mut Recorder,
    image: &[usize],
    known: &[f32],
    keep: &[f32],
    x: &Tensor,
    z: &Tensor,
    coeffs: &Tensor,
) -> Result<Plan> {
    let gpu = rec.gpu.clone();
    let known = gpu.tensor_from(image, known, "inpainting: original")?;
    let keep = gpu.tensor_from(image, keep, "inpainting: keep mask")?;
    inpaint_known(rec, x, z, coeffs, &known, &keep)?;
    let mut r = gpu.recorder();
    renoise(&mut r, x, z, coeffs)?;
    Ok(r.finish())
}

/// [N, C, H, W] → [N, H, W, C] (PyTorch's layout to ours).
pub fn nchw_to_nhwc(v: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((b * h + y) * w + x) * c + ch] = v[((b * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// [N, H, W, C] → [N, C, H, W].
pub fn nhwc_to_nchw(v: &[f32], [n, h, w, c]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((b * c + ch) * h + y) * w + x] = v[((b * h + y) * w + x) * c + ch];
                }
            }
        }
    }
    out
}
