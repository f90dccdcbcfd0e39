//! Gradients of the weighted objectives through the explicit step on a tiny random Llama in
//! f64: distrust-weighted cross-entropy against candle's autograd of the weighting written out,
//! and DPO/ORPO against central finite differences of the objective `eval --method` computes.

mod common;
#[path = "common/gradients.rs"]
mod gradients;

use candle_core::{Device, Tensor};
use common::TinySpec;
use gradients::*;
use your_ai::data::batch::Row;
use your_ai::data::Sample;
use your_ai::engine::candle::step::Grads;
use your_ai::model::lora::{Adapter, Target};
use your_ai::model::Llama;

/// Distrust weights c of four examples from made-up (w, H): D = 2.7·(ln(1 − w + 1e-8) + H)².
fn distrust_weights(lambda: f64) -> Vec<f32> {
    use your_ai::distrust::formula::{example_weights, Provenance};
    let prov: Vec<Provenance> = [(0.05, 3.0), (0.9, 0.1), (0.5, 1.0), (0.3, 0.2)]
        .iter()
        .map(|&(w, h)| Provenance {
            auth_weight: w,
            prov_entropy: h,
        })
        .collect();
    example_weights(&prov, 2.7, lambda).c
}

fn weighted_rows(s: &[Sample], c: &[f32]) -> Vec<Row> {
    s.iter().zip(c).map(|(s, &c)| Row::single(s, c)).collect()
}

#[test]
fn distrust_weighted_gradient_equals_autograd_of_the_explicitly_weighted_ce() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let c = distrust_weights(0.6);
    assert!(c.iter().any(|&c| (c - 1.0).abs() > 0.3), "{c:?}");
    let r = weighted_rows(&samples(), &c);
    // Accumulated over two micro-batches, normalised by Σ c·n of the whole batch.
    let (loss, grads) = explicit_weighted(
        &model,
        &adapter,
        &[batch(&model, &r[..2]), batch(&model, &r[2..])],
    );
    let vars = autograd_vars(&adapter);
    // The oracle: Σ_i c_i·CE_sum_i / Σ_i c_i·n_i written out per example (per-example CE
    // sums from autograd, the weighting done here on scalars-as-tensors).
    let s = samples();
    let mut num: Option<Tensor> = None;
    let mut den = 0.0;
    for (i, sample) in s.iter().enumerate() {
        let mb = batch(&model, &rows(std::slice::from_ref(sample)));
        let ce_sum =
            (autograd_loss(&model, &vars, adapter.cfg.scale(), &mb) * mb.n_targets as f64).unwrap();
        let term = (ce_sum * c[i] as f64).unwrap();
        num = Some(match num {
            Some(n) => (n + term).unwrap(),
            None => term,
        });
        den += c[i] as f64 * mb.n_targets as f64;
    }
    let oracle = (num.unwrap() / den).unwrap();
    assert!(
        (oracle.to_scalar::<f64>().unwrap() - loss).abs() < 1e-9,
        "loss {loss} vs {oracle}"
    );
    let store = oracle.backward().unwrap();
    for (l, t, a, b) in &vars {
        let (ga, gb) = grads.pairs[*l][t.index()].as_ref().unwrap();
        for (name, ours, theirs) in [
            ("A", ga, store.get(a.as_tensor()).unwrap()),
            ("B", gb, store.get(b.as_tensor()).unwrap()),
        ] {
            let rel = max_rel_diff(theirs, ours);
            assert!(
                rel < 1e-8,
                "layer {l} {t:?} d{name}: relative difference {rel}"
            );
        }
    }
    // And it differs from the plain gradient: the weighting acts.
    let (_, plain) = explicit(&model, &adapter, &[batch(&model, &rows(&s))]);
    let moved = grads
        .tensors()
        .zip(plain.tensors())
        .map(|(a, b)| max_rel_diff(b, a))
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "weighted and plain gradients agree ({moved})");
}

