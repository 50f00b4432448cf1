//! The decoder: one implementation for the Llama family (Llama, Mistral, Qwen2) and Gemma 3,
//! driven by [`ModelConfig`]. It trains (LoRA or full) and generates with a KV cache.
//!
//! Weights are kept under their HF module paths (`model.layers.0.self_attn.q_proj.weight`)
//! so adapters and exports line up with HF checkpoints. Gemma's RMSNorm multiplies by
//! `1 + w`; the decoder stores that effective factor and the loaders convert.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;

use crate::attention;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::fused_lora::{self, LoraKernel};
use crate::lora::{dropout_mask, LoraAdapter, LoraConfig};
use crate::ops;
pub use crate::ops::masked_cross_entropy;
use crate::quant::QuantWeight;

/// What a forward pass may change.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainMode {
    /// Inference: nothing trainable.
    Frozen,
    /// LoRA adapters on a frozen base.
    Lora(LoraConfig),
    /// Every weight is trainable.
    Full,
}

/// A frozen base weight `[out, in]`: dense, or kept quantized (QLoRA).
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Quant(QuantWeight),
}

impl BaseWeight {
    /// `(out_features, in_features)`
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Dense(t) => (t.dims()[0], t.dims()[1]),
            Self::Quant(q) => q.dims(),
        }
    }

    /// The weight as a dense f32 tensor (dequantized if need be).
    pub fn dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quant(q) => Ok(q.dequantize(device)?),
        }
    }
}

/// A linear layer `y = x Wᵀ (+ b)` with an optional LoRA adapter.
pub struct Linear {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub base: BaseWeight,
    /// Set in full fine-tuning: the weight as a variable.
    weight_var: Option<Var>,
    bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        if let (Some(lora), None) = (&self.lora, &self.weight_var) {
            if lora.kernel == LoraKernel::Fused {
                return self.forward_fused(x, lora, ctx);
            }
        }
        let mut y = match &self.weight_var {
            Some(w) => x.broadcast_matmul(&w.as_tensor().t()?)?,
            None => match &self.base {
                BaseWeight::Dense(w) => ops::frozen_linear(x, w)?,
                BaseWeight::Quant(q) => ops::quant_linear(x, q)?,
            },
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = &self.lora {
            let mask = match (&mut ctx.dropout_rng, lora.dropout > 0.0) {
                (Some(rng), true) => Some(dropout_mask(x.dims(), lora.dropout, rng, x.device())?),
                _ => None,
            };
            y = (y + lora.forward(x, mask.as_ref())?)?;
        }
        Ok(y)
    }

    /// Frozen base with an adapter, as one op ([`crate::fused_lora`]).
    fn forward_fused(&self, x: &Tensor, lora: &LoraAdapter, ctx: &mut Ctx) -> Result<Tensor> {
        let mask = match (&mut ctx.dropout_rng, lora.dropout > 0.0) {
            (Some(rng), true) => Some(dropout_mask(x.dims(), lora.dropout, rng, x.device())?),
            _ => None,
        };
        let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
        let y = match &self.base {
            BaseWeight::Dense(w) => {
                fused_lora::lora_linear(x, w, a, b, lora.scaling, mask.as_ref())?
            }
            BaseWeight::Quant(q) => {
                fused_lora::lora_linear_quantized(x, q, a, b, lora.scaling, mask.as_ref())?
            }
        };
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }

    pub fn in_features(&self) -> usize {
        self.base.dims().1
    }
    pub fn out_features(&self) -> usize {
        self.base.dims().0
    }

    /// The weight with the adapter merged: `W + scaling · B A` (onto the dequantized weight
    /// when the base is quantized).
    pub fn merged_weight(&self, device: &Device) -> Result<Tensor> {
        let w = self.current_weight(device)?;
        match &self.lora {
            Some(l) => {
                let delta = l.delta()?.to_dtype(w.dtype())?;
                Ok((w + delta)?)
            }
            None => Ok(w),
        }
    }

