"""resnet50 end to end on CPU: weights pushed by the test, images uploaded over REST,
a real node started from `.venv-vision` (torchvision does not import beside the
torch of `.venv`; see scripts/setup-vision-venv.sh)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.api import register, wait_for_task
from tests.support.servers import ROOT
from tests.workers.workers_support import VISION_VENV, NodeFromVenv, vision_python

pytestmark = [pytest.mark.slow, pytest.mark.vision]
LABELS = (ROOT / "workers" / "executors" / "imagenet_classes.txt").read_text().splitlines()

# weights.pt: random (seed 0). golden.pt and tabby.pt: the same, but a last layer whose answer is known for
# any image: zero weights (the image's features count for nothing) and a bias of 20 for one class, 0 for
# the 999 others.
_MAKE_ASSETS = """
import sys, torch
from PIL import Image
from torchvision.models import resnet50
out = sys.argv[1]
torch.manual_seed(0)
state = resnet50(weights=None).state_dict()
torch.save(state, f"{out}/weights.pt")
for name, winner in (("golden", 207), ("tabby", 281)):
    bias = torch.zeros_like(state["fc.bias"])
    bias[winner] = 20.0
    torch.save({**state, "fc.weight": torch.zeros_like(state["fc.weight"]), "fc.bias": bias}, f"{out}/{name}.pt")
