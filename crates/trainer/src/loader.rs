//! Loading a base model: an HF folder or hub id (config.json, safetensors, tokenizer.json) or
//! a GGUF file (metadata to config, weights dequantized to f32, the embedded tokenizer).
//! With [`Quantization::Keep`] a GGUF file's quantized projections and a bitsandbytes NF4
//! checkpoint's weights stay quantized; with [`Quantization::Nf4`] dense projections are
//! quantized to NF4 at load, with [`Quantization::Bf16`] rounded to bf16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{QuantWeights, Weights};
use crate::quant::nf4::Nf4Weight;
use crate::quant::{is_quantizable, QuantWeight, Quantization};
use crate::tokenizer::Tokenizer;

/// A base model ready to build a [`crate::Decoder`] from.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// HF-named weights in HF conventions.
    pub weights: Weights,
    /// Linear weights held quantized (empty unless a quantization was asked for).
    pub quantized: QuantWeights,
    pub tokenizer: Tokenizer,
    /// What was loaded, for records: a path or a hub id.
    pub source: String,
    /// Where the files are on disk.
    pub path: PathBuf,
}

/// Loads `spec`: a `.gguf` file, an HF folder, or a hub id (`org/name`, through hf-hub's cache;
/// with `HF_HUB_OFFLINE=1` only the cache is read).
pub fn load(spec: &str, device: &Device) -> Result<LoadedModel> {
    load_with(spec, device, Quantization::None)
}

/// As [`load`], holding the linear projections as `quant` asks.
pub fn load_with(spec: &str, device: &Device, quant: Quantization) -> Result<LoadedModel> {
    let mut m = load_as_stored(spec, device, quant)?;
    match quant {
        Quantization::None => {}
        Quantization::Nf4 => quantize_nf4(&mut m)?,
        Quantization::Keep if m.quantized.is_empty() => {
            return Err(Error::config(
                "model.quantization",
                format!(
                    "\"keep\": {} holds no quantized linear weights (expected a gguf file with quantized tensors or a bitsandbytes nf4 checkpoint; use \"nf4\" to quantize at load)",
                    m.path.display()
                ),
            ))
        }
        Quantization::Keep => {}
        Quantization::Bf16 => {
            let q = crate::quant::weight::bf16_projections(&mut m.weights)
                .map_err(|e| Error::config("model.quantization", e.to_string()))?;
            m.quantized.extend(q);
        }
    }
    Ok(m)
}

/// Quantizes every dense projection of `m` to NF4 with double quantization.
fn quantize_nf4(m: &mut LoadedModel) -> Result<()> {
    let q = crate::quant::weight::nf4_projections(&mut m.weights)
        .map_err(|e| Error::config("model.quantization", e.to_string()))?;
    m.quantized.extend(q);
    Ok(())
}

fn load_as_stored(spec: &str, device: &Device, quant: Quantization) -> Result<LoadedModel> {
    let keep = quant == Quantization::Keep;
    let path = Path::new(spec);
    if path.extension().is_some_and(|e| e == "gguf") {
        if !path.is_file() {
            return Err(Error::model(path, "no such gguf file"));
        }
        return load_gguf_with(path, device, keep);
    }
    if path.is_dir() {
        return load_hf_dir_with(path, spec, device, keep);
    }
    if path.exists() {
        return Err(Error::model(
            path,
            "expected a .gguf file, an HF model folder or a hub id",
        ));
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        let dir = fetch_hub(spec)?;
        return load_hf_dir_with(&dir, spec, device, keep);
    }
    Err(Error::model(
        path,
        "not found: expected a .gguf file, an HF model folder or a hub id like org/name",
    ))
}

/// Reads just the config of `spec` (no weights).
pub fn load_config(spec: &str) -> Result<ModelConfig> {
    let path = Path::new(spec);
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok(open_gguf(path)?.2);
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        fetch_hub(spec)?
    };
    ModelConfig::from_hf_file(&dir.join("config.json"))
}