    /// The current weight, dense f32 (dequantized when the base is quantized).
    /// `device` is where a quantized base is dequantized to (the model's device).
    pub fn current_weight(&self, device: &Device) -> Result<Tensor> {
        match &self.weight_var {
            Some(v) => Ok(v.as_tensor().clone()),
            None => self.base.dense(device),
        }
    }
}

/// An RMSNorm weight (the effective factor, `1 + w` for Gemma).
struct Norm {
    name: String,
    weight: Tensor,
    var: Option<Var>,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.var {
            Some(v) => v.as_tensor(),
            None => &self.weight,
        };
        Ok(ops::rms_norm(x, w, self.eps)?)
    }
}

struct Block {
    input_layernorm: Norm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Gemma 3: RMSNorm over each head's queries and keys.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    /// Gemma 3: norm of the attention output before the residual add.
    post_attention_norm: Option<Norm>,
    /// Norm before the MLP (Llama calls it `post_attention_layernorm`).
    pre_mlp_norm: Norm,
    /// Gemma 3: norm of the MLP output before the residual add.
    post_mlp_norm: Option<Norm>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    sliding: bool,
    rope_base: f64,
}

/// Per-call state of a forward pass.
pub struct Ctx<'a> {
    /// Dropout generator while training; None disables dropout.
    pub dropout_rng: Option<&'a mut StdRng>,
}

/// Keys and values of past positions, per layer: `[b, n_kv, t, head_dim]`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Decoder {
    pub config: ModelConfig,
    pub device: Device,
    embed_tokens: Tensor,
    embed_var: Option<Var>,
    blocks: Vec<Block>,
    norm: Norm,
    /// None when the embeddings are tied.
    lm_head: Option<Linear>,
    mode: TrainMode,
}

/// A weight source: HF names to tensors, in HF conventions (Gemma norms as stored by HF).
pub type Weights = HashMap<String, Tensor>;

/// Linear weights kept quantized, by HF name (`model.layers.0.mlp.up_proj.weight`).
pub type QuantWeights = HashMap<String, QuantWeight>;

impl Decoder {
    /// Builds the decoder from HF-named weights. In LoRA mode, adapters are created on the
    /// matching linear layers (seeded); an adapter that matches nothing is an error.
    pub fn new(
        config: ModelConfig,
        weights: Weights,
        mode: TrainMode,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::with_quantized(config, weights, QuantWeights::new(), mode, seed, device)
    }

