#!/usr/bin/env python3
"""The training step of `ftbench bench train`, run with PyTorch + transformers + PEFT.

Builds the same model shape as ftbench's preset (random weights), the same LoRA (r16, alpha 32,
dropout 0 on q,k,v,o,gate,up,down) or full fine-tuning, the same fixed batch (every position
carries loss), AdamW at lr 2e-4 with gradient-norm clipping at 1.0, one warm-up step and N
timed steps of forward + backward + optimiser step, and prints one JSON line with the keys of
ftbench's bench output. Progress goes to stderr.

    .venv-peers/bin/python scripts/peers/peft_lora_step.py --preset smollm-135m --threads 2

See scripts/peers/README.md.
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def preset_config(name):
    """HF config fields of ftbench's presets (crates/trainer/src/config.rs, ModelConfig::preset),
    with the values ftbench resolves for the keys the preset leaves out."""
    if name == "smollm-135m":
        return "llama", {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "vocab_size": 49152,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
    if name == "gemma3-270m":
        layers = 18
        return "gemma3_text", {
            "hidden_size": 640,
            "intermediate_size": 2048,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "vocab_size": 262144,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "sliding_window": 512,
            "query_pre_attn_scalar": 256,
            "max_position_embeddings": 32768,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "attention_bias": False,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            # ftbench's embedding has no padding row (transformers' Gemma 3 default is 0)
            "pad_token_id": None,
            # every sixth layer attends globally (sliding_window_pattern 6): layers 5, 11, 17
            "layer_types": sliding_pattern(layers),
        }
    if name == "llama-3.2-1b":
        return "llama", {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    return None, None


PRESETS = ["smollm-135m", "gemma3-270m", "llama-3.2-1b"]


def sliding_pattern(layers, pattern=6):
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def build_config(family, fields, attn):
    if family == "llama":
        from transformers import LlamaConfig as Config
    else:
        from transformers import Gemma3TextConfig as Config
    fields = dict(fields)
    rope_scaling = fields.pop("rope_scaling", None)
    try:
        config = Config(**fields, rope_scaling=rope_scaling) if rope_scaling else Config(**fields)
    except TypeError:
        # transformers versions that take RoPE settings only through `rope_parameters`
        rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
        if rope_scaling:
            rope.update(rope_scaling)
        if "rope_local_base_freq" in fields:
            local = fields.pop("rope_local_base_freq")
            rope = {
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
            }
        config = Config(**fields, rope_parameters=rope)
    config._attn_implementation = attn
    config.use_cache = False
    return config


def check_config(config, family, fields):
    """Stops if transformers resolved the config differently from ftbench's preset."""
    want = {k: v for k, v in fields.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    for key, value in want.items():
        got = getattr(config, key, None)
        if got != value:
            sys.exit(f"peft_lora_step.py: transformers resolved `{key}` = {got!r}, expected {value!r}")
    # RoPE bases: older transformers keep rope_theta / rope_local_base_freq, newer ones keep
    # them in rope_parameters
    params = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (params.get("full_attention", params) or {}).get("rope_theta")
    if theta != fields["rope_theta"]:
        sys.exit(f"peft_lora_step.py: RoPE base {theta!r}, expected {fields['rope_theta']!r}")
    if family == "gemma3_text":
        local = getattr(config, "rope_local_base_freq", None)
        if local is None:
            local = (params.get("sliding_attention") or {}).get("rope_theta")
        if local != fields["rope_local_base_freq"]:
            sys.exit(f"peft_lora_step.py: local RoPE base {local!r}, expected {fields['rope_local_base_freq']!r}")


def fixed_batch(batch, seq, vocab):
    """ftbench's batch: ids[i] = (i * 2654435761 + 12345) mod vocab over batch*seq positions,
    targets = ids shifted left by one (the last wraps to ids[0]), every position with loss."""
    n = batch * seq
    ids = [(i * 2_654_435_761 + 12_345) % vocab for i in range(n)]
    targets = ids[1:] + ids[:1]
    return ids, targets


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    parts = line.split()
                    return int(parts[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="model shape: " + ", ".join(PRESETS))
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (one more warm-up step runs first)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=0, help="compute threads; 0 = all cores")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers (quick runs)")
    p.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "bf16-autocast"],
        help="f32, or f32 weights with the forward under torch.autocast(cpu, bfloat16)",
    )
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="transformers attention implementation")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.preset not in PRESETS:
        p.error(f"--preset {a.preset}: unknown (expected one of {', '.join(PRESETS)})")
    if a.steps < 1 or a.batch < 1 or a.seq < 2:
        p.error("--steps, --batch must be at least 1 and --seq at least 2")
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be at least 1")
    if a.threads < 0:
        p.error("--threads must be 0 (all cores) or positive")
    return a


