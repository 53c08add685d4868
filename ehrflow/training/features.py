"""Featurisation of ICU/hospital stays for the fusion models.

One *stay* is one admission. Its first ``hours`` (from the first ICU stay's intime, else the
admit time) are cut into ``bin_hours`` bins; per variable and bin we keep the mean value and an
observed mask, and derive the time since the last observation. Per-variable summary statistics
(min, max, mean, first, last, count) and static descriptors come alongside; note and
workflow-summary texts become frozen-encoder embeddings, cached on disk.

Everything learned from data (the variable list, clip bounds, means and standard deviations,
categorical levels) is fitted on the training split only and kept in a ``Normalizer`` that is
saved with the checkpoint, so evaluation featurises exactly as training did.

Bad input is counted in a ``FeatureReport``, never silently absorbed: stays without
measurements, non-finite or non-numeric values, variables never observed in training.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel, Field

from ehrflow.records.model import Admission, Measurements, Patient

log = logging.getLogger(__name__)

STAT_NAMES = ("min", "max", "mean", "first", "last", "count")
TASKS = ("mortality", "readmission", "phenotypes")

DEFAULT_PHENOTYPES: dict[str, list[str]] = {
    "sepsis": ["ICD9CM:038", "ICD9CM:99591", "ICD9CM:99592", "ICD9CM:78552", "ICD10CM:A40", "ICD10CM:A41"],
    "acute_kidney_failure": ["ICD9CM:584", "ICD10CM:N17"],
    "chronic_kidney_disease": ["ICD9CM:585", "ICD10CM:N18"],
    "heart_failure": ["ICD9CM:428", "ICD10CM:I50"],
    "hypertension": ["ICD9CM:401", "ICD9CM:402", "ICD9CM:403", "ICD9CM:404", "ICD9CM:405", "ICD10CM:I1"],
    "diabetes": ["ICD9CM:249", "ICD9CM:250", "ICD10CM:E08", "ICD10CM:E09", "ICD10CM:E10", "ICD10CM:E11"],
    "respiratory_failure": ["ICD9CM:51881", "ICD9CM:51882", "ICD9CM:51884", "ICD10CM:J96"],
    "pneumonia": ["ICD9CM:480", "ICD9CM:481", "ICD9CM:482", "ICD9CM:483", "ICD9CM:485", "ICD9CM:486", "ICD10CM:J1"],
    "cardiac_dysrhythmia": ["ICD9CM:427", "ICD10CM:I47", "ICD10CM:I48", "ICD10CM:I49"],
    "coronary_artery_disease": ["ICD9CM:410", "ICD9CM:411", "ICD9CM:412", "ICD9CM:413", "ICD9CM:414", "ICD10CM:I2"],
}
"""Ten frequent ICU diagnosis groups as ``SYSTEM:code-prefix`` lists (dots removed before matching),
in the spirit of the MIMIC benchmark phenotypes."""


class FeatureConfig(BaseModel):
    """How stays become tensors. Everything left ``None`` is chosen from the training split."""

    hours: float = Field(48.0, gt=0)
    bin_hours: float = Field(1.0, gt=0)
    variables: list[str] | None = None
    """Time-series variables, in order; ``None``: those observed in at least ``min_variable_fraction``
    of training stays (at most ``max_variables``, most frequent first)."""
    min_variable_fraction: float = Field(0.01, ge=0, le=1)
    max_variables: int = Field(128, ge=1)
    static_keys: list[str] | None = None
    """Numeric ``Admission.static`` keys; ``None``: every numeric key seen in training."""
    categorical_static: list[str] = Field(default_factory=lambda: ["ICUType"])
    static_exclude: list[str] = Field(default_factory=lambda: ["SAPS-I", "SOFA"])
    """PhysioNet's SAPS-I and SOFA come from the outcomes file; the Raindrop protocol leaves them out."""
    clip_quantiles: tuple[float, float] = (0.005, 0.995)
    drop_empty_stays: bool = True
    """Stays with no measurement in the window are left out (counted in the report)."""
    notes_within_window: bool = True
    """Only notes written before the window ends (no discharge summaries leaking the outcome)."""
    include_untimed_notes: bool = False
    note_chunk_words: int = Field(200, ge=8)
    phenotype_groups: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_PHENOTYPES))

    @property
    def n_bins(self) -> int:
        return math.ceil(self.hours / self.bin_hours)