const HUB_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Resolves a hub id to a local snapshot folder through hf-hub's cache, downloading what is
/// missing unless `HF_HUB_OFFLINE` is set.
pub fn fetch_hub(id: &str) -> Result<PathBuf> {
    let offline = hub_offline(std::env::var("HF_HUB_OFFLINE").ok().as_deref());
    let cache = hf_hub::Cache::from_env();
    let repo = hf_hub::Repo::model(id.to_string());
    let hub_err = |msg: String| Error::model(id, msg);
    let get = |file: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cache.repo(repo.clone()).get(file) {
            return Ok(Some(p));
        }
        if offline {
            return Ok(None);
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| hub_err(format!("hub client: {e}")))?;
        match api.repo(repo.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(_) if file != "config.json" => Ok(None),
            Err(e) => Err(hub_err(format!("cannot download {file}: {e}"))),
        }
    };
    let config = get("config.json")?.ok_or_else(|| {
        hub_err(format!(
            "config.json is not in the hub cache ({}) and HF_HUB_OFFLINE is set",
            cache.path().display()
        ))
    })?;
    for f in HUB_FILES {
        get(f)?;
    }
    // weights: one file or a sharded index
    if get("model.safetensors")?.is_none() {
        let index = get("model.safetensors.index.json")?.ok_or_else(|| {
            hub_err("neither model.safetensors nor model.safetensors.index.json found".into())
        })?;
        for shard in shard_files(&index)? {
            get(&shard)?.ok_or_else(|| hub_err(format!("shard {shard} not found")))?;
        }
    }
    Ok(config.parent().expect("snapshot folder").to_path_buf())
}