def main(argv=None):
    a = parse_args(argv)
    # a deprecation notice transformers raises from inside PEFT; nothing this script can change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    threads = a.threads or os.cpu_count() or 1
    import torch

    torch.set_num_threads(threads)
    import peft
    import transformers
    from transformers import AutoModelForCausalLM

    family, fields = preset_config(a.preset)
    if a.layers is not None:
        fields["num_hidden_layers"] = a.layers
        if "layer_types" in fields:
            fields["layer_types"] = sliding_pattern(a.layers)
    if a.seq > fields["max_position_embeddings"]:
        sys.exit(f"peft_lora_step.py: --seq {a.seq} is longer than the preset's context {fields['max_position_embeddings']}")
    config = build_config(family, fields, a.attn)
    check_config(config, family, fields)

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=a.attn, dtype=torch.float32)
    model.to(torch.float32)
    attn_impl = getattr(model.config, "_attn_implementation", a.attn)

    if a.mode == "lora":
        lora = peft.LoraConfig(
            r=a.rank,
            lora_alpha=a.alpha,
            lora_dropout=0.0,
            target_modules=SEVEN,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    # ftbench's defaults: weight decay 0, betas (0.9, 0.999), eps 1e-8; its cosine schedule
    # changes only the lr value, so a constant lr does the same work
    optim = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    ids, targets = fixed_batch(a.batch, a.seq, config.vocab_size)
    input_ids = torch.tensor(ids, dtype=torch.long).view(a.batch, a.seq)
    target_ids = torch.tensor(targets, dtype=torch.long).view(-1)

    def step():
        optim.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16-autocast"):
            logits = model(input_ids=input_ids, use_cache=False).logits
        # mean cross-entropy over every position, in f32 (as transformers' own loss does)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), target_ids)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        return loss.item(), float(norm)

    times = []
    for i in range(a.steps + 1):
        t = time.perf_counter()
        loss, norm = step()
        s = time.perf_counter() - t
        if not (math.isfinite(loss) and math.isfinite(norm)):
            sys.exit(f"peft_lora_step.py: loss {loss}, gradient norm {norm} at step {i}")
        if i > 0:
            times.append(s)
        print(f"step {i}{' (warm-up)' if i == 0 else ''}: {s:.3f} s, loss {loss:.4f}", file=sys.stderr)

    times.sort()
    median = times[len(times) // 2]  # the upper median for an even count, as ftbench takes it
    n = a.batch * a.seq
    out = {
        "bench": "train",
        "peer": "pytorch+peft" if a.mode == "lora" else "pytorch",
        "preset": a.preset,
        "mode": a.mode,
        "layers": config.num_hidden_layers,
        "batch": a.batch,
        "seq": a.seq,
        "threads": torch.get_num_threads(),
        "lora_rank": a.rank if a.mode == "lora" else None,
        "trainable_parameters": n_trainable,
        "timed_steps": a.steps,
        "median_s_per_step": median,
        "min_s_per_step": times[0],
        "mean_s_per_step": statistics.fmean(times),
        "tokens_per_s": n / median,
        "peak_rss_bytes": peak_rss_bytes(),
        "device": "cpu",
        "dtype": a.dtype,
        "attn_implementation": attn_impl,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "python_version": platform.python_version(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
