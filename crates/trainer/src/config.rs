//! Model configuration, read from an HF `config.json` (field names as HF writes them) or built
//! from GGUF metadata, and written back as `config.json` by `convert`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The model families one decoder implementation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 2/3, SmolLM and other `LlamaForCausalLM` checkpoints.
    Llama,
    /// Mistral: the Llama block with an optional sliding window.
    Mistral,
    /// Qwen2 / Qwen2.5: the Llama block with q/k/v biases.
    Qwen2,
    /// Gemma 3 (text): GELU-tanh MLP, (1+w) RMSNorm, sandwich norms, q/k norm, embedding
    /// scale, local and global attention layers with their own RoPE bases.
    Gemma3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// SiLU gate (`hidden_act = "silu"`).
    #[serde(rename = "silu")]
    Silu,
    /// tanh-approximated GELU gate (`gelu_pytorch_tanh`).
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluTanh,
}

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`) or linear scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub rope_type: String,
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// A resolved decoder configuration. Field names follow HF `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    /// RoPE base of global (full-attention) layers.
    pub rope_theta: f64,
    /// Gemma 3: RoPE base of the sliding-window layers.
    pub rope_local_base_freq: Option<f64>,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub hidden_act: Activation,
    /// Biases on the q, k and v projections (Qwen2, or `attention_bias = true`).
    pub qkv_bias: bool,
    pub sliding_window: Option<usize>,
    /// One entry per layer: true where the layer attends within `sliding_window` only.
    pub sliding_layers: Vec<bool>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` (head_dim when absent).
    pub query_pre_attn_scalar: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// The fields read from `config.json`; everything optional so errors can name the key.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

fn first_id(v: &Option<Value>) -> Option<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32),
        Some(Value::Array(a)) => a.first().and_then(|n| n.as_u64()).map(|n| n as u32),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads an HF `config.json`. Gemma 3 multimodal configs are read through their
    /// `text_config`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("invalid json: {e}")))?;
        Self::from_hf_value(&value).map_err(|msg| Error::model(path, msg))
    }

    pub fn from_hf_value(value: &Value) -> std::result::Result<Self, String> {
        let value = match value.get("text_config") {
            Some(tc) if tc.is_object() => tc,
            _ => value,
        };
        let c: HfConfig = serde_json::from_value(value.clone()).map_err(|e| format!("{e}"))?;
        let model_type = c.model_type.clone().ok_or("missing key `model_type`")?;
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "gemma3_text" | "gemma3" => Family::Gemma3,
            other => {
                return Err(format!(
                    "unknown architecture `model_type = \"{other}\"` (expected one of llama, mistral, qwen2, gemma3_text)"
                ))
            }
        };
        let need = |v: Option<usize>, key: &str| v.ok_or(format!("missing key `{key}`"));
        let hidden_size = need(c.hidden_size, "hidden_size")?;
        let num_attention_heads = need(c.num_attention_heads, "num_attention_heads")?;
        let num_hidden_layers = need(c.num_hidden_layers, "num_hidden_layers")?;
        let gemma = family == Family::Gemma3;
        let act = c
            .hidden_activation
            .clone()
            .or(c.hidden_act.clone())
            .unwrap_or_else(|| {
                if gemma {
                    "gelu_pytorch_tanh".into()
                } else {
                    "silu".into()
                }
            });
        let hidden_act = match act.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu" => Activation::GeluTanh,
            other => {
                return Err(format!(
                    "unsupported `hidden_act = \"{other}\"` (expected silu or gelu_pytorch_tanh)"
                ))
            }
        };
        let sliding_window = match family {
            Family::Qwen2 if !c.use_sliding_window.unwrap_or(false) => None,
            _ => c.sliding_window,
        };
        let sliding_layers = if let Some(types) = &c.layer_types {
            if types.len() != num_hidden_layers {
                return Err(format!(
                    "`layer_types` has {} entries, expected num_hidden_layers = {num_hidden_layers}",
                    types.len()
                ));
            }
            types.iter().map(|t| t == "sliding_attention").collect()
        } else if gemma {
            let pattern = c.sliding_window_pattern.unwrap_or(6);
            (0..num_hidden_layers)
                .map(|i| (i + 1) % pattern != 0)
                .collect()
        } else if family == Family::Qwen2 && sliding_window.is_some() {
            let from = c.max_window_layers.unwrap_or(num_hidden_layers);
            (0..num_hidden_layers).map(|i| i >= from).collect()
        } else {
            vec![sliding_window.is_some(); num_hidden_layers]
        };
        let rope_scaling = match &c.rope_scaling {
            None | Some(Value::Null) => None,
            Some(v) => {
                let mut v = v.clone();
                if v.get("rope_type").is_none() {
                    if let Some(t) = v.get("type").cloned() {
                        v["rope_type"] = t;
                    }
                }
                let s: RopeScaling =
                    serde_json::from_value(v).map_err(|e| format!("`rope_scaling`: {e}"))?;
                match s.rope_type.as_str() {
                    "llama3" | "linear" => Some(s),
                    "default" => None,
                    other => return Err(format!("unsupported `rope_scaling.rope_type = \"{other}\"` (expected llama3 or linear)")),
                }
            }
        };
        Ok(ModelConfig {
            family,
            hidden_size,
            intermediate_size: need(c.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(num_attention_heads),
            // zero heads are refused by `validate`, named there
            head_dim: c
                .head_dim
                .unwrap_or(hidden_size.checked_div(num_attention_heads).unwrap_or(0)),
            vocab_size: need(c.vocab_size, "vocab_size")?,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: c
                .rope_theta
                .unwrap_or(if gemma { 1_000_000.0 } else { 10_000.0 }),
            rope_local_base_freq: if gemma {
                Some(c.rope_local_base_freq.unwrap_or(10_000.0))
            } else {
                None
            },
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(gemma),
            hidden_act,
            qkv_bias: c.attention_bias.unwrap_or(family == Family::Qwen2),
            sliding_window,
            sliding_layers,
            query_pre_attn_scalar: c.query_pre_attn_scalar,
            final_logit_softcapping: c.final_logit_softcapping,
            attn_logit_softcapping: c.attn_logit_softcapping,
            bos_token_id: first_id(&c.bos_token_id),
            eos_token_id: first_id(&c.eos_token_id),
            pad_token_id: first_id(&c.pad_token_id),
        })
    }

    /// The `config.json` HF transformers reads for this model.
    pub fn to_hf_json(&self) -> Value {
        let (arch, model_type) = match self.family {
            Family::Llama => ("LlamaForCausalLM", "llama"),
            Family::Mistral => ("MistralForCausalLM", "mistral"),
            Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Family::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        };
        let act = match self.hidden_act {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        };
        let mut v = json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": act,
            "attention_bias": self.qkv_bias,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        });
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::to_value(s).expect("rope scaling serialises");
        }
        if self.family == Family::Gemma3 {
            v["hidden_activation"] = json!(act);
            v["rope_local_base_freq"] = json!(self.rope_local_base_freq);
            v["sliding_window"] = json!(self.sliding_window);
            // HF declares this an int; write whole numbers as such
            let q = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
            v["query_pre_attn_scalar"] = if q.fract() == 0.0 {
                json!(q as i64)
            } else {
                json!(q)
            };
            v["final_logit_softcapping"] = json!(self.final_logit_softcapping);
            v["attn_logit_softcapping"] = json!(self.attn_logit_softcapping);
            let types: Vec<&str> = self
                .sliding_layers
                .iter()
                .map(|&s| {
                    if s {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            v["layer_types"] = json!(types);
        } else if let Some(w) = self.sliding_window {
            v["sliding_window"] = json!(w);
            if self.family == Family::Qwen2 {
                v["use_sliding_window"] = json!(true);
                let first = self
                    .sliding_layers
                    .iter()
                    .position(|&s| s)
                    .unwrap_or(self.num_hidden_layers);
                v["max_window_layers"] = json!(first);
            }
        }
        v
    }

    pub fn is_gemma(&self) -> bool {
        self.family == Family::Gemma3
    }

    /// Softmax scale of the attention scores.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Gemma multiplies the embeddings by sqrt(hidden_size).
    pub fn embedding_scale(&self) -> Option<f64> {
        self.is_gemma().then(|| (self.hidden_size as f64).sqrt())
    }

    /// RoPE base of layer `layer`.
    pub fn rope_base(&self, layer: usize) -> f64 {
        match (self.sliding_layers[layer], self.rope_local_base_freq) {
            (true, Some(local)) => local,
            _ => self.rope_theta,
        }
    }

    /// Parameter count of the base model (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, l) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        );
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * i;
        let norms = if self.is_gemma() {
            4 * h + 2 * self.head_dim
        } else {
            2 * h
        };
        let embed = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        l * (attn + mlp + norms) + embed + h
    }

    /// The shape the meter's FLOP counter needs.
    pub fn shape(&self) -> ftbench_meter::ModelShape {
        ftbench_meter::ModelShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            gated_mlp: true,
        }
    }

    /// Checks the shapes fit together.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim = {} must be even for RoPE",
                self.head_dim
            ));
        }
        if self.sliding_layers.len() != self.num_hidden_layers {
            return Err("one attention kind per layer expected".into());
        }
        Ok(())
    }

    /// Presets with the published shapes of a few models, used by `bench` on random weights.
    pub fn preset(name: &str) -> Option<Self> {
        let v = match name {
            "smollm-135m" => json!({
                "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "max_position_embeddings": 2048, "tie_word_embeddings": true, "hidden_act": "silu"
            }),
            "gemma3-270m" => json!({
                "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
                "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 256, "vocab_size": 262144, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
                "query_pre_attn_scalar": 256, "max_position_embeddings": 32768,
                "hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6
            }),
            "llama-3.2-1b" => json!({
                "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 64, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "max_position_embeddings": 131072, "tie_word_embeddings": true, "hidden_act": "silu",
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            }),
            _ => return None,
        };
        Some(Self::from_hf_value(&v).expect("presets are valid"))
    }

    pub const PRESETS: &'static [&'static str] = &["smollm-135m", "gemma3-270m", "llama-3.2-1b"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_layer_pattern_and_scales() {
        let c = ModelConfig::preset("gemma3-270m").unwrap();
        // every sixth layer is global: layers 5, 11, 17
        let global: Vec<usize> = (0..18).filter(|&i| !c.sliding_layers[i]).collect();
        assert_eq!(global, vec![5, 11, 17]);
        assert_eq!(c.rope_base(0), 10_000.0);
        assert_eq!(c.rope_base(5), 1_000_000.0);
        assert!((c.attention_scale() - 1.0 / 16.0).abs() < 1e-12);
        assert!(c.tie_word_embeddings);
        // published size: about 268M parameters, 170M of them in the embedding
        let p = c.num_parameters();
        assert!((265_000_000..272_000_000).contains(&p), "{p}");
    }

    #[test]
    fn smollm_preset_counts_135m_parameters() {
        let p = ModelConfig::preset("smollm-135m").unwrap().num_parameters();
        assert!((134_000_000..136_000_000).contains(&p), "{p}");
    }

    #[test]
    fn round_trips_through_hf_json() {
        for name in ModelConfig::PRESETS {
            let c = ModelConfig::preset(name).unwrap();
            let back = ModelConfig::from_hf_value(&c.to_hf_json()).unwrap();
            assert_eq!(c, back, "{name}");
        }
    }

    #[test]
    fn integer_fields_are_written_as_integers() {
        let v = ModelConfig::preset("gemma3-270m").unwrap().to_hf_json();
        assert!(
            v["query_pre_attn_scalar"].is_i64(),
            "{}",
            v["query_pre_attn_scalar"]
        );
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = ModelConfig::from_hf_value(&json!({"model_type": "bert"})).unwrap_err();
        assert!(
            err.contains("unknown architecture") && err.contains("bert"),
            "{err}"
        );
        let err = ModelConfig::from_hf_value(&json!({"model_type": "llama", "hidden_size": 8}))
            .unwrap_err();
        assert!(err.contains("num_attention_heads"), "{err}");
    }

    #[test]
    fn zero_heads_are_refused_not_divided_by() {
        let mut v = ModelConfig::preset("smollm-135m").unwrap().to_hf_json();
        v["num_attention_heads"] = json!(0);
        v.as_object_mut().unwrap().remove("head_dim");
        let err = ModelConfig::from_hf_value(&v)
            .and_then(|c| c.validate().map(|_| c))
            .unwrap_err();
        assert!(err.contains("num_attention_heads"), "{err}");
    }
}
