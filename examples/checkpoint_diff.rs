//! Compares two checkpoints tensor by tensor, bit for bit (the kill soak's final check), or checks
//! that every checkpoint and the exported model of a run folder load (no torn file).
//!
//!   cargo run --release --example checkpoint_diff -- A.safetensors B.safetensors
//!   cargo run --release --example checkpoint_diff -- --check RUN_DIR
//!
//! Exits 1 when the tensors differ or a file does not load.

use std::path::Path;

use wgpu_diffusion::io::model_dir::MODEL_WEIGHTS;
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::train::RunDir;

fn check(dir: &Path) -> anyhow::Result<usize> {
    let run = RunDir {
        root: dir.to_path_buf(),
    };
    let mut files = run.list_checkpoints();
    let model = run.model().join(MODEL_WEIGHTS);
    if model.exists() {
        files.push(model);
    }
    for f in &files {
        let t = LoadedTensors::read(f)?;
        for name in t.names() {
            t.get(&name)?;
        }
    }
    if run.model().exists() {
        wgpu_diffusion::io::model_dir::read_model_config(&run.model())?;
    }
    Ok(files.len())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--check") {
        let dir = Path::new(args.get(1).expect("--check RUN_DIR"));
        match check(dir) {
            Ok(n) => {
                println!("{n} files load");
                return Ok(());
            }
            Err(e) => {
                eprintln!("torn or unreadable file in {}: {e:#}", dir.display());
                std::process::exit(1);
            }
        }
    }
    let (a, b) = match args.as_slice() {
        [a, b] => (
            LoadedTensors::read(Path::new(a))?,
            LoadedTensors::read(Path::new(b))?,
        ),
        _ => anyhow::bail!("usage: checkpoint_diff A B | --check RUN_DIR"),
    };
    let (mut names_a, mut names_b) = (a.names(), b.names());
    names_a.sort();
    names_b.sort();
    if names_a != names_b {
        eprintln!("the tensor names differ");
        std::process::exit(1);
    }
    let (mut values, mut differing) = (0usize, 0usize);
    for name in &names_a {
        let (_, va) = a.get(name)?;
        let (_, vb) = b.get(name)?;
        values += va.len();
        differing += va
            .iter()
            .zip(&vb)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count()
            + va.len().abs_diff(vb.len());
    }
    let (sa, sb) = (a.metadata(), b.metadata());
    println!(
        "{} tensors, {values} values, {differing} differ; steps {} and {}, data positions {} and {}",
        names_a.len(),
        sa.get("step").map_or("?", |s| s.as_str()),
        sb.get("step").map_or("?", |s| s.as_str()),
        sa.get("data_position").map_or("?", |s| s.as_str()),
        sb.get("data_position").map_or("?", |s| s.as_str()),
    );
    if differing > 0 || sa.get("step") != sb.get("step") {
        std::process::exit(1);
    }
    Ok(())
}
