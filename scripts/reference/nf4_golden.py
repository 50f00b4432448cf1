#!/usr/bin/env python3
"""Golden NF4 fixtures for ftbench's `quant::nf4` codec, from bitsandbytes itself.

Writes three files under crates/trainer/tests/data/:

* nf4_golden.json: bitsandbytes' NF4 code, its signed dynamic map (the 8-bit code of double
  quantization), an 8-bit blockwise case built on the map's midpoints, and a few weights
  quantized with `bitsandbytes.functional.quantize_4bit` (blocksize 64, nf4), each with and
  without double quantization: packed bytes, absmax, nested codes and scales, offset, and
  what `dequantize_4bit` gives back.
* nf4_bnb.safetensors: two `bnb.nn.Linear4bit` layers (out 128, in 64) saved through their
  own `state_dict()`, the layout of a pre-quantized Hugging Face checkpoint. Layer 0 holds a
  bfloat16 weight with double quantization, layer 1 a float32 weight without.
* nf4_bnb_dequant.safetensors: what bitsandbytes dequantizes those two weights to.

bitsandbytes runs on the CPU, where two implementations are involved:

* `quantize_4bit` and `quantize_blockwise` for the reference ("default") backend are plain
  torch: scale by the reciprocal of the block's absmax, then `torch.bucketize` against the
  midpoints of the code, so the nearest code wins and an exact tie goes to the lower index.
* `quantize_blockwise` on the CPU (used by `quantize_4bit(compress_statistics=True)`) is a
  native kernel whose search is approximate: it does not always pick the nearest code. Its
  codes are recorded as "cpu"; the reference backend's codes, computed on the same absmax
  and offset, are recorded as "reference". ftbench matches the reference bit for bit.

Floats are written as the decimal of the float32 value widened to a double (exact once read
back as f32); byte arrays as hex strings.

Usage (needs torch, bitsandbytes and safetensors; runs without network):

    python scripts/reference/nf4_golden.py [--out-dir crates/trainer/tests/data]
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.functional import QuantState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

BLOCK = 64
NESTED_BLOCK = 256
REF = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def floats(t):
    return [float(x) for x in t.detach().float().reshape(-1).tolist()]


def hexbytes(t):
    return bytes(t.detach().to(torch.uint8).reshape(-1).tolist()).hex()


def f32(x):
    return np.float32(x)


def nf4_code():
    return F.get_4bit_type("nf4", device="cpu")


def ref_quantize_blockwise(a, code, blocksize):
    """bitsandbytes' reference (pure torch) 8-bit blockwise quantization."""
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(REF, a, code, blocksize)


def edge_weight():
    """8 x 64: one block per row, each row an edge case."""
    code = nf4_code().numpy()
    mids = ((code[:-1] + code[1:]) / f32(2)).astype(np.float32)
    rows = np.zeros((8, 64), dtype=np.float32)
    k = np.arange(64)
    # row 0: all zeros (absmax 0)
    # row 1: small values and one huge outlier
    rows[1] = (((k * 37) % 64) - 32).astype(np.float32) * f32(1e-3)
    rows[1, 5] = f32(1000.0)
    # row 2: exact code values times 0.5
    rows[2] = code[k % 16] * f32(0.5)
    # row 3: negative only
    rows[3] = -((k + 1).astype(np.float32) * f32(0.01))
    # row 4: absmax 1, the 15 midpoints (ties), one float32 step above and below each
    tie = np.zeros(64, dtype=np.float32)
    tie[0] = 1.0
    tie[1:16] = mids
    tie[16:31] = np.nextafter(mids, np.float32(np.inf))
    tie[31:46] = np.nextafter(mids, np.float32(-np.inf))
    tie[46] = -1.0
    rows[4] = tie
    # row 5: the same ties at absmax 0.125 (a power of two keeps them exact)
    rows[5] = tie * f32(0.125)
    # row 6: subnormal values; bnb clamps the absmax to 1e-38 before taking its reciprocal
    rows[6] = (k + 1).astype(np.float32) * f32(1e-42)
    # row 7: mixed signs over a wide range
    rows[7] = (np.sin(k * 0.7) * np.exp(k / 9.0)).astype(np.float32)
    return torch.from_numpy(rows)


def gaussian_weight():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(8, 128, generator=g, dtype=torch.float32) * 0.02


def wide_weight(out_features=65, in_features=256):
    """65 x 256 (260 blocks, so two nested blocks, the second of 4) from a formula that
    the Rust test recomputes exactly: a multiplicative hash of the flat index mapped to
    [-1, 1) in steps of 2^-23, times a per-row scale 0.01 * (1 + row % 7)."""
    idx = np.arange(out_features * in_features, dtype=np.uint64)
    h = (idx * np.uint64(2654435761)) % np.uint64(1 << 32)
    u = ((h >> np.uint64(8)).astype(np.int64) - (1 << 23)).astype(np.float32) * np.float32(2.0**-23)
    rows = np.arange(out_features)
    scale = np.float32(0.01) * (1 + rows % 7).astype(np.float32)
    w = u.reshape(out_features, in_features) * scale[:, None]
    return torch.from_numpy(w.astype(np.float32))


