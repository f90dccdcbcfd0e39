//! Presets built into the binary: the starting configuration per machine memory size
//! (`presets/machines.yaml`) and the shapes of the model aliases (`presets/model_shapes.json`),
//! so `recommend` and `estimate` work before anything is downloaded or benchmarked.

use crate::error::Result;
use crate::model::ModelConfig;

const MACHINE_PRESETS: &str = include_str!("../../presets/machines.yaml");
const MODEL_SHAPES: &str = include_str!("../../presets/model_shapes.json");

/// Settings for machines with at least `memory_gb` of memory.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct MachinePreset {
    pub memory_gb: f64,
    pub batch_size: usize,
    pub max_seq_length: usize,
    pub lora_rank: usize,
    pub num_layers: Option<usize>,
    pub quantize: Option<u8>,
}

/// Every machine preset, smallest machine first.
pub fn machine_presets() -> Vec<MachinePreset> {
    // The file is part of the binary and checked by a test; an error here is a build mistake.
    let mut v: Vec<MachinePreset> =
        serde_yaml::from_str(MACHINE_PRESETS).expect("presets/machines.yaml is valid");
    v.sort_by(|a, b| a.memory_gb.total_cmp(&b.memory_gb));
    v
}

/// The preset for a machine with `memory` bytes: the largest one it has room for (the
/// smallest one below all of them).
pub fn preset_for(memory: u64) -> MachinePreset {
    let all = machine_presets();
    let gb = memory as f64 / 1e9;
    all.iter()
        .rev()
        .find(|p| p.memory_gb <= gb * 1.05)
        .unwrap_or(&all[0])
        .clone()
}

/// The shape of a model alias, when it is one we know.
pub fn alias_shape(alias: &str) -> Option<ModelConfig> {
    let all: serde_json::Value = serde_json::from_str(MODEL_SHAPES).ok()?;
    ModelConfig::from_hf_json(all.get(alias)?, alias).ok()
}

/// The dtype a model alias's checkpoint stores its weights in.
pub fn alias_dtype(alias: &str) -> Option<candle_core::DType> {
    let all: serde_json::Value = serde_json::from_str(MODEL_SHAPES).ok()?;
    crate::model::config::stored_dtype(all.get(alias)?)
}

/// What `spec` is without its weights: an alias that is not downloaded yet uses its known
/// shape (nothing is fetched); anything else is inspected on disk.
pub fn shape(spec: &str) -> Result<crate::model::Inspected> {
    if let Some(repo) = crate::model::source::alias_repo(spec) {
        if !crate::model::source::is_cached(repo) {
            if let Some(cfg) = alias_shape(spec) {
                return Ok(crate::model::Inspected::from_config(cfg, alias_dtype(spec)));
            }
        }
    }
    crate::model::inspect(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_cover_the_machine_sizes_in_order() {
        let p = machine_presets();
        let sizes: Vec<f64> = p.iter().map(|x| x.memory_gb).collect();
        assert_eq!(sizes, [16.0, 32.0, 64.0, 96.0, 128.0, 192.0]);
        assert_eq!(preset_for(8_000_000_000).memory_gb, 16.0);
        assert_eq!(preset_for(17_179_869_184).memory_gb, 16.0); // 16 GiB
        assert_eq!(preset_for(68_719_476_736).memory_gb, 64.0); // 64 GiB
        assert_eq!(preset_for(500_000_000_000).memory_gb, 192.0);
    }

    #[test]
    fn every_alias_has_a_shape() {
        for (alias, _) in crate::model::source::ALIASES {
            let cfg = alias_shape(alias).unwrap_or_else(|| panic!("{alias} has no shape"));
            assert!(cfg.num_hidden_layers > 0);
        }
        assert!(alias_shape("no-such-model").is_none());
    }
}