class FeatureReport(BaseModel):
    """Counts of everything featurisation left out or could not use."""

    stays_seen: int = 0
    stays_kept: int = 0
    stays_without_measurements: int = 0
    stays_dropped_empty: int = 0
    values_used: int = 0
    values_nonfinite: int = 0
    values_non_numeric: int = 0
    values_outside_window: int = 0
    values_of_unused_variables: int = 0
    static_nonfinite: int = 0
    variables_never_observed_in_training: list[str] = Field(default_factory=list)
    notes_used: int = 0
    notes_after_window: int = 0
    notes_untimed_skipped: int = 0
    stays_with_notes: int = 0
    stays_with_summary: int = 0
    labels_known: dict[str, int] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)

    def warn(self, message: str) -> None:
        log.warning("features: %s", message)
        self.warnings.append(message)


@dataclass
class StayRecord:
    """One stay, reduced to what featurisation needs (times in hours since the window start)."""

    stay_id: str
    patient_id: str
    times: np.ndarray
    variables: np.ndarray
    values: np.ndarray
    age: float | None
    sex: str
    static: dict[str, float | str | None]
    note_texts: list[str]
    summary_text: str | None
    mortality: bool | None
    readmission: bool | None
    phenotypes: np.ndarray | None
    """Multi-hot over the configured groups; None when the stay has no diagnosis codes."""


def _window_start(adm: Admission) -> dt.datetime | None:
    intimes = [s.intime for s in adm.icu_stays if s.intime is not None]
    return min(intimes) if intimes else adm.admit_time


def _phenotype_vector(adm: Admission, groups: Mapping[str, list[str]]) -> np.ndarray | None:
    if not adm.diagnoses:
        return None
    codes = [f"{c.system}:{c.code.replace('.', '').upper()}" for c in adm.diagnoses]
    return np.array(
        [
            any(code.startswith(prefix.replace(".", "").upper()) for code in codes for prefix in prefixes)
            for prefixes in groups.values()
        ],
        dtype=np.float32,
    )


def extract_stays(
    patients: Iterable[Patient],
    config: FeatureConfig,
    report: FeatureReport,
    summaries: Mapping[str, str] | None = None,
) -> list[StayRecord]:
    """One ``StayRecord`` per inpatient admission; ``summaries`` is keyed by admission or patient id."""
    summaries = summaries or {}
    records: list[StayRecord] = []
    horizon = config.hours
    for patient in patients:
        for adm in patient.admissions:
            if not adm.inpatient:
                continue
            report.stays_seen += 1
            start = _window_start(adm)
            times: list[float] = []
            names: list[str] = []
            values: list[float] = []
            measurements = Measurements.of(adm.measurements)  # read as columns: no item objects built
            for time, variable, value in zip(
                measurements.column("time"), measurements.column("variable"), measurements.column("value"), strict=True
            ):
                if value is None:
                    report.values_non_numeric += 1
                    continue
                if not math.isfinite(value):
                    report.values_nonfinite += 1
                    continue
                offset = (time - start).total_seconds() / 3600 if start is not None else math.nan
                if not (0 <= offset <= horizon):  # PhysioNet's "first 48 h" includes 48:00
                    report.values_outside_window += 1
                    continue
                times.append(offset)
                names.append(variable)
                values.append(value)
            if not values:
                report.stays_without_measurements += 1
            window_end = start + dt.timedelta(hours=horizon) if start is not None else None
            note_texts = []
            for note in [*adm.notes, *patient.notes]:
                if note.time is None and not config.include_untimed_notes:
                    report.notes_untimed_skipped += 1
                    continue
                if (
                    config.notes_within_window
                    and note.time is not None
                    and (window_end is None or note.time >= window_end)
                ):
                    report.notes_after_window += 1
                    continue
                if note.text.strip():
                    note_texts.append(note.text)
            summary = summaries.get(adm.id) or summaries.get(patient.id)
            records.append(
                StayRecord(
                    stay_id=adm.id,
                    patient_id=patient.id,
                    times=np.asarray(times, dtype=np.float64),
                    variables=np.asarray(names, dtype=object),
                    values=np.asarray(values, dtype=np.float64),
                    age=patient.age,
                    sex=patient.sex,
                    static=dict(adm.static),
                    note_texts=note_texts,
                    summary_text=summary if summary and summary.strip() else None,
                    mortality=adm.outcomes.in_hospital_death,
                    readmission=adm.outcomes.readmission_30d,
                    phenotypes=_phenotype_vector(adm, config.phenotype_groups),
                )
            )
    return records


