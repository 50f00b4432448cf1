//! LoRA adapters with PEFT semantics: configuration, target matching, initialisation, the
//! adapter's forward, merging, and PEFT's on-disk layout (`adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
pub use crate::fused_lora::LoraKernel;

/// Which linear layers get an adapter, as in PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names; a module matches when its full name equals an entry or ends with
    /// `.entry`.
    List(Vec<String>),
    /// `"all-linear"` (every linear layer but the LM head) or a regular expression that must
    /// match the whole module name.
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    }
}

/// LoRA hyper-parameters. In the TOML config this is the `[lora]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of the update `B A` (PEFT: `r`). Default 16.
    #[serde(default = "default_rank", alias = "r")]
    pub rank: usize,
    /// `lora_alpha`; scaling = alpha / rank (alpha / sqrt(rank) with rsLoRA). Default 32.
    #[serde(default = "default_alpha", alias = "lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input only (PEFT: `lora_dropout`). Default 0.05.
    #[serde(default = "default_dropout", alias = "lora_dropout")]
    pub dropout: f64,
    /// Default: the attention projections q/k/v/o.
    #[serde(default)]
    pub target_modules: TargetModules,
    /// Rank-stabilised scaling alpha / sqrt(rank). Default false.
    #[serde(default)]
    pub use_rslora: bool,
    /// The layer's implementation: "fused" (default) or "naive"; see [`crate::fused_lora`].
    #[serde(default, alias = "lora_kernel")]
    pub kernel: LoraKernel,
}

fn default_rank() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.05
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            target_modules: TargetModules::default(),
            use_rslora: false,
            kernel: LoraKernel::default(),
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("lora.rank", "must be at least 1, found 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "lora.dropout",
                format!("must be in [0, 1), found {}", self.dropout),
            ));
        }
        if let TargetModules::Pattern(p) = &self.target_modules {
            if p != "all-linear" {
                Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    Error::config("lora.target_modules", format!("invalid regex: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// A matcher for HF module paths such as `model.layers.3.self_attn.q_proj`.
    pub fn matcher(&self) -> Result<TargetMatcher> {
        self.validate()?;
        Ok(match &self.target_modules {
            TargetModules::List(names) => TargetMatcher::Names(names.clone()),
            TargetModules::Pattern(p) if p == "all-linear" => TargetMatcher::AllLinear,
            TargetModules::Pattern(p) => {
                TargetMatcher::Regex(Regex::new(&format!("^(?:{p})$")).unwrap())
            }
        })
    }
}

pub enum TargetMatcher {
    Names(Vec<String>),
    AllLinear,
    Regex(Regex),
}

impl TargetMatcher {
    /// `module` is a full HF path; `is_lm_head` excludes the output layer from `all-linear`.
    pub fn matches(&self, module: &str, is_lm_head: bool) -> bool {
        match self {
            TargetMatcher::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            TargetMatcher::AllLinear => !is_lm_head,
            TargetMatcher::Regex(re) => re.is_match(module),
        }
    }
}

/// One adapter: `y += scaling · dropout(x) Aᵀ Bᵀ`, A `[r, in]` and B `[out, r]` in f32.
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
    pub kernel: LoraKernel,
}

impl LoraAdapter {
    /// PEFT's initialisation: A kaiming-uniform with a = sqrt(5) (bound = 1/sqrt(in)), B zeros.
    pub fn init(
        in_features: usize,
        out_features: usize,
        cfg: &LoraConfig,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a: Vec<f32> = (0..cfg.rank * in_features)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (cfg.rank, in_features), device)?;
        let b = Tensor::zeros((out_features, cfg.rank), DType::F32, device)?;
        Ok(LoraAdapter {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
            kernel: cfg.kernel,
        })
    }

    /// The adapter's contribution for `x: [.., in]`; `mask` is dropout's keep-mask already
    /// divided by (1 - p), or None when dropout is off.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = match mask {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        };
        // as 2-D products: [n, in] x [in, r] -> [n, r] x [r, out]
        let in_f = self.a.as_tensor().dim(1)?;
        let mut dims = x.dims().to_vec();
        let s = x.reshape(((), in_f))?.matmul(&self.a.as_tensor().t()?)?;
        let y = s.matmul(&self.b.as_tensor().t()?)?;
        *dims.last_mut().expect("input has a feature dim") = y.dim(1)?;
        let y = y.reshape(dims)?;
        Ok((y * self.scaling)?)
    }

    /// `scaling · B A`, the update merged into `W: [out, in]`.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }
}

/// Draws dropout's keep-mask for `shape` from the run's seeded generator.
pub fn dropout_mask(shape: &[usize], p: f64, rng: &mut StdRng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let keep = (1.0 / (1.0 - p)) as f32;
    let v: Vec<f32> = (0..n)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// PEFT's key prefix for a module path.
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created), each
/// through a temporary file and a rename.
pub fn save_peft(
    dir: &Path,
    cfg: &LoraConfig,
    adapters: &[(String, &LoraAdapter)],
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let target_modules = match &cfg.target_modules {
        TargetModules::List(v) => json!(v),
        TargetModules::Pattern(p) => json!(p),
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null
    });
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (module, ad) in adapters {
        tensors.insert(
            peft_key(module, "lora_A"),
            ad.a.as_tensor().to_dtype(DType::F32)?,
        );
        tensors.insert(
            peft_key(module, "lora_B"),
            ad.b.as_tensor().to_dtype(DType::F32)?,
        );
    }
    let cfg_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).expect("json");
    ftbench_meter::write_atomic(&cfg_path, text.as_bytes()).map_err(|e| Error::io(&cfg_path, e))?;
    let st_path = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &st_path).map_err(|e| Error::io(&st_path, e))?;
    Ok(())
}