    /// As [`Decoder::new`], with some linear weights held quantized (a frozen QLoRA base):
    /// each name in `quant` replaces the dense weight of that name.
    pub fn with_quantized(
        config: ModelConfig,
        mut weights: Weights,
        mut quant: QuantWeights,
        mode: TrainMode,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate().map_err(|m| Error::config("model", m))?;
        let c = &config;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = weights
                .remove(name)
                .ok_or_else(|| Error::config("model", format!("missing weight `{name}`")))?;
            if t.dims() != shape {
                return Err(Error::config(
                    "model",
                    format!(
                        "weight `{name}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    ),
                ));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(device)?)
        };
        let full = mode == TrainMode::Full;
        let gemma = c.is_gemma();
        let norm = |take: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
                    name: String,
                    dim: usize|
         -> Result<Norm> {
            let mut w = take(&format!("{name}.weight"), &[dim])?;
            if gemma {
                w = (w + 1.0)?;
            }
            let var = if full {
                Some(Var::from_tensor(&w)?)
            } else {
                None
            };
            Ok(Norm {
                name,
                weight: w,
                var,
                eps: c.rms_norm_eps,
            })
        };
        if full && !quant.is_empty() {
            return Err(Error::config(
                "train.mode",
                "full fine-tuning needs a dense f32 base; found projections held quantized or in bf16 (set model.quantization = \"none\")",
            ));
        }
        let mut linear = |take: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
                          name: String,
                          out_f: usize,
                          in_f: usize,
                          bias: bool|
         -> Result<Linear> {
            let wname = format!("{name}.weight");
            let base = match quant.remove(&wname) {
                Some(q) => {
                    let (qo, qi) = q.dims();
                    if (qo, qi) != (out_f, in_f) {
                        let msg = format!(
                            "quantized weight `{wname}` has shape [{qo}, {qi}], expected [{out_f}, {in_f}]"
                        );
                        return Err(Error::config("model", msg));
                    }
                    BaseWeight::Quant(q)
                }
                None => BaseWeight::Dense(take(&wname, &[out_f, in_f])?),
            };
            let bias = if bias {
                Some(take(&format!("{name}.bias"), &[out_f])?)
            } else {
                None
            };
            let weight_var = match (&base, full) {
                (BaseWeight::Dense(w), true) => Some(Var::from_tensor(w)?),
                _ => None,
            };
            Ok(Linear {
                name,
                base,
                weight_var,
                bias,
                lora: None,
            })
        };
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q_dim, kv_dim) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let embed_tokens = take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let take: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor> = &mut take;
            blocks.push(Block {
                input_layernorm: norm(take, format!("{p}.input_layernorm"), h)?,
                q_proj: linear(take, format!("{p}.self_attn.q_proj"), q_dim, h, c.qkv_bias)?,
                k_proj: linear(take, format!("{p}.self_attn.k_proj"), kv_dim, h, c.qkv_bias)?,
                v_proj: linear(take, format!("{p}.self_attn.v_proj"), kv_dim, h, c.qkv_bias)?,
                o_proj: linear(take, format!("{p}.self_attn.o_proj"), h, q_dim, false)?,
                q_norm: if gemma {
                    Some(norm(take, format!("{p}.self_attn.q_norm"), c.head_dim)?)
                } else {
                    None
                },
                k_norm: if gemma {
                    Some(norm(take, format!("{p}.self_attn.k_norm"), c.head_dim)?)
                } else {
                    None
                },
                post_attention_norm: if gemma {
                    Some(norm(take, format!("{p}.post_attention_layernorm"), h)?)
                } else {
                    None
                },
                pre_mlp_norm: if gemma {
                    norm(take, format!("{p}.pre_feedforward_layernorm"), h)?
                } else {
                    norm(take, format!("{p}.post_attention_layernorm"), h)?
                },
                post_mlp_norm: if gemma {
                    Some(norm(take, format!("{p}.post_feedforward_layernorm"), h)?)
                } else {
                    None
                },
                gate_proj: linear(take, format!("{p}.mlp.gate_proj"), i, h, false)?,
                up_proj: linear(take, format!("{p}.mlp.up_proj"), i, h, false)?,
                down_proj: linear(take, format!("{p}.mlp.down_proj"), h, i, false)?,
                sliding: c.sliding_layers[l],
                rope_base: c.rope_base(l),
            });
        }
        let norm_f = norm(&mut take, "model.norm".to_string(), h)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(linear(
                &mut take,
                "lm_head".to_string(),
                c.vocab_size,
                h,
                false,
            )?)
        };
        drop(linear);
        if let Some(name) = quant.keys().min() {
            return Err(Error::config(
                "model",
                format!("quantized weight `{name}` matches no linear layer of the model"),
            ));
        }
        let embed_var = if full {
            Some(Var::from_tensor(&embed_tokens)?)
        } else {
            None
        };
        let mut model = Decoder {
            config,
            device: device.clone(),
            embed_tokens,
            embed_var,
            blocks,
            norm: norm_f,
            lm_head,
            mode: TrainMode::Frozen,
        };
        if let TrainMode::Lora(lc) = &mode {
            model.add_adapters(lc, seed)?;
        }
        model.mode = mode;
        Ok(model)
    }

    /// The linear layers in module order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for b in &self.blocks {
            v.extend([
                &b.q_proj,
                &b.k_proj,
                &b.v_proj,
                &b.o_proj,
                &b.gate_proj,
                &b.up_proj,
                &b.down_proj,
            ]);
        }
        v.extend(self.lm_head.as_ref());
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for b in &mut self.blocks {
            v.extend([
                &mut b.q_proj,
                &mut b.k_proj,
                &mut b.v_proj,
                &mut b.o_proj,
                &mut b.gate_proj,
                &mut b.up_proj,
                &mut b.down_proj,
            ]);
        }
        v.extend(self.lm_head.as_mut());
        v
    }

    fn add_adapters(&mut self, lc: &LoraConfig, seed: u64) -> Result<()> {
        let matcher = lc.matcher()?;
        let mut rng = crate::lora::rng(seed);
        let device = self.device.clone();
        let mut n = 0;
        for lin in self.linears_mut() {
            if matcher.matches(&lin.name, lin.name == "lm_head") {
                let limit = lin.in_features().min(lin.out_features());
                if lc.rank > limit {
                    return Err(Error::config(
                        "lora.rank",
                        format!(
                            "{} exceeds the smaller dimension of `{}` ({limit})",
                            lc.rank, lin.name
                        ),
                    ));
                }
                lin.lora = Some(LoraAdapter::init(
                    lin.in_features(),
                    lin.out_features(),
                    lc,
                    &mut rng,
                    &device,
                )?);
                n += 1;
            }
        }
        if n == 0 {
            return Err(Error::config(
                "lora.target_modules",
                format!(
                    "{} matches no linear layer of this model (names look like model.layers.0.self_attn.q_proj)",
                    match &lc.target_modules {
                        crate::lora::TargetModules::List(v) => format!("{v:?}"),
                        crate::lora::TargetModules::Pattern(p) => format!("{p:?}"),
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Replaces the adapters' weights with those of a loaded PEFT adapter.
    pub fn load_adapter(
        &mut self,
        adapter: &crate::lora::PeftAdapter,
        path: &std::path::Path,
    ) -> Result<()> {
        let lc = adapter.config.clone();
        let device = self.device.clone();
        let mut rng = crate::lora::rng(0);
        let mut used = 0;
        for lin in self.linears_mut() {
            if let Some((a, b)) = adapter.weights.get(&lin.name) {
                let exp_a = [lc.rank, lin.in_features()];
                let exp_b = [lin.out_features(), lc.rank];
                if a.dims() != exp_a || b.dims() != exp_b {
                    return Err(Error::Adapter {
                        path: path.to_path_buf(),
                        msg: format!(
                            "`{}`: lora_A {:?} / lora_B {:?}, expected {exp_a:?} / {exp_b:?}",
                            lin.name,
                            a.dims(),
                            b.dims()
                        ),
                    });
                }
                let ad = LoraAdapter::init(
                    lin.in_features(),
                    lin.out_features(),
                    &lc,
                    &mut rng,
                    &device,
                )?;
                ad.a.set(&a.to_device(&device)?)?;
                ad.b.set(&b.to_device(&device)?)?;
                lin.lora = Some(ad);
                used += 1;
            }
        }
        if used != adapter.weights.len() {
            let names: Vec<String> = self.linears().iter().map(|l| l.name.clone()).collect();
            let missing: Vec<&String> = adapter
                .weights
                .keys()
                .filter(|k| !names.contains(k))
                .collect();
            return Err(Error::Adapter {
                path: path.to_path_buf(),
                msg: format!("modules not in the base model: {missing:?}"),
            });
        }
        self.mode = TrainMode::Lora(lc);
        Ok(())
    }

    /// Every RMSNorm: the final one, then per block.
    fn norms(&self) -> Vec<&Norm> {
        let mut norms: Vec<&Norm> = vec![&self.norm];
        for b in &self.blocks {
            norms.extend([&b.input_layernorm, &b.pre_mlp_norm]);
            let optional = [
                &b.q_norm,
                &b.k_norm,
                &b.post_attention_norm,
                &b.post_mlp_norm,
            ];
            norms.extend(optional.into_iter().flatten());
        }
        norms
    }

    pub fn mode(&self) -> &TrainMode {
        &self.mode
    }

    /// Trainable variables with their names (PEFT keys for adapters, HF names otherwise).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((crate::lora::peft_key(&lin.name, "lora_A"), l.a.clone()));
                out.push((crate::lora::peft_key(&lin.name, "lora_B"), l.b.clone()));
            }
            if let Some(w) = &lin.weight_var {
                out.push((format!("{}.weight", lin.name), w.clone()));
            }
        }
        if let Some(v) = &self.embed_var {
            out.push(("model.embed_tokens.weight".into(), v.clone()));
        }
        for n in self.norms() {
            if let Some(v) = &n.var {
                out.push((format!("{}.weight", n.name), v.clone()));
            }
        }
        out
    }

    /// The frozen linear projections' parameter count and the bytes they hold (dense f32 or
    /// quantized), LM head excluded.
    pub fn base_linear_footprint(&self) -> (usize, usize) {
        let mut params = 0;
        let mut bytes = 0;
        let n_block_linears = 7 * self.blocks.len();
        for lin in self.linears().into_iter().take(n_block_linears) {
            let (o, i) = lin.base.dims();
            params += o * i;
            bytes += match &lin.base {
                BaseWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
                BaseWeight::Quant(q) => q.storage_bytes(),
            };
        }
        (params, bytes)
    }

    /// How many frozen projections are held in each format (`f32`, `nf4`, `q4k`, ...).
    pub fn base_linear_formats(&self) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for lin in self.linears() {
            let kind = match &lin.base {
                BaseWeight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
                BaseWeight::Quant(q) => q.kind(),
            };
            *out.entry(kind).or_insert(0) += 1;
        }
        out
    }

    /// The adapters with their module paths.
    pub fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        self.linears()
            .into_iter()
            .filter_map(|l| l.lora.as_ref().map(|a| (l.name.clone(), a)))
            .collect()
    }

    /// Folds each adapter into its base weight and removes it.
    pub fn merge_adapters(&mut self) -> Result<usize> {
        let device = self.device.clone();
        let mut n = 0;
        for lin in self.linears_mut() {
            if lin.lora.is_some() {
                lin.base = BaseWeight::Dense(lin.merged_weight(&device)?);
                lin.lora = None;
                n += 1;
            }
        }
        self.mode = TrainMode::Frozen;
        Ok(n)
    }

    /// The weights under HF names and conventions (Gemma norms as `w`, not `1 + w`), adapters
    /// merged when `merge` is set, for export.
    pub fn hf_weights(&self, merge: bool) -> Result<Weights> {
        let gemma = self.config.is_gemma();
        let mut w = Weights::new();
        let embed = self
            .embed_var
            .as_ref()
            .map_or(self.embed_tokens.clone(), |v| v.as_tensor().clone());
        w.insert("model.embed_tokens.weight".into(), embed);
        for lin in self.linears() {
            let t = if merge {
                lin.merged_weight(&self.device)?
            } else {
                lin.current_weight(&self.device)?
            };
            w.insert(format!("{}.weight", lin.name), t);
            if let Some(b) = &lin.bias {
                w.insert(format!("{}.bias", lin.name), b.clone());
            }
        }
        for n in self.norms() {
            let t = n
                .var
                .as_ref()
                .map_or(n.weight.clone(), |v| v.as_tensor().clone());
            w.insert(
                format!("{}.weight", n.name),
                if gemma { (t - 1.0)? } else { t },
            );
        }
        Ok(w)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let table = self
            .embed_var
            .as_ref()
            .map_or(&self.embed_tokens, |v| v.as_tensor());
        let x =
            table
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, self.config.hidden_size))?;
        Ok(match self.config.embedding_scale() {
            Some(s) => (x * s)?,
            None => x,
        })
    }

    /// cos/sin tables `[t, head_dim/2]` for positions `start..start+t` at RoPE base `base`,
    /// with the config's frequency scaling when `scaled`.
    fn rope_tables(
        &self,
        base: f64,
        scaled: bool,
        start: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor)> {
        let d = self.config.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(s) = self.config.rope_scaling.as_ref().filter(|_| scaled) {
            if s.rope_type == "linear" {
                inv_freq.iter_mut().for_each(|f| *f /= s.factor);
            } else {
                // Llama 3: long wavelengths divided by `factor`, short ones kept, a smooth
                // interpolation between.
                let low = s.low_freq_factor.unwrap_or(1.0);
                let high = s.high_freq_factor.unwrap_or(4.0);
                let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (low_wl, high_wl) = (old / low, old / high);
                for f in inv_freq.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > low_wl {
                        *f /= s.factor;
                    } else if wl >= high_wl {
                        let smooth = (old / wl - low) / (high - low);
                        *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                    }
                }
            }
        }
        let angles: Vec<f32> = (start..start + t)
            .flat_map(|p| inv_freq.iter().map(move |f| (p as f64 * f) as f32))
            .collect();
        let angles = Tensor::from_vec(angles, (t, d / 2), &self.device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// Hidden states after the final norm, `[b, t, hidden]`. With a cache, `ids` are the new
    /// positions and the cache is extended.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + t > c.max_position_embeddings {
            return Err(Error::config(
                "max_seq_len",
                format!(
                    "sequence of {} tokens exceeds the model's context of {}",
                    past + t,
                    c.max_position_embeddings
                ),
            ));
        }
        if let Some(cache) = cache.as_deref_mut() {
            if cache.layers.is_empty() {
                cache.layers = vec![None; self.blocks.len()];
            }
        }
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        // rope tables and masks, shared by layers of the same kind
        // keyed by (base, scaled): Gemma 3 scales only its global layers' frequencies
        let mut tables: Vec<((f64, bool), Tensor, Tensor)> = Vec::new();
        let mut x = self.embed(ids)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let key = (blk.rope_base, !(c.is_gemma() && blk.sliding));
            if !tables.iter().any(|(k, _, _)| *k == key) {
                let (cos, sin) = self.rope_tables(key.0, key.1, past, t)?;
                tables.push((key, cos, sin));
            }
            let (_, cos, sin) = tables.iter().find(|(k, _, _)| *k == key).unwrap();

            // attention: [b, t, h] -> q [b, t, nh·hd], k/v [b, t, nkv·hd]
            let residual = &x;
            let h = blk.input_layernorm.forward(&x)?;
            let q = blk.q_proj.forward(&h, ctx)?;
            let k = blk.k_proj.forward(&h, ctx)?;
            let v = blk.v_proj.forward(&h, ctx)?;
            let (q, k) = match (&blk.q_norm, &blk.k_norm) {
                // per-head norms: [b, t, heads, hd]
                (Some(qn), Some(kn)) => (
                    qn.forward(&q.reshape((b, t, nh, hd))?)?,
                    kn.forward(&k.reshape((b, t, nkv, hd))?)?,
                ),
                _ => (q, k),
            };
            let window = if blk.sliding { c.sliding_window } else { None };
            // [b, h, t, hd], rotated
            let heads = |x: &Tensor, n: usize| x.reshape((b, t, n, hd))?.transpose(1, 2);
            let rotated = |x: &Tensor, n: usize| ops::rope(&heads(x, n)?, cos, sin);
            if let Some(cache) = cache.as_deref_mut() {
                // the cache keeps rotated keys and values as [b, nkv, positions, hd]
                let (mut ck, mut cv) = (rotated(&k, nkv)?, heads(&v, nkv)?.contiguous()?);
                if let Some((pk, pv)) = &cache.layers[l] {
                    ck = Tensor::cat(&[pk, &ck], 2)?;
                    cv = Tensor::cat(&[pv, &cv], 2)?;
                }
                cache.layers[l] = Some((ck, cv));
            }
            let attn = if past == 0 && c.attn_logit_softcapping.is_none() {
                // one op from the projections to [b, t, nh·hd]
                let rope = attention::Rotary { cos, sin };
                attention::causal_attention(
                    &q,
                    &k,
                    &v,
                    nh,
                    nkv,
                    Some(rope),
                    c.attention_scale(),
                    window,
                )?
            } else {
                let q = rotated(&q, nh)?;
                let (k, v) = match cache.as_deref() {
                    Some(cache) => cache.layers[l].clone().expect("stored above"),
                    None => (rotated(&k, nkv)?, heads(&v, nkv)?),
                };
                debug_assert_eq!(past + t, k.dims()[2]);
                let scale = c.attention_scale();
                let softcap = c.attn_logit_softcapping;
                attention::attend_heads(&q, &k, &v, past, scale, softcap, window)?
            };
            let mut a = blk.o_proj.forward(&attn, ctx)?;
            if let Some(n) = &blk.post_attention_norm {
                a = n.forward(&a)?;
            }
            x = (residual + a)?;

            // MLP: act(gate) * up -> down
            let h = blk.pre_mlp_norm.forward(&x)?;
            let gate = blk.gate_proj.forward(&h, ctx)?;
            let up = blk.up_proj.forward(&h, ctx)?;
            let mut m = blk
                .down_proj
                .forward(&ops::gated_act(&gate, &up, c.hidden_act)?, ctx)?;
            if let Some(n) = &blk.post_mlp_norm {
                m = n.forward(&m)?;
            }
            x = (x + m)?;
        }
        self.norm.forward(&x)
    }

    /// The LM head weight `[vocab, hidden]`.
    fn head_weight(&self) -> Tensor {
        match &self.lm_head {
            Some(l) => l
                .current_weight(&self.device)
                .expect("the lm head is never quantized"),
            None => self
                .embed_var
                .as_ref()
                .map_or(self.embed_tokens.clone(), |v| v.as_tensor().clone()),
        }
    }

    /// Logits `[b, t, vocab]` (for scoring and generation; training uses [`Decoder::loss`]).
    pub fn forward_logits(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache, &mut Ctx { dropout_rng: None })?;
        self.logits_from_hidden(&h)
    }

    /// Masked mean next-token cross-entropy of a batch. `ids`, `targets`: `[b, t]`;
    /// `mask`: per position, the loss weight (0 for prompt and padding).
    pub fn loss(
        &self,
        ids: &Tensor,
        targets: &[u32],
        mask: &[f32],
        rng: Option<&mut StdRng>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.forward_hidden(ids, None, &mut Ctx { dropout_rng: rng })?;
        let h = h.reshape((b * t, self.config.hidden_size))?;
        if self.lm_head.as_ref().is_some_and(|l| l.lora.is_some()) {
            // an adapter on the LM head: full logits through candle ops
            let logits = self.logits_from_hidden(&h)?;
            return Ok(masked_cross_entropy(&logits, targets, mask)?);
        }
        let weight_grad = self.mode == TrainMode::Full;
        Ok(ops::lm_head_loss(
            &h,
            &self.head_weight(),
            targets.to_vec(),
            mask.to_vec(),
            weight_grad,
            self.config.final_logit_softcapping,
        )?)
    }

    /// Logits from final hidden states `[.., hidden]`: LM head, its adapter, soft-capping.
    fn logits_from_hidden(&self, h: &Tensor) -> Result<Tensor> {
        let mut logits = h.broadcast_matmul(&self.head_weight().t()?)?;
        if let Some(lora) = self.lm_head.as_ref().and_then(|l| l.lora.as_ref()) {
            logits = (logits + lora.forward(h, None)?)?;
        }
        if let Some(cap) = self.config.final_logit_softcapping {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }
}

