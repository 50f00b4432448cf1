//! LoRA-aware FLOP counts per token, from a model's shape.
//!
//! Conventions (all counts are per token; one multiply-add is 2 FLOPs):
//! - forward: 2 FLOPs per weight of every linear layer (q, k, v, o, gate, up, down in
//!   each decoder layer) and of the LM head (counted whether or not it is tied to the
//!   embedding; the embedding lookup itself costs nothing);
//! - backward, input gradient: 2 FLOPs per weight of every linear layer and the LM head;
//! - backward, weight gradient: 2 FLOPs per *trainable* weight only (all of them for full
//!   fine-tuning, none of the base weights for LoRA);
//! - attention: the score product `q k^T` and the value product `p v` are counted apart
//!   from the linear layers, 2 x heads x head_dim FLOPs per attended position each. The
//!   mask is causal, so a training sequence of length S attends on average to
//!   (S + 1) / 2 positions per token. Their backward is twice the forward (a gradient for
//!   each operand). Sliding-window layers are counted as full attention (an upper bound);
//! - LoRA: each adapted module adds r x (in + out) weights; forward 2 FLOPs per adapter
//!   weight, backward 2 for the input gradient and 2 for the weight gradient;
//! - norms, activations, RoPE, softmax and the loss are not counted (they are O(hidden)
//!   per token against O(hidden^2) for the matmuls).

use serde::{Deserialize, Serialize};

/// The canonical names of the seven linear projections of a decoder layer.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The shape of a decoder-only transformer, with Hugging Face config key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (fewer than query heads with grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the LM head).
    pub vocab_size: usize,
    /// True for a gated MLP (`gate_proj`, `up_proj`, `down_proj`: Llama, Gemma, Qwen),
    /// false for a plain two-layer MLP (`up_proj`, `down_proj`).
    pub gated_mlp: bool,
}

/// Errors reading a model shape from a Hugging Face `config.json` value.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// A key that must be a positive integer is missing or is not one.
    #[error("config key `{key}`: expected a positive integer, found {found}")]
    BadKey {
        /// The key.
        key: String,
        /// What was found, as JSON, or `nothing`.
        found: String,
    },
}

impl ModelShape {
    /// Reads the shape from a Hugging Face `config.json` value. Multimodal configs with a
    /// `text_config` object (Gemma 3) are read from that object. `num_key_value_heads`
    /// defaults to `num_attention_heads`, `head_dim` to `hidden_size /
    /// num_attention_heads`; the MLP is taken as gated (every Llama, Qwen, Mistral and
    /// Gemma model is).
    pub fn from_hf_config(config: &serde_json::Value) -> Result<Self, ShapeError> {
        let c = config
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(config);
        let get = |key: &str| -> Result<Option<usize>, ShapeError> {
            match c.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n as usize)),
                    _ => Err(ShapeError::BadKey {
                        key: key.into(),
                        found: v.to_string(),
                    }),
                },
            }
        };
        let need = |key: &str| -> Result<usize, ShapeError> {
            get(key)?.ok_or_else(|| ShapeError::BadKey {
                key: key.into(),
                found: "nothing".into(),
            })
        };
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        Ok(ModelShape {
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: get("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim: get("head_dim")?.unwrap_or(hidden_size / num_attention_heads),
            vocab_size: need("vocab_size")?,
            gated_mlp: true,
        })
    }

    /// `(in_features, out_features)` of a decoder layer's linear module, by canonical
    /// name; `None` for an unknown name or `gate_proj` of an ungated MLP.
    pub fn module_dims(&self, module: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        match module {
            "q_proj" => Some((h, q)),
            "k_proj" | "v_proj" => Some((h, kv)),
            "o_proj" => Some((q, h)),
            "gate_proj" if self.gated_mlp => Some((h, i)),
            "up_proj" => Some((h, i)),
            "down_proj" => Some((i, h)),
            _ => None,
        }
    }

    /// Weights in the linear modules of one decoder layer.
    pub fn layer_linear_params(&self) -> u64 {
        LINEAR_MODULES
            .iter()
            .filter_map(|m| self.module_dims(m))
            .map(|(i, o)| (i * o) as u64)
            .sum()
    }

    /// Weights in all decoder linear modules (LM head and embedding excluded).
    pub fn linear_params(&self) -> u64 {
        self.layer_linear_params() * self.num_hidden_layers as u64
    }

    /// Weights in the LM head (`hidden_size x vocab_size`).
    pub fn lm_head_params(&self) -> u64 {
        (self.hidden_size * self.vocab_size) as u64
    }
}

