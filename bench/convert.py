"""Speed and memory of ``megatron-mimo convert import-hf`` / ``export-hf`` vs plain safetensors.

    python bench/convert.py --size default --rounds 3 --json /tmp/convert-bench.json

Builds a random-weight LLaVA directory (CLIP-L/336 tower, a Llama text model, bf16, one
safetensors file as transformers 5 writes it: ``--size default`` ~1.44 GB, ``small`` ~0.24 GB)
without instantiating a transformers model, then, per round and each step in a fresh process:
(a) baseline: ``load_file`` of every shard, ``save_file`` of the same dicts elsewhere;
(b) ``import_hf`` and (c) ``export_hf`` called in-process (interpreter, torch and the product's
modules imported before the clock starts); (d) the CLI (``python -m megatron_mimo.main convert``)
timed from the outside (wall time, start-up included; ``cli_startup_s`` is a process that only
imports what a conversion imports). One warm-up round comes first; its export is checked bit for
bit against the source (names, dtypes, values) and config.json.

Throughput = bytes of the model's tensors / seconds. An import and an export each read and write
the model once, as the baseline's load + save does, so the target ratios are
``(load_s + save_s) / import_s`` and ``(load_s + save_s) / export_s`` (>= 0.5); ``load_s /
import_s`` and ``save_s / export_s`` are reported too (the first is ~0: ``load_file`` only maps the
file). Peak RSS is the whole process's ``ru_maxrss`` divided by the largest safetensors file
(target <= 1.5); ``--shards N`` splits the source as transformers' sharded files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rounds import machine, print_table, summarize

SIZES = {
    "default": {"vision": (1024, 4096, 24, 16), "text": (2048, 5504, 6, 16, 8)},
    "small": {"vision": (768, 3072, 4, 12), "text": (1024, 2752, 2, 8, 4)},
}
"""(hidden, ffn, layers, heads) of the CLIP tower; (hidden, ffn, layers, heads, kv heads) of
the Llama text model. Both sizes share image 336 / patch 14 and the 32064-word vocabulary."""
IMAGE, PATCH, VOCAB, IMAGE_TOKEN = 336, 14, 32064, 32000
REPO = Path(__file__).resolve().parent.parent
PRE_IMPORT = ("megatron_mimo.convert.importer", "megatron_mimo.convert.exporter",
              "megatron_mimo.convert.checkpoint_io", "megatron_mimo.convert.single")
"""What a conversion imports lazily: loaded before the clock starts, as torch is."""


def llava_config(size: str) -> dict:
    """config.json with the key set transformers 5.25 writes for ``LlavaForConditionalGeneration``
    (taken from ``examples/tiny_llava.py``'s output), at ``size``."""
    vh, vffn, vlayers, vheads = SIZES[size]["vision"]
    th, tffn, tlayers, theads, kv = SIZES[size]["text"]
    text = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
            "eos_token_id": 2, "head_dim": th // theads, "hidden_act": "silu", "hidden_size": th,
            "initializer_range": 0.02, "intermediate_size": tffn, "max_position_embeddings": 4096,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": theads,
            "num_hidden_layers": tlayers, "num_key_value_heads": kv, "pad_token_id": 0,
            "pretraining_tp": 1, "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": False, "use_cache": True, "vocab_size": VOCAB}
    vision = {"attention_dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": vh,
              "image_size": IMAGE, "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": vffn, "layer_norm_eps": 1e-05,
              "model_type": "clip_vision_model", "num_attention_heads": vheads, "num_channels": 3,
              "num_hidden_layers": vlayers, "patch_size": PATCH, "projection_dim": 768}
    return {"architectures": ["LlavaForConditionalGeneration"], "dtype": "bfloat16",
            "image_seq_length": (IMAGE // PATCH) ** 2, "image_token_index": IMAGE_TOKEN,
            "model_type": "llava", "multimodal_projector_bias": True,
            "projector_hidden_act": "gelu", "text_config": text, "tie_word_embeddings": False,
            "transformers_version": "5.25.0", "vision_config": vision,
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}


def tensor_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the LLaVA, named as transformers 5 writes a LLaVA file."""
    vh, vffn, vlayers, _ = SIZES[size]["vision"]
    th, tffn, tlayers, theads, kv = SIZES[size]["text"]
    shapes = {"vision_tower.embeddings.class_embedding": (vh,),
              "vision_tower.embeddings.patch_embedding.weight": (vh, 3, PATCH, PATCH),
              "vision_tower.embeddings.position_embedding.weight": ((IMAGE // PATCH) ** 2 + 1, vh)}
    for part in ("pre_layrnorm", "post_layernorm"):
        shapes |= {f"vision_tower.{part}.{n}": (vh,) for n in ("weight", "bias")}
    for i in range(vlayers):
        layer = f"vision_tower.encoder.layers.{i}."
        for name, (rows, cols) in {"self_attn.q_proj": (vh, vh), "self_attn.k_proj": (vh, vh),
                                   "self_attn.v_proj": (vh, vh), "self_attn.out_proj": (vh, vh),
                                   "mlp.fc1": (vffn, vh), "mlp.fc2": (vh, vffn)}.items():
            shapes |= {f"{layer}{name}.weight": (rows, cols), f"{layer}{name}.bias": (rows,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}{norm}.{n}": (vh,) for n in ("weight", "bias")}
    for name, (rows, cols) in {"linear_1": (th, vh), "linear_2": (th, th)}.items():
        shapes |= {f"multi_modal_projector.{name}.weight": (rows, cols),
                   f"multi_modal_projector.{name}.bias": (rows,)}
    text, head = "language_model.model.", th // theads
    shapes |= {f"{text}embed_tokens.weight": (VOCAB, th), f"{text}norm.weight": (th,),
               "language_model.lm_head.weight": (VOCAB, th)}
    for i in range(tlayers):
        layer = f"{text}layers.{i}."
        shapes |= {f"{layer}{name}.weight": shape for name, shape in {
            "input_layernorm": (th,), "post_attention_layernorm": (th,),
            "self_attn.q_proj": (th, th), "self_attn.k_proj": (kv * head, th),
            "self_attn.v_proj": (kv * head, th), "self_attn.o_proj": (th, th),
            "mlp.gate_proj": (tffn, th), "mlp.up_proj": (tffn, th),
            "mlp.down_proj": (th, tffn)}.items()}
    return dict(sorted(shapes.items()))


def write_tokenizer(out: Path) -> None:
    """A WordLevel tokenizer of VOCAB ids with ``<image>`` at IMAGE_TOKEN, as the import checks."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    words[IMAGE_TOKEN] = "<image>"
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<image>"])
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}, indent=1) + "\n")