class Normalizer(BaseModel):
    """Everything featurisation learned from the training split; saved with the checkpoint."""

    config: FeatureConfig
    variables: list[str]
    clip_low: list[float]
    clip_high: list[float]
    mean: list[float]
    std: list[float]
    never_observed: list[str] = Field(default_factory=list)
    static_numeric: list[str]
    static_mean: list[float]
    static_std: list[float]
    static_categories: dict[str, list[str]]

    @property
    def static_columns(self) -> list[str]:
        cols = ["sex=F", "sex=M"]
        for key in self.static_numeric:
            cols += [key, f"{key}:missing"]
        for key, levels in self.static_categories.items():
            cols += [f"{key}={level}" for level in levels]
        return cols

    @property
    def stat_columns(self) -> list[str]:
        return [f"{v}:{s}" for v in self.variables for s in STAT_NAMES]

    @classmethod
    def fit(cls, records: Sequence[StayRecord], config: FeatureConfig, report: FeatureReport) -> Normalizer:
        if not records:
            raise ValueError("cannot fit featurisation on an empty training split")
        stays_per_variable: Counter[str] = Counter()
        for rec in records:
            stays_per_variable.update(set(rec.variables.tolist()))
        if config.variables is not None:
            variables = list(config.variables)
            never = [v for v in variables if stays_per_variable[v] == 0]
            if never:
                report.warn(
                    f"{len(never)} configured variable(s) never observed in the training split "
                    f"(their inputs stay masked): {', '.join(never[:10])}"
                )
        else:
            threshold = config.min_variable_fraction * len(records)
            ranked = sorted(stays_per_variable.items(), key=lambda kv: (-kv[1], kv[0]))
            variables = [v for v, n in ranked if n >= threshold and n > 0][: config.max_variables]
            never = []
            if not variables:
                raise ValueError("no time-series variable is observed in the training split")
        report.variables_never_observed_in_training = never
        index = {v: i for i, v in enumerate(variables)}
        per_var: list[list[np.ndarray]] = [[] for _ in variables]
        for rec in records:
            for name in set(rec.variables.tolist()):
                if name in index:
                    per_var[index[name]].append(rec.values[rec.variables == name])
        lows, highs, means, stds = [], [], [], []
        q_low, q_high = config.clip_quantiles
        for chunks in per_var:
            if not chunks:
                lows.append(0.0), highs.append(0.0), means.append(0.0), stds.append(1.0)
                continue
            vals = np.concatenate(chunks)
            lo, hi = np.quantile(vals, [q_low, q_high])
            clipped = np.clip(vals, lo, hi)
            sd = float(clipped.std())
            lows.append(float(lo)), highs.append(float(hi)), means.append(float(clipped.mean()))
            stds.append(sd if sd > 1e-8 else 1.0)

        excluded = set(config.static_exclude)
        categorical = [k for k in config.categorical_static if k not in excluded]
        if config.static_keys is not None:
            numeric_keys = [k for k in config.static_keys if k not in categorical and k not in excluded]
        else:
            seen = {k for rec in records for k, v in rec.static.items() if isinstance(v, int | float)}
            numeric_keys = sorted(seen - excluded - set(categorical))
        numeric_keys = ["age", *[k for k in numeric_keys if k != "age"]]
        columns: dict[str, list[float]] = {k: [] for k in numeric_keys}
        categories: dict[str, set[str]] = {k: set() for k in categorical}
        for rec in records:
            for key in numeric_keys:
                value = rec.age if key == "age" else rec.static.get(key)
                if isinstance(value, int | float) and math.isfinite(value):
                    columns[key].append(float(value))
            for key in categorical:
                if rec.static.get(key) is not None:
                    categories[key].add(_category_label(rec.static[key]))
        static_mean = [float(np.mean(columns[k])) if columns[k] else 0.0 for k in numeric_keys]
        static_std = [float(np.std(columns[k])) if len(columns[k]) > 1 else 1.0 for k in numeric_keys]
        return cls(
            config=config,
            variables=variables,
            clip_low=lows,
            clip_high=highs,
            mean=means,
            std=[s if s > 1e-8 else 1.0 for s in stds],
            never_observed=never,
            static_numeric=numeric_keys,
            static_mean=static_mean,
            static_std=[s if s > 1e-8 else 1.0 for s in static_std],
            static_categories={k: sorted(v) for k, v in categories.items()},
        )

    def transform(
        self,
        records: Sequence[StayRecord],
        report: FeatureReport,
        text_encoder: TextEncoder | None = None,
    ) -> FeatureSet:
        """Tensors for ``records``; stays without measurements are dropped when the config says so."""
        cfg = self.config
        if cfg.drop_empty_stays:
            kept = [r for r in records if r.values.size]
            report.stays_dropped_empty += len(records) - len(kept)
            records = kept
        n, t, v = len(records), cfg.n_bins, len(self.variables)
        index = {name: i for i, name in enumerate(self.variables)}
        lo, hi = np.asarray(self.clip_low), np.asarray(self.clip_high)
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        values = np.zeros((n, t, v), dtype=np.float32)
        mask = np.zeros((n, t, v), dtype=bool)
        stats = np.full((n, v, len(STAT_NAMES)), np.nan, dtype=np.float32)
        static = np.zeros((n, len(self.static_columns)), dtype=np.float32)
        for row, rec in enumerate(records):
            var_idx = np.fromiter(
                (index.get(name, -1) for name in rec.variables), dtype=np.int64, count=rec.variables.size
            )
            used = var_idx >= 0
            report.values_of_unused_variables += int((~used).sum())
            report.values_used += int(used.sum())
            if used.any():
                vi, times = var_idx[used], rec.times[used]
                z = (np.clip(rec.values[used], lo[vi], hi[vi]) - mean[vi]) / std[vi]
                bins = np.minimum((times / cfg.bin_hours).astype(np.int64), t - 1)
                sums = np.zeros((t, v))
                counts = np.zeros((t, v))
                np.add.at(sums, (bins, vi), z)
                np.add.at(counts, (bins, vi), 1)
                observed = counts > 0
                values[row][observed] = (sums[observed] / counts[observed]).astype(np.float32)
                mask[row] = observed
                stats[row] = _summary_stats(vi, times, z, v)
            static[row] = self._static_row(rec, report)
        if text_encoder is not None:
            notes, notes_mask = _note_embeddings(records, text_encoder, cfg.note_chunk_words, report)
            summaries, summary_mask = _summary_embeddings(records, text_encoder, report)
        else:
            notes = summaries = np.zeros((n, 0), dtype=np.float32)
            notes_mask = summary_mask = np.zeros(n, dtype=bool)
        labels, label_mask = _labels(records, len(cfg.phenotype_groups))
        for task in TASKS:
            report.labels_known[task] = report.labels_known.get(task, 0) + int(label_mask[task].sum())
        report.stays_kept += n
        return FeatureSet(
            stay_ids=np.asarray([r.stay_id for r in records], dtype=object),
            patient_ids=np.asarray([r.patient_id for r in records], dtype=object),
            values=values,
            mask=mask,
            stats=stats.reshape(n, v * len(STAT_NAMES)),
            static=static,
            notes=notes,
            notes_mask=notes_mask,
            summary=summaries,
            summary_mask=summary_mask,
            mortality=labels["mortality"],
            mortality_mask=label_mask["mortality"],
            readmission=labels["readmission"],
            readmission_mask=label_mask["readmission"],
            phenotypes=labels["phenotypes"],
            phenotypes_mask=label_mask["phenotypes"],
        )

    def _static_row(self, rec: StayRecord, report: FeatureReport) -> np.ndarray:
        row = [float(rec.sex == "F"), float(rec.sex == "M")]
        for key, mu, sd in zip(self.static_numeric, self.static_mean, self.static_std, strict=True):
            value = rec.age if key == "age" else rec.static.get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                report.static_nonfinite += 1
                value = None
            if isinstance(value, int | float):
                row += [(float(value) - mu) / sd, 0.0]
            else:
                row += [0.0, 1.0]
        for key, levels in self.static_categories.items():
            raw = rec.static.get(key)
            label = _category_label(raw) if raw is not None else None
            row += [float(label == level) for level in levels]
        return np.asarray(row, dtype=np.float32)