/// Which modules carry LoRA adapters, and their rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraShape {
    /// Adapter rank r.
    pub rank: usize,
    /// Adapted modules, by canonical name (`q_proj` ... `down_proj`). A name matches by
    /// suffix, so `self_attn.q_proj` counts as `q_proj`; `all-linear` means all seven.
    /// Other names match nothing; see [`LoraShape::unknown_targets`].
    pub target_modules: Vec<String>,
}

impl LoraShape {
    /// Adapters on all seven linear modules of every layer.
    pub fn all_linear(rank: usize) -> Self {
        LoraShape {
            rank,
            target_modules: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The canonical modules this shape adapts, without duplicates, in canonical order.
    pub fn canonical_targets(&self) -> Vec<&'static str> {
        if self.target_modules.iter().any(|t| t == "all-linear") {
            return LINEAR_MODULES.to_vec();
        }
        LINEAR_MODULES
            .iter()
            .copied()
            .filter(|m| self.target_modules.iter().any(|t| matches_module(t, m)))
            .collect()
    }

    /// Target names that match none of the canonical modules (counted as nothing).
    pub fn unknown_targets(&self) -> Vec<&str> {
        self.target_modules
            .iter()
            .map(String::as_str)
            .filter(|t| *t != "all-linear" && !LINEAR_MODULES.iter().any(|m| matches_module(t, m)))
            .collect()
    }

    /// Adapter weights in the whole model: r x (in + out) per adapted module and layer.
    pub fn params(&self, shape: &ModelShape) -> u64 {
        let per_layer: u64 = self
            .canonical_targets()
            .iter()
            .filter_map(|m| shape.module_dims(m))
            .map(|(i, o)| (self.rank * (i + o)) as u64)
            .sum();
        per_layer * shape.num_hidden_layers as u64
    }
}

fn matches_module(target: &str, module: &str) -> bool {
    target == module || target.ends_with(&format!(".{module}"))
}

/// What is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    /// Every weight (full fine-tuning).
    Full,
    /// LoRA adapters on a frozen base.
    Lora(LoraShape),
    /// Nothing: forward only (inference, evaluation).
    None,
}

/// FLOPs per token, split by where they go. `total` is the sum of the other fields.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct FlopCount {
    /// Forward through the decoder's linear modules.
    pub forward_linear: f64,
    /// Forward attention score and value products.
    pub forward_attention: f64,
    /// Forward through the LM head.
    pub forward_lm_head: f64,
    /// Backward, gradients with respect to the inputs of the linear modules and LM head.
    pub backward_input_grad: f64,
    /// Backward through the attention score and value products (twice the forward).
    pub backward_attention: f64,
    /// Backward, gradients with respect to trainable base weights.
    pub backward_weight_grad: f64,
    /// Forward through the LoRA adapters.
    pub lora_forward: f64,
    /// Backward through the LoRA adapters (input and weight gradients).
    pub lora_backward: f64,
    /// Sum of all the above.
    pub total: f64,
}

impl FlopCount {
    fn summed(mut self) -> Self {
        self.total = self.forward_linear
            + self.forward_attention
            + self.forward_lm_head
            + self.backward_input_grad
            + self.backward_attention
            + self.backward_weight_grad
            + self.lora_forward
            + self.lora_backward;
        self
    }
}