/// Whether `HF_HUB_OFFLINE` asks for offline mode; the values huggingface_hub treats as true
/// (1, ON, YES, TRUE in any case), so that `HF_HUB_OFFLINE=false` does not mean offline.
fn hub_offline(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(index, format!("invalid json: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::model(index, "missing object `weight_map`"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Loads an HF folder: config.json, model.safetensors (or a sharded index), tokenizer.json.
pub fn load_hf_dir(dir: &Path, source: &str, device: &Device) -> Result<LoadedModel> {
    load_hf_dir_with(dir, source, device, false)
}

/// Suffix of the tensor that marks a bitsandbytes 4-bit weight and holds its quant state.
const BNB_NF4_STATE: &str = ".quant_state.bitsandbytes__nf4";

/// As [`load_hf_dir`]; bitsandbytes NF4 weights stay quantized when `keep` is set and are
/// dequantized to f32 otherwise.
fn load_hf_dir_with(dir: &Path, source: &str, device: &Device, keep: bool) -> Result<LoadedModel> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else {
        let index = dir.join("model.safetensors.index.json");
        if !index.is_file() {
            return Err(Error::model(
                dir,
                "neither model.safetensors nor model.safetensors.index.json found",
            ));
        }
        shard_files(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    };
    let mut weights = Weights::new();
    let mut quantized = QuantWeights::new();
    for f in &files {
        let mut ts: HashMap<String, Tensor> = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| Error::model(f, format!("cannot read safetensors: {}", candle_msg(&e))))?
            .into_iter()
            .filter_map(|(k, t)| text_model_name(k).map(|k| (k, t)))
            .collect();
        // another bitsandbytes 4-bit type (fp4) is named, not taken for a missing state
        if let Some(k) = ts
            .keys()
            .filter(|k| k.contains(".quant_state.bitsandbytes__") && !k.ends_with(BNB_NF4_STATE))
            .min()
        {
            let (w, ty) = k
                .split_once(".quant_state.bitsandbytes__")
                .expect("filtered");
            return Err(Error::model(
                f,
                format!("tensor `{w}` is bitsandbytes {ty}: quant_type expected \"nf4\", found \"{ty}\""),
            ));
        }
        // bitsandbytes 4-bit weights: `<w>` packed codes plus `<w>.absmax`, `<w>.quant_map`, ...
        let mut bnb: Vec<String> = ts
            .keys()
            .filter_map(|k| k.strip_suffix(BNB_NF4_STATE).map(str::to_string))
            .collect();
        bnb.sort();
        for w in bnb {
            let q = Nf4Weight::from_bnb_tensors(&w, &|k: &str| ts.get(k).cloned())
                .map_err(|e| Error::model(f, e.to_string()))?;
            ts.retain(|k, _| !(k == &w || k.starts_with(&format!("{w}."))));
            if keep {
                quantized.insert(w, QuantWeight::Nf4(std::sync::Arc::new(q)));
            } else {
                let t = Tensor::from_vec(q.dequantize(), (q.out_features, q.in_features), device)?;
                weights.insert(w, t);
            }
        }
        for (k, t) in ts {
            if t.dtype() == DType::U8 && k.ends_with(".weight") {
                return Err(Error::model(
                    f,
                    format!(
                        "tensor `{k}` is u8 without a quant state (expected `{k}{BNB_NF4_STATE}`)"
                    ),
                ));
            }
            weights.insert(k, t.to_dtype(DType::F32)?.to_device(device)?);
        }
    }
    if config.tie_word_embeddings {
        weights.remove("lm_head.weight");
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    Ok(LoadedModel {
        config,
        weights,
        quantized,
        tokenizer,
        source: source.to_string(),
        path: dir.to_path_buf(),
    })
}

/// The HF name of a checkpoint tensor as the text decoder names it, or None for the vision
/// tower of a multimodal checkpoint. Gemma 3 multimodal checkpoints nest the text model:
/// `language_model.model.layers.0...` (transformers before 4.52) or
/// `model.language_model.layers.0...` (4.52 and later).
fn text_model_name(k: String) -> Option<String> {
    const VISION: [&str; 4] = [
        "vision_tower.",
        "multi_modal_projector.",
        "model.vision_tower.",
        "model.multi_modal_projector.",
    ];
    if VISION.iter().any(|p| k.starts_with(p)) {
        return None;
    }
    if let Some(rest) = k.strip_prefix("model.language_model.") {
        return Some(format!("model.{rest}"));
    }
    Some(
        k.strip_prefix("language_model.")
            .map(String::from)
            .unwrap_or(k),
    )
}

fn md_u32(c: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::model(path, format!("missing metadata key `{key}`")))?
        .to_u32()
        .map(|v| v as usize)
        .map_err(|e| Error::model(path, format!("metadata key `{key}`: {}", candle_msg(&e))))
}

fn md_f64(c: &gguf_file::Content, key: &str) -> Option<f64> {
    match c.metadata.get(key)? {
        // llama.cpp stores the HF config's decimal values as f32: read back the shortest decimal
        // that rounds to that f32 (1e-6, not 9.99999997e-7), so a GGUF file and its HF
        // checkpoint give the same config and the same logits
        gguf_file::Value::F32(f) => f.to_string().parse().ok(),
        gguf_file::Value::F64(f) => Some(*f),
        _ => None,
    }
}

/// A candle error as one line: without the backtrace candle attaches when `RUST_BACKTRACE`
/// is set.
fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_msg(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_msg(inner))
        }
        e => e.to_string(),
    }
}

