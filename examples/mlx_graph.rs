//! How much work the MLX engine's training step asks of MLX: the step (forward, head, and each
//! block's recompute and vector-Jacobian product) and the optimizer's update built as one lazy
//! graph and counted by primitive, with nothing computed. On a GPU every node is at least one
//! kernel that the host builds and launches, and on an 8B step on an H200 that host work set the
//! pace (docs/gpu.md), so this is how changes to the step are weighed where there is no GPU.
//! On MLX's CPU backend the fused ops (RMSNorm, RoPE, attention) show as the primitives they
//! fall back to there; on a GPU each is one node.
//!
//!     cargo run --release --features mlx --example mlx_graph -- MODEL [TOKENS] [RANK] [f32|bf16]
//!
//! MODEL: a model folder or GGUF (SmolLM2's, say); TOKENS (2048): one row of that many, every
//! target trained; RANK (16): LoRA on all seven projections of every block.

use candle_core::{DType, Device};
use std::collections::BTreeMap;
use your_ai::data::batch::Row;
use your_ai::data::Sample;
use your_ai::engine::mlx::optimizer::{self, AdamW};
use your_ai::engine::mlx::step::{self, Evaluation};
use your_ai::engine::mlx::weights::Model;
use your_ai::engine::mlx::{batch, graph, params::Params};
use your_ai::model::lora::{Adapter, LoraConfig, Target};
use your_ai::model::{load, LoadOptions};

/// Primitives that make a view of their input (no kernel on a GPU when it is contiguous).
const VIEWS: [&str; 10] = [
    "Transpose",
    "Broadcast",
    "Reshape",
    "ExpandDims",
    "Squeeze",
    "Slice",
    "Flatten",
    "Unflatten",
    "AsStrided",
    "Split",
];

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> Res<T> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("argument {i}: cannot read {s:?}").into()),
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_path = args
        .get(1)
        .ok_or("usage: mlx_graph MODEL [TOKENS] [RANK] [f32|bf16]")?;
    let tokens: usize = arg(&args, 2, 2048)?;
    let rank: usize = arg(&args, 3, 16)?;
    let (dtype, mlx_dtype) = match args.get(4).map(String::as_str) {
        None | Some("bf16") => (DType::BF16, mlx_rs::Dtype::Bfloat16),
        Some("f32") => (DType::F32, mlx_rs::Dtype::Float32),
        Some(other) => return Err(format!("dtype {other:?}: f32 or bf16").into()),
    };
    let llama = load(
        model_path,
        &LoadOptions::new(Device::Cpu, dtype, None),
        None,
    )?
    .model;
    let cfg = llama.cfg.clone();
    let layers = cfg.num_hidden_layers;
    let lora = LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        layers: (0..layers).collect(),
        use_rslora: false,
    };
    let adapter = Adapter::init(lora, &cfg, 7, &Device::Cpu)?;
    let model = Model::from_llama(llama, mlx_dtype, None)?;
    let params = Params::from_adapter(&adapter)?;
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|p| (p * 7919) % (cfg.vocab_size as u32 - 3) + 3)
        .collect();
    let sample = Sample {
        trained: vec![true; tokens],
        ids,
        truncated: 0,
        untrained_turns: 0,
    };
    let lay = batch::layout(&[Row::single(&sample, 1.0)], &cfg)?;
    let pending = step::forward_backward(
        &model,
        &params,
        &lay,
        (1.0 / tokens as f64, 0),
        Evaluation::Deferred,
        &mut Default::default(),
    )?;
    let step_nodes = graph::census(&graph::print(&pending.outputs().collect::<Vec<_>>())?);

    let mut opt = AdamW::new(&params.bank_sizes(), 0.01)?;
    // The engine's moments are computed before a step.
    mlx_rs::transforms::eval(opt.m.iter().chain(&opt.v))?;
    let norm = optimizer::global_norm(&pending.grad)?;
    let updated = opt.step(&params.banks, &pending.grad, 1.0, 1e-4)?;
    let outputs: Vec<_> = pending
        .outputs()
        .chain([&norm])
        .chain(&updated)
        .chain(&opt.m)
        .chain(&opt.v)
        .collect();
    let all = graph::census(&graph::print(&outputs)?);
    // The update's graph holds the step's: what it adds is the difference.
    let update_nodes: BTreeMap<String, usize> = all
        .iter()
        .map(|(k, n)| (k.clone(), n - step_nodes.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();

    println!(
        "MLX graph of one training step: {model_path}, {layers} blocks, {tokens} tokens, \
         rank {rank} on all seven projections, {dtype:?}, {} LoRA tensors",
        params.tensors().len()
    );
    for (what, nodes) in [("step", &step_nodes), ("update", &update_nodes)] {
        let (views, work): (Vec<_>, Vec<_>) =
            nodes.iter().partition(|(k, _)| VIEWS.contains(&k.as_str()));
        let total = |v: &[(&String, &usize)]| v.iter().map(|(_, n)| **n).sum::<usize>();
        println!(
            "\n{what}: {} nodes that compute ({:.1} a block), and {} views",
            total(&work),
            total(&work) as f64 / layers as f64,
            total(&views)
        );
        let mut rows = work;
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (name, n) in rows {
            println!("{n:>8} {:>8.1}  {name}", *n as f64 / layers as f64);
        }
    }
    Ok(())
}