/// Random weights for a config, HF names: matrices uniform with standard deviation 0.02
/// (cheap to draw for a 262k vocabulary), norms near their identity, for tests and benchmarks.
pub fn random_weights(c: &ModelConfig, seed: u64, device: &Device) -> Result<Weights> {
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = Weights::new();
    let mat =
        |name: String, shape: (usize, usize), w: &mut Weights, rng: &mut StdRng| -> Result<()> {
            let n = shape.0 * shape.1;
            let v: Vec<f32> = (0..n).map(|_| uniform_std(rng, 0.02)).collect();
            w.insert(name, Tensor::from_vec(v, shape, device)?);
            Ok(())
        };
    let gemma = c.is_gemma();
    let norm = |name: String, dim: usize, w: &mut Weights, rng: &mut StdRng| -> Result<()> {
        // HF convention: Gemma stores w (applied as 1 + w), others store the factor.
        let v: Vec<f32> = (0..dim)
            .map(|_| (if gemma { 0.0 } else { 1.0 }) + rng.random_range(-0.1..0.1f32))
            .collect();
        w.insert(name, Tensor::from_vec(v, dim, device)?);
        Ok(())
    };
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    mat(
        "model.embed_tokens.weight".into(),
        (c.vocab_size, h),
        &mut w,
        &mut rng,
    )?;
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        norm(format!("{p}.input_layernorm.weight"), h, &mut w, &mut rng)?;
        mat(
            format!("{p}.self_attn.q_proj.weight"),
            (q, h),
            &mut w,
            &mut rng,
        )?;
        mat(
            format!("{p}.self_attn.k_proj.weight"),
            (kv, h),
            &mut w,
            &mut rng,
        )?;
        mat(
            format!("{p}.self_attn.v_proj.weight"),
            (kv, h),
            &mut w,
            &mut rng,
        )?;
        mat(
            format!("{p}.self_attn.o_proj.weight"),
            (h, q),
            &mut w,
            &mut rng,
        )?;
        if c.qkv_bias {
            for (n, d) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                let v: Vec<f32> = (0..d).map(|_| uniform_std(&mut rng, 0.02)).collect();
                w.insert(
                    format!("{p}.self_attn.{n}.bias"),
                    Tensor::from_vec(v, d, device)?,
                );
            }
        }
        mat(
            format!("{p}.mlp.gate_proj.weight"),
            (i, h),
            &mut w,
            &mut rng,
        )?;
        mat(format!("{p}.mlp.up_proj.weight"), (i, h), &mut w, &mut rng)?;
        mat(
            format!("{p}.mlp.down_proj.weight"),
            (h, i),
            &mut w,
            &mut rng,
        )?;
        norm(
            format!("{p}.post_attention_layernorm.weight"),
            h,
            &mut w,
            &mut rng,
        )?;
        if gemma {
            norm(
                format!("{p}.self_attn.q_norm.weight"),
                c.head_dim,
                &mut w,
                &mut rng,
            )?;
            norm(
                format!("{p}.self_attn.k_norm.weight"),
                c.head_dim,
                &mut w,
                &mut rng,
            )?;
            norm(
                format!("{p}.pre_feedforward_layernorm.weight"),
                h,
                &mut w,
                &mut rng,
            )?;
            norm(
                format!("{p}.post_feedforward_layernorm.weight"),
                h,
                &mut w,
                &mut rng,
            )?;
        }
    }
    norm("model.norm.weight".into(), h, &mut w, &mut rng)?;
    if !c.tie_word_embeddings {
        mat("lm_head.weight".into(), (c.vocab_size, h), &mut w, &mut rng)?;
    }
    Ok(w)
}

/// A sample of the uniform distribution with mean 0 and standard deviation `std`.
fn uniform_std(rng: &mut impl rand::Rng, std: f32) -> f32 {
    let a = std * 3f32.sqrt();
    rng.random_range(-a..a)
}