/// Builds the config from a GGUF file's metadata.
pub fn gguf_config(c: &gguf_file::Content, path: &Path) -> Result<ModelConfig> {
    let arch = c
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| Error::model(path, "missing metadata key `general.architecture`"))?;
    let model_type = match arch.as_str() {
        "gemma3" => "gemma3_text",
        "llama" => "llama",
        "mistral" => "mistral",
        "qwen2" => "qwen2",
        other => {
            return Err(Error::model(
                path,
                format!("unknown architecture `general.architecture = \"{other}\"` (expected gemma3, llama, mistral or qwen2)"),
            ))
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = md_u32(c, &k("embedding_length"), path)?;
    let heads = md_u32(c, &k("attention.head_count"), path)?;
    let head_dim = md_u32(c, &k("attention.key_length"), path).unwrap_or(hidden / heads);
    let vocab = match c.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => return Err(Error::model(path, "missing tensor `token_embd.weight`")),
    };
    let token_id = |key: &str| c.metadata.get(key).and_then(|v| v.to_u32().ok());
    let mut v = json!({
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": md_u32(c, &k("feed_forward_length"), path)?,
        "num_hidden_layers": md_u32(c, &k("block_count"), path)?,
        "num_attention_heads": heads,
        "num_key_value_heads": md_u32(c, &k("attention.head_count_kv"), path).unwrap_or(heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": md_f64(c, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "max_position_embeddings": md_u32(c, &k("context_length"), path).unwrap_or(4096),
        "tie_word_embeddings": !c.tensor_infos.contains_key("output.weight"),
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
    });
    if let Some(theta) = md_f64(c, &k("rope.freq_base")) {
        v["rope_theta"] = json!(theta);
    }
    match c
        .metadata
        .get(&k("rope.scaling.type"))
        .and_then(|t| t.to_string().ok())
        .map(String::as_str)
    {
        None | Some("none") => {}
        Some("linear") => {
            let factor = md_f64(c, &k("rope.scaling.factor")).ok_or_else(|| {
                Error::model(
                    path,
                    format!("missing metadata key `{}`", k("rope.scaling.factor")),
                )
            })?;
            v["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
        Some(other) => {
            return Err(Error::model(
                path,
                format!(
                    "unsupported `{} = \"{other}\"` (expected none or linear)",
                    k("rope.scaling.type")
                ),
            ))
        }
    }
    if let Ok(w) = md_u32(c, &k("attention.sliding_window"), path) {
        v["sliding_window"] = json!(w);
        if arch == "qwen2" {
            v["use_sliding_window"] = json!(true);
        }
    }
    if arch == "gemma3" {
        // Gemma 3 GGUF files do not store these; the values are those of every released
        // Gemma 3 text model up to 12B (the 27B model scales queries by 168).
        v["query_pre_attn_scalar"] = json!(head_dim);
        v["rope_local_base_freq"] = json!(10_000.0);
        v["sliding_window_pattern"] = json!(6);
    }
    if arch == "qwen2" {
        v["attention_bias"] = json!(c.tensor_infos.contains_key("blk.0.attn_q.bias"));
    }
    ModelConfig::from_hf_value(&v).map_err(|m| Error::model(path, m))
}

/// Llama 3.1+ GGUF files carry their RoPE scaling as a tensor, `rope_freqs.weight`: one divisor
/// per frequency, computed by llama.cpp's converter from the HF `rope_scaling` (type llama3).
/// This recovers that `rope_scaling`, assuming the parameters of every released Llama 3.x
/// model (low_freq_factor 1, high_freq_factor 4, original context 8192) and solving for
/// `factor`; divisors that do not fit those parameters are an error rather than a model with
/// silently different positions.
fn llama3_rope_from_gguf<R: std::io::Read + std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    path: &Path,
    config: &mut ModelConfig,
) -> Result<()> {
    const NAME: &str = "rope_freqs.weight";
    if !content.tensor_infos.contains_key(NAME) {
        return Ok(());
    }
    let err = |msg: String| Error::model(path, format!("tensor `{NAME}`: {msg}"));
    let divisors: Vec<f32> = content
        .tensor(reader, NAME, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1())
        .map_err(|e| err(candle_msg(&e)))?;
    let d = config.head_dim;
    if divisors.len() != d / 2 {
        return Err(err(format!(
            "{} values, expected head_dim / 2 = {}",
            divisors.len(),
            d / 2
        )));
    }
    let (low, high, old) = (1.0f64, 4.0f64, 8192.0f64);
    let (low_wl, high_wl) = (old / low, old / high);
    let wavelength =
        |i: usize| 2.0 * std::f64::consts::PI * config.rope_theta.powf(2.0 * i as f64 / d as f64);
    let smooth = |wl: f64| (old / wl - low) / (high - low);
    // the factor: read off a long wavelength, else solved from the interpolated band
    let mut factor = None;
    for (i, &x) in divisors.iter().enumerate() {
        let wl = wavelength(i);
        if wl > low_wl {
            factor = Some(x.to_string().parse::<f64>().unwrap_or(x as f64));
            break;
        }
        if wl >= high_wl && factor.is_none() {
            let s = smooth(wl);
            factor = Some((1.0 - s) / (1.0 / x as f64 - s));
        }
    }
    let Some(factor) = factor else {
        // every wavelength is short: the scaling changes nothing
        if let Some((i, x)) = divisors
            .iter()
            .enumerate()
            .find(|(_, &x)| (x - 1.0).abs() > 1e-6)
        {
            return Err(err(format!(
                "divisor {x} at index {i}, expected 1 for a wavelength below {high_wl}"
            )));
        }
        return Ok(());
    };
    for (i, &x) in divisors.iter().enumerate() {
        let wl = wavelength(i);
        let expected = if wl < high_wl {
            1.0
        } else if wl > low_wl {
            factor
        } else {
            let s = smooth(wl);
            1.0 / ((1.0 - s) / factor + s)
        };
        if ((x as f64) - expected).abs() > 1e-4 * expected.abs().max(1.0) {
            return Err(err(format!(
                "divisor {x} at index {i} does not fit Llama 3 RoPE scaling (factor {factor}, low_freq_factor 1, \
                 high_freq_factor 4, original_max_position_embeddings 8192), which expects {expected}"
            )));
        }
    }
    config.rope_scaling = Some(crate::config::RopeScaling {
        rope_type: "llama3".into(),
        factor,
        low_freq_factor: Some(low),
        high_freq_factor: Some(high),
        original_max_position_embeddings: Some(old as usize),
    });
    Ok(())
}

/// The HF name of a GGUF tensor, or None for tensors the decoder does not use.
fn hf_name(gguf: &str, gemma: bool) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp stores Llama's q/k rows interleaved for its rotary layout; this restores HF's
/// half-split order. `w: [heads·head_dim, in]`.
fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let hd = out_f / heads;
    Ok(w.reshape((heads, hd / 2, 2, in_f))?
        .transpose(1, 2)?
        .reshape((out_f, in_f))?)
}

/// The source row of each output row of [`unpermute_qk`], for a weight of `out_f` rows.
fn unpermute_qk_rows(out_f: usize, heads: usize) -> Vec<usize> {
    let hd = out_f / heads;
    let half = hd / 2;
    let mut order = vec![0; out_f];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order[h * hd + j * half + i] = h * hd + 2 * i + j;
            }
        }
    }
    order
}