/// Attention FLOPs (scores plus values) for one token attending to `positions` positions,
/// over all layers.
fn attention_flops(shape: &ModelShape, positions: f64) -> f64 {
    let per_layer = 2.0 * 2.0 * (shape.num_attention_heads * shape.head_dim) as f64 * positions;
    per_layer * shape.num_hidden_layers as f64
}

/// FLOPs per training token for sequences of `seq_len` tokens (causal mask: on average
/// `(seq_len + 1) / 2` attended positions per token). With [`Trainable::None`] only the
/// forward pass is counted.
pub fn training_flops_per_token(
    shape: &ModelShape,
    seq_len: usize,
    trainable: &Trainable,
) -> FlopCount {
    let linear = shape.linear_params() as f64;
    let head = shape.lm_head_params() as f64;
    let avg_context = (seq_len as f64 + 1.0) / 2.0;
    let forward_attention = attention_flops(shape, avg_context);
    let mut c = FlopCount {
        forward_linear: 2.0 * linear,
        forward_attention,
        forward_lm_head: 2.0 * head,
        ..FlopCount::default()
    };
    if *trainable != Trainable::None {
        c.backward_input_grad = 2.0 * (linear + head);
        c.backward_attention = 2.0 * forward_attention;
    }
    match trainable {
        Trainable::Full => c.backward_weight_grad = 2.0 * (linear + head),
        Trainable::Lora(lora) => {
            let adapters = lora.params(shape) as f64;
            c.lora_forward = 2.0 * adapters;
            c.lora_backward = 4.0 * adapters;
        }
        Trainable::None => {}
    }
    c.summed()
}