def step_build(out: str, size: str, shards: str) -> dict:
    """Random bf16 weights in ``shards`` files (transformers' shard names and index if > 1)."""
    import torch
    from safetensors.torch import save_file

    out_dir, count = Path(out), int(shards)
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(llava_config(size), indent=2) + "\n")
    write_tokenizer(out_dir)
    torch.manual_seed(0)
    names = list(tensor_shapes(size).items())
    files = (["model.safetensors"] if count == 1 else
             [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
    weight_map = {}
    for i, file in enumerate(files):
        part = {n: torch.randn(s, dtype=torch.bfloat16) for n, s in names[i::count]}
        save_file(part, str(out_dir / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    if count > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return {}


def step_baseline(src: str, dst: str) -> dict:
    """Plain ``load_file`` of every shard, then ``save_file`` of the same dicts; the fsync of
    what was written is timed apart (the checkpoint writer fsyncs, ``save_file`` does not)."""
    from safetensors.torch import load_file, save_file

    files = sorted(Path(src).glob("*.safetensors"))
    start = time.perf_counter()
    loaded = {f.name: load_file(str(f)) for f in files}
    loaded_at = time.perf_counter()
    for name, tensors in loaded.items():
        save_file(tensors, str(Path(dst) / name), metadata={"format": "pt"})
    saved_at = time.perf_counter()
    for name in loaded:
        with open(Path(dst) / name, "rb+") as handle:
            os.fsync(handle.fileno())
    return {"load_s": loaded_at - start, "save_s": saved_at - loaded_at,
            "fsync_s": time.perf_counter() - saved_at}


def step_import(src: str, ckpt: str) -> dict:
    """``import_hf`` as the CLI calls it."""
    from megatron_mimo.convert.importer import import_hf

    start = time.perf_counter()
    import_hf(Path(ckpt), llava_dir=Path(src))
    return {"seconds": time.perf_counter() - start}


def step_export(ckpt: str, out: str) -> dict:
    """``export_hf`` as the CLI calls it (default 2 GiB shards)."""
    from megatron_mimo.convert.exporter import export_hf

    start = time.perf_counter()
    export_hf(Path(ckpt), Path(out))
    return {"seconds": time.perf_counter() - start}


def step_verify(src: str, out: str) -> dict:
    """The export holds the source's tensors bit for bit (names, dtypes, shapes, bytes) and its
    config.json; raises on the first difference."""
    from safetensors import safe_open

    def tensors(folder: str) -> dict:
        handles = {f: safe_open(str(f), "pt") for f in sorted(Path(folder).glob("*.safetensors"))}
        return {k: (h, k) for h in handles.values() for k in h.keys()}

    want, got = tensors(src), tensors(out)
    if set(want) != set(got):
        raise SystemExit(f"names differ: {sorted(set(want) ^ set(got))[:5]}")
    for name, (handle, key) in want.items():
        a, b = handle.get_tensor(key), got[name][0].get_tensor(key)
        if a.dtype != b.dtype or a.shape != b.shape or not _same_bits(a, b):
            raise SystemExit(f"{name}: differs ({a.dtype} {tuple(a.shape)} vs {b.dtype} "
                             f"{tuple(b.shape)})")
    configs = [json.loads((Path(d) / "config.json").read_text()) for d in (src, out)]
    if configs[0] != configs[1]:
        raise SystemExit("config.json differs")
    return {"tensors_checked": len(want)}


def _same_bits(a, b) -> bool:
    """Byte-level equality (NaN payloads and -0.0 included, which ``equal`` would blur)."""
    import torch

    return torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))


STEPS = {"build": step_build, "baseline": step_baseline, "import": step_import,
         "export": step_export, "verify": step_verify, "startup": dict}
"""``startup`` only imports what a conversion imports: the CLI's fixed start-up cost."""


def child(name: str, args: list[str]) -> None:
    """Run one step in this (fresh) process; print its figures and own peak RSS as JSON."""
    import importlib

    import torch  # noqa: F401 - start-up cost kept outside every timed call

    for module in PRE_IMPORT if name in ("import", "export", "startup") else ():
        importlib.import_module(module)
    rss_before = _vm_rss()
    result = STEPS[name](*args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({**result, "rss_before": rss_before, "peak_rss": peak}))


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_step(name: str, *args: str) -> dict:
    """One step in a fresh interpreter; its JSON line (raises with its stderr on failure)."""
    proc = subprocess.run([sys.executable, __file__, "--step", name, *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(*argv: str) -> dict:
    """The CLI from the outside: wall time from spawn to exit, its own peak RSS (wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "megatron_mimo.main", "convert", *argv],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"convert {argv[0]} failed: {proc.stderr.read().decode()[-3000:]}")
    proc.stderr.close()
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024}


def baseline(src: Path, work: Path) -> dict:
    """The plain safetensors round trip into ``work/copy``, deleted afterwards."""
    (work / "copy").mkdir()
    try:
        return run_step("baseline", str(src), str(work / "copy"))
    finally:
        shutil.rmtree(work / "copy")


def one_round(src: Path, work: Path, model_bytes: int, largest: int, index: int) -> dict:
    """Baseline, in-process import/export, CLI import/export; outputs deleted afterwards. The
    baseline runs first in even rounds and after the export in odd ones, so that neither side
    always meets the page cache and allocator state the other left."""
    try:
        base = baseline(src, work) if index % 2 == 0 else None
        imp = run_step("import", str(src), str(work / "ckpt"))
        exp = run_step("export", str(work / "ckpt"), str(work / "out"))
        checked = run_step("verify", str(src), str(work / "out"))["tensors_checked"] \
            if index == 0 else None
        shutil.rmtree(work / "out")
        shutil.rmtree(work / "ckpt")
        base = base or baseline(src, work)
        start = time.perf_counter()
        run_step("startup")
        startup = time.perf_counter() - start
        cli_imp = run_cli("import-hf", str(src), str(work / "ckpt"))
        cli_exp = run_cli("export-hf", str(work / "ckpt"), str(work / "out"))
    finally:
        for name in ("ckpt", "out"):
            shutil.rmtree(work / name, ignore_errors=True)
    roundtrip = base["load_s"] + base["save_s"]
    return {
        "baseline_load_s": base["load_s"], "baseline_save_s": base["save_s"],
        "baseline_fsync_s": base["fsync_s"], "import_s": imp["seconds"],
        "export_s": exp["seconds"], "cli_startup_s": startup,
        "cli_import_wall_s": cli_imp["wall_s"], "cli_export_wall_s": cli_exp["wall_s"],
        "baseline_gb_per_s": model_bytes / roundtrip / 1e9,
        "import_gb_per_s": model_bytes / imp["seconds"] / 1e9,
        "export_gb_per_s": model_bytes / exp["seconds"] / 1e9,
        "import_vs_load_save": roundtrip / imp["seconds"],
        "export_vs_load_save": roundtrip / exp["seconds"],
        "import_vs_load_save_fsync": (roundtrip + base["fsync_s"]) / imp["seconds"],
        "import_vs_load": base["load_s"] / imp["seconds"],
        "export_vs_save": base["save_s"] / exp["seconds"],
        "baseline_rss_x": base["peak_rss"] / largest, "import_rss_x": imp["peak_rss"] / largest,
        "export_rss_x": exp["peak_rss"] / largest,
        "cli_import_rss_x": cli_imp["peak_rss"] / largest,
        "cli_export_rss_x": cli_exp["peak_rss"] / largest,
        "baseline_rss_growth_x": (base["peak_rss"] - base["rss_before"]) / largest,
        "import_rss_growth_x": (imp["peak_rss"] - imp["rss_before"]) / largest,
        "export_rss_growth_x": (exp["peak_rss"] - exp["rss_before"]) / largest,
        "rss_after_imports_gb": imp["rss_before"] / 1e9,
        "verified_tensors": checked,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after 1 warm-up")
    parser.add_argument("--shards", type=int, default=1, help="safetensors files of the source")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.step:
        child(args.step, rest)
        return 0
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        work, src = Path(tmp), Path(tmp) / "llava"
        run_step("build", str(src), args.size, str(args.shards))
        files = [f.stat().st_size for f in src.glob("*.safetensors")]
        shapes = tensor_shapes(args.size).values()
        model_bytes = sum(2 * _numel(s) for s in shapes)
        start_load = os.getloadavg()
        rounds = []
        for i in range(args.rounds + 1):
            result = one_round(src, work, model_bytes, max(files), i)
            print(f"round {i}{' (warm-up)' if i == 0 else ''}: "
                  f"{json.dumps({k: round(v, 3) for k, v in result.items() if v})}", flush=True)
            rounds.append(result)
    measured = rounds[1:]
    summary = summarize(measured, skip=("verified_tensors",))
    print_table(measured, summary)
    report = {"size": args.size, "shards": args.shards, "model_bytes": model_bytes,
              "largest_file_bytes": max(files), "verified_tensors": rounds[0]["verified_tensors"],
              "machine": {**machine(), "loadavg_at_start": start_load}, "rounds": measured,
              "warmup": rounds[0], "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


if __name__ == "__main__":
    sys.exit(main())
