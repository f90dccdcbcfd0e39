//! `your_ai setup`: detect the hardware and save it to the setup file (keeping the benchmark
//! results already there).

use crate::error::Result;
use crate::runtime::hardware::Hardware;
use crate::runtime::setup_file;

pub fn run() -> Result<()> {
    let hw = Hardware::detect();
    println!("Hardware: {}", hw.describe());
    let best = setup_file::load_or_set_aside()?
        .map(|p| p.best)
        .unwrap_or_default();
    let path = setup_file::save(&setup_file::Saved {
        hardware: hw,
        best: best.clone(),
    })?;
    println!(
        "Saved the hardware and benchmark results to {}",
        path.display()
    );
    if best.is_empty() {
        println!(
            "No benchmark results yet: `your_ai benchmark --model M` measures the configurations \
             that fit and saves the fastest here, for `your_ai train --auto-optimize`."
        );
    }
    for (model, b) in &best {
        println!(
            "  {model}: batch {} × length {}, rank {} at {:.1} tokens/s, peak {:.2} GB",
            b.batch_size,
            b.max_seq_length,
            b.lora_rank,
            b.tokens_per_s,
            b.peak_bytes as f64 / 1e9
        );
    }
    Ok(())
}