def _category_label(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _summary_stats(vi: np.ndarray, times: np.ndarray, z: np.ndarray, n_vars: int) -> np.ndarray:
    """(variables, STAT_NAMES) in z-space; NaN where a variable was not observed (count 0)."""
    out = np.full((n_vars, len(STAT_NAMES)), np.nan, dtype=np.float32)
    out[:, 5] = 0
    order = np.lexsort((times, vi))
    vi, z = vi[order], z[order]
    starts = np.flatnonzero(np.r_[True, vi[1:] != vi[:-1]])
    ends = np.r_[starts[1:], vi.size]
    var = vi[starts]
    out[var, 0] = np.minimum.reduceat(z, starts)
    out[var, 1] = np.maximum.reduceat(z, starts)
    out[var, 2] = np.add.reduceat(z, starts) / (ends - starts)
    out[var, 3] = z[starts]
    out[var, 4] = z[ends - 1]
    out[var, 5] = ends - starts
    return out


def _labels(records: Sequence[StayRecord], n_phenotypes: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    n = len(records)
    labels = {
        "mortality": np.array([bool(r.mortality) for r in records], dtype=np.float32),
        "readmission": np.array([bool(r.readmission) for r in records], dtype=np.float32),
        "phenotypes": np.zeros((n, n_phenotypes), dtype=np.float32),
    }
    masks = {
        "mortality": np.array([r.mortality is not None for r in records], dtype=bool),
        "readmission": np.array([r.readmission is not None for r in records], dtype=bool),
        "phenotypes": np.array([r.phenotypes is not None for r in records], dtype=bool),
    }
    for i, rec in enumerate(records):
        if rec.phenotypes is not None:
            labels["phenotypes"][i] = rec.phenotypes
    return labels, masks


@dataclass
class FeatureSet:
    """Arrays for ``n`` stays: time series (n, bins, variables), statistics, static, text, labels and masks."""

    stay_ids: np.ndarray
    patient_ids: np.ndarray
    values: np.ndarray
    mask: np.ndarray
    stats: np.ndarray
    static: np.ndarray
    notes: np.ndarray
    notes_mask: np.ndarray
    summary: np.ndarray
    summary_mask: np.ndarray
    mortality: np.ndarray
    mortality_mask: np.ndarray
    readmission: np.ndarray
    readmission_mask: np.ndarray
    phenotypes: np.ndarray
    phenotypes_mask: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.stay_ids)

    def subset(self, index: np.ndarray) -> FeatureSet:
        kwargs = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "extras"}
        return FeatureSet(**kwargs)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}
        arrays["stay_ids"] = arrays["stay_ids"].astype(str)
        arrays["patient_ids"] = arrays["patient_ids"].astype(str)
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        with np.load(path, allow_pickle=False) as data:
            kwargs = {f.name: data[f.name] for f in fields(cls) if f.name != "extras"}
        return cls(**kwargs)

    def time_since_last(self, bin_hours: float) -> np.ndarray:
        """Hours since each variable was last observed, at each bin (GRU-D's delta; 0 where observed).

        Before the first observation it counts from the window start.
        """
        n, t, v = self.mask.shape
        delta = np.zeros((n, t, v), dtype=np.float32)
        for step in range(1, t):
            delta[:, step] = np.where(self.mask[:, step - 1], bin_hours, delta[:, step - 1] + bin_hours)
        return delta

    def last_observed(self) -> np.ndarray:
        """Forward-filled values (0, the training mean in z-space, before the first observation)."""
        last = np.zeros_like(self.values)
        current = np.zeros(self.values[:, 0].shape, dtype=self.values.dtype)
        for step in range(self.values.shape[1]):
            current = np.where(self.mask[:, step], self.values[:, step], current)
            last[:, step] = current
        return last