/// The ggml tensor types candle can read and dequantize.
const GGML_TYPES_READ: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// llama.cpp's name of ggml tensor type `ty`.
fn ggml_type_name(ty: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(ty as usize).copied().unwrap_or("unknown")
}

/// Scans a GGUF (v2/v3) header for the first tensor whose type candle cannot read, so the
/// error can name it (candle's own message names only the type number).
fn unsupported_gguf_tensor(path: &Path) -> Option<(String, u32)> {
    use std::io::Read;
    let mut r = std::io::BufReader::new(std::fs::File::open(path).ok()?);
    fn u32_(r: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_(r: &mut impl Read) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip(r: &mut impl Read, n: u64) -> Option<()> {
        let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()?;
        (copied == n).then_some(())
    }
    fn string(r: &mut impl Read) -> Option<String> {
        let n = u64_(r)?;
        if n > 1 << 20 {
            return None;
        }
        let mut b = vec![0u8; n as usize];
        r.read_exact(&mut b).ok()?;
        String::from_utf8(b).ok()
    }
    fn value(r: &mut impl Read, ty: u32, depth: u32) -> Option<()> {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return string(r).map(|_| ()),
            9 if depth == 0 => {
                let elem = u32_(r)?;
                let n = u64_(r)?;
                for _ in 0..n {
                    value(r, elem, depth + 1)?;
                }
                return Some(());
            }
            _ => return None,
        };
        skip(r, size)
    }
    if u32_(&mut r)? != 0x4655_4747 || !matches!(u32_(&mut r)?, 2 | 3) {
        return None;
    }
    let n_tensors = u64_(&mut r)?;
    let n_kv = u64_(&mut r)?;
    for _ in 0..n_kv {
        string(&mut r)?;
        let ty = u32_(&mut r)?;
        value(&mut r, ty, 0)?;
    }
    for _ in 0..n_tensors {
        let name = string(&mut r)?;
        let n_dims = u32_(&mut r)?;
        skip(&mut r, 8 * n_dims as u64)?;
        let ty = u32_(&mut r)?;
        u64_(&mut r)?;
        if !GGML_TYPES_READ.contains(&ty) {
            return Some((name, ty));
        }
    }
    None
}

