//! What a step minimises: supervised cross-entropy (SFT), or a preference objective over pairs
//! of answers (DPO, ORPO). The preference losses are written here once, on per-answer
//! log-probabilities, with their derivatives: an engine scores each answer's tokens, calls
//! [`pair_terms`], and weights each answer's token cross-entropies by the derivative (the loss
//! depends on the tokens only through `log π(answer) = −Σ CE`), so the backward is the SFT
//! backward with other weights.

use crate::data::batch::Row;
use crate::data::preference::{pair_rows, Pair};
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// `train --method`: what the run optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Supervised fine-tuning: cross-entropy on the trained tokens.
    #[default]
    Sft,
    /// Direct Preference Optimization (sigmoid loss) against the base model with the adapter
    /// off as the reference.
    Dpo,
    /// Odds Ratio Preference Optimization: SFT on the chosen answer plus an odds-ratio term;
    /// no reference model.
    Orpo,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Orpo => "orpo",
        }
    }

    pub fn is_preference(self) -> bool {
        self != Method::Sft
    }
}

/// A preference objective as one micro-batch applies it. Its rows come in pairs: the chosen
/// answer's row, then the rejected one's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceLoss {
    pub method: Method,
    pub beta: f64,
    /// Each pair's share of the loss: 1 / (pairs in the accumulated batch).
    pub pair_scale: f64,
    /// ORPO's NLL term: 1 / (chosen tokens in the accumulated batch).
    pub token_scale: f64,
}

/// What one pair contributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairTerms {
    /// The pair's preference loss (DPO's −log σ(z), or ORPO's −β log σ(log-odds ratio); ORPO's
    /// NLL on the chosen answer is added by the caller, token-weighted over the batch).
    pub loss: f64,
    /// ∂loss/∂log π(chosen) and ∂loss/∂log π(rejected), π summed over the answer's tokens.
    pub d_chosen: f64,
    pub d_rejected: f64,
    /// The implicit rewards: β·(log π − log π_ref) for DPO, β·(mean token log π) for ORPO.
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

/// Log-probabilities of one pair's answers, each summed over the answer's scored tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    /// The reference model's (DPO only).
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    /// Scored tokens of each answer (ORPO averages over them).
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

/// log σ(x), stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The loss, derivatives and rewards of one pair under `method` (a preference method).
pub fn pair_terms(method: Method, beta: f64, p: &PairLogps) -> PairTerms {
    match method {
        Method::Dpo | Method::Sft => {
            let chosen_reward = beta * (p.chosen - p.ref_chosen);
            let rejected_reward = beta * (p.rejected - p.ref_rejected);
            let z = chosen_reward - rejected_reward;
            // d(−log σ(z))/dz = −σ(−z).
            let g = -sigmoid(-z);
            PairTerms {
                loss: -log_sigmoid(z),
                d_chosen: g * beta,
                d_rejected: -g * beta,
                chosen_reward,
                rejected_reward,
            }
        }
        Method::Orpo => {
            // A mean log-probability of exactly 0 (every token certain, in f32) would make
            // the odds infinite; it is held just below.
            let a = (p.chosen / p.chosen_tokens.max(1) as f64).min(-1e-7);
            let b = (p.rejected / p.rejected_tokens.max(1) as f64).min(-1e-7);
            // log odds(p) = log p − log(1 − p), with p = e^a: log(1 − e^a) = ln(−expm1(a)).
            let log1m = |v: f64| (-v.exp_m1()).ln();
            let ratio = (a - b) - (log1m(a) - log1m(b));
            let g = -beta * sigmoid(-ratio);
            // d ratio/da = 1/(1 − e^a) = −1/expm1(a); d ratio/db = −1/(1 − e^b).
            let da = g * (-1.0 / a.exp_m1());
            let db = g * (1.0 / b.exp_m1());
            PairTerms {
                loss: -beta * log_sigmoid(ratio),
                d_chosen: da / p.chosen_tokens.max(1) as f64,
                d_rejected: db / p.rejected_tokens.max(1) as f64,
                chosen_reward: beta * a,
                rejected_reward: beta * b,
            }
        }
    }
}

/// Sums over the pairs of a batch, for the progress line, metrics and `eval`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PreferenceSums {
    pub pairs: usize,
    /// Σ pair loss (without ORPO's NLL).
    pub loss: f64,
    /// Pairs whose chosen reward is above the rejected one (a tie is not a win, as in TRL).
    pub correct: usize,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    /// Pairs whose chosen answer the policy itself finds more likely (log π, summed over the
    /// tokens): the base model's "accuracy" before any training, where every reward is 0.
    pub prefers_chosen: usize,
    /// ORPO: Σ cross-entropy over the chosen answers' tokens, and their count.
    pub chosen_ce: f64,
    pub chosen_tokens: usize,
}

