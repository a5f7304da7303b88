//! A byte-mutation fuzzer for every loader that reads a user's file (run by hand, not in CI; a
//! stable-toolchain stand-in for `cargo fuzz`, which needs nightly):
//!
//!   cargo run --release --example fuzz_loaders -- TARGET|all [--minutes M] [--seed S]
//!
//! Targets: `weights` (a diffusers model file: safetensors → the model's flat layout), `checkpoint`
//! (our checkpoint: metadata, train/unet configs, every tensor group), `config` (config.json →
//! UNetConfig), `vae_config` (an AutoencoderKL config.json → VaeConfig), `scheduler` (scheduler_config.json → every sampler's schedule, RePaint's too),
//! `toml` (the run config), `image` (a PNG/JPEG from `--data`, `--lowres`, `--inpaint`).
//!
//! Seeds: the diffusers-written fixtures of tests/fixtures/samplers, files this program writes
//! from our own writers (a checkpoint of a small model, the presets' configs, images), and
//! fuzz/corpus/TARGET/* (kept in the repository). Each input is a seed mutated 1–8 times (bit
//! flips, interesting bytes and integers, deletions, duplications, splices, dictionary tokens,
//! numbers in text replaced by extreme ones). Findings go to fuzz/findings/:
//! - a panic (caught) → TARGET-panic-HASH;
//! - an input running over 10 s → TARGET-hang-HASH (the watchdog ends the process);
//! - an allocation over 256 MiB from a few-KB input (a size field trusted before it was checked
//!   against the file) → the allocator refuses it, the process aborts, and the next start files
//!   the input it was running (TARGET.current) as TARGET-abort-HASH.
//!
//! Every finding becomes a regression case in tests/fixtures/fuzz/, run by `cargo test`.
//! `--write-corpus` stores the generated seeds under 64 KiB in fuzz/corpus/TARGET/.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wgpu_diffusion::gpu::Gpu;
use wgpu_diffusion::io::tensors::serialize_named;
use wgpu_diffusion::nn::UNetConfig;
use wgpu_diffusion::robustness::{
    LoaderFixture as Fixture, TARGETS, exercise as run_target, small_config,
};
use wgpu_diffusion::train::{TrainConfig, Trainer};

/// Refuses single allocations above this: no loader needs that much for a few-KB input.
const MAX_ALLOC: usize = 256 << 20;
const HANG: Duration = Duration::from_secs(10);

struct Bounded;

// SAFETY: forwards to the system allocator; only refuses (null) oversized requests.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Bounded = Bounded;

/// SplitMix64: a small, seedable generator for the mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING_U64: [u64; 12] = [
    0,
    1,
    7,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    100_000_001,
];

const NUMBERS: [&str; 18] = [
    "0",
    "-1",
    "1",
    "3",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "-1e308",
    "1e-320",
    "NaN",
    "nan",
    "inf",
    "0.5",
    "999999999999",
    "2147483648",
];

