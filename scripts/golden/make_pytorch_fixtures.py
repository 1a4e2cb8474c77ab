#!/usr/bin/env python3
"""Write the small checkpoint fixtures under tests/fixtures/pytorch/ with the reference tools.

- single/pytorch_model.bin: torch.save of a module state dict (OrderedDict with _metadata, a tied
  pair sharing one storage) plus f32/f16/bf16/f64/int64/int32/int16/int8/uint8/bool tensors, an
  nn.Parameter, a transposed (non-contiguous) view, row and column slices with storage offsets, a
  0-d scalar and an empty tensor.
- sharded/: the same kind of tensors split by huggingface_hub into pytorch_model-0000i-of-0000N.bin
  plus pytorch_model.bin.index.json (written as transformers writes it).
- hf_safetensors/: huggingface_hub.save_torch_state_dict output, single and sharded, so the Rust
  reader is checked on files the reference writer made and the Rust writer's shard names and
  index JSON can be compared with the reference's.
- malicious/pytorch_model.bin: a real torch.save whose pickle calls os.system through __reduce__.
  NEVER torch.load it. The command would create MARKER; the Rust test asserts it does not exist.
- legacy/pytorch_model.bin: the pre-1.6 non-zip format, which we refuse with a clear message.
- expected.json: dtype, shape and flat values of every tensor, from torch itself.

Run: /root/.cache/autoquant/venv/bin/python scripts/golden/make_pytorch_fixtures.py
"""
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards

ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pytorch"
MARKER = "/tmp/autoquant_malicious_pickle_ran"

DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.proj = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: one storage, two names


def exact_floats(t):
    """Values as Python floats; every f16/bf16 value is exactly representable in f64."""
    return [float(v) for v in t.detach().to(torch.float64).reshape(-1).tolist()]


BIT_VIEWS = {torch.float32: (torch.int32, 32), torch.float16: (torch.int16, 16),
             torch.bfloat16: (torch.int16, 16), torch.float64: (torch.int64, 64)}


def describe(t):
    t = t.detach()
    out = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if t.dtype.is_floating_point:
        out["values"] = exact_floats(t)
        # JSON readers need not round decimals correctly; the raw bit patterns compare exactly.
        view, width = BIT_VIEWS[t.dtype]
        out["bits"] = [int(v) % (1 << width) for v in t.contiguous().view(view).reshape(-1).tolist()]
    else:
        out["values"] = [int(v) for v in t.reshape(-1).tolist()]
    return out


def build_state_dict():
    torch.manual_seed(0)
    model = Tiny()
    sd = model.state_dict()  # OrderedDict carrying _metadata
    base = torch.arange(15, dtype=torch.float32).reshape(3, 5) / 4
    grid = torch.arange(20, dtype=torch.float32).reshape(5, 4) - 7.5
    sd["half"] = torch.tensor([0.5, -1.25, 65504.0, 6.1035e-05], dtype=torch.float16)
    sd["bfloat"] = torch.tensor([[1.0, -2.5], [3.140625, 1e30]], dtype=torch.bfloat16)
    sd["double"] = torch.tensor([1.0 / 3.0, -2.0], dtype=torch.float64)
    sd["long"] = torch.tensor([-(2**40), 0, 7, 2**62], dtype=torch.int64)
    sd["int"] = torch.tensor([[-5, 6], [2**31 - 1, -(2**31)]], dtype=torch.int32)
    sd["short"] = torch.tensor([-300, 300], dtype=torch.int16)
    sd["char"] = torch.tensor([-128, 127, 0], dtype=torch.int8)
    sd["byte"] = torch.tensor([0, 255, 17], dtype=torch.uint8)
    sd["mask"] = torch.tensor([True, False, True])
    sd["transposed"] = base.t()  # 5x3 view with stride (1, 5)
    sd["rows"] = grid[1:3]  # storage offset 4, contiguous
    sd["cols"] = grid[:, 1:3]  # storage offset 1, stride (4, 1): not contiguous
    sd["scalar"] = torch.tensor(2.75)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.tensor([[0.25, -0.75]]), requires_grad=True)
    return sd


def write_expected(sd, path, extra=None):
    out = {name: describe(t) for name, t in sd.items()}
    if extra:
        out.update(extra)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


def main():
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)

    sd = build_state_dict()
    (ROOT / "single").mkdir()
    torch.save(sd, ROOT / "single" / "pytorch_model.bin")
    # The loader must see exactly what torch sees, including the tie.
    loaded = torch.load(ROOT / "single" / "pytorch_model.bin", weights_only=True)
    assert loaded["embed.weight"].data_ptr() == loaded["head.weight"].data_ptr()
    assert not loaded["transposed"].is_contiguous() and loaded["cols"].storage_offset() == 1
    write_expected(loaded, ROOT / "single" / "expected.json")

    # Sharded .bin, split by huggingface_hub with a tiny limit, index as transformers writes it.
    shard_sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in build_state_dict().items()
                           if k in ("proj.weight", "proj.bias", "bfloat", "long", "transposed", "mask"))
    split = split_torch_state_dict_into_shards(
        shard_sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=64)
    assert split.is_sharded
    (ROOT / "sharded").mkdir()
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: shard_sd[n] for n in names}, ROOT / "sharded" / filename)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (ROOT / "sharded" / "pytorch_model.bin.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_expected(shard_sd, ROOT / "sharded" / "expected.json")

    # Reference safetensors writer: single file, and sharded with a limit of 100 bytes.
    st_sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in build_state_dict().items()
                        if k not in ("head.weight",))
    for sub in ("single", "sharded"):
        (ROOT / "hf_safetensors" / sub).mkdir(parents=True)
    save_torch_state_dict(st_sd, ROOT / "hf_safetensors" / "single")
    save_torch_state_dict(st_sd, ROOT / "hf_safetensors" / "sharded", max_shard_size=100)
    write_expected(st_sd, ROOT / "hf_safetensors" / "expected.json",
                   extra={"__order__": list(st_sd.keys()), "__max_shard_size__": 100,
                          # A limit smaller than some tensors: those get shards of their own.
                          "__split_50__": split_torch_state_dict_into_shards(
                              st_sd, max_shard_size=50).tensor_to_filename})

    # Legacy pre-1.6 format.
    (ROOT / "legacy").mkdir()
    torch.save({"w": torch.ones(2)}, ROOT / "legacy" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)

    # Malicious checkpoint: the pickle asks to call os.system. Built with torch.save so the rest
    # of the archive is genuine.
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {MARKER}",))

    (ROOT / "malicious").mkdir()
    torch.save({"w": torch.ones(2), "evil": Evil()}, ROOT / "malicious" / "pytorch_model.bin")
    (ROOT / "malicious" / "marker.txt").write_text(MARKER + "\n")
    assert not os.path.exists(MARKER)

    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"wrote {ROOT} ({total} bytes)")


if __name__ == "__main__":
    main()