impl PreferenceSums {
    pub fn add_pair(&mut self, p: &PairLogps, t: &PairTerms) {
        self.pairs += 1;
        self.loss += t.loss;
        self.correct += usize::from(t.chosen_reward > t.rejected_reward);
        self.prefers_chosen += usize::from(p.chosen > p.rejected);
        self.chosen_reward += t.chosen_reward;
        self.rejected_reward += t.rejected_reward;
        self.chosen_ce -= p.chosen;
        self.chosen_tokens += p.chosen_tokens;
    }

    pub fn merge(&mut self, o: &PreferenceSums) {
        self.pairs += o.pairs;
        self.loss += o.loss;
        self.correct += o.correct;
        self.prefers_chosen += o.prefers_chosen;
        self.chosen_reward += o.chosen_reward;
        self.rejected_reward += o.rejected_reward;
        self.chosen_ce += o.chosen_ce;
        self.chosen_tokens += o.chosen_tokens;
    }

    fn per_pair(&self, v: f64) -> f64 {
        v / self.pairs.max(1) as f64
    }

    /// The objective's value: the mean pair loss, plus for ORPO the chosen answers' mean
    /// token cross-entropy.
    pub fn objective(&self, method: Method) -> f64 {
        let pref = self.per_pair(self.loss);
        match method {
            Method::Orpo => pref + self.chosen_ce / self.chosen_tokens.max(1) as f64,
            _ => pref,
        }
    }

    pub fn accuracy(&self) -> f64 {
        self.per_pair(self.correct as f64)
    }

    pub fn prefers_chosen(&self) -> f64 {
        self.per_pair(self.prefers_chosen as f64)
    }

    pub fn margin(&self) -> f64 {
        self.per_pair(self.chosen_reward - self.rejected_reward)
    }

    pub fn chosen(&self) -> f64 {
        self.per_pair(self.chosen_reward)
    }

    pub fn rejected(&self) -> f64 {
        self.per_pair(self.rejected_reward)
    }
}

/// Each sequence's log-probability (−Σ CE of its scored tokens) and scored-token count.
pub type SequenceScores = (Vec<f64>, Vec<usize>);

/// [`SequenceScores`] of a `[seqs, t]` batch from the cross-entropy of each scored row, a row
/// being `sequence · t + position`.
pub fn per_sequence(ce: &[f64], rows: &[u32], t: usize, seqs: usize) -> SequenceScores {
    let mut logp = vec![0.0; seqs];
    let mut tokens = vec![0; seqs];
    for (&c, &row) in ce.iter().zip(rows) {
        let s = row as usize / t.max(1);
        if s < seqs {
            logp[s] -= c;
            tokens[s] += 1;
        }
    }
    (logp, tokens)
}

/// The pairs of a batch whose sequences are chosen, rejected, pair after pair, as
/// [`PairLogps`] (with the reference's scores when given).
pub fn pairs_of(policy: &SequenceScores, reference: Option<&SequenceScores>) -> Vec<PairLogps> {
    let (logp, tokens) = policy;
    (0..logp.len() / 2)
        .map(|i| {
            let (c, r) = (2 * i, 2 * i + 1);
            PairLogps {
                chosen: logp[c],
                rejected: logp[r],
                ref_chosen: reference.map_or(0.0, |x| x.0[c]),
                ref_rejected: reference.map_or(0.0, |x| x.0[r]),
                chosen_tokens: tokens[c],
                rejected_tokens: tokens[r],
            }
        })
        .collect()
}

/// A micro-batch of pairs under `loss`: the pairs' sums, and each sequence's weight on its
/// tokens' cross-entropy in the gradient (`∂loss/∂CE` of each of its tokens). Both engines
/// scale the SFT head's per-token gradient by it, so the SFT backward serves.
pub fn weigh_pairs(
    loss: &PreferenceLoss,
    policy: &SequenceScores,
    reference: Option<&SequenceScores>,
) -> (PreferenceSums, Vec<f64>) {
    let mut sums = PreferenceSums::default();
    let mut coef = vec![0.0; policy.0.len()];
    for (i, p) in pairs_of(policy, reference).iter().enumerate() {
        let terms = pair_terms(loss.method, loss.beta, p);
        sums.add_pair(p, &terms);
        // log π = −Σ CE, so ∂loss/∂CE = −∂loss/∂log π for each of the answer's tokens.
        coef[2 * i] = -terms.d_chosen * loss.pair_scale;
        if loss.method == Method::Orpo {
            coef[2 * i] += loss.token_scale;
        }
        coef[2 * i + 1] = -terms.d_rejected * loss.pair_scale;
    }
    (sums, coef)
}