def quantize_case(name, w, store_input=True, dequant_rows=None):
    shape = tuple(w.shape)
    packed, st = F.quantize_4bit(w, blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    dq = F.dequantize_4bit(packed, st)
    assert dq.dtype == torch.float32

    packed_n, st_n = F.quantize_4bit(w, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed_n, packed)

    # the reference backend's nested codes for the same absmax and offset
    dyn = st_n.state2.code
    ref_codes, ref_nabs = ref_quantize_blockwise(st.absmax - st_n.offset, dyn, NESTED_BLOCK)
    st_ref = QuantState(
        absmax=ref_codes,
        shape=st.shape,
        code=st.code,
        blocksize=BLOCK,
        quant_type="nf4",
        dtype=w.dtype,
        offset=st_n.offset,
        state2=QuantState(absmax=ref_nabs, code=dyn, blocksize=NESTED_BLOCK, dtype=torch.float32),
    )
    dq_ref = F.dequantize_4bit(packed, st_ref)
    absmax_ref = F.dequantize_blockwise(ref_codes, st_ref.state2) + st_n.offset
    absmax_cpu = F.dequantize_blockwise(st_n.absmax, st_n.state2) + st_n.offset

    def pick(t):
        t = t.reshape(shape)
        if dequant_rows is None:
            return floats(t)
        return {str(r): floats(t[r]) for r in dequant_rows}

    case = {
        "name": name,
        "shape": list(shape),
        "plain": {
            "packed": hexbytes(packed),
            "packed_shape": list(packed.shape),
            "absmax": floats(st.absmax),
            "dequant": pick(dq),
        },
        "nested": {
            "offset": float(st_n.offset.item()),
            "nested_blocksize": st_n.state2.blocksize,
            "reference": {
                "codes": hexbytes(ref_codes),
                "nested_absmax": floats(ref_nabs),
                "absmax_values": floats(absmax_ref),
                "dequant": pick(dq_ref),
            },
            # what quantize_4bit(compress_statistics=True) itself returns on the CPU
            "cpu": {
                "codes": hexbytes(st_n.absmax),
                "nested_absmax": floats(st_n.state2.absmax),
                "absmax_values": floats(absmax_cpu),
            },
        },
    }
    if store_input:
        case["input"] = floats(w)
    diff = int((ref_codes != st_n.absmax).sum())
    print(f"{name}: {st.absmax.numel()} blocks, nested codes cpu != reference: {diff}")
    return case


def blockwise8_case(dyn):
    """Four blocks of 256 on the midpoints of the dynamic map: 1.0 (or -1.0) first so the
    block's absmax is 1, then the 255 midpoints exactly, one step above or one below."""
    mids = ((dyn[:-1] + dyn[1:]) / 2).numpy()
    up = np.nextafter(mids, np.float32(np.inf))
    down = np.nextafter(mids, np.float32(-np.inf))
    blocks = [
        np.concatenate([[1.0], mids]),
        np.concatenate([[1.0], up]),
        np.concatenate([[1.0], down]),
        np.concatenate([[-1.0], mids]),
    ]
    a = torch.from_numpy(np.concatenate(blocks).astype(np.float32))
    ref_q, ref_absmax = ref_quantize_blockwise(a, dyn, NESTED_BLOCK)
    cpu_q, cpu_st = F.quantize_blockwise(a, code=dyn, blocksize=NESTED_BLOCK)
    assert torch.equal(ref_absmax, cpu_st.absmax)
    print(f"blockwise8: cpu != reference on {int((ref_q != cpu_q).sum())} of {a.numel()}")
    return {
        "input": floats(a),
        "absmax": floats(ref_absmax),
        "reference_codes": hexbytes(ref_q),
        "cpu_codes": hexbytes(cpu_q),
    }


def bnb_layers(out_dir):
    g = torch.Generator().manual_seed(99)
    tensors, expected = {}, {}
    for i, (dtype, nested) in enumerate([(torch.bfloat16, True), (torch.float32, False)]):
        w = (torch.randn(128, 64, generator=g) * 0.02).to(dtype)
        lin = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=dtype, compress_statistics=nested, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(
            w, requires_grad=False, compress_statistics=nested, quant_type="nf4", blocksize=BLOCK
        )
        lin = lin.to("cpu")
        prefix = f"model.layers.{i}.mlp.up_proj."
        for k, v in lin.state_dict().items():
            tensors[prefix + k] = v.detach().contiguous()

        qs = lin.weight.quant_state
        absmax = qs.absmax
        if qs.nested:
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        dq32 = torch.ops.bitsandbytes.dequantize_4bit(lin.weight.data, absmax, BLOCK, "nf4", [128, 64], torch.float32)
        native = F.dequantize_4bit(lin.weight.data, qs)
        assert native.dtype == dtype
        expected[prefix + "weight"] = dq32.contiguous()
        if dtype != torch.float32:
            expected[prefix + "weight.native"] = native.contiguous()
    save_file(tensors, str(out_dir / "nf4_bnb.safetensors"))
    save_file(expected, str(out_dir / "nf4_bnb_dequant.safetensors"))
    for k, v in tensors.items():
        print(f"  {k}: {v.dtype} {list(v.shape)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[2] / "crates/trainer/tests/data"))
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    dyn = F.create_dynamic_map(signed=True)
    golden = {
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__.split("+")[0],
        "device": "cpu",
        "nf4_code": floats(nf4_code()),
        "dynamic_map": floats(dyn),
        "blockwise8": blockwise8_case(dyn),
        "cases": [
            quantize_case("edge", edge_weight()),
            quantize_case("gaussian", gaussian_weight()),
            quantize_case("wide", wide_weight(), store_input=False, dequant_rows=[0, 64]),
        ],
    }
    path = out_dir / "nf4_golden.json"
    path.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {path}")
    bnb_layers(out_dir)


if __name__ == "__main__":
    main()