fn dictionary(target: &str) -> &'static [&'static str] {
    match target {
        "weights" | "checkpoint" => &[
            "\"dtype\"",
            "\"F32\"",
            "\"F16\"",
            "\"BF16\"",
            "\"I64\"",
            "\"F64\"",
            "\"BOOL\"",
            "\"shape\"",
            "\"data_offsets\"",
            "\"__metadata__\"",
            "[0,0]",
            "[]",
            "{}",
            "\"step\"",
            "\"unet_config\"",
            "\"train_config\"",
            "\"class_names\"",
        ],
        "config" => &[
            "\"sample_size\"",
            "\"block_out_channels\"",
            "\"norm_num_groups\"",
            "\"attention_head_dim\"",
            "\"layers_per_block\"",
            "\"down_block_types\"",
            "\"up_block_types\"",
            "\"AttnDownBlock2D\"",
            "\"in_channels\"",
            "\"num_class_embeds\"",
            "\"_null_class\"",
            "\"_sr_scale\"",
            "null",
            "[]",
            "{}",
            "true",
        ],
        "vae_config" => &[
            "\"sample_size\"",
            "\"block_out_channels\"",
            "\"latent_channels\"",
            "\"norm_num_groups\"",
            "\"layers_per_block\"",
            "\"down_block_types\"",
            "\"DownEncoderBlock2D\"",
            "\"scaling_factor\"",
            "\"shift_factor\"",
            "\"latents_mean\"",
            "\"use_quant_conv\"",
            "null",
            "[]",
            "{}",
            "true",
        ],
        "scheduler" => &[
            "\"beta_schedule\"",
            "\"squaredcos_cap_v2\"",
            "\"scaled_linear\"",
            "\"sigmoid\"",
            "\"trained_betas\"",
            "\"num_train_timesteps\"",
            "\"timestep_spacing\"",
            "\"trailing\"",
            "\"leading\"",
            "\"steps_offset\"",
            "\"prediction_type\"",
            "\"v_prediction\"",
            "\"use_karras_sigmas\"",
            "\"clip_sample_range\"",
            "\"beta_start\"",
            "null",
            "[]",
        ],
        "toml" => &[
            "steps = ",
            "batch_size = ",
            "grad_accum = ",
            "lr = ",
            "ema_decay = ",
            "log_every = ",
            "beta_schedule = \"squaredcos_cap_v2\"",
            "num_train_timesteps = ",
            "sample_steps = ",
            "nan",
            "inf",
            "[x]",
            "\"",
            "\n",
        ],
        _ => &["IHDR", "IDAT", "IEND", "\u{ff}\u{d8}", "PLTE", "tRNS"],
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, target: &str, seeds: &[Vec<u8>]) {
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = [0u8, 0xff, 0x7f, 0x80, b'9', b'"', b'-'][rng.below(7)];
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                input.drain(i..i + n);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk: Vec<u8> = input[i..i + n].to_vec();
                let at = rng.below(len);
                input.splice(at..at, chunk);
            }
            4 if len >= 8 => {
                let i = rng.below(len - 7);
                let v = INTERESTING_U64[rng.below(INTERESTING_U64.len())];
                let v = if rng.below(4) == 0 {
                    v.wrapping_add(len as u64)
                } else {
                    v
                };
                input[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 => {
                let dict = dictionary(target);
                let tok = dict[rng.below(dict.len())].as_bytes();
                let at = rng.below(len + 1);
                if rng.below(2) == 0 && at + tok.len() <= len {
                    input[at..at + tok.len()].copy_from_slice(tok);
                } else {
                    input.splice(at..at, tok.iter().copied());
                }
            }
            6 if len > 0 => {
                // A run of digits (a size, an offset, a count) becomes an extreme number.
                let start = rng.below(len);
                if let Some(p) = input[start..].iter().position(|b| b.is_ascii_digit()) {
                    let a = start + p;
                    let mut b = a;
                    while b < len && (input[b].is_ascii_digit() || input[b] == b'.') {
                        b += 1;
                    }
                    let num = NUMBERS[rng.below(NUMBERS.len())].as_bytes();
                    input.splice(a..b, num.iter().copied());
                }
            }
            7 if !seeds.is_empty() => {
                // Splice: the head of this input, the tail of another seed.
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                input.truncate(rng.below(len));
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

fn read_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

fn png(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// The seeds of a target: the repository's corpus plus files written by the real writers.
fn seeds(target: &str, gpu: &Arc<Gpu>, fx: &Fixture) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = read_seeds(&root.join("fuzz/corpus").join(target));
    let fixtures = root.join("tests/fixtures/samplers");
    match target {
        "weights" => {
            out.push(
                std::fs::read(fixtures.join("eps/diffusion_pytorch_model.safetensors")).unwrap(),
            );
            let flat = wgpu_diffusion::nn::init::default_init(&fx.small_store, 3);
            let mut meta = std::collections::HashMap::new();
            meta.insert("format".into(), "pt".into());
            out.push(serialize_named(&fx.small_store, &[("", &flat)], meta).unwrap());
        }
        "checkpoint" => {
            let cfg = TrainConfig {
                batch_size: 1,
                sample_every: 0,
                class_conditional: false,
                ..Default::default()
            };
            let trainer = Trainer::new(gpu.clone(), cfg, &small_config()).expect("trainer");
            trainer
                .set_weights(&wgpu_diffusion::nn::init::default_init(&fx.small_store, 1))
                .unwrap();
            out.push(trainer.checkpoint_bytes(&small_config()).unwrap());
        }
        "config" => {
            out.push(std::fs::read(fixtures.join("eps/config.json")).unwrap());
            for p in UNetConfig::PRESETS {
                out.push(UNetConfig::preset(p).unwrap().to_json().into_bytes());
            }
        }
        "vae_config" => {
            let vae = root.join("tests/fixtures/vae");
            out.push(std::fs::read(vae.join("model/config.json")).unwrap());
            out.push(std::fs::read(vae.join("model_noattn/config.json")).unwrap());
            for p in wgpu_diffusion::nn::VaeConfig::PRESETS {
                let c = wgpu_diffusion::nn::VaeConfig::preset(p).unwrap();
                out.push(c.to_json().into_bytes());
            }
        }
        "scheduler" => {
            out.push(std::fs::read(fixtures.join("eps/scheduler_config.json")).unwrap());
            out.push(std::fs::read(fixtures.join("v/scheduler/scheduler_config.json")).unwrap());
        }
        "toml" => {
            out.push(
                toml::to_string(&TrainConfig::default())
                    .unwrap()
                    .into_bytes(),
            );
        }
        "image" => {
            use image::{DynamicImage, ImageFormat};
            let gray = image::GrayImage::from_fn(7, 5, |x, y| image::Luma([(x * 30 + y) as u8]));
            let rgb = image::RgbImage::from_fn(9, 9, |x, y| image::Rgb([x as u8 * 20, y as u8, 7]));
            out.push(png(
                DynamicImage::ImageLuma8(gray.clone()),
                ImageFormat::Png,
            ));
            out.push(png(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Png));
            out.push(png(
                DynamicImage::ImageRgb8(rgb).to_rgba8().into(),
                ImageFormat::Png,
            ));
            out.push(png(
                DynamicImage::ImageLuma16(DynamicImage::ImageLuma8(gray.clone()).to_luma16()),
                ImageFormat::Png,
            ));
            out.push(png(DynamicImage::ImageLuma8(gray), ImageFormat::Jpeg));
        }
        _ => unreachable!(),
    }
    out
}

fn hash(bytes: &[u8]) -> String {
    // FNV-1a: a stable name for a finding.
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

fn fuzz(target: &str, minutes: f64, seed: u64, gpu: &Arc<Gpu>, fx: &Fixture) -> (u64, usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let findings = root.join("findings");
    std::fs::create_dir_all(&findings).unwrap();
    let current_path = findings.join(format!("{target}.current"));
    // The previous run of this target died on the input it was running: file it.
    if let Ok(prev) = std::fs::read(&current_path)
        && !prev.is_empty()
    {
        let name = findings.join(format!("{target}-abort-{}", hash(&prev)));
        std::fs::write(&name, &prev).unwrap();
        eprintln!("{target}: the previous run aborted on {}", name.display());
    }
    let seeds = seeds(target, gpu, fx);
    for s in &seeds {
        run_target(target, s, fx);
    }
    let mut current = std::fs::File::create(&current_path).unwrap();
    let started = Arc::new(AtomicU64::new(u64::MAX));
    let t0 = Instant::now();
    {
        let started = started.clone();
        let target = target.to_string();
        let current_path = current_path.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let s = started.load(Ordering::Relaxed);
                if s != u64::MAX && t0.elapsed().as_millis() as u64 > s + HANG.as_millis() as u64 {
                    let input = std::fs::read(&current_path).unwrap_or_default();
                    let name =
                        current_path.with_file_name(format!("{target}-hang-{}", hash(&input)));
                    let _ = std::fs::write(&name, &input);
                    let _ = std::fs::remove_file(&current_path);
                    eprintln!("{target}: an input ran over {HANG:?}: {}", name.display());
                    std::process::exit(2);
                }
            }
        });
    }
    let mut rng = Rng(seed ^ hash(target.as_bytes()).len() as u64 ^ 0x5eed);
    let deadline = Duration::from_secs_f64(minutes * 60.0);
    let (mut execs, mut found) = (0u64, 0usize);
    let mut last_report = Instant::now();
    while t0.elapsed() < deadline {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut input, target, &seeds);
        current.set_len(0).unwrap();
        current.rewind().unwrap();
        current.write_all(&input).unwrap();
        started.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_target(target, &input, fx)
        }));
        started.store(u64::MAX, Ordering::Relaxed);
        execs += 1;
        if result.is_err() {
            found += 1;
            let name = findings.join(format!("{target}-panic-{}", hash(&input)));
            std::fs::write(&name, &input).unwrap();
            eprintln!("{target}: panic, input saved to {}", name.display());
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "{target}: {execs} inputs in {:.0} s, {found} panics",
                t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    drop(current);
    let _ = std::fs::remove_file(&current_path);
    (execs, found)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = args.first().cloned().unwrap_or_else(|| "all".into());
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let minutes: f64 = flag("--minutes").map_or(10.0, |m| m.parse().expect("--minutes"));
    let seed: u64 = flag("--seed").map_or(0, |s| s.parse().expect("--seed"));
    let targets: Vec<&str> = if target == "all" {
        TARGETS.to_vec()
    } else {
        vec![
            TARGETS
                .iter()
                .copied()
                .find(|t| *t == target)
                .unwrap_or_else(|| panic!("unknown target {target}; one of {TARGETS:?} or all")),
        ]
    };
    // Panics are findings, reported by the loop: keep their messages short.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("panic: {info}");
    }));
    let gpu = Gpu::new(&Default::default()).expect("a GPU adapter (lavapipe works)");
    let fixture_cfg = UNetConfig::from_json(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/eps/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let fx = Fixture::new(&gpu, &fixture_cfg).unwrap();
    if args.iter().any(|a| a == "--write-corpus") {
        // Keeps the generated seeds (the small ones) in the repository's corpus.
        for t in &targets {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(t);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds(t, &gpu, &fx).iter().enumerate() {
                if seed.len() <= 64 << 10 {
                    std::fs::write(dir.join(format!("seed-{i}-{}", hash(seed))), seed).unwrap();
                }
            }
        }
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--replay") {
        // Re-run saved inputs: prints each panic's message.
        for f in &args[i + 1..] {
            let input = std::fs::read(f).expect("input");
            eprintln!("== {f}");
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_target(targets[0], &input, &fx)
            }));
        }
        return;
    }
    for t in targets {
        let start = Instant::now();
        let (execs, found) = fuzz(t, minutes, seed, &gpu, &fx);
        println!(
            "{{\"target\":\"{t}\",\"seconds\":{:.0},\"inputs\":{execs},\"panics\":{found}}}",
            start.elapsed().as_secs_f64()
        );
    }
}