Image.new("RGB", (320, 240), (200, 30, 30)).save(f"{out}/red.png")
img = Image.new("RGB", (64, 96))
img.putdata([((x * 7) % 256, (y * 5) % 256, (x * y) % 256) for y in range(96) for x in range(64)])
img.save(f"{out}/pattern.png")
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    python = vision_python()
    out = tmp_path_factory.mktemp("resnet50")
    subprocess.run([str(python), "-c", _MAKE_ASSETS, str(out)], check=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def vision_node(stack, redis_client, assets, tmp_path_factory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("model-cache")
    node = NodeFromVenv(["cpu.resnet50"], celery_bin=VISION_VENV / "bin" / "celery", concurrency=1,
                        env={"MARKETPLACE_MODEL_CACHE_DIR": str(cache)})
    try:
        node.wait_ready(redis_client, timeout=180)
        node.cache_dir = cache  # type: ignore[attr-defined]
        yield node
    finally:
        node.stop()
        redis_client.delete(f"marketplace:worker:{node.hostname}")


def _push(stack, weights: Path, version: str) -> str:  # type: ignore[no-untyped-def]
    """`marketplace models push` as an operator runs it (from the vision venv's entry point)."""
    import os

    proc = subprocess.run(
        [str(VISION_VENV / "bin" / "marketplace"), "models", "push", "resnet50", str(weights), "--version", version],
        cwd=ROOT, env={**os.environ, **stack}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _upload(client, user, path: Path) -> str:  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        resp = client.post("/v1/files", data={"file": (fh, path.name)}, headers=user["headers"],
                           content_type="multipart/form-data")
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


def _classify(client, user, files: list[str], version: str) -> list:  # type: ignore[no-untyped-def,type-arg]
    """A resnet50 job of `files` with the weights of `version` on the CPU node: its outputs."""
    resp = client.post("/v1/tasks", json={
        "model": "resnet50", "device": "cpu", "inputs": [{"file": f} for f in files],
        "params": {"version": version, "top_k": 3},
    }, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    doc = wait_for_task(client, user["headers"], task_id, timeout=300)
    assert doc["status"] == "Done", doc
    assert doc["queue"] == "cpu.resnet50"
    outputs = client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"]).get_json()["outputs"]
    assert len(outputs) == len(files)
    for top in outputs:
        assert len(top) == 3
        assert [set(p) for p in top] == [{"label", "index", "score"}] * 3
        assert all(0 <= p["index"] < 1000 and p["label"] == LABELS[p["index"]] for p in top)
        scores = [p["score"] for p in top]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    return outputs


def test_resnet50_answers_with_the_pushed_weights_of_the_jobs_version(  # type: ignore[no-untyped-def]
    stack, client, worker, vision_node, assets,
):
    """Weights whose answer is known: a node that ignored the pushed weights, or served a job
    with another version's, answers something else."""
    from marketplace.infra.storage import get_store
    from marketplace.registry.weights import manifest_key

    golden, tabby = f"golden-{uuid.uuid4().hex[:8]}", f"tabby-{uuid.uuid4().hex[:8]}"
    printed = _push(stack, assets / "golden.pt", golden)
    _push(stack, assets / "tabby.pt", tabby)
    data = (assets / "golden.pt").read_bytes()
    manifest = json.loads(get_store().get_bytes(manifest_key("resnet50", golden)))
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["size"] == len(data)
    assert manifest["sha256"] in printed

    user = register(client)
    files = [_upload(client, user, assets / name) for name in ("red.png", "pattern.png")]
    # Logits: 20 for the winner, 0 for the 999 others, whatever the image. Softmax:
    # e^20 / (e^20 + 999) = 1 / (1 + 999 × e^-20) = 1 / (1 + 999 × 2.061e-9) = 0.99999794 → 0.999998;
    # each other class e^0 / (e^20 + 999) = 2.1e-9 → 0.0.
    assert LABELS[207] == "golden retriever" and LABELS[281] == "tabby"
    for version, (index, label) in ((golden, (207, "golden retriever")), (tabby, (281, "tabby"))):
        for top in _classify(client, user, files, version):
            assert top[0] == {"index": index, "label": label, "score": 0.999998}, (version, top, vision_node.tail(40))
            assert [p["score"] for p in top[1:]] == [0.0, 0.0], (version, top)

    for version in (golden, tabby):
        sha = json.loads(get_store().get_bytes(manifest_key("resnet50", version)))["sha256"]
        cached = list((vision_node.cache_dir / "models" / "resnet50" / version).glob("weights-*.pt"))
        assert len(cached) == 1 and hashlib.sha256(cached[0].read_bytes()).hexdigest() == sha


def test_resnet50_answers_depend_on_the_image(stack, client, worker, vision_node, assets):  # type: ignore[no-untyped-def]
    """With weights that look at the image (random ones), two different images get different answers."""
    version = f"test-{uuid.uuid4().hex[:8]}"
    _push(stack, assets / "weights.pt", version)
    user = register(client)
    files = [_upload(client, user, assets / name) for name in ("red.png", "pattern.png")]
    outputs = _classify(client, user, files, version)
    assert outputs[0] != outputs[1]


def test_resnet50_refuses_weights_whose_sha256_does_not_match(  # type: ignore[no-untyped-def]
    stack, client, worker, vision_node, assets,
):
    from marketplace.infra.storage import get_store
    from marketplace.registry.weights import manifest_key

    version = f"bad-{uuid.uuid4().hex[:8]}"
    _push(stack, assets / "weights.pt", version)
    key = manifest_key("resnet50", version)
    manifest = json.loads(get_store().get_bytes(key))
    manifest["sha256"] = "0" * 64  # the object store now holds something else than was pushed
    get_store().put_bytes(key, json.dumps(manifest).encode(), "application/json")

    user = register(client)
    file_id = _upload(client, user, assets / "red.png")
    resp = client.post("/v1/tasks", json={"model": "resnet50", "device": "cpu", "inputs": [{"file": file_id}],
                                          "params": {"version": version}}, headers=user["headers"])
    doc = wait_for_task(client, user["headers"], resp.get_json()["id"], timeout=300)
    assert doc["status"] == "Failed"
    assert "sha256" in doc["error"] and "0" * 64 in doc["error"], doc


def test_a_file_that_is_not_an_image_fails_naming_it(stack, client, worker, vision_node, assets, tmp_path):  # type: ignore[no-untyped-def]
    version = f"test-{uuid.uuid4().hex[:8]}"
    _push(stack, assets / "weights.pt", version)
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"not an image at all " * 20)
    user = register(client)
    file_id = _upload(client, user, notes)
    resp = client.post("/v1/tasks", json={"model": "resnet50", "device": "cpu", "inputs": [{"file": file_id}],
                                          "params": {"version": version}}, headers=user["headers"])
    doc = wait_for_task(client, user["headers"], resp.get_json()["id"], timeout=300)
    assert doc["status"] == "Failed"
    # PIL's own text named an object's address ("cannot identify image file <_io.BytesIO ...>").
    assert f"item 0: file {file_id} is not an image (no format PIL reads" in doc["error"]
    assert "BytesIO" not in doc["error"]


_COMPARE_PREPROCESS = """
import sys, torch
from PIL import Image
from torchvision import transforms
from workers.executors.resnet50 import ResNet50Executor, _MEAN, _STD
torch.manual_seed(0)
sizes = [(320, 240), (64, 96), (500, 260), (257, 1000)]
images = [Image.fromarray((torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()) for w, h in sizes]
images.append(Image.new("L", (300, 300), 90).convert("RGB"))
reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                transforms.Normalize(_MEAN, _STD)])
ref = torch.stack([reference(img) for img in images])
got = ResNet50Executor().preprocess(images, "cpu")
assert got.shape == ref.shape == (5, 3, 224, 224), (got.shape, ref.shape)
diff = (got - ref).abs()
print(f"max {diff.max().item():.4f} mean {diff.mean().item():.6f}")
# One grey level is 1/255/0.225 = 0.017 after normalizing; antialiasing may differ by a few on edges.
assert diff.mean().item() < 0.01 and diff.max().item() < 0.2, (diff.mean().item(), diff.max().item())
"""


def test_tensor_preprocessing_matches_the_pil_reference_pipeline() -> None:
    """The executor resizes and crops uint8 tensors (on the GPU on a GPU node); it must give what
    torchvision's PIL pipeline gives: upscaled, downscaled, odd aspect and grey images alike."""
    proc = subprocess.run([str(vision_python()), "-c", _COMPARE_PREPROCESS], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("max ")