/// Opens a GGUF file and reads its metadata into a config.
fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content, ModelConfig)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
        if let Some((tensor, ty)) = unsupported_gguf_tensor(path) {
            return Error::model(
                path,
                format!(
                    "tensor `{tensor}` has ggml type {} ({}), which has no dequantizer here (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k..q6_k)",
                    ty,
                    ggml_type_name(ty)
                ),
            );
        }
        Error::model(
            path,
            format!("not a readable gguf file: {}", candle_msg(&e)),
        )
    })?;
    let mut config = gguf_config(&content, path)?;
    llama3_rope_from_gguf(&content, &mut f, path, &mut config)?;
    Ok((f, content, config))
}

/// Loads a GGUF file: config from metadata, weights dequantized to f32 under HF names and
/// conventions, and the embedded tokenizer.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_gguf_with(path, device, false)
}

/// As [`load_gguf`]; with `keep`, the projections stored in a quantized block type stay
/// quantized (rows reordered as bytes where llama.cpp permuted them).
fn load_gguf_with(path: &Path, device: &Device, keep: bool) -> Result<LoadedModel> {
    let (mut f, content, config) = open_gguf(path)?;
    let gemma = config.is_gemma();
    let permuted = matches!(config.family, crate::Family::Llama | crate::Family::Mistral);
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut quantized = QuantWeights::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name, gemma) else {
            continue;
        };
        let qt = content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| Error::model(path, format!("tensor `{name}`: {}", candle_msg(&e))))?;
        let block_type = !matches!(
            qt.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        if keep && block_type && is_quantizable(&hf) {
            let heads = if !permuted {
                None
            } else if hf.ends_with("self_attn.q_proj.weight") {
                Some(config.num_attention_heads)
            } else if hf.ends_with("self_attn.k_proj.weight") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            let order = heads.map(|h| unpermute_qk_rows(qt.shape().dims()[0], h));
            let q = QuantWeight::from_gguf(&qt, order.as_deref())
                .map_err(|e| Error::model(path, format!("tensor `{name}`: {}", candle_msg(&e))))?;
            quantized.insert(hf, q);
            continue;
        }
        let mut t = qt
            .dequantize(&Device::Cpu)
            .map_err(|e| {
                Error::model(
                    path,
                    format!("tensor `{name}` ({:?}): {}", qt.dtype(), candle_msg(&e)),
                )
            })?
            .to_dtype(DType::F32)?;
        if gemma && hf.ends_with("norm.weight") {
            // llama.cpp's converter stores Gemma's norm factor 1 + w
            t = (t - 1.0)?;
        }
        if permuted && hf.ends_with("self_attn.q_proj.weight") {
            t = unpermute_qk(&t, config.num_attention_heads)?;
        } else if permuted && hf.ends_with("self_attn.k_proj.weight") {
            t = unpermute_qk(&t, config.num_key_value_heads)?;
        }
        weights.insert(hf, t.to_device(device)?);
    }
    let tokenizer = Tokenizer::from_gguf(&content, path)?;
    Ok(LoadedModel {
        config,
        weights,
        quantized,
        tokenizer,
        source: path.display().to_string(),
        path: path.to_path_buf(),
    })
}

