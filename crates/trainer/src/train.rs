//! The run configuration (TOML), the optimiser and schedule, and the training loop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, DataConfig};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::model::Decoder;

/// The whole run configuration: `ftbench train --config X.toml [--set key=value]...`.
/// Unknown keys are errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Name used in the run id. Default "run".
    #[serde(default = "default_name")]
    pub name: String,
    /// Seeds adapter initialisation, dropout and data order. Default 42.
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ModelSection,
    #[serde(default)]
    pub lora: LoraConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub output: OutputConfig,
}

fn default_name() -> String {
    "run".into()
}
fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A `.gguf` file, an HF folder or a hub id.
    pub path: String,
    /// Compute threads on the CPU; 0 = all cores. Default 0.
    #[serde(default)]
    pub threads: usize,
    /// How the frozen base's projections are held: "none" (dense f32), "nf4" (quantized
    /// at load, QLoRA) or "keep" (a GGUF file's quantized tensors or a bitsandbytes NF4
    /// checkpoint as stored). Default "none".
    #[serde(default)]
    pub quantization: crate::quant::Quantization,
    /// `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (the best one present). Default auto;
    /// `--device` overrides it.
    #[serde(default)]
    pub device: crate::device::DeviceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Lora,
    Full,
}

/// Optimisation settings (the `[train]` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// "lora" (default) or "full".
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Optimiser steps. Default 100.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Sequences per micro-batch. Default 4.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimiser step. Default 1.
    #[serde(default = "default_one")]
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate. Default 2e-4.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Linear warm-up steps. Default 10.
    #[serde(default = "default_warmup")]
    pub warmup_steps: usize,
    /// Cosine decay ends at learning_rate × min_lr_ratio. Default 0.1.
    #[serde(default = "default_min_lr")]
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay. Default 0.0.
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW β1, β2, ε. Defaults 0.9, 0.999, 1e-8.
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Global gradient-norm clip; 0 disables. Default 1.0.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
}

fn default_mode() -> Mode {
    Mode::Lora
}
fn default_steps() -> usize {
    100
}
fn default_batch() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_lr() -> f64 {
    2e-4
}
fn default_warmup() -> usize {
    10
}
fn default_min_lr() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}

impl Default for TrainConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// Evaluation settings (the `[eval]` table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Held-out loss before and after training. Default true.
    #[serde(default = "default_true")]
    pub heldout_loss: bool,
    /// Batch size of the held-out loss. Default 4.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// GSM8K exact match on this many test questions before and after; 0 skips. Default 0.
    #[serde(default)]
    pub gsm8k_examples: usize,
    /// GSM8K test file. Default ../shared/datasets/gsm8k/test.jsonl.
    #[serde(default = "default_gsm8k_test")]
    pub gsm8k_path: PathBuf,
    /// Generation budget per question. Default 256.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
}

fn default_true() -> bool {
    true
}
fn default_gsm8k_test() -> PathBuf {
    PathBuf::from("../shared/datasets/gsm8k/test.jsonl")
}
fn default_new_tokens() -> usize {
    256
}

impl Default for EvalConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Parent folder of run folders. Default "results".
    #[serde(default = "default_results")]
    pub dir: PathBuf,
}

fn default_results() -> PathBuf {
    PathBuf::from("results")
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: default_results(),
        }
    }
}

