//! The PEFT files of an adapter: `adapter_model.safetensors` and `adapter_config.json`, written
//! as PEFT writes them and read as PEFT reads them, refusing what a merge or our forward would
//! drop or misread.

use super::{Adapter, AdapterError, LoraConfig, LoraPair, Target};
use crate::model::ModelConfig;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

impl Adapter {
    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (which must exist).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), AdapterError> {
        let mut tensors = HashMap::new();
        for (l, t, p) in self.iter() {
            tensors.insert(Self::tensor_name(l, t, 'A'), p.a.clone());
            tensors.insert(Self::tensor_name(l, t, 'B'), p.b.clone());
        }
        let st = dir.join("adapter_model.safetensors");
        crate::io::tensors::save_safetensors(&tensors, &st).map_err(|e| AdapterError::Io {
            action: "write",
            path: st.clone(),
            reason: e.to_string(),
        })?;
        let base = crate::model::source::AdapterBase::of(base_model);
        let all_layers = self.pairs.len();
        let layers = if self.cfg.layers.len() == all_layers {
            Value::Null
        } else {
            json!(self.cfg.layers)
        };
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base.name,
            "r": self.cfg.rank,
            "lora_alpha": self.cfg.alpha,
            "lora_dropout": self.cfg.dropout,
            "target_modules": self.cfg.targets.iter().map(|t| t.module()).collect::<Vec<_>>(),
            "layers_to_transform": layers,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": self.cfg.use_rslora,
            "use_dora": false,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": base.revision,
        });
        let cfg_path = dir.join("adapter_config.json");
        std::fs::write(
            &cfg_path,
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| AdapterError::Io {
            action: "write",
            path: cfg_path,
            reason: e.to_string(),
        })
    }

    /// Loads a PEFT LoRA adapter directory for a model with config `model`.
    pub fn load_peft(
        dir: &Path,
        model: &ModelConfig,
        device: &Device,
    ) -> Result<Self, AdapterError> {
        if !dir.exists() {
            return Err(AdapterError::NoSuchDir {
                path: dir.to_path_buf(),
            });
        }
        // Files a run was killed while moving in are put in place first (best effort: where
        // the directory is read-only, what is there is read, as it would be without).
        let _ = crate::io::file_set::finish_commits(dir);
        let cfg_path = dir.join("adapter_config.json");
        let bad = |reason: String| AdapterError::Invalid {
            path: cfg_path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| AdapterError::Io {
            action: "read",
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
        let c: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if c.get("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err(bad(
                "`peft_type` is not \"LORA\"; only LoRA adapters are supported".into(),
            ));
        }
        // PEFT's flags are booleans; "true" or 1 would read as false here and, for rsLoRA,
        // scale the update wrongly.
        for flag in ["use_dora", "fan_in_fan_out", "use_rslora"] {
            match c.get(flag) {
                None | Some(Value::Null | Value::Bool(_)) => {}
                Some(v) => return Err(bad(format!("`{flag}` must be true or false, not {v}"))),
            }
        }
        for flag in ["use_dora", "fan_in_fan_out"] {
            if c.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(bad(format!("`{flag}: true` is not supported")));
            }
        }
        // Parts of a PEFT adapter beyond its LoRA pairs: a merge without them would differ from
        // the adapter PEFT loads, so they are refused rather than dropped.
        if c.get("modules_to_save")
            .and_then(Value::as_array)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(
                "`modules_to_save` (whole modules trained beside the LoRA pairs) is not supported"
                    .into(),
            ));
        }
        if let Some(b) = c
            .get("bias")
            .filter(|b| b.as_str() != Some("none") && !b.is_null())
        {
            return Err(bad(format!(
                "`bias: {b}` (trained biases) is not supported; only \"none\" is"
            )));
        }
        if c.get("trainable_token_indices")
            .is_some_and(|t| !t.is_null())
        {
            return Err(bad(
                "`trainable_token_indices` (trained embedding rows) is not supported".into(),
            ));
        }
        for pat in ["rank_pattern", "alpha_pattern"] {
            if c.get(pat)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(bad(format!("a non-empty `{pat}` is not supported")));
            }
        }
        let rank =
            c.get("r")
                .and_then(Value::as_u64)
                .filter(|r| *r > 0)
                .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
        let alpha = match c.get("lora_alpha") {
            None | Some(Value::Null) => return Err(bad("`lora_alpha` is missing".into())),
            Some(a) => a
                .as_f64()
                .filter(|a| *a > 0.0 && (*a as f32).is_finite())
                .ok_or_else(|| bad(format!("`lora_alpha` must be a positive number, not {a}")))?,
        };
        let targets: Vec<Target> = match c.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().and_then(Target::parse).ok_or_else(|| {
                        bad(format!(
                            "target module {v} is not one of q/k/v/o/gate/up/down_proj"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(Value::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
            _ => return Err(bad("`target_modules` must be a list of module names".into())),
        };
        let index = |v: &Value| {
            v.as_u64().map(|l| l as usize).ok_or_else(|| {
                bad(format!(
                    "`layers_to_transform`: {v} is not a block index (0, 1, 2, …)"
                ))
            })
        };
        let layers: Vec<usize> = match c.get("layers_to_transform") {
            None | Some(Value::Null) => (0..model.num_hidden_layers).collect(),
            Some(n @ Value::Number(_)) => vec![index(n)?],
            Some(Value::Array(a)) => a.iter().map(index).collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(bad(
                    "`layers_to_transform` must be a list of block indices".into()
                ))
            }
        };
        if let Some(l) = layers.iter().find(|&&l| l >= model.num_hidden_layers) {
            return Err(bad(format!(
                "layer {l} does not exist; the model has {} blocks",
                model.num_hidden_layers
            )));
        }
        let cfg = LoraConfig {
            rank,
            alpha,
            dropout: c.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            targets,
            layers,
            use_rslora: c
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let st_path = dir.join("adapter_model.safetensors");
        let tensors =
            candle_core::safetensors::load(&st_path, device).map_err(|e| AdapterError::Io {
                action: "read",
                path: st_path.clone(),
                reason: e.to_string(),
            })?;
        // PEFT writes `...lora_A.weight`; some versions keep the adapter name (`lora_A.default.weight`).
        let used = std::cell::RefCell::new(std::collections::HashSet::new());
        let find = |l: usize, t: Target, which: char| -> Option<&Tensor> {
            let plain = Self::tensor_name(l, t, which);
            let named = plain.replace(".weight", ".default.weight");
            let (name, x) = [plain, named]
                .into_iter()
                .find_map(|n| tensors.get_key_value(&n))?;
            used.borrow_mut().insert(name.clone());
            Some(x)
        };
        let mut pairs: Vec<[Option<LoraPair>; 7]> = (0..model.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        let mut found = 0;
        for &l in &cfg.layers {
            for &t in &cfg.targets {
                let (inp, out) = t.dims(model);
                match (find(l, t, 'A'), find(l, t, 'B')) {
                    (Some(a), Some(b)) => {
                        let fits = a.dims().get(1) == Some(&inp) && b.dims().first() == Some(&out);
                        if fits && (a.dims() != [rank, inp] || b.dims() != [out, rank]) {
                            return Err(AdapterError::Invalid {
                                path: st_path.clone(),
                                reason: format!(
                                    "layer {l} {}: lora_A {:?} / lora_B {:?} are not of rank {rank}, the `r` of adapter_config.json; the config and the tensors disagree",
                                    t.module(),
                                    a.dims(),
                                    b.dims()
                                ),
                            });
                        }
                        if a.dims() != [rank, inp] || b.dims() != [out, rank] {
                            return Err(AdapterError::Invalid {
                                path: st_path.clone(),
                                reason: format!(
                                    "layer {l} {}: lora_A {:?} / lora_B {:?} do not fit rank {rank} on a [{out}, {inp}] weight; the adapter was made for another model",
                                    t.module(),
                                    a.dims(),
                                    b.dims()
                                ),
                            });
                        }
                        // Integer tensors would convert to numbers no training made.
                        if [a, b].iter().any(|x| !x.dtype().is_float()) {
                            return Err(AdapterError::Invalid {
                                path: st_path.clone(),
                                reason: format!(
                                    "layer {l} {}: lora_A / lora_B are {:?} / {:?}; an adapter's \
                                     tensors are floating point (F32, F16 or BF16)",
                                    t.module(),
                                    a.dtype(),
                                    b.dtype()
                                ),
                            });
                        }
                        let to = |x: &Tensor| x.to_dtype(DType::F32);
                        pairs[l][t.index()] = Some(LoraPair {
                            a: to(a).map_err(|e| bad(e.to_string()))?,
                            b: to(b).map_err(|e| bad(e.to_string()))?,
                        });
                        found += 1;
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(AdapterError::Invalid {
                            path: st_path.clone(),
                            reason: format!(
                                "layer {l} {} has only one of lora_A and lora_B; the file is incomplete or damaged",
                                t.module()
                            ),
                        })
                    }
                    // PEFT skips modules that do not exist in a block; a layer range may be sparse.
                    (None, None) => continue,
                }
            }
        }
        let used = used.into_inner();
        let mut unused: Vec<&String> = tensors.keys().filter(|n| !used.contains(*n)).collect();
        if !unused.is_empty() {
            unused.sort();
            return Err(AdapterError::Invalid {
                path: st_path,
                reason: format!(
                    "{} tensor(s) are no LoRA pair of this model's layers and the config's target_modules and layers_to_transform (first: {}); a merge would leave them out",
                    unused.len(),
                    unused[0]
                ),
            });
        }
        if found == 0 {
            return Err(AdapterError::Invalid {
                path: st_path,
                reason: "no LoRA tensors for this model's layers were found".into(),
            });
        }
        let adapter = Self { cfg, pairs };
        if let Some(name) = adapter.first_non_finite() {
            return Err(AdapterError::Invalid {
                path: st_path,
                reason: format!(
                    "{name} holds NaN or infinite values (the run that wrote it diverged); \
                     use an earlier checkpoint or best/ instead"
                ),
            });
        }
        Ok(adapter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::tests::{tiny_cfg, tiny_lora};

    #[test]
    fn peft_files_round_trip_including_other_writers_naming() {
        let (model, cfg) = (tiny_cfg(), tiny_lora());
        let mut a = Adapter::init(cfg, &model, 1, &Device::Cpu).unwrap();
        for t in a.tensors_mut() {
            *t = Tensor::randn(0f32, 1.0, t.dims(), &Device::Cpu).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        a.save_peft(dir.path(), "base").unwrap();
        let back = Adapter::load_peft(dir.path(), &model, &Device::Cpu).unwrap();
        assert_eq!(back.cfg, a.cfg);
        let same = |x: &Adapter, y: &Adapter| {
            x.iter().zip(y.iter()).all(|((l1, t1, p1), (l2, t2, p2))| {
                l1 == l2
                    && t1 == t2
                    && p1.a.to_vec2::<f32>().unwrap() == p2.a.to_vec2::<f32>().unwrap()
                    && p1.b.to_vec2::<f32>().unwrap() == p2.b.to_vec2::<f32>().unwrap()
            })
        };
        assert!(same(&a, &back));
        // Older PEFT keeps the adapter name in tensor names; some writers save f16.
        let st = dir.path().join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        let renamed: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                (
                    k.replace(".weight", ".default.weight"),
                    v.to_dtype(DType::F16).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&renamed, &st).unwrap();
        let half = Adapter::load_peft(dir.path(), &model, &Device::Cpu).unwrap();
        assert_eq!(half.num_params(), a.num_params());
        // An adapter for another model is refused with the shapes named.
        let other = ModelConfig {
            hidden_size: 64,
            head_dim: 16,
            ..model.clone()
        };
        let e = Adapter::load_peft(dir.path(), &other, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("made for another model"), "{e}");
        // A config PEFT would write for DoRA is refused, not silently misread.
        let cfg_path = dir.path().join("adapter_config.json");
        let mut c: Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        c["use_dora"] = json!(true);
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        assert!(Adapter::load_peft(dir.path(), &model, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("use_dora"));
    }

    /// What a merge would leave out of a PEFT adapter is refused, each with what is wrong.
    #[test]
    fn parts_beyond_the_lora_pairs_are_refused() {
        let (model, cfg) = (tiny_cfg(), tiny_lora());
        let a = Adapter::init(cfg, &model, 1, &Device::Cpu).unwrap();
        let refused = |config: &dyn Fn(&mut Value), tensors: &dyn Fn(&mut HashMap<_, _>)| {
            let dir = tempfile::tempdir().unwrap();
            a.save_peft(dir.path(), "base").unwrap();
            let cfg_path = dir.path().join("adapter_config.json");
            let mut c: Value =
                serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
            config(&mut c);
            std::fs::write(&cfg_path, c.to_string()).unwrap();
            let st = dir.path().join("adapter_model.safetensors");
            let mut t: HashMap<String, Tensor> =
                candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
            tensors(&mut t);
            candle_core::safetensors::save(&t, &st).unwrap();
            match Adapter::load_peft(dir.path(), &model, &Device::Cpu) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        let none = |_: &mut HashMap<String, Tensor>| {};
        // Unchanged, it loads: the refusals below come from each change alone.
        assert_eq!(refused(&|_| {}, &none), "");
        let e = refused(&|c| c["modules_to_save"] = json!(["embed_tokens"]), &none);
        assert!(e.contains("modules_to_save"), "{e}");
        let e = refused(&|c| c["bias"] = json!("all"), &none);
        assert!(e.contains("bias"), "{e}");
        let e = refused(&|c| c["trainable_token_indices"] = json!([1, 2]), &none);
        assert!(e.contains("trainable_token_indices"), "{e}");
        let e = refused(&|c| c["lora_alpha"] = json!("4"), &none);
        assert!(e.contains("must be a positive number"), "{e}");
        let e = refused(&|c| c["lora_alpha"] = json!(-8.0), &none);
        assert!(
            e.contains("`lora_alpha` must be a positive number, not -8"),
            "{e}"
        );
        // Mistyped flags and indices, and integer tensors, are refused, not misread.
        let e = refused(&|c| c["use_rslora"] = json!("true"), &none);
        assert!(e.contains("`use_rslora` must be true or false"), "{e}");
        let e = refused(&|c| c["layers_to_transform"] = json!([-1]), &none);
        assert!(e.contains("-1 is not a block index"), "{e}");
        let q = Adapter::tensor_name(1, Target::Q, 'A');
        let e = refused(&|_| {}, &|t| {
            let x = t[&q].to_dtype(DType::I64).unwrap();
            t.insert(q.clone(), x);
        });
        assert!(e.contains("floating point"), "{e}");
        let e = refused(&|c| c["r"] = json!(1), &none);
        assert!(e.contains("the config and the tensors disagree"), "{e}");
        let half = Adapter::tensor_name(1, Target::Down, 'B');
        let e = refused(&|_| {}, &|t| {
            t.remove(&half);
        });
        assert!(e.contains("layer 1 down_proj has only one of"), "{e}");
        // A pair for a block the config does not name (and a stray tensor) would be dropped.
        let extra = Adapter::tensor_name(0, Target::Q, 'A');
        let e = refused(&|_| {}, &|t| {
            let x = t[&Adapter::tensor_name(1, Target::Q, 'A')].clone();
            t.insert(extra.clone(), x);
        });
        assert!(e.contains(&format!("(first: {extra})")), "{e}");
    }
}