/// Writes an HF folder: config.json, model.safetensors (f32) and the tokenizer files.
pub fn save_hf_dir(
    dir: &Path,
    config: &ModelConfig,
    weights: &Weights,
    tokenizer: &Tokenizer,
) -> Result<()> {
    save_hf_dir_nf4(dir, config, weights, &HashMap::new(), tokenizer)
}

/// As [`save_hf_dir`], with the weights in `nf4` written in bitsandbytes' 4-bit layout and a
/// `quantization_config` in config.json, as transformers saves a model loaded in 4 bits.
pub fn save_hf_dir_nf4(
    dir: &Path,
    config: &ModelConfig,
    weights: &Weights,
    nf4: &HashMap<String, std::sync::Arc<Nf4Weight>>,
    tokenizer: &Tokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let mut cfg = config.to_hf_json();
    if !nf4.is_empty() {
        let double = nf4
            .values()
            .any(|w| matches!(w.absmax, crate::quant::nf4::Absmax::Nested { .. }));
        cfg["quantization_config"] = json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": double,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"],
        });
    }
    let text = serde_json::to_string_pretty(&cfg).expect("json");
    ftbench_meter::write_atomic(&cfg_path, text.as_bytes()).map_err(|e| Error::io(&cfg_path, e))?;
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in weights {
        ts.insert(
            k.clone(),
            t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?,
        );
    }
    for (k, w) in nf4 {
        ts.remove(k);
        ts.extend(w.to_bnb_tensors(k));
    }
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&ts, &tmp)?;
    let dst = dir.join("model.safetensors");
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    tokenizer.save_hf(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn qk_row_order_matches_the_tensor_unpermute() {
        let (heads, hd, in_f) = (3, 8, 2);
        let out_f = heads * hd;
        let w = Tensor::arange(0f32, (out_f * in_f) as f32, &Device::Cpu)
            .unwrap()
            .reshape((out_f, in_f))
            .unwrap();
        let want = unpermute_qk(&w, heads).unwrap().to_vec2::<f32>().unwrap();
        let rows = w.to_vec2::<f32>().unwrap();
        let got: Vec<Vec<f32>> = unpermute_qk_rows(out_f, heads)
            .into_iter()
            .map(|r| rows[r].clone())
            .collect();
        assert_eq!(got, want);
    }

    use super::*;

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight", true).unwrap(),
            "model.layers.3.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight", false).unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias", false).unwrap(),
            "model.layers.0.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("token_embd.weight", true).unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight", false).is_none());
    }

    #[test]
    fn hub_offline_values() {
        for v in ["1", "true", "TRUE", "yes", "On"] {
            assert!(hub_offline(Some(v)), "{v}");
        }
        for v in ["0", "false", "no", "off", ""] {
            assert!(!hub_offline(Some(v)), "{v}");
        }
        assert!(!hub_offline(None));
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)
        let (heads, hd, inf) = (2, 4, 3);
        let w = Tensor::arange(0f32, (heads * hd * inf) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, inf))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, hd / 2, inf))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((heads * hd, inf))
            .unwrap();
        let back = unpermute_qk(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
