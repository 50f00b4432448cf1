//! Loading a base model: an HF folder or hub id (config.json, safetensors, tokenizer.json) or
//! a GGUF file (metadata to config, weights dequantized to f32, the embedded tokenizer).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Weights;
use crate::tokenizer::Tokenizer;

/// A base model ready to build a [`crate::Decoder`] from.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// HF-named weights in HF conventions.
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// What was loaded, for records: a path or a hub id.
    pub source: String,
    /// Where the files are on disk.
    pub path: PathBuf,
}

/// Loads `spec`: a `.gguf` file, an HF folder, or a hub id (`org/name`, through hf-hub's cache;
/// with `HF_HUB_OFFLINE=1` only the cache is read).
pub fn load(spec: &str, device: &Device) -> Result<LoadedModel> {
    let path = Path::new(spec);
    if path.extension().is_some_and(|e| e == "gguf") {
        if !path.is_file() {
            return Err(Error::model(path, "no such gguf file"));
        }
        return load_gguf(path, device);
    }
    if path.is_dir() {
        return load_hf_dir(path, spec, device);
    }
    if path.exists() {
        return Err(Error::model(
            path,
            "expected a .gguf file, an HF model folder or a hub id",
        ));
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        let dir = fetch_hub(spec)?;
        return load_hf_dir(&dir, spec, device);
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
    for f in &files {
        let ts = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| Error::model(f, format!("cannot read safetensors: {}", candle_msg(&e))))?;
        for (k, t) in ts {
            let Some(k) = text_model_name(k) else {
                continue;
            };
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

/// Opens a GGUF file and reads its metadata into a config.
fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content, ModelConfig)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
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
    let (mut f, content, config) = open_gguf(path)?;
    let gemma = config.is_gemma();
    let permuted = matches!(config.family, crate::Family::Llama | crate::Family::Mistral);
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name, gemma) else {
            continue;
        };
        let qt = content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| Error::model(path, format!("tensor `{name}`: {}", candle_msg(&e))))?;
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
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_hf_json()).expect("json");
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
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&ts, &tmp)?;
    let dst = dir.join("model.safetensors");
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    tokenizer.save_hf(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
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