# ---------------------------------------------------------------- text embeddings


class TextEncoder(Protocol):
    """A frozen sentence encoder: texts -> (n, dim) float array."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


class CachedTextEncoder:
    """Wraps a ``TextEncoder`` with an on-disk cache keyed by (model id, sha256 of the text).

    One ``.npy`` per text, written atomically, so concurrent workers can share the cache.
    """

    def __init__(self, encoder: TextEncoder, model_id: str, cache_dir: str | Path | None):
        self.encoder = encoder
        self.model_id = model_id
        self.cache_dir = Path(cache_dir) / _SLUG.sub("_", model_id) if cache_dir is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, text: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"{self.model_id}\0{text}".encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.npy"

    def encode(self, texts: list[str]) -> np.ndarray:
        out: list[np.ndarray | None] = [None] * len(texts)
        todo: list[int] = []
        for i, text in enumerate(texts):
            path = self._path(text)
            if path is not None and path.is_file():
                out[i] = np.load(path)
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            self.misses += len(todo)
            encoded = np.asarray(self.encoder.encode([texts[i] for i in todo]), dtype=np.float32)
            if encoded.shape[0] != len(todo) or not np.isfinite(encoded).all():
                raise ValueError(f"text encoder {self.model_id!r} returned a bad array of shape {encoded.shape}")
            for i, vector in zip(todo, encoded, strict=True):
                out[i] = vector
                path = self._path(texts[i])
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
                    np.save(tmp, vector)
                    tmp.replace(path)
        return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)  # type: ignore[arg-type]


def load_text_encoder(model: str | Path | None = None, cache_dir: str | Path | None = None) -> CachedTextEncoder:
    """ehrflow's embedder (``model=None``: the packaged all-MiniLM-L6-v2), or any local sentence-transformers directory."""
    from ehrflow.retrieval.embedder import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(model)
    return CachedTextEncoder(embedder, embedder.name, cache_dir)