/// The preference sums of `pairs` under `method`, in micro-batches of `batch_size` pairs
/// (stopping at a signal). `score(rows, reference)` is the engine's forward: the rows'
/// [`SequenceScores`] with the adapter and, when `reference` (DPO), without it.
pub fn evaluate_pairs(
    pairs: &[Pair],
    batch_size: usize,
    method: Method,
    beta: f64,
    mut score: impl FnMut(&[Row], bool) -> Result<(SequenceScores, Option<SequenceScores>)>,
) -> Result<PreferenceSums> {
    let mut sums = PreferenceSums::default();
    for chunk in pairs.chunks(batch_size.max(1)) {
        if let Some(signal) = crate::runtime::signals::requested() {
            return Err(crate::error::Error::Stopping { signal });
        }
        let (policy, reference) = score(&pair_rows(chunk), method == Method::Dpo)?;
        for p in pairs_of(&policy, reference.as_ref()) {
            sums.add_pair(&p, &pair_terms(method, beta, &p));
        }
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logps(c: f64, r: f64) -> PairLogps {
        PairLogps {
            chosen: c,
            rejected: r,
            ref_chosen: -7.0,
            ref_rejected: -6.5,
            chosen_tokens: 5,
            rejected_tokens: 3,
        }
    }

    /// The derivatives against central finite differences of the loss, for both methods and
    /// across signs of the margin.
    #[test]
    fn derivatives_match_finite_differences() {
        for method in [Method::Dpo, Method::Orpo] {
            for beta in [0.1, 0.5, 2.0] {
                for (c, r) in [(-8.0, -6.0), (-3.0, -9.0), (-6.9, -6.4), (-0.5, -20.0)] {
                    let t = pair_terms(method, beta, &logps(c, r));
                    let h = 1e-6;
                    let f = |c: f64, r: f64| pair_terms(method, beta, &logps(c, r)).loss;
                    let dc = (f(c + h, r) - f(c - h, r)) / (2.0 * h);
                    let dr = (f(c, r + h) - f(c, r - h)) / (2.0 * h);
                    assert!((dc - t.d_chosen).abs() < 1e-6, "{method:?} {beta} {c} {r}");
                    assert!(
                        (dr - t.d_rejected).abs() < 1e-6,
                        "{method:?} {beta} {c} {r}"
                    );
                }
            }
        }
    }

    /// DPO's loss is log 2 when the policy is the reference (every reward 0), and TRL's
    /// formulas otherwise, computed here independently.
    #[test]
    fn dpo_and_orpo_values() {
        let same = PairLogps {
            chosen: -7.0,
            rejected: -6.5,
            ..logps(0.0, 0.0)
        };
        let t = pair_terms(Method::Dpo, 0.1, &same);
        assert!((t.loss - 2f64.ln()).abs() < 1e-12);
        assert_eq!((t.chosen_reward, t.rejected_reward), (0.0, 0.0));
        let t = pair_terms(Method::Dpo, 0.1, &logps(-5.0, -9.0));
        let z: f64 = 0.1 * ((-5.0 + 7.0) - (-9.0 + 6.5));
        assert!((t.loss - (1.0 + (-z).exp()).ln()).abs() < 1e-12);
        let t = pair_terms(Method::Orpo, 0.1, &logps(-5.0, -9.0));
        let (a, b) = (-1.0f64, -3.0f64);
        let odds = |p: f64| p.ln() - (1.0 - p).ln();
        let ratio = odds(a.exp()) - odds(b.exp());
        assert!((t.loss - 0.1 * (1.0 + (-ratio).exp()).ln()).abs() < 1e-12);
        assert!((t.chosen_reward - 0.1 * a).abs() < 1e-12);
        // Extreme margins stay finite.
        for (c, r) in [(-1e4, -1e-4), (-1e-4, -1e4)] {
            for m in [Method::Dpo, Method::Orpo] {
                let t = pair_terms(m, 1.0, &logps(c, r));
                assert!(
                    t.loss.is_finite() && t.d_chosen.is_finite(),
                    "{m:?} {c} {r}"
                );
            }
        }
    }

    #[test]
    fn sums_count_ties_as_misses() {
        let mut s = PreferenceSums::default();
        let p = logps(-7.0, -6.5);
        s.add_pair(&p, &pair_terms(Method::Dpo, 0.1, &p));
        let p = logps(-5.0, -9.0);
        s.add_pair(&p, &pair_terms(Method::Dpo, 0.1, &p));
        assert_eq!((s.pairs, s.correct, s.prefers_chosen), (2, 1, 1));
        assert!((s.accuracy() - 0.5).abs() < 1e-12);
        assert_eq!(s.chosen_tokens, 10);
        assert!((s.objective(Method::Orpo) - (s.loss / 2.0 + 12.0 / 10.0)).abs() < 1e-12);
    }
}