impl RunConfig {
    /// Reads a TOML config and applies `key=value` overrides (dotted keys, TOML values;
    /// a value that is not valid TOML is taken as a string).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut value: toml::Value = toml::from_str(&text)
            .map_err(|e| Error::config(&file, format!("invalid toml: {}", e.message().trim())))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        // Deserialise from text so the error carries a position, then name the key there.
        let resolved = toml::to_string(&value).expect("a toml value serialises");
        let cfg: RunConfig = toml::from_str(&resolved).map_err(|e| {
            let key = e
                .span()
                .map(|sp| key_at(&resolved, sp.start))
                .unwrap_or_default();
            let whence = if overrides.is_empty() {
                file.clone()
            } else {
                format!("{file} with --set overrides")
            };
            Error::config(
                if key.is_empty() { whence.clone() } else { key },
                format!("{} (in {whence})", e.message().trim()),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.steps == 0 {
            return Err(Error::config("train.steps", "must be at least 1, found 0"));
        }
        if t.batch_size == 0 {
            return Err(Error::config(
                "train.batch_size",
                "must be at least 1, found 0",
            ));
        }
        if t.gradient_accumulation_steps == 0 {
            return Err(Error::config(
                "train.gradient_accumulation_steps",
                "must be at least 1, found 0",
            ));
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return Err(Error::config(
                "train.learning_rate",
                format!("must be positive, found {}", t.learning_rate),
            ));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(Error::config(
                "train.min_lr_ratio",
                format!("must be in [0, 1], found {}", t.min_lr_ratio),
            ));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            return Err(Error::config(
                "train.adam_beta1",
                format!(
                    "betas must be in [0, 1), found {} and {}",
                    t.adam_beta1, t.adam_beta2
                ),
            ));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return Err(Error::config(
                "train.weight_decay",
                format!("must be >= 0, found {}", t.weight_decay),
            ));
        }
        if self.eval.batch_size == 0 {
            return Err(Error::config(
                "eval.batch_size",
                "must be at least 1, found 0",
            ));
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            return Err(Error::config(
                "train.max_grad_norm",
                format!("must be >= 0, found {}", t.max_grad_norm),
            ));
        }
        self.lora.validate()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// The dotted key (`train.steps`) of the line holding byte `pos` of a TOML text written by
/// `toml::to_string`: the last `[table]` header before it plus the line's key.
fn key_at(text: &str, pos: usize) -> String {
    let before = &text[..pos.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = before[..line_start].lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .map(str::to_string)
    });
    let key = match line.split_once('=') {
        Some((k, _)) => k.trim().trim_matches('"').to_string(),
        None => String::new(),
    };
    match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}"),
        (Some(t), true) => t,
        (None, _) => key,
    }
}

fn apply_override(root: &mut toml::Value, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| Error::config(spec, "--set expects key=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = root;
    for (i, p) in parts.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| {
            Error::config(key, format!("`{}` is not a table", parts[..i].join(".")))
        })?;
        if i + 1 == parts.len() {
            table.insert(p.to_string(), value.clone());
            return Ok(());
        }
        cur = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

/// Learning rate at `step` (1-based): linear warm-up, then cosine decay to
/// `lr × min_lr_ratio` at the last step.
pub fn learning_rate(cfg: &TrainConfig, step: usize) -> f64 {
    let peak = cfg.learning_rate;
    if step <= cfg.warmup_steps {
        return peak * step as f64 / cfg.warmup_steps.max(1) as f64;
    }
    // the first step after warm-up runs at the peak, the last at the minimum
    let decay_steps = cfg.steps.saturating_sub(cfg.warmup_steps + 1).max(1);
    let progress = ((step - cfg.warmup_steps - 1) as f64 / decay_steps as f64).min(1.0);
    let min = peak * cfg.min_lr_ratio;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// AdamW over the trainable variables, which stay in f32.
pub struct Optim {
    adamw: AdamW,
    vars: Vec<Var>,
}

impl Optim {
    pub fn new(vars: Vec<Var>, cfg: &TrainConfig) -> Result<Self> {
        let params = ParamsAdamW {
            lr: cfg.learning_rate,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        };
        Ok(Optim {
            adamw: AdamW::new(vars.clone(), params)?,
            vars,
        })
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.adamw.set_learning_rate(lr);
        self.adamw.step(grads)?;
        Ok(())
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }
}

/// Adds `other`'s gradients of `vars` into `acc`.
pub fn accumulate(acc: &mut GradStore, other: &GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        if let Some(g) = other.get(v) {
            let sum = match acc.get(v) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v, sum);
        }
    }
    Ok(())
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.get(v) {
                let g = (g * scale)?;
                grads.insert(v, g);
            }
        }
    }
    Ok(norm)
}

/// The tensors of one batch.
pub fn batch_ids(batch: &Batch, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(
        &batch.input_ids,
        (batch.batch_size, batch.seq_len),
        device,
    )?)
}

/// What one optimiser step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens in the step's batches (padding excluded).
    pub tokens: usize,
    pub seconds: f64,
}