def _chunks(text: str, words: int) -> list[str]:
    tokens = text.split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)] or [text]


def _note_embeddings(
    records: Sequence[StayRecord], encoder: TextEncoder, chunk_words: int, report: FeatureReport
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of chunk embeddings over all a stay's notes (the encoder truncates long inputs otherwise)."""
    owners: list[int] = []
    texts: list[str] = []
    for row, rec in enumerate(records):
        for note in rec.note_texts:
            report.notes_used += 1
            for chunk in _chunks(note, chunk_words):
                owners.append(row)
                texts.append(chunk)
    return _pool(len(records), owners, encoder.encode(texts) if texts else None, report, "stays_with_notes")


def _summary_embeddings(
    records: Sequence[StayRecord], encoder: TextEncoder, report: FeatureReport
) -> tuple[np.ndarray, np.ndarray]:
    owners = [row for row, rec in enumerate(records) if rec.summary_text]
    texts = [records[row].summary_text or "" for row in owners]
    return _pool(len(records), owners, encoder.encode(texts) if texts else None, report, "stays_with_summary")


def _pool(
    n: int, owners: list[int], vectors: np.ndarray | None, report: FeatureReport, counter: str
) -> tuple[np.ndarray, np.ndarray]:
    if vectors is None:
        return np.zeros((n, 0), dtype=np.float32), np.zeros(n, dtype=bool)
    out = np.zeros((n, vectors.shape[1]), dtype=np.float32)
    counts = np.zeros(n)
    np.add.at(out, np.asarray(owners), vectors)
    np.add.at(counts, np.asarray(owners), 1)
    present = counts > 0
    out[present] /= counts[present, None]
    setattr(report, counter, getattr(report, counter) + int(present.sum()))
    return out, present


TRAJECTORY_STAT_NAMES = (
    "std",
    "mean_first_half",
    "mean_second_half",
    "mean_last_quarter",
    "slope_per_bin",
    "bins_since_last",
    "bins_observed",
)


def trajectory_stats(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per variable, ``TRAJECTORY_STAT_NAMES`` over the observed bins of (n, bins, variables) series: the
    columns are grouped by statistic, one column per variable in each group."""
    v = values.astype(np.float64)
    n_bins = v.shape[1]
    bins = np.arange(n_bins, dtype=np.float64)[None, :, None]

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator > 0)

    def mean_over(window: slice) -> np.ndarray:
        return ratio(np.where(mask[:, window], v[:, window], 0.0).sum(1), mask[:, window].sum(1))

    count = mask.sum(1).astype(np.float64)
    centred = np.where(mask, v - ratio(np.where(mask, v, 0.0).sum(1), count)[:, None, :], 0.0)
    bin_centred = np.where(mask, bins - ratio(np.where(mask, bins, 0.0).sum(1), count)[:, None, :], 0.0)
    last_bin = np.where(mask, bins, -1.0).max(1)
    return np.hstack(
        [
            np.sqrt(ratio((centred**2).sum(1), count)),
            mean_over(slice(0, n_bins // 2)),
            mean_over(slice(n_bins // 2, None)),
            mean_over(slice(n_bins - n_bins // 4, None)),
            ratio((bin_centred * centred).sum(1), (bin_centred**2).sum(1)),
            np.where(count > 0, n_bins - 1 - last_bin, np.nan),
            count,
        ]
    )


__all__ = [
    "DEFAULT_PHENOTYPES",
    "STAT_NAMES",
    "TASKS",
    "TRAJECTORY_STAT_NAMES",
    "CachedTextEncoder",
    "FeatureConfig",
    "FeatureReport",
    "FeatureSet",
    "Normalizer",
    "StayRecord",
    "TextEncoder",
    "extract_stays",
    "load_text_encoder",
    "trajectory_stats",
]