/// FLOPs for one generated token when the KV cache holds `context_len` positions (the
/// new token included), forward only.
pub fn inference_flops_per_token(shape: &ModelShape, context_len: usize) -> FlopCount {
    FlopCount {
        forward_linear: 2.0 * shape.linear_params() as f64,
        forward_attention: attention_flops(shape, context_len as f64),
        forward_lm_head: 2.0 * shape.lm_head_params() as f64,
        ..FlopCount::default()
    }
    .summed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hidden 4, intermediate 8, 2 layers, 2 query heads, 1 kv head, head_dim 2, vocab 10.
    fn tiny() -> ModelShape {
        ModelShape {
            hidden_size: 4,
            intermediate_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 2,
            vocab_size: 10,
            gated_mlp: true,
        }
    }

    #[test]
    fn lora_count_matches_hand_calculation() {
        // Per layer: q 4x4=16, k 4x2=8, v 4x2=8, o 4x4=16, gate 4x8=32, up 32, down 32
        //   = 144 weights; 2 layers = 288. LM head 4x10 = 40.
        // forward_linear      = 2 * 288                       = 576
        // forward_lm_head     = 2 * 40                        = 80
        // attention, seq 3: average context (3+1)/2 = 2 positions;
        //   per layer 2 (scores + values) * 2 FLOPs * (2 heads * 2 dims) * 2 = 32; x2 layers = 64
        // backward_input_grad = 2 * (288 + 40)                = 656
        // backward_attention  = 2 * 64                        = 128
        // backward_weight_grad = 0 (base frozen)
        // LoRA r=1 on q (4+4=8) and v (4+2=6): 14 per layer, 28 in all
        // lora_forward = 2 * 28 = 56; lora_backward = 4 * 28 = 112
        // total = 576 + 80 + 64 + 656 + 128 + 0 + 56 + 112  = 1672
        let lora = LoraShape {
            rank: 1,
            target_modules: vec!["q_proj".into(), "self_attn.v_proj".into()],
        };
        let c = training_flops_per_token(&tiny(), 3, &Trainable::Lora(lora.clone()));
        assert_eq!(lora.params(&tiny()), 28);
        assert_eq!(c.forward_linear, 576.0);
        assert_eq!(c.forward_lm_head, 80.0);
        assert_eq!(c.forward_attention, 64.0);
        assert_eq!(c.backward_input_grad, 656.0);
        assert_eq!(c.backward_attention, 128.0);
        assert_eq!(c.backward_weight_grad, 0.0);
        assert_eq!(c.lora_forward, 56.0);
        assert_eq!(c.lora_backward, 112.0);
        assert_eq!(c.total, 1672.0);
    }

    #[test]
    fn full_and_inference_counts() {
        // Full: forward 576 + 80 + 64, backward input 656 + attention 128, weight grad
        // 2 * (288 + 40) = 656: total 2160.
        let c = training_flops_per_token(&tiny(), 3, &Trainable::Full);
        assert_eq!(c.backward_weight_grad, 656.0);
        assert_eq!(c.total, 2160.0);
        // Forward only, the same sequence: 576 + 80 + 64 = 720.
        assert_eq!(
            training_flops_per_token(&tiny(), 3, &Trainable::None).total,
            720.0
        );
        // One generated token with 5 cached positions: attention per layer
        // 2 * 2 * 4 * 5 = 80, x2 = 160; total 576 + 80 + 160 = 816.
        let g = inference_flops_per_token(&tiny(), 5);
        assert_eq!(g.forward_attention, 160.0);
        assert_eq!(g.total, 816.0);
    }

    #[test]
    fn full_training_is_about_six_n() {
        // Attention aside, full fine-tuning costs 6 FLOPs per weight and token.
        let s = tiny();
        let c = training_flops_per_token(&s, 1, &Trainable::Full);
        let n = (s.linear_params() + s.lm_head_params()) as f64;
        assert_eq!(
            c.total - c.forward_attention - c.backward_attention,
            6.0 * n
        );
    }

    #[test]
    fn targets_and_hf_config() {
        let l = LoraShape {
            rank: 2,
            target_modules: vec!["all-linear".into()],
        };
        assert_eq!(l.canonical_targets().len(), 7);
        let l = LoraShape {
            rank: 2,
            target_modules: vec!["q_proj".into(), "qproj".into()],
        };
        assert_eq!(l.unknown_targets(), vec!["qproj"]);
        // An ungated MLP has no gate_proj.
        let mut s = tiny();
        s.gated_mlp = false;
        assert_eq!(s.layer_linear_params(), 144 - 32);

        let cfg = serde_json::json!({
            "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 262144
        });
        let s = ModelShape::from_hf_config(&cfg).unwrap();
        assert_eq!(s.head_dim, 256);
        // Gemma 3 270M: per layer q 640x1024 + k,v 640x256 each + o 1024x640
        //   + 3 x 640x2048 = 655360 + 327680 + 655360 + 3932160 = 5_570_560; x18 = 100_270_080.
        assert_eq!(s.linear_params(), 100_270_080);
        // LoRA r16 on all seven modules, sequences of 256 (the numbers in docs/run-record.md):
        // adapters per layer 16 x (1664 + 896 + 896 + 1664 + 2688 + 2688 + 2688) = 210,944,
        // x18 = 3,796,992; LM head 640 x 262,144 = 167,772,160;
        // forward 2 x 100,270,080 + 2 x 167,772,160 + attention 4 x 1024 x 128.5 x 18
        // (= 9,474,048); backward input 2 x 268,042,240 + attention 2 x 9,474,048;
        // adapters 6 x 3,796,992: total 1,123,373,056 FLOPs per token.
        let c = training_flops_per_token(&s, 256, &Trainable::Lora(LoraShape::all_linear(16)));
        assert_eq!(c.forward_attention, 9_474_048.0);
        assert_eq!(c.lora_forward, 7_593_984.0);
        assert_eq!(c.total, 1_123_373_056.0);
        let bad = serde_json::json!({"hidden_size": "640"});
        let e = ModelShape::from_hf_config(&bad).unwrap_err().to_string();
        assert_eq!(
            e,
            "config key `hidden_size`: expected a positive integer, found \"640\""
        );
    }
}
