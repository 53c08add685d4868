"""The default embedder loads offline from the installed package and returns normalised float32 vectors."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from ehrflow.retrieval.embedder import DEFAULT_MODEL_NAME, Embedder, SentenceTransformerEmbedder, default_model_path


def test_default_model_loads_offline_with_shape_and_normalisation():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    embedder = SentenceTransformerEmbedder()
    assert isinstance(embedder, Embedder)
    assert embedder.name == DEFAULT_MODEL_NAME
    assert embedder.model_path == default_model_path()
    vectors = embedder.encode(["hyperkalemia", "type 2 diabetes mellitus", "metformin 500 mg twice daily"])
    assert vectors.shape == (3, embedder.dim) == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_similar_texts_are_closer_than_unrelated_ones():
    a, b, c = SentenceTransformerEmbedder().encode(["high blood potassium", "hyperkalemia", "broken wrist"])
    assert a @ b > a @ c + 0.2


def test_model_is_loaded_once_per_process():
    first, second = SentenceTransformerEmbedder(), SentenceTransformerEmbedder(model=str(default_model_path()))
    assert first._model() is second._model()


def test_a_model_directory_is_named_by_its_weights(tmp_path):
    """Retrained weights in the same directory get a new name, so indexes built with the old ones are rebuilt."""
    model = tmp_path / "tuned"
    model.mkdir()
    (model / "modules.json").write_text("[]")
    (model / "model.safetensors").write_bytes(b"first weights")
    first = SentenceTransformerEmbedder(model).name
    assert first.startswith("tuned-") and SentenceTransformerEmbedder(model).name == first
    (model / "model.safetensors").write_bytes(b"retrained weights")
    assert SentenceTransformerEmbedder(model).name not in (first, "tuned")


def test_hub_names_and_bad_arguments_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs offline"):
        SentenceTransformerEmbedder("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="backend"):
        SentenceTransformerEmbedder(backend="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of texts"):
        SentenceTransformerEmbedder().encode("one string")  # type: ignore[arg-type]


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="exporting to ONNX needs the onnx package")
def test_onnx_backend_reproduces_torch_vectors(tmp_path):
    texts = ["Hyperkalemia", "elevated serum potassium levels in a patient with chronic kidney disease", "CHF"]
    torch_vectors = SentenceTransformerEmbedder().encode(texts)
    onnx = SentenceTransformerEmbedder(backend="onnx", onnx_cache=tmp_path)
    onnx_vectors = onnx.encode(texts, batch_size=2)  # mixed lengths in one batch exercise the padding mask
    assert onnx.name == DEFAULT_MODEL_NAME and onnx_vectors.dtype == np.float32
    np.testing.assert_allclose(np.sum(torch_vectors * onnx_vectors, axis=1), 1.0, atol=1e-4)
    assert len(list(tmp_path.rglob("model.onnx"))) == 1

    int8 = SentenceTransformerEmbedder(backend="onnx-int8", onnx_cache=tmp_path)
    int8_vectors = int8.encode(texts, batch_size=2)
    assert int8.name == f"{DEFAULT_MODEL_NAME}-int8"  # a different vector space: indexes must not mix them
    assert len(list(tmp_path.rglob("model.int8.onnx"))) == 1 and len(list(tmp_path.rglob("model.onnx"))) == 1
    cosine = np.sum(torch_vectors * int8_vectors, axis=1)
    assert np.all(cosine > 0.8) and not np.allclose(cosine, 1.0, atol=1e-4)  # close to torch, not identical
    similarities = int8_vectors @ int8_vectors.T
    assert similarities[0, 1] > similarities[0, 2]  # hyperkalemia is nearer the potassium sentence than CHF