#[test]
fn lambda_zero_gives_the_plain_gradient_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let c = distrust_weights(0.0);
    assert!(c.iter().all(|&c| c == 1.0));
    let s = samples();
    let (lw, gw) = explicit_weighted(&model, &adapter, &[batch(&model, &weighted_rows(&s, &c))]);
    let (lp, gp) = explicit(&model, &adapter, &[batch(&model, &rows(&s))]);
    assert_eq!(lw.to_bits(), lp.to_bits());
    for (a, b) in gw.tensors().zip(gp.tensors()) {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

/// Mean CE of one example under `adapter`.
fn example_loss(model: &Llama, adapter: &Adapter, s: &Sample) -> f64 {
    explicit(
        model,
        adapter,
        &[batch(model, &rows(std::slice::from_ref(s)))],
    )
    .0
}

#[test]
fn the_high_distrust_example_moves_the_model_more() {
    use your_ai::distrust::formula::{example_weights, Provenance};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let s = samples();
    let two = [s[0].clone(), s[2].clone()];
    // Example 0: primary-source-like (w 0.05, H 3): D ≈ 23. Example 1: w 0.5, H 0.8: D ≈ 0.4.
    let prov = [(0.05, 3.0), (0.5, 0.8)].map(|(w, h)| Provenance {
        auth_weight: w,
        prov_entropy: h,
    });
    let ew = example_weights(&prov, 2.7, 0.6);
    assert!(ew.d[0] > 20.0 * ew.d[1], "{:?}", ew.d);
    // One small plain gradient-descent step from the same start, weighted and unweighted.
    let step = |c: &[f32]| {
        let (_, g) = explicit_weighted(&model, &adapter, &[batch(&model, &weighted_rows(&two, c))]);
        let mut a = adapter.clone();
        for (p, g) in a.tensors_mut().zip(g.tensors()) {
            *p = (&*p - (g * 0.02).unwrap()).unwrap();
        }
        a
    };
    let plain = step(&[1.0, 1.0]);
    let weighted = step(&ew.c);
    let drop = |a: &Adapter, i: usize| {
        example_loss(&model, &adapter, &two[i]) - example_loss(&model, a, &two[i])
    };
    let (p0, p1, w0, w1) = (
        drop(&plain, 0),
        drop(&plain, 1),
        drop(&weighted, 0),
        drop(&weighted, 1),
    );
    assert!(
        p0 > 0.0 && w0 > 0.0,
        "the step lowers the loss ({p0}, {w0})"
    );
    // The high-D example improves more than under plain training, the low-D one less.
    assert!(w0 > p0 * 1.05, "high D: weighted {w0} vs plain {p0}");
    assert!(w1 < p1, "low D: weighted {w1} vs plain {p1}");
}

/// The samples as preference pairs: (0 chosen, 1 rejected), (2 chosen, 3 rejected).
fn pairs() -> Vec<your_ai::data::preference::Pair> {
    let s = samples();
    vec![
        your_ai::data::preference::Pair {
            chosen: s[0].clone(),
            rejected: s[1].clone(),
        },
        your_ai::data::preference::Pair {
            chosen: s[2].clone(),
            rejected: s[3].clone(),
        },
    ]
}

/// The preference sums of `pairs` for `model` carrying `adapter`.
fn pair_sums(
    model: &mut Llama,
    adapter: Option<Adapter>,
    pairs: &[your_ai::data::preference::Pair],
    method: your_ai::engine::objective::Method,
    beta: f64,
) -> your_ai::engine::objective::PreferenceSums {
    model.adapter = adapter;
    your_ai::engine::candle::preference::evaluate(model, pairs, 2, method, beta).unwrap()
}

/// DPO's and ORPO's gradients through the step (per-answer weights on the SFT backward)
/// against central finite differences of the objective, as `eval --method` computes it.
#[test]
fn preference_gradients_match_finite_differences() {
    use your_ai::engine::candle::preference;
    use your_ai::engine::objective::{Method, PreferenceLoss};
    let dir = tempfile::tempdir().unwrap();
    let mut model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let pairs = pairs();
    let rows = your_ai::data::preference::pair_rows(&pairs);
    let mb = batch(&model, &rows);
    let chosen_tokens: usize = pairs.iter().map(|p| p.chosen.trained_count()).sum();
    for (method, beta) in [(Method::Dpo, 0.5), (Method::Orpo, 0.3)] {
        let loss = PreferenceLoss {
            method,
            beta,
            pair_scale: 0.5,
            token_scale: 1.0 / chosen_tokens as f64,
        };
        let mut grads = Grads::new(&adapter);
        let sums = preference::accumulate(
            &step(&model, &adapter, 0),
            &mb,
            &loss,
            &mut grads,
            &mut Default::default(),
        )
        .unwrap();
        assert_eq!(sums.pairs, 2);
        // The step's own objective is the evaluated one.
        let at =
            pair_sums(&mut model, Some(adapter.clone()), &pairs, method, beta).objective(method);
        assert!((sums.objective(method) - at).abs() < 1e-10, "{method:?}");
        let h = 1e-5;
        for (l, t, which, idx) in [
            (0, Target::Q, 0, 5),
            (1, Target::V, 1, 17),
            (0, Target::O, 1, 40),
            (1, Target::Down, 0, 100),
        ] {
            let mut loss_at = |delta: f64| {
                let mut a = adapter.clone();
                let p = a.pairs[l][t.index()].as_mut().unwrap();
                let m = if which == 0 { &mut p.a } else { &mut p.b };
                let mut v = m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                v[idx] += delta;
                *m = Tensor::from_vec(v, m.dims(), &Device::Cpu).unwrap();
                pair_sums(&mut model, Some(a), &pairs, method, beta).objective(method)
            };
            let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h);
            let (ga, gb) = grads.pairs[l][t.index()].as_ref().unwrap();
            let g = if which == 0 { ga } else { gb };
            let ours = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
            assert!(
                (fd - ours).abs() < 1e-6 * (1.0 + fd.abs()),
                "{method:?} layer {l} {t:?}: fd {fd} vs {ours}"
            );
            assert!(ours.abs() > 1e-8, "{method:?} layer {l} {t:?}: no gradient");
        }
    }
}

