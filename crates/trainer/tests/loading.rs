//! The loading paths on tiny models the tests write themselves: HF folders (one file and
//! sharded), an offline hf-hub cache, GGUF files as llama.cpp lays them out (F32 and Q8_0
//! tensors), and bad input that must stop with one clear error.

#[path = "common/tiny.rs"]
mod tiny;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, D};
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::loader::{self, LoadedModel};
use ftbench_trainer::model::{Decoder, TrainMode, Weights};
use ftbench_trainer::quant::Quantization;
use serde_json::json;

const FAMILIES: [&str; 3] = ["gemma3", "llama", "qwen2"];

/// Ids of two sequences of 9 tokens: longer than the tiny Gemma sliding window of 4.
fn ids(vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..18u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
    Tensor::from_vec(v, (2, 9), &Device::Cpu).unwrap()
}

fn logits(config: &ModelConfig, weights: Weights) -> Tensor {
    let model = Decoder::new(config.clone(), weights, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
    model.forward_logits(&ids(config.vocab_size), None).unwrap()
}

fn loaded_logits(m: LoadedModel) -> Tensor {
    logits(&m.config, m.weights)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_same_logits(what: &str, a: &Tensor, b: &Tensor) {
    let d = max_diff(a, b);
    assert!(d == 0.0, "{what}: logits differ by up to {d}");
}

fn load(spec: &Path) -> LoadedModel {
    loader::load(spec.to_str().unwrap(), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", spec.display()))
}

fn load_err(spec: &str) -> String {
    match loader::load(spec, &Device::Cpu) {
        Ok(_) => panic!("{spec}: loaded, expected an error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
            eprintln!("error (expected): {msg}");
            msg
        }
    }
}

#[test]
fn hf_folder_round_trips_for_each_family() {
    let root = tiny::temp_dir("hf");
    for fam in FAMILIES {
        let dir = root.join(fam);
        let (c, w) = tiny::write_hf_folder(&dir, fam, 11);
        let expected = logits(&c, w.clone());
        let m = load(&dir);
        assert_eq!(m.config, c, "{fam}: config changed through config.json");
        assert_eq!(m.weights.len(), w.len(), "{fam}: tensor count");
        assert_eq!(m.tokenizer.bos_id(), Some(2), "{fam}");
        assert_eq!(m.tokenizer.eos_id(), Some(1), "{fam}");
        assert_eq!(m.tokenizer.pad_id(), Some(0), "{fam}");
        assert_eq!(
            m.tokenizer.encode("how many apples ?", true).unwrap(),
            vec![2, 12, 13, 14, 7],
            "{fam}"
        );
        assert_same_logits(fam, &expected, &loaded_logits(m));
    }
    // the untied head, the GQA and the biases really are in the files
    let names = |fam: &str| -> Vec<String> {
        candle_core::safetensors::load(root.join(fam).join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect()
    };
    assert!(names("llama").contains(&"lm_head.weight".to_string()));
    assert!(names("qwen2").contains(&"model.layers.1.self_attn.v_proj.bias".to_string()));
    assert!(!names("gemma3").contains(&"lm_head.weight".to_string()));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn gemma3_multimodal_checkpoint_loads_its_text_model() {
    let root = tiny::temp_dir("multimodal");
    let text = root.join("text");
    let (c, w) = tiny::write_hf_folder(&text, "gemma3", 14);
    let expected = logits(&c, w.clone());
    // both layouts transformers has written for Gemma3ForConditionalGeneration
    let layouts: [(&str, fn(&str) -> String); 2] = [
        ("old", |k| format!("language_model.{k}")),
        ("new", |k| k.replacen("model.", "model.language_model.", 1)),
    ];
    for (name, rename) in layouts {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(text.join(f), dir.join(f)).unwrap();
        }
        let config = json!({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": c.to_hf_json(), "vision_config": {"model_type": "siglip_vision_model"}});
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut ts: HashMap<String, Tensor> =
            w.iter().map(|(k, t)| (rename(k), t.clone())).collect();
        let vision = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let prefix = if name == "old" { "" } else { "model." };
        ts.insert(
            format!("{prefix}vision_tower.vision_model.embeddings.patch_embedding.weight"),
            vision.clone(),
        );
        ts.insert(
            format!("{prefix}multi_modal_projector.mm_input_projection_weight"),
            vision,
        );
        candle_core::safetensors::save(&ts, dir.join("model.safetensors")).unwrap();
        let m = load(&dir);
        assert_eq!(m.config, c, "{name}");
        assert_eq!(
            m.weights.len(),
            w.len(),
            "{name}: the vision tower is not loaded"
        );
        assert_same_logits(name, &expected, &loaded_logits(m));
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Copies the config and tokenizer files of the HF folder `src` into `dst` and writes `w`
/// there as two safetensors shards with an HF `model.safetensors.index.json`. Returns the
/// shard file names.
fn write_sharded(src: &Path, dst: &Path, w: &Weights) -> [&'static str; 2] {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut parts: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let mut total = 0;
    for (i, name) in names.into_iter().enumerate() {
        let shard = usize::from(i >= w.len() / 2);
        total += w[name].elem_count() * 4;
        parts[shard].insert(name.clone(), w[name].clone());
        weight_map.insert(name.clone(), json!(files[shard]));
    }
    for (part, file) in parts.iter().zip(files) {
        assert!(!part.is_empty());
        candle_core::safetensors::save(part, dst.join(file)).unwrap();
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
    files
}

#[test]
fn sharded_checkpoint_loads_like_one_file() {
    let root = tiny::temp_dir("sharded");
    let single = root.join("single");
    let (c, w) = tiny::write_hf_folder(&single, "llama", 12);
    let expected = logits(&c, w.clone());

    let sharded = root.join("sharded");
    let files = write_sharded(&single, &sharded, &w);
    let m = load(&sharded);
    assert_eq!(m.weights.len(), w.len());
    assert_same_logits("sharded", &expected, &loaded_logits(m));

    // a shard named in the index but absent is an error naming it
    std::fs::remove_file(sharded.join(files[1])).unwrap();
    let err = load_err(sharded.to_str().unwrap());
    assert!(err.contains(files[1]), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Everything that reads `HF_HOME` and `HF_HUB_OFFLINE` is in this one test: the
/// environment is process-wide.
#[test]
fn hub_id_loads_from_an_offline_cache() {
    let root = tiny::temp_dir("hub");
    let src = root.join("src");
    let (c, w) = tiny::write_hf_folder(&src, "qwen2", 13);
    let expected = logits(&c, w);

    let hf_home = root.join("hf-home");
    let repo = hf_home.join("hub").join("models--tiny-org--tiny-qwen");
    let revision = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), revision).unwrap();
    let snapshot = repo.join("snapshots").join(revision);
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), snapshot.join(f)).unwrap();
    }

    // a second repo with a sharded checkpoint
    let sharded_repo = hf_home
        .join("hub")
        .join("models--tiny-org--tiny-qwen-sharded");
    std::fs::create_dir_all(sharded_repo.join("refs")).unwrap();
    std::fs::write(sharded_repo.join("refs").join("main"), revision).unwrap();
    let sharded_w =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    write_sharded(
        &src,
        &sharded_repo.join("snapshots").join(revision),
        &sharded_w,
    );

    let saved: Vec<_> = ["HF_HOME", "HF_HUB_OFFLINE"]
        .iter()
        .map(|k| (*k, std::env::var_os(k)))
        .collect();
    std::env::set_var("HF_HOME", &hf_home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let m = loader::load("tiny-org/tiny-qwen", &Device::Cpu).unwrap();
        assert_eq!(m.source, "tiny-org/tiny-qwen");
        assert_eq!(m.path, snapshot);
        assert_eq!(m.config, c);
        assert_same_logits("hub", &expected, &loaded_logits(m));
        assert_eq!(loader::load_config("tiny-org/tiny-qwen").unwrap(), c);
        let m = loader::load("tiny-org/tiny-qwen-sharded", &Device::Cpu).unwrap();
        assert_same_logits("hub sharded", &expected, &loaded_logits(m));

        let err = load_err("tiny-org/missing-model");
        assert!(
            err.contains("tiny-org/missing-model"),
            "names the id: {err}"
        );
        assert!(
            err.contains(&hf_home.join("hub").display().to_string()),
            "names the cache: {err}"
        );
        assert!(
            err.contains("HF_HUB_OFFLINE"),
            "says why nothing was downloaded: {err}"
        );
    }));
    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

// ---------------------------------------------------------------------------------------
// GGUF

#[test]
fn gguf_reproduces_the_hf_model() {
    let root = tiny::temp_dir("gguf");
    for (fam, arch) in [("gemma3", "gemma3"), ("llama", "llama"), ("qwen2", "qwen2")] {
        let c = tiny::config(fam);
        let w = tiny::weights(&c, 21);
        let gguf = root.join(format!("{fam}.gguf"));
        let hf_weights = tiny::write_gguf(&gguf, arch, &c, &w);

        // the HF side: a folder holding the same numbers
        let dir = root.join(fam);
        let tok = tiny::write_tokenizer(&root.join(format!("{fam}-tok")));
        loader::save_hf_dir(&dir, &c, &hf_weights, &tok).unwrap();
        let hf = load(&dir);
        let expected = loaded_logits(hf);

        let m = loader::load_gguf(&gguf, &Device::Cpu).unwrap_or_else(|e| panic!("{fam}: {e}"));
        assert_eq!(m.config, c, "{fam}: config from GGUF metadata");
        assert_eq!(
            loader::load_config(gguf.to_str().unwrap()).unwrap(),
            c,
            "{fam}: load_config"
        );
        assert_eq!(m.weights.len(), w.len(), "{fam}: tensor count");
        assert_eq!(
            m.tokenizer.encode("ab ab", true).unwrap(),
            vec![2, 10, 10],
            "{fam}: embedded tokenizer"
        );
        assert_eq!(m.tokenizer.eos_id(), Some(1));
        let got = loaded_logits(m);
        assert_same_logits(&format!("{fam} gguf"), &expected, &got);

        // and through `load`, by extension
        let m = load(&gguf);
        assert_same_logits(
            &format!("{fam} gguf via load"),
            &expected,
            &loaded_logits(m),
        );

        // the Q8_0 rounding is a small perturbation: the model with the original f32 weights
        // is close (measured: up to about 4% of the largest logit of these tiny models)
        let d = max_diff(&expected, &logits(&c, w));
        let scale = expected
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{fam}: Q8_0 moves the logits by up to {d} (largest logit {scale})");
        assert!(
            d > 0.0 && d < 0.1 * scale,
            "{fam}: Q8_0 moved the logits by {d} (largest logit {scale})"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// `quantization = "keep"`: the GGUF file's Q8_0 projections stay quantized (q/k rows of
/// Llama reordered as bytes) and the model computes exactly what the dequantized load does.
#[test]
fn gguf_kept_quantized_matches_the_dequantized_load() {
    let root = tiny::temp_dir("gguf-keep");
    for (fam, arch) in [("gemma3", "gemma3"), ("llama", "llama"), ("qwen2", "qwen2")] {
        let c = tiny::config(fam);
        let w = tiny::weights(&c, 5);
        let gguf = root.join(format!("{fam}.gguf"));
        tiny::write_gguf(&gguf, arch, &c, &w);
        let spec = gguf.to_str().unwrap();
        let dense = load(&gguf);
        let kept = loader::load_with(spec, &Device::Cpu, Quantization::Keep)
            .unwrap_or_else(|e| panic!("{fam}: {e}"));
        let mut names: Vec<&String> = kept.quantized.keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.1.mlp.down_proj.weight"
            ],
            "{fam}: the quantized projections (the embedding stays dense)"
        );
        for (name, q) in &kept.quantized {
            assert_eq!(q.kind(), "q8_0", "{fam}: {name}");
            let d = max_diff(&q.dequantize(&Device::Cpu).unwrap(), &dense.weights[name]);
            assert_eq!(
                d, 0.0,
                "{fam}: {name} dequantizes to the dense load's values"
            );
        }
        assert_eq!(
            kept.weights.len() + kept.quantized.len(),
            dense.weights.len()
        );
        let expected = loaded_logits(dense);
        let model = Decoder::with_quantized(
            kept.config.clone(),
            kept.weights,
            kept.quantized,
            TrainMode::Frozen,
            0,
            &Device::Cpu,
        )
        .unwrap();
        let got = model.forward_logits(&ids(c.vocab_size), None).unwrap();
        assert_same_logits(&format!("{fam} kept quantized"), &expected, &got);
    }
    // nothing quantized to keep in an f32 HF folder
    let dir = root.join("hf");
    tiny::write_hf_folder(&dir, "llama", 1);
    let err = loader::load_with(dir.to_str().unwrap(), &Device::Cpu, Quantization::Keep)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.quantization") && err.contains("no quantized"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A bitsandbytes-layout checkpoint (the tiny Llama's down projections, whose 64 inputs fit
/// NF4's blocks, in 4 bits): `keep` holds them quantized, `none` dequantizes them, and a
/// missing or inconsistent quant state stops the load naming the tensor.
#[test]
fn bitsandbytes_nf4_checkpoint_loads_and_bad_quant_state_is_named() {
    use ftbench_trainer::quant::nf4::Nf4Weight;
    use std::sync::Arc;
    let root = tiny::temp_dir("bnb");
    let c = tiny::config("llama");
    let w = tiny::weights(&c, 9);
    let tok = tiny::write_tokenizer(&root.join("tok"));
    let mut nf4 = HashMap::new();
    let mut dequantized = w.clone();
    for (name, t) in &w {
        if name.ends_with("mlp.down_proj.weight") {
            let (o, i) = t.dims2().unwrap();
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = Nf4Weight::quantize(name, &v, o, i, true).unwrap();
            dequantized.insert(
                name.clone(),
                Tensor::from_vec(q.dequantize(), (o, i), &Device::Cpu).unwrap(),
            );
            nf4.insert(name.clone(), Arc::new(q));
        }
    }
    assert_eq!(nf4.len(), 2);
    let dir = root.join("bnb");
    loader::save_hf_dir_nf4(&dir, &c, &w, &nf4, &tok).unwrap();
    let spec = dir.to_str().unwrap();
    let expected = logits(&c, dequantized);
    let kept = loader::load_with(spec, &Device::Cpu, Quantization::Keep).unwrap();
    assert_eq!(kept.quantized.len(), 2);
    let model = Decoder::with_quantized(
        c.clone(),
        kept.weights,
        kept.quantized,
        TrainMode::Frozen,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_same_logits(
        "bnb kept",
        &expected,
        &model.forward_logits(&ids(c.vocab_size), None).unwrap(),
    );
    assert_same_logits("bnb dequantized", &expected, &loaded_logits(load(&dir)));

    // the same file with one tensor's quant state removed, then with a wrong shape in it
    let st = dir.join("model.safetensors");
    let all = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let key = "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4";
    for case in ["missing", "fp4", "shape"] {
        let mut ts = all.clone();
        if case == "missing" {
            ts.remove(key);
        } else if case == "fp4" {
            let t = ts.remove(key).unwrap();
            ts.insert(key.replace("__nf4", "__fp4"), t);
        } else {
            let bytes: Vec<u8> = ts[key].to_vec1().unwrap();
            let text = String::from_utf8(bytes)
                .unwrap()
                .replace("[32, 64]", "[32, 128]");
            assert!(text.contains("[32, 128]"), "{text}");
            let n = text.len();
            ts.insert(
                key.into(),
                Tensor::from_vec(text.into_bytes(), n, &Device::Cpu).unwrap(),
            );
        }
        let bad = root.join(format!("bad-{case}"));
        std::fs::create_dir_all(&bad).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(dir.join(f), bad.join(f)).unwrap();
        }
        candle_core::safetensors::save(&ts, bad.join("model.safetensors")).unwrap();
        let err = load_err(bad.to_str().unwrap());
        assert!(
            err.contains("model.safetensors")
                && err.contains("model.layers.1.mlp.down_proj.weight"),
            "{case}: {err}"
        );
        if case == "fp4" {
            assert!(
                err.contains("fp4") && !err.contains("without a quant state"),
                "{err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A tiny Llama 3 with RoPE scaling: head_dim 16 and base 500000 put its wavelengths on both
/// sides of the Llama 3 band (2048..8192) and one inside it.
fn scaled_llama(rope_scaling: serde_json::Value) -> ModelConfig {
    let mut v = tiny::config_json("llama");
    v["head_dim"] = json!(16);
    v["rope_theta"] = json!(500000.0);
    v["rope_scaling"] = rope_scaling;
    ModelConfig::from_hf_value(&v).unwrap()
}

#[test]
fn gguf_rope_scaling_matches_the_hf_config() {
    let root = tiny::temp_dir("gguf-rope");
    let cases = [
        (
            "llama3-8",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        ),
        (
            "llama3-32",
            json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        ),
        ("linear-2", json!({"rope_type": "linear", "factor": 2.0})),
    ];
    let plain = scaled_llama(serde_json::Value::Null);
    for (name, scaling) in cases {
        let c = scaled_llama(scaling);
        assert!(c.rope_scaling.is_some());
        let w = tiny::weights(&c, 31);
        let gguf = root.join(format!("{name}.gguf"));
        let hf_weights = tiny::write_gguf(&gguf, "llama", &c, &w);
        let expected = logits(&c, hf_weights.clone());
        let m = loader::load_gguf(&gguf, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.config, c, "{name}: config from GGUF");
        assert_eq!(
            loader::load_config(gguf.to_str().unwrap()).unwrap(),
            c,
            "{name}: load_config"
        );
        assert_same_logits(name, &expected, &loaded_logits(m));
        // the scaling is not a no-op on these positions
        assert!(
            max_diff(&expected, &logits(&plain, hf_weights)) > 0.0,
            "{name}"
        );
    }
    // divisors that are not Llama 3's band are refused, not silently ignored
    let odd = scaled_llama(
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    );
    let gguf = root.join("odd.gguf");
    tiny::write_gguf(&gguf, "llama", &odd, &tiny::weights(&odd, 1));
    let err = load_err(gguf.to_str().unwrap());
    assert!(
        err.contains("odd.gguf") && err.contains("rope_freqs.weight"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------
// bad input

#[test]
fn bad_input_gives_one_clear_error() {
    let root = tiny::temp_dir("bad");

    // a missing path: folder-like and .gguf
    let missing = root.join("no-such-model");
    let err = load_err(missing.to_str().unwrap());
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("not found"),
        "{err}"
    );
    let missing = root.join("no-such-model.gguf");
    let err = load_err(missing.to_str().unwrap());
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    // random bytes named .gguf
    let corrupt = root.join("corrupt.gguf");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&corrupt, &bytes).unwrap();
    let err = load_err(corrupt.to_str().unwrap());
    assert!(
        err.contains("corrupt.gguf") && err.contains("not a readable gguf file"),
        "{err}"
    );
    let err = loader::load_config(corrupt.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt.gguf") && err.contains("not a readable gguf file"),
        "{err}"
    );

    // a valid GGUF cut short inside its tensor data
    let c = tiny::config("qwen2");
    let good = root.join("good.gguf");
    tiny::write_gguf(&good, "qwen2", &c, &tiny::weights(&c, 1));
    let full = std::fs::read(&good).unwrap();
    let cut = root.join("cut.gguf");
    std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
    let err = load_err(cut.to_str().unwrap());
    assert!(err.contains("cut.gguf"), "{err}");

    // a tensor type candle has no dequantizer for (IQ2_XXS, type 16), patched into the header
    let name = b"blk.0.ffn_gate.weight";
    let at = full.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dtype_at = at + 4 + 2 * 8; // n_dims: u32 = 2, then two u64 dims
    assert_eq!(
        full[dtype_at..dtype_at + 4],
        8u32.to_le_bytes(),
        "stored as Q8_0"
    );
    let mut patched = full.clone();
    patched[dtype_at..dtype_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let iq = root.join("iq2.gguf");
    std::fs::write(&iq, &patched).unwrap();
    let err = load_err(iq.to_str().unwrap());
    assert!(
        err.contains("iq2.gguf")
            && err.contains("`blk.0.ffn_gate.weight`")
            && err.contains("IQ2_XXS"),
        "{err}"
    );

    // an architecture we do not implement
    let bert = root.join("bert");
    tiny::write_hf_folder(&bert, "llama", 1);
    let mut cfg = tiny::config_json("llama");
    cfg["model_type"] = json!("bert");
    std::fs::write(bert.join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(bert.to_str().unwrap());
    assert!(
        err.contains("config.json") && err.contains("unknown architecture") && err.contains("bert"),
        "{err}"
    );

    // a truncated safetensors file
    let trunc = root.join("truncated");
    tiny::write_hf_folder(&trunc, "llama", 1);
    let st = trunc.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(trunc.to_str().unwrap());
    assert!(
        err.contains("model.safetensors") && err.contains("cannot read safetensors"),
        "{err}"
    );

    // a folder without weights
    let empty = root.join("empty");
    tiny::write_hf_folder(&empty, "llama", 1);
    std::fs::remove_file(empty.join("model.safetensors")).unwrap();
    let err = load_err(empty.to_str().unwrap());
    assert!(err.contains("model.safetensors"), "{err}");

    let _ = std::fs::remove_dir_all(&root);
}