/// A PEFT adapter read from disk: its config and, per module path, (A, B).
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub weights: HashMap<String, (Tensor, Tensor)>,
}

/// Reads a PEFT adapter folder.
pub fn load_peft(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Adapter {
        path: cfg_path.clone(),
        msg: format!("invalid json: {e}"),
    })?;
    let bad = |msg: String| Error::Adapter {
        path: cfg_path.clone(),
        msg,
    };
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(bad(format!("`peft_type` is \"{t}\", expected \"LORA\"")));
        }
    }
    let rank = v
        .get("r")
        .and_then(|r| r.as_u64())
        .ok_or_else(|| bad("missing integer key `r`".into()))? as usize;
    let alpha = v.get("lora_alpha").and_then(|a| a.as_f64()).unwrap_or(8.0);
    let target_modules: TargetModules = match v.get("target_modules") {
        Some(t) => {
            serde_json::from_value(t.clone()).map_err(|e| bad(format!("`target_modules`: {e}")))?
        }
        None => return Err(bad("missing key `target_modules`".into())),
    };
    let config = LoraConfig {
        rank,
        alpha,
        dropout: v
            .get("lora_dropout")
            .and_then(|d| d.as_f64())
            .unwrap_or(0.0),
        target_modules,
        use_rslora: v
            .get("use_rslora")
            .and_then(|d| d.as_bool())
            .unwrap_or(false),
        kernel: LoraKernel::default(),
    };
    let st_path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&st_path, device).map_err(|e| Error::Adapter {
        path: st_path.clone(),
        msg: e.to_string(),
    })?;
    let mut weights: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix("base_model.model.") else {
            return Err(Error::Adapter {
                path: st_path.clone(),
                msg: format!("unexpected key `{key}`"),
            });
        };
        let t = t.to_dtype(DType::F32)?;
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            weights.entry(m.to_string()).or_default().0 = Some(t);
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            weights.entry(m.to_string()).or_default().1 = Some(t);
        } else {
            return Err(Error::Adapter {
                path: st_path.clone(),
                msg: format!("unexpected key `{key}`"),
            });
        }
    }
    let mut out = HashMap::new();
    for (m, (a, b)) in weights {
        match (a, b) {
            (Some(a), Some(b)) => {
                out.insert(m, (a, b));
            }
            _ => {
                return Err(Error::Adapter {
                    path: st_path.clone(),
                    msg: format!("module `{m}` has only one of lora_A and lora_B"),
                })
            }
        }
    }
    Ok(PeftAdapter {
        config,
        weights: out,
    })
}

/// The generator used for adapter initialisation and dropout, seeded from the run's seed.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_follows_peft() {
        let mut c = LoraConfig {
            rank: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0); // 32 / sqrt(16)
    }

    #[test]
    fn target_matching() {
        let names = LoraConfig {
            target_modules: TargetModules::List(vec!["q_proj".into(), "mlp.down_proj".into()]),
            ..Default::default()
        }
        .matcher()
        .unwrap();
        assert!(names.matches("model.layers.0.self_attn.q_proj", false));
        assert!(names.matches("model.layers.7.mlp.down_proj", false));
        assert!(!names.matches("model.layers.0.self_attn.k_proj", false));
        assert!(
            !names.matches("model.layers.0.self_attn.xq_proj", false),
            "suffix must follow a dot"
        );
        let all = LoraConfig {
            target_modules: TargetModules::Pattern("all-linear".into()),
            ..Default::default()
        }
        .matcher()
        .unwrap();
        assert!(all.matches("model.layers.0.mlp.up_proj", false));
        assert!(!all.matches("lm_head", true));
        let re = LoraConfig {
            target_modules: TargetModules::Pattern(
                r"model\.layers\.(0|1)\.self_attn\.(q|v)_proj".into(),
            ),
            ..Default::default()
        }
        .matcher()
        .unwrap();
        assert!(re.matches("model.layers.1.self_attn.v_proj", false));
        assert!(
            !re.matches("model.layers.11.self_attn.v_proj", false),
            "regex must match the whole name"
        );
        let bad = LoraConfig {
            target_modules: TargetModules::Pattern("(".into()),
            ..Default::default()
        };
        assert!(bad.matcher().is_err());
    }

    #[test]
    fn init_is_kaiming_uniform_and_zero() {
        let cfg = LoraConfig {
            rank: 4,
            ..Default::default()
        };
        let ad = LoraAdapter::init(100, 7, &cfg, &mut rng(0), &Device::Cpu).unwrap();
        let a =
            ad.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.1), "bound is 1/sqrt(100)");
        assert!(a.iter().any(|v| v.abs() > 0.05));
        let b =
            ad.b.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(b.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn peft_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("ftbench-peft-{}", std::process::id()));
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            ..Default::default()
        };
        let mut r = rng(1);
        let ad = LoraAdapter::init(5, 3, &cfg, &mut r, &Device::Cpu).unwrap();
        ad.b.set(&Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        save_peft(
            &dir,
            &cfg,
            &[("model.layers.0.self_attn.q_proj".into(), &ad)],
            "m",
        )
        .unwrap();
        let back = load_peft(&dir, &Device::Cpu).unwrap();
        assert_eq!(back.config.rank, 2);
        assert_eq!(back.config.alpha, 4.0);
        let (a, b) = &back.weights["model.layers.0.self_attn.q_proj"];
        assert_eq!(a.dims(), &[2, 5]);
        assert_eq!(b.dims(), &[3, 2]);
        let names = safetensors::SafeTensors::deserialize(
            &std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        )
        .unwrap()
        .names()
        .into_iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
        assert!(names.contains(
            &"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