/// Runs one optimiser step over `accum` micro-batches: forward and backward per micro-batch
/// with the loss divided by `accum`, gradients summed, clipped, then AdamW.
pub fn train_step(
    model: &Decoder,
    optim: &mut Optim,
    batches: &[Batch],
    cfg: &TrainConfig,
    step: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<StepStats> {
    let start = Instant::now();

    // schedule
    let lr = learning_rate(cfg, step);

    // forward and backward, accumulating gradients
    let mut grads: Option<GradStore> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0;
    for batch in batches {
        let ids = batch_ids(batch, &model.device)?;
        let loss = model.loss(&ids, &batch.targets, &batch.loss_mask, Some(rng))?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Training(format!(
                "loss is {value} at step {step}; lower train.learning_rate or check the data"
            )));
        }
        loss_sum += value;
        tokens += batch.n_tokens;
        let g = (loss / batches.len() as f64)?.backward()?;
        match grads.as_mut() {
            None => grads = Some(g),
            Some(acc) => accumulate(acc, &g, optim.vars())?,
        }
    }
    let mut grads = grads.ok_or_else(|| Error::Training("a step without batches".into()))?;

    // clip
    let grad_norm = clip_grad_norm(&mut grads, optim.vars(), cfg.max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Err(Error::Training(format!(
            "gradient norm is {grad_norm} at step {step}"
        )));
    }

    // update
    optim.step(&grads, lr)?;

    Ok(StepStats {
        step,
        loss: loss_sum / batches.len() as f64,
        lr,
        grad_norm,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Mean loss over evaluation batches, weighted by their loss tokens.
pub fn heldout_loss(model: &Decoder, batches: &[Batch]) -> Result<f64> {
    let mut total = 0.0;
    let mut weight = 0usize;
    for b in batches {
        if b.n_loss_tokens == 0 {
            continue;
        }
        let ids = batch_ids(b, &model.device)?;
        let loss = model
            .loss(&ids, &b.targets, &b.loss_mask, None)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        total += loss * b.n_loss_tokens as f64;
        weight += b.n_loss_tokens;
    }
    if weight == 0 {
        return Err(Error::Training(
            "the held-out set has no tokens with loss".into(),
        ));
    }
    Ok(total / weight as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = TrainConfig {
            steps: 111,
            warmup_steps: 10,
            learning_rate: 1e-3,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((learning_rate(&cfg, 5) - 5e-4).abs() < 1e-12);
        assert!((learning_rate(&cfg, 10) - 1e-3).abs() < 1e-12);
        assert!(
            (learning_rate(&cfg, 11) - 1e-3).abs() < 1e-12,
            "first decay step at the peak"
        );
        // halfway through the decay (steps 11..=111): min + (peak - min)/2 = 1e-4 + 4.5e-4
        assert!((learning_rate(&cfg, 61) - 5.5e-4).abs() < 1e-12);
        assert!((learning_rate(&cfg, 111) - 1e-4).abs() < 1e-12);
        let no_warmup = TrainConfig {
            steps: 3,
            warmup_steps: 0,
            learning_rate: 1.0,
            min_lr_ratio: 0.0,
            ..Default::default()
        };
        assert_eq!(learning_rate(&no_warmup, 1), 1.0);
        assert!(learning_rate(&no_warmup, 3).abs() < 1e-12);
    }

    #[test]
    fn config_errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("ftbench-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(
            &p,
            "[model]\npath = \"m.gguf\"\n[data]\n[train]\nlerning_rate = 1e-4\n",
        )
        .unwrap();
        let e = RunConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("`train.lerning_rate`") && e.contains("unknown field"),
            "{e}"
        );
        std::fs::write(
            &p,
            "[model]\npath = \"m.gguf\"\n[data]\n[train]\nsteps = \"ten\"\n",
        )
        .unwrap();
        let e = RunConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("`train.steps`") && e.contains("invalid type"),
            "{e}"
        );
        let e = RunConfig::load(&p, &["train.steps=3".into(), "lora.rnk=4".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`lora.rnk`") && e.contains("--set"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn overrides_set_nested_keys() {
        let mut v: toml::Value = toml::from_str("[train]\nsteps = 3").unwrap();
        apply_override(&mut v, "train.steps=7").unwrap();
        apply_override(&mut v, "model.path=models/x.gguf").unwrap();
        apply_override(&mut v, "lora.target_modules=[\"q_proj\"]").unwrap();
        assert_eq!(v["train"]["steps"].as_integer(), Some(7));
        assert_eq!(v["model"]["path"].as_str(), Some("models/x.gguf"));
        assert_eq!(v["lora"]["target_modules"].as_array().unwrap().len(), 1);
        assert!(apply_override(&mut v, "novalue").is_err());
    }
}
