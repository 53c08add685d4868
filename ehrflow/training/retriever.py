"""Retriever fine-tuning in DR.EHR's two stages, trained through Ray Train.

A clinician's query names an entity ("myocardial infarction") that the note may write as a synonym, an abbreviation
or only imply. DR.EHR teaches a bi-encoder that gap with (entity, chunk) pairs:

- stage 1 (knowledge): the chunk's KG lexical matches (``QueryExpander.ground``), each giving its name, synonyms
  and parent concepts as queries for that chunk;
- stage 2 (LLM): the LLM lists entities the chunk states or implies (bounded schema, cached by ``ehrflow/llm``).
  The small local model is weak, so every listed entity must ground to a KG node by exact/normalised lookup; the
  rest are dropped and counted in ``PairReport``.

The bi-encoder is fine-tuned with in-batch negatives (MultipleNegativesRanking loss; in-batch items that share the
positive's chunk or query are masked out, since they are not negatives) inside a ``TorchTrainer`` with a checkpoint
per epoch. The final weights are exported as a sentence-transformers directory that
``SentenceTransformerEmbedder(path)`` and ``NoteIndex`` load.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterable
from itertools import zip_longest
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ehrflow.knowledge.graph import KnowledgeGraph, Node
from ehrflow.knowledge.text import casefold_key
from ehrflow.llm.base import LLM, LLMConfig, LLMError
from ehrflow.records.ingest import InputSpec, source_patients
from ehrflow.records.model import Patient
from ehrflow.retrieval.expansion import HIERARCHY_RELATIONS, QueryExpander
from ehrflow.retrieval.notes import patient_chunks
from ehrflow.training.ray_utils import (
    RayTrainConfig,
    average_gradients,
    latest_checkpoint,
    load_state,
    log_progress_in_worker,
    report_epoch,
    run_config,
    scaling_config,
    seed_everything,
    world_rank,
    world_size,
)

log = logging.getLogger(__name__)

PairSource = Literal["name", "synonym", "parent", "llm"]
PAIRS_FILE = "pairs.jsonl"
REPORT_FILE = "ehrflow_retriever.json"
PROGRESS_EVERY = 50
"""Steps between progress lines (an epoch over a KG's synonyms is minutes on a CPU)."""
MAX_QUERY_CHARS = 80
"""Longer KG labels are descriptions rather than how anyone searches."""


class RetrieverDataConfig(BaseModel):
    """Where the notes come from: a ``PatientStore`` (with a cohort filter) or loader inputs."""

    store_url: str | None = None
    cohort: str = ""
    inputs: list[InputSpec] = Field(default_factory=list)
    max_patients: int | None = Field(None, ge=1)
    max_chunks: int | None = Field(5000, ge=1)
    """Chunks sampled (seeded) for pair mining; ``None``: all."""


class PairOptions(BaseModel):
    node_types: tuple[str, ...] = ("disease", "effect/phenotype", "drug")
    max_synonyms: int = Field(3, ge=0)
    max_parents: int = Field(2, ge=0)
    max_pairs_per_chunk: int = Field(6, ge=1)
    llm_stage: bool = True
    llm: LLMConfig = Field(default_factory=LLMConfig)
    llm_max_chunks: int = Field(200, ge=0)
    """Chunks sent to the LLM (stage 2 costs one call per chunk; the local model does a few per second at best)."""
    llm_max_chunk_chars: int = Field(1200, gt=0)
    llm_max_tokens: int = Field(160, gt=0)


class RetrieverOptim(BaseModel):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-5, gt=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    scale: float = Field(20.0, gt=0)
    """Similarity scale of the MultipleNegativesRanking loss (sentence-transformers' default)."""
    max_seq_length: int = Field(128, ge=16)
    max_steps: int | None = Field(None, ge=1)
    seed: int = 0


class BiEncoderTrainConfig(BaseModel):
    """What every bi-encoder fine-tuning run has: the base model, where the export goes, the optimiser and Ray."""

    model_config = ConfigDict(extra="forbid")

    base_model: Path | None = None
    """A local sentence-transformers directory; ``None``: ehrflow's default embedder (all-MiniLM-L6-v2)."""
    output_dir: Path
    overwrite: bool = False
    train: RetrieverOptim = Field(default_factory=RetrieverOptim)
    ray: RayTrainConfig


class RetrieverTrainConfig(BiEncoderTrainConfig):
    """Everything ``train_retriever`` needs (``ehrflow train retriever --config retriever.yaml``)."""

    output_dir: Path = Path(".ehrflow/models/retriever")
    data: RetrieverDataConfig = Field(default_factory=RetrieverDataConfig)
    pairs: PairOptions = Field(default_factory=PairOptions)
    ray: RayTrainConfig = Field(default_factory=lambda: RayTrainConfig(name="retriever", checkpoints_to_keep=1))

    @classmethod
    def from_yaml(cls, path: str | Path) -> RetrieverTrainConfig:
        import yaml

        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        return cls.model_validate(data)


class TrainingPair(BaseModel):
    query: str
    chunk_id: str
    text: str
    source: PairSource
    node_id: str
    group: int | None = None
    """Pairs of one group go into the same batches, as each other's hard negatives; ``None``: random batches."""


class PairReport(BaseModel):
    """What pair mining found, and what the LLM stage gave and lost."""

    chunks: int = 0
    chunks_with_pairs: int = 0
    pairs_by_source: dict[str, int] = Field(default_factory=dict)
    llm_chunks: int = 0
    llm_failed_calls: int = 0
    llm_entities: int = 0
    llm_grounded: int = 0
    """LLM entities that named a KG node (of ``node_types``) and added a new pair."""
    llm_already_known: int = 0
    """LLM entities that grounded to a query stage 1 had already paired with the chunk."""
    llm_dropped: int = 0
    """LLM entities that grounded to no KG node: hallucinated, misspelt or too vague."""

    @property
    def pairs(self) -> int:
        return sum(self.pairs_by_source.values())


class _ChunkEntities(BaseModel):
    """The LLM's answer per chunk: bounded, so a small model terminates."""

    entities: list[Annotated[str, Field(max_length=60)]] = Field(default_factory=list, max_length=8)


# ---------------------------------------------------------------------- pair mining


def sample_chunks(patients: Iterable[Patient], data: RetrieverDataConfig, seed: int) -> list[tuple[str, str]]:
    """(chunk id, text) of the patients' notes, chunked as ``NoteIndex`` does; a seeded sample of ``max_chunks``."""
    chunks: list[tuple[str, str]] = []
    for n, patient in enumerate(patients):
        if data.max_patients is not None and n >= data.max_patients:
            break
        chunks.extend((c.id, c.text) for c in patient_chunks(patient))
    if data.max_chunks is not None and len(chunks) > data.max_chunks:
        chunks = random.Random(seed).sample(chunks, data.max_chunks)
    return chunks


class PairMiner:
    """Builds (entity query, chunk) pairs: KG lexical matches (stage 1), then grounded LLM entities (stage 2)."""

    def __init__(self, kg: KnowledgeGraph, options: PairOptions, llm: LLM | None = None):
        self.kg = kg
        self.options = options
        self.llm = llm
        self.expander = QueryExpander(kg, node_types=options.node_types)

    def knowledge_queries(self, text: str) -> list[tuple[str, PairSource, str]]:
        """(query, source, node id) from the KG nodes named in ``text``: names first, then synonyms, then parents."""
        names, synonyms, parents = [], [], []
        for _, nodes in self.expander.ground(text):
            for node in nodes:
                if not self.kg.names_a_condition(node.id):
                    continue
                names.append((node.name, "name", node.id))
                synonyms.extend((s, "synonym", node.id) for s in node.synonyms[: self.options.max_synonyms])
                if self.options.max_parents:
                    for _, parent in self.kg.neighbors(
                        node.id, relations=HIERARCHY_RELATIONS, direction="out", limit=self.options.max_parents
                    ):
                        parents.append((parent.name, "parent", node.id))
        interleaved = [q for group in zip_longest(names, synonyms, parents) for q in group if q is not None]
        return _unique(interleaved)  # interleaved, so a per-chunk cap keeps some of each kind

    def llm_nodes(self, text: str, report: PairReport) -> list[Node]:
        """KG nodes for the entities the LLM lists for ``text``; ungrounded ones are counted and dropped.

        The prompt deliberately holds no example answer: SmolLM2-135M copies it verbatim, and copied entities
        ground to the KG, so they would pass validation as false pairs.
        """
        assert self.llm is not None
        messages = [
            {"role": "system", "content": "You list clinical entities. Answer with JSON only."},
            {
                "role": "user",
                "content": "List up to 8 diseases, symptoms or drugs that this clinical note excerpt states or "
                "clearly implies (for example, 'stent placed in the LAD' implies coronary artery disease). "
                'Use standard medical names. JSON: {"entities": ["..."]}\n\nExcerpt:\n'
                + text[: self.options.llm_max_chunk_chars],
            },
        ]
        report.llm_chunks += 1
        try:
            answer = self.llm.structured(messages, _ChunkEntities, max_tokens=self.options.llm_max_tokens)
        except LLMError as err:
            report.llm_failed_calls += 1
            log.debug("LLM entity listing failed: %s", err)
            return []
        nodes: list[Node] = []
        for entity in answer.entities:
            report.llm_entities += 1
            matches = self.kg.lexical_lookup(entity, types=self.options.node_types) if entity.strip() else []
            if not matches:
                report.llm_dropped += 1
                continue
            node = next((m.node for m in matches if self.kg.names_a_condition(m.node.id)), None)
            if node is None:
                report.llm_dropped += 1
                continue
            nodes.append(node)
        return nodes

    def mine(self, chunks: list[tuple[str, str]], seed: int = 0) -> tuple[list[TrainingPair], PairReport]:
        report = PairReport(chunks=len(chunks))
        llm_chunks: set[str] = set()
        if self.options.llm_stage and self.llm is not None and self.options.llm_max_chunks:
            ids = [cid for cid, _ in chunks]
            llm_chunks = set(random.Random(seed).sample(ids, min(len(ids), self.options.llm_max_chunks)))
        pairs: list[TrainingPair] = []
        sources: Counter[str] = Counter()
        for chunk_id, text in chunks:
            queries = self.knowledge_queries(text)[: self.options.max_pairs_per_chunk]
            if chunk_id in llm_chunks:
                known = {casefold_key(q) for q, _, _ in queries}
                for node in self.llm_nodes(text, report):
                    if casefold_key(node.name) in known:
                        report.llm_already_known += 1
                        continue
                    known.add(casefold_key(node.name))
                    report.llm_grounded += 1
                    queries.append((node.name, "llm", node.id))
            if queries:
                report.chunks_with_pairs += 1
            for query, source, node_id in queries:
                pairs.append(TrainingPair(query=query, chunk_id=chunk_id, text=text, source=source, node_id=node_id))
                sources[source] += 1
        report.pairs_by_source = dict(sources)
        return pairs, report


def _unique(items: list[tuple[str, PairSource, str]]) -> list[tuple[str, PairSource, str]]:
    seen: set[str] = set()
    out = []
    for query, source, node_id in items:
        key = casefold_key(query)
        if key and key not in seen and len(query) <= MAX_QUERY_CHARS:
            seen.add(key)
            out.append((query, source, node_id))
    return out


# ---------------------------------------------------------------------- training


def in_batch_loss(
    query_vectors: torch.Tensor, chunk_vectors: torch.Tensor, chunk_ids: list[str], queries: list[str], scale: float
) -> torch.Tensor:
    """MultipleNegativesRanking loss: each query's chunk against the batch's other chunks.

    Another item with the same chunk or the same query is a positive too, not a negative: it is masked out.
    """
    q = torch.nn.functional.normalize(query_vectors, dim=-1)
    d = torch.nn.functional.normalize(chunk_vectors, dim=-1)
    scores = scale * q @ d.T
    n = len(chunk_ids)
    keys = [casefold_key(t) for t in queries]
    same = torch.tensor(
        [[i != j and (chunk_ids[i] == chunk_ids[j] or keys[i] == keys[j]) for j in range(n)] for i in range(n)],
        device=scores.device,
    )
    scores = scores.masked_fill(same, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, torch.arange(n, device=scores.device))


def batch_order(pairs: list[dict[str, Any]], rng: random.Random) -> list[int]:
    """One epoch's order of pair indices, cut into batches as it runs: random, or, when the pairs carry groups,
    group after group in random order (members shuffled), so a batch holds whole groups of similar items."""
    if all(p.get("group") is None for p in pairs):
        return rng.sample(range(len(pairs)), len(pairs))
    groups: dict[Any, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.get("group"), []).append(i)
    members = list(groups.values())
    rng.shuffle(members)
    return [i for group in members for i in rng.sample(group, len(group))]


def _encode(model: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.preprocess(texts).items()}
    return model(features)["sentence_embedding"]


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train.torch
    from sentence_transformers import SentenceTransformer

    optim = RetrieverOptim.model_validate_json(loop_config["train"])
    ray_config = RayTrainConfig.model_validate_json(loop_config["ray"])
    rank, size = world_rank(), world_size()
    if rank == 0 and ray_config.num_workers > 0:  # local mode runs in the caller's process: its logging stands
        log_progress_in_worker()
    seed_everything(optim.seed)
    torch.set_num_threads(max(1, int(ray_config.cpus_per_worker)))
    device = ray.train.torch.get_device()
    pairs = [json.loads(line) for line in Path(loop_config["pairs"]).read_text().splitlines()]
    base = SentenceTransformer(loop_config["base_model"], device=str(device), local_files_only=True)
    base.max_seq_length = optim.max_seq_length
    # Not DDP: the pooler gets no gradient, and a step runs the model twice (queries, then texts) before one backward.
    # Plain DDP then fails on its second step; with static_graph a two-process check gave wrong gradients, and
    # find_unused_parameters worked under Ray but failed in the same check. Averaging the gradients after backward
    # matched the mean of each worker's own gradients exactly in that check.
    model = ray.train.torch.prepare_model(base, parallel_strategy=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr)
    steps_per_epoch = math.ceil(math.ceil(len(pairs) / size) / optim.batch_size)
    total_steps = optim.epochs * steps_per_epoch
    if optim.max_steps:
        total_steps = min(total_steps, optim.max_steps)
    warmup = max(1, int(optim.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )
    step = 0
    epoch_losses: list[float] = []  # kept in every checkpoint: local mode has no per-epoch metrics history
    for epoch in range(optim.epochs):
        if step >= total_steps:
            break
        started = time.perf_counter()
        model.train()
        order = batch_order(pairs, random.Random(optim.seed * 1000 + epoch))[rank::size]
        losses: list[float] = []
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            batch = [pairs[i] for i in order[b * optim.batch_size : (b + 1) * optim.batch_size]]
            if len(batch) < 2:  # keep every rank at the same number of collective steps
                batch = [pairs[i] for i in order[: optim.batch_size]]
            queries = [p["query"] for p in batch]
            loss = in_batch_loss(
                _encode(model, queries, device),
                _encode(model, [p["text"] for p in batch], device),
                [p["chunk_id"] for p in batch],
                queries,
                optim.scale,
            )
            optimizer.zero_grad()
            loss.backward()
            if size > 1:
                average_gradients(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            step += 1
            if rank == 0 and step % PROGRESS_EVERY == 0:
                recent = losses[-PROGRESS_EVERY:]
                log.info("bi-encoder step %d/%d: loss %.3f", step, total_steps, sum(recent) / len(recent))
        epoch_losses.append(float(sum(losses) / max(1, len(losses))))
        metrics = {
            "train/loss": epoch_losses[-1],
            "train/steps": float(step),
            "epoch_seconds": time.perf_counter() - started,
        }
        report_epoch(
            metrics,
            epoch=epoch,
            state={"model": model.state_dict()},
            meta={
                "checkpoints_to_keep": ray_config.checkpoints_to_keep,
                "steps": step,
                "train_loss": epoch_losses,
                **loop_config["meta"],
            },
            run_dir=ray_config.run_dir,
            local_mode=ray_config.num_workers == 0,
        )


class BiEncoderFit(BaseModel):
    """What ``fit_bi_encoder`` leaves behind: the exported model, the run and its loss curve."""

    model_dir: Path
    run_dir: Path
    checkpoint: Path
    steps: int
    train_loss: list[float]
    """Mean loss per epoch."""


class RetrieverResult(BiEncoderFit):
    pair_report: PairReport
    wall_seconds: float


def check_outputs(config: BiEncoderTrainConfig) -> None:
    """Refuses to overwrite a model or to start over a run that already has checkpoints (before any slow work)."""
    if (Path(config.output_dir) / "modules.json").exists() and not config.overwrite:
        raise FileExistsError(
            f"{config.output_dir}: a model is already there; set overwrite or choose another output_dir"
        )
    if latest_checkpoint(config.ray.run_dir) is not None:
        raise FileExistsError(f"{config.ray.run_dir}: the run already has checkpoints; choose a new ray.name")


def fit_bi_encoder(pairs: list[TrainingPair], config: BiEncoderTrainConfig, report: dict[str, Any]) -> BiEncoderFit:
    """Fine-tunes a sentence-transformers bi-encoder on (query, text) pairs through Ray Train and exports it.

    Items of a batch that share ``chunk_id`` or query are not negatives of each other (``in_batch_loss``). ``report``
    is saved beside the weights (``ehrflow_retriever.json``) with the loss curve. Callers run ``check_outputs``
    first, before their own slow work.
    """
    from ray.train.torch import TorchTrainer
    from sentence_transformers import SentenceTransformer

    from ehrflow.retrieval.embedder import resolve_model

    if len(pairs) < 2:
        raise ValueError(f"bi-encoder training needs at least 2 pairs, got {len(pairs)}")
    base = resolve_model(config.base_model)[0]
    output_dir, train, ray = Path(config.output_dir), config.train, config.ray
    run_dir = ray.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    pairs_path = run_dir / PAIRS_FILE
    pairs_path.write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "train": train.model_dump_json(),
            "ray": ray.model_dump_json(),
            "pairs": str(pairs_path),
            "base_model": str(base),
            "meta": {"base_model": str(base), **report},
        },
        scaling_config=scaling_config(ray),
        run_config=run_config(ray),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training finished without a checkpoint")
    checkpoint = Path(result.checkpoint.path)
    state, saved = load_state(checkpoint)
    model = SentenceTransformer(str(base), device="cpu", local_files_only=True)
    model.load_state_dict(state["model"])
    model.max_seq_length = max(model.max_seq_length or 0, train.max_seq_length)
    model.save(str(output_dir))
    losses = [float(x) for x in saved["train_loss"]]
    summary = {"base_model": str(base), **report, "steps": saved.get("steps"), "train_loss": losses}
    (output_dir / REPORT_FILE).write_text(json.dumps(summary, indent=2))
    return BiEncoderFit(
        model_dir=output_dir.resolve(),
        run_dir=run_dir,
        checkpoint=checkpoint,
        steps=int(saved.get("steps", 0)),
        train_loss=losses,
    )


def train_retriever(
    config: RetrieverTrainConfig,
    patients: Iterable[Patient] | None = None,
    *,
    kg: KnowledgeGraph | None = None,
    llm: LLM | None = None,
) -> RetrieverResult:
    """Mine pairs, fine-tune through Ray Train, export a sentence-transformers directory to ``config.output_dir``.

    ``patients`` default to ``config.data``; ``kg`` to the KG shipped with ehrflow; ``llm`` to
    ``build_llm(config.pairs.llm)`` when ``config.pairs.llm_stage`` is on.
    """
    started = time.perf_counter()
    check_outputs(config)
    if kg is None:
        kg = KnowledgeGraph.default()
    if llm is None and config.pairs.llm_stage and config.pairs.llm_max_chunks:
        from ehrflow.llm import build_llm

        llm = build_llm(config.pairs.llm)
    chunks = sample_chunks(
        patients
        if patients is not None
        else source_patients(config.data.store_url, config.data.cohort, config.data.inputs),
        config.data,
        0,
    )
    if not chunks:
        raise ValueError("retriever training: the patients have no note text to train on")
    pairs, report = PairMiner(kg, config.pairs, llm if config.pairs.llm_stage else None).mine(chunks)
    log.info("retriever pairs: %s from %d chunks", report.pairs_by_source, report.chunks)
    if len(pairs) < 2:
        raise ValueError(f"retriever training: only {len(pairs)} (entity, chunk) pairs from {len(chunks)} chunks")
    fit = fit_bi_encoder(pairs, config, {"pair_report": report.model_dump()})
    return RetrieverResult(**fit.model_dump(), pair_report=report, wall_seconds=time.perf_counter() - started)


__all__ = [
    "BiEncoderFit",
    "BiEncoderTrainConfig",
    "PairMiner",
    "PairOptions",
    "PairReport",
    "RetrieverDataConfig",
    "RetrieverOptim",
    "RetrieverResult",
    "RetrieverTrainConfig",
    "TrainingPair",
    "batch_order",
    "check_outputs",
    "fit_bi_encoder",
    "in_batch_loss",
    "sample_chunks",
    "train_retriever",
]