/// DPO's reference is the base model: the same whatever adapter the policy carries, and equal
/// to the policy's own log-probabilities when there is no adapter (every reward then 0).
#[test]
fn the_dpo_reference_does_not_depend_on_the_adapter() {
    use your_ai::engine::objective::Method;
    let dir = tempfile::tempdir().unwrap();
    let mut model = tiny_model(&TinySpec::default(), dir.path());
    let one = pairs()[..1].to_vec();
    let beta = 0.25;
    // With one pair: ref log π(chosen) = log π(chosen) − reward/β, and log π = −Σ CE.
    let reference = |model: &mut Llama, adapter: Option<Adapter>| {
        let s = pair_sums(model, adapter, &one, Method::Dpo, beta);
        (-s.chosen_ce - s.chosen_reward / beta, s.chosen_reward)
    };
    let (base, reward) = reference(&mut model, None);
    assert_eq!(reward, 0.0);
    let a1 = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let a2 = random_adapter(&model, vec![1], vec![Target::Q, Target::Down]);
    for a in [a1, a2] {
        let (r, reward) = reference(&mut model, Some(a));
        assert!(reward.abs() > 1e-6, "the adapter changes the policy");
        assert!((r - base).abs() < 1e-9, "reference {r} vs base {base}");
    }
}

/// Two micro-batches of one pair each, accumulated, give the gradient of one micro-batch of
/// both pairs (each pair weighs 1/pairs of the accumulated batch).
#[test]
fn accumulating_pairs_equals_one_batch_of_pairs() {
    use your_ai::engine::candle::preference;
    use your_ai::engine::objective::{Method, PreferenceLoss};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&TinySpec::default(), dir.path());
    let adapter = random_adapter(&model, vec![0, 1], Target::ALL.to_vec());
    let pairs = pairs();
    let chosen_tokens: usize = pairs.iter().map(|p| p.chosen.trained_count()).sum();
    for method in [Method::Dpo, Method::Orpo] {
        let loss = PreferenceLoss {
            method,
            beta: 0.3,
            pair_scale: 0.5,
            token_scale: 1.0 / chosen_tokens as f64,
        };
        let run = |groups: &[&[your_ai::data::preference::Pair]]| {
            let mut grads = Grads::new(&adapter);
            let mut sums = your_ai::engine::objective::PreferenceSums::default();
            for g in groups {
                let mb = batch(&model, &your_ai::data::preference::pair_rows(g));
                let s = preference::accumulate(
                    &step(&model, &adapter, 0),
                    &mb,
                    &loss,
                    &mut grads,
                    &mut Default::default(),
                )
                .unwrap();
                sums.merge(&s);
            }
            (sums, grads)
        };
        let (one, g1) = run(&[&pairs]);
        let (two, g2) = run(&[&pairs[..1], &pairs[1..]]);
        assert!((one.objective(method) - two.objective(method)).abs() < 1e-12);
        for (l, t, _) in adapter.iter() {
            let (a1, b1) = g1.pairs[l][t.index()].as_ref().unwrap();
            let (a2, b2) = g2.pairs[l][t.index()].as_ref().unwrap();
            assert!(
                max_rel_diff(a1, a2) < 1e-10 && max_rel_diff(b1, b2) < 1e-10,
                "{method:?} {l} {t:?}"
            );
        }
    }
}
