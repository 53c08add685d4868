"""Medication-recommendation datasets: visits of (diagnoses, procedures, drug set) per patient.

Built from the ``PatientStore`` the way the GAMENet/SafeDrug preprocessing builds its MIMIC-III
benchmark (drugs NDC -> RxCUI -> ATC-4 -> ATC-3, top-K code filters, patients with at least two
visits, visits in admission order), or imported from that lineage's pickles. The mapping files
are research reference data (WHO ATC is non-commercial): they are read from a user-given folder
at run time and never bundled.

A dataset is saved as gzipped JSON plus ``.npy`` matrices: no pickle, so a saved dataset can be
shared and reloaded without trusting it.
"""

from __future__ import annotations

import ast
import csv
import datetime as dt
import functools
import gzip
import hashlib
import json
import logging
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field

from ehrflow.records.errors import RecordError
from ehrflow.records.model import Admission, Code, MedicationOrder, Note, Patient
from ehrflow.records.store import CohortFilter, PatientStore

if TYPE_CHECKING:
    from ehrflow.knowledge.molecules import MoleculeGraphs

log = logging.getLogger(__name__)

PAD, OOV = "<pad>", "<oov>"
"""Input vocabularies reserve index 0 for padding and 1 for codes outside the top-K (the OOV bucket)."""

Visit = tuple[list[int], list[int], list[int]]
"""(diagnosis ids, procedure ids, medication ids) of one admission."""


# --------------------------------------------------------------------------- drug normalisation


def ndc11(raw: str | None) -> str | None:
    """Normalise an NDC to the 11-digit 5-4-2 form the mapping tables key on (``None`` if not an NDC)."""
    if raw is None:
        return None
    text = raw.strip()
    if text.endswith(".0"):  # NDCs read through a float column
        text = text[:-2]
    if "-" in text:
        parts = text.split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        widths = tuple(len(p) for p in parts)
        padded = {(4, 4, 2): (5, 4, 2), (5, 3, 2): (5, 4, 2), (5, 4, 1): (5, 4, 2), (5, 4, 2): (5, 4, 2)}
        if widths not in padded:
            return None
        return "".join(p.zfill(w) for p, w in zip(parts, padded[widths], strict=True))
    if not text.isdigit() or int(text) == 0:  # MIMIC writes "0" for "no NDC"
        return None
    return text.zfill(11) if len(text) <= 11 else None


class DrugMapper:
    """NDC -> RxCUI -> ATC-4 -> ATC-3, from the GAMENet/SafeDrug mapping files.

    ``ndc2RXCUI.txt`` is a Python dict literal (read with ``ast.literal_eval``, never ``eval``);
    ``ndc2atc_level4.zip`` holds ``YEAR,MONTH,NDC,RXCUI,ATC5`` rows whose ATC column is ATC level 4
    (five characters) despite its name; like SafeDrug, the first row per RxCUI wins.
    """

    def __init__(self, ndc_to_rxcui: dict[str, str], rxcui_to_atc4: dict[str, str], ndc_to_atc4: dict[str, str]):
        self.ndc_to_rxcui = ndc_to_rxcui
        self.rxcui_to_atc4 = rxcui_to_atc4
        self.ndc_to_atc4 = ndc_to_atc4

    @classmethod
    def from_dir(cls, mapping_dir: str | Path) -> DrugMapper:
        """Read (once per process and folder) the two mapping files."""
        return _mapper_cached(str(Path(mapping_dir).resolve()))

    @classmethod
    def _read(cls, mapping_dir: Path) -> DrugMapper:
        ndc_path = mapping_dir / "ndc2RXCUI.txt"
        zip_path = mapping_dir / "ndc2atc_level4.zip"
        for p in (ndc_path, zip_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: drug mapping file not found (see the medrec data PROVENANCE)")
        try:
            raw = ast.literal_eval(ndc_path.read_text())
        except (SyntaxError, ValueError) as exc:
            raise RecordError(
                ndc_path, getattr(exc, "lineno", None), None, f"not a Python dict literal: {exc}"
            ) from exc
        if not isinstance(raw, dict):
            raise RecordError(ndc_path, 1, None, f"expected a dict literal, got {type(raw).__name__}")
        ndc_to_rxcui = {n: str(r) for k, r in raw.items() if (n := ndc11(str(k))) and str(r).strip()}
        import pandas as pd

        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".csv")]
            if not names:
                raise RecordError(zip_path, None, None, "archive holds no .csv table")
            with zf.open(names[0]) as fh:
                table = pd.read_csv(fh, dtype=str, keep_default_na=False)
        atc_col = next((c for c in table.columns if c.upper().startswith("ATC")), None)
        if atc_col is None or "RXCUI" not in table.columns:
            raise RecordError(zip_path, 1, "header", f"expected RXCUI and ATC columns, got {list(table.columns)}")
        table = table[table[atc_col].str.strip().str.len() >= 4]
        by_rxcui = table[table["RXCUI"].str.strip() != ""].drop_duplicates("RXCUI")  # first row per RxCUI wins
        rxcui_to_atc4 = dict(zip(by_rxcui["RXCUI"].str.strip(), by_rxcui[atc_col].str.strip(), strict=True))
        ndc_to_atc4: dict[str, str] = {}
        if "NDC" in table.columns:  # vectorised ``ndc11`` for the dashed 4-4-2 / 5-3-2 / 5-4-1 forms
            parts = table["NDC"].str.strip().str.split("-", expand=True)
            if parts.shape[1] == 3:
                p0, p1, p2 = (parts[i].fillna("") for i in range(3))
                ok = (
                    (p0 + p1 + p2).str.fullmatch(r"\d{10}")
                    & p0.str.len().between(4, 5)
                    & p1.str.len().between(3, 4)
                    & p2.str.len().between(1, 2)
                )
                ndcs = (p0.str.zfill(5) + p1.str.zfill(4) + p2.str.zfill(2))[ok]
                atcs = table[atc_col].str.strip()[ok]
                ndc_to_atc4 = dict(zip(ndcs[::-1], atcs[::-1], strict=True))  # reversed: the first row wins
        return cls(ndc_to_rxcui, rxcui_to_atc4, ndc_to_atc4)

    def atc3(self, order: MedicationOrder) -> tuple[str | None, str]:
        """The order's ATC-3 class and the route that found it (``"unmapped"`` when none did)."""
        if order.atc and len(order.atc.strip()) >= 4:
            return order.atc.strip()[:4].upper(), "atc"
        ndc = ndc11(order.ndc)
        if ndc is not None:
            rxcui = self.ndc_to_rxcui.get(ndc)
            if rxcui is not None and rxcui in self.rxcui_to_atc4:
                return self.rxcui_to_atc4[rxcui][:4], "ndc-rxcui"
            if ndc in self.ndc_to_atc4:
                return self.ndc_to_atc4[ndc][:4], "ndc-table"
        if order.rxnorm and order.rxnorm.strip() in self.rxcui_to_atc4:
            return self.rxcui_to_atc4[order.rxnorm.strip()][:4], "rxnorm"
        return None, "unmapped"


@functools.lru_cache(maxsize=4)
def _mapper_cached(mapping_dir: str) -> DrugMapper:
    return DrugMapper._read(Path(mapping_dir))


def drug_name_key(name: str) -> str:
    """A name-level drug id for orders no table maps (lower-case, dose and form words dropped)."""
    text = re.sub(r"\d[\d.,/]*\s*(mg|mcg|g|ml|meq|unit|units|%)?\b", " ", name.lower())
    text = re.sub(r"\b(oral|tablet|tab|capsule|cap|injection|inj|solution|soln|vial|bag|syringe)\b", " ", text)
    text = re.sub(r"[^a-z0-9]+", " ", text).strip()
    return "NAME:" + (text or name.lower().strip())


def read_ddi_pairs(path: str | Path) -> set[frozenset[str]]:
    """Unordered drug pairs with a severe interaction, one ``a<TAB>b`` per line after a header."""
    path = Path(path)
    pairs: set[frozenset[str]] = set()
    with path.open(newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        next(reader, None)
        for line_no, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise RecordError(path, line_no, "atc3_a/atc3_b", "row needs two drug codes")
            pairs.add(frozenset((row[0].strip(), row[1].strip())))
    return pairs


def ddi_matrix(med_vocab: Sequence[str], pairs: Iterable[frozenset[str]]) -> np.ndarray:
    """0/1 symmetric adjacency over ``med_vocab`` (drugs outside the pairs' vocabulary get no edges)."""
    index = {m: i for i, m in enumerate(med_vocab)}
    adj = np.zeros((len(med_vocab), len(med_vocab)), dtype=np.float32)
    for pair in pairs:
        members = [index[m] for m in pair if m in index]
        if len(members) == 2:
            adj[members[0], members[1]] = adj[members[1], members[0]] = 1.0
    return adj


# --------------------------------------------------------------------------- the dataset


@dataclass
class DatasetReport:
    """What building the dataset dropped or bucketed, so nothing disappears silently."""

    patients_seen: int = 0
    patients_kept: int = 0
    visits_kept: int = 0
    visits_without_codes_or_drugs: int = 0
    patients_below_min_visits: int = 0
    orders_seen: int = 0
    orders_by_route: dict[str, int] = field(default_factory=dict)
    orders_dropped_unmapped: int = 0
    diag_oov: int = 0
    proc_oov: int = 0
    med_dropped_outside_top_k: int = 0
    note_mentions: int = 0
    """Conditions found in admission notes and added as ``NOTE:`` codes (``symptoms_from_notes``)."""
    note_mentions_skipped: int = 0
    """Mentions left out because they were negated or about a relative."""
    drugs_without_smiles: list[str] = field(default_factory=list)


@dataclass
class MedRecDataset:
    """Patients as lists of visits over three vocabularies, plus what the representations need."""

    patient_ids: list[str]
    visits: list[list[Visit]]
    diag_vocab: list[str]
    proc_vocab: list[str]
    med_vocab: list[str]
    code_titles: dict[str, str] = field(default_factory=dict)
    """Vocabulary entry -> human-readable title (ICD titles), for the patient text."""
    drug_names: dict[str, list[str]] = field(default_factory=dict)
    """Medication vocabulary entry -> order names seen for it, for the drug text."""
    ddi: np.ndarray | None = None
    report: DatasetReport = field(default_factory=DatasetReport)

    @property
    def n_visits(self) -> int:
        return sum(len(v) for v in self.visits)

    def subset(self, indices: Sequence[int]) -> MedRecDataset:
        return MedRecDataset(
            [self.patient_ids[i] for i in indices],
            [self.visits[i] for i in indices],
            self.diag_vocab,
            self.proc_vocab,
            self.med_vocab,
            self.code_titles,
            self.drug_names,
            self.ddi,
            self.report,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        doc = {
            "patient_ids": self.patient_ids,
            "visits": self.visits,
            "diag_vocab": self.diag_vocab,
            "proc_vocab": self.proc_vocab,
            "med_vocab": self.med_vocab,
            "code_titles": self.code_titles,
            "drug_names": self.drug_names,
            "report": asdict(self.report),
        }
        with gzip.open(path / "dataset.json.gz", "wt") as fh:
            json.dump(doc, fh)
        if self.ddi is not None:
            np.save(path / "ddi.npy", self.ddi, allow_pickle=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MedRecDataset:
        path = Path(path)
        with gzip.open(path / "dataset.json.gz", "rt") as fh:
            doc = json.load(fh)
        ddi_path = path / "ddi.npy"
        return cls(
            doc["patient_ids"],
            [[(v[0], v[1], v[2]) for v in p] for p in doc["visits"]],
            doc["diag_vocab"],
            doc["proc_vocab"],
            doc["med_vocab"],
            doc["code_titles"],
            doc["drug_names"],
            np.load(ddi_path, allow_pickle=False) if ddi_path.exists() else None,
            DatasetReport(**doc["report"]),
        )


class MedRecDataConfig(BaseModel):
    """How visits and vocabularies are built; defaults follow SafeDrug's MIMIC-III preprocessing."""

    mapping_dir: Path | None = None
    """Folder with ``ndc2RXCUI.txt`` and ``ndc2atc_level4.zip``; without it drugs are keyed by RxNorm/name."""
    ddi_pairs: Path | None = None
    """``ddi_atc3_pairs.tsv``-style file; or give ``ddi_matrix`` (``.npy`` ordered like the med vocabulary)."""
    ddi_matrix: Path | None = None
    unmapped_drugs: Literal["drop", "rxnorm-or-name"] = "drop"
    """GAMENet drops orders the ATC tables cannot map; ``rxnorm-or-name`` keys them by RxNorm code, else name."""
    top_diag: int = Field(2000, ge=1)
    top_proc: int = Field(1000, ge=1)
    top_med: int = Field(300, ge=1)
    min_visits: int = Field(2, ge=1)
    """Patients with fewer visits are left out (the benchmark keeps patients with >= 2 admissions)."""
    cohort: str = ""
    """A ``CohortFilter`` expression, e.g. ``source=mimic4``."""
    symptoms_from_notes: bool = False
    """Add the symptoms, phenotypes and diseases the extraction agent finds in each admission's notes
    (lexical KG matching with negation and family context; no LLM) as extra ``NOTE:<KG node id>`` codes in
    the diagnosis channel, titled by the node name. Needs the knowledge graph."""


def _code_key(code: Code) -> str:
    return f"{code.system}:{code.code}"


def visit_time(adm: Admission) -> dt.datetime:
    """Sort key of visits: admission time, undated admissions last."""
    return adm.admit_time or dt.datetime.max.replace(tzinfo=dt.UTC)


def visit_codes(adm: Admission) -> tuple[list[str], list[str]]:
    """The admission's diagnosis and procedure keys (``SYSTEM:code``), first occurrence order, no repeats."""
    return (
        list(dict.fromkeys(_code_key(c) for c in adm.diagnoses)),
        list(dict.fromkeys(_code_key(c) for c in adm.procedures)),
    )


def order_drug(
    order: MedicationOrder, mapper: DrugMapper | None, unmapped_drugs: Literal["drop", "rxnorm-or-name"]
) -> tuple[str | None, str]:
    """(drug key or None, the route that mapped it): ATC-3 through ``mapper``, else RxNorm/name if allowed."""
    drug, route = mapper.atc3(order) if mapper is not None else (None, "unmapped")
    if drug is None and unmapped_drugs == "rxnorm-or-name":
        drug, route = (f"RXNORM:{order.rxnorm}", "rxnorm-code") if order.rxnorm else (drug_name_key(order.name), "name")
    return drug, route


def note_codes(extractor, kg, notes: Sequence[Note]) -> tuple[dict[str, str], int]:  # noqa: ANN001
    """``NOTE:<node id>`` -> node name for the conditions the extraction agent finds, and how many it skipped
    (negated or about a relative)."""
    found: dict[str, str] = {}
    skipped = 0
    for entity in extractor(notes):
        if entity.negated or entity.family or entity.candidate_node_id is None:
            skipped += 1
            continue
        found.setdefault(f"NOTE:{entity.candidate_node_id}", kg.get(entity.candidate_node_id).name)
    return found, skipped


def _top_k_vocab(counts: Counter[str], k: int) -> list[str]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [PAD, OOV, *(w for w, _ in ranked)]


def note_extractor(kg):  # noqa: ANN001, ANN202 - the KG type is optional at import time
    """The extraction agent's lexical pass, restricted to conditions (symptoms, phenotypes, diseases)."""
    from ehrflow.agents.extraction import ExtractionAgent, ExtractionConfig

    if kg is None:
        kg = _default_kg()
    if kg is None:
        raise ValueError("symptoms_from_notes needs the knowledge graph (ehrflow kg build), and none is installed")
    return kg, ExtractionAgent(kg, config=ExtractionConfig(mode="lexical", node_types=("disease", "effect/phenotype")))


def build_dataset(
    patients: Iterable[Patient],
    config: MedRecDataConfig,
    mapper: DrugMapper | None = None,
    kg=None,  # noqa: ANN001
) -> MedRecDataset:
    """Turn patient records into the benchmark's visit structure; counts every drop in ``report``."""
    if mapper is None and config.mapping_dir is not None:
        mapper = DrugMapper.from_dir(config.mapping_dir)
    extractor = None
    if config.symptoms_from_notes:
        kg, extractor = note_extractor(kg)
    report = DatasetReport()
    routes: Counter[str] = Counter()
    titles: dict[str, str] = {}
    names: dict[str, Counter[str]] = defaultdict(Counter)
    raw: list[tuple[str, list[tuple[list[str], list[str], list[str]]]]] = []
    for patient in patients:
        report.patients_seen += 1
        visits: list[tuple[list[str], list[str], list[str]]] = []
        for adm in sorted(patient.admissions, key=visit_time):
            diags, procs = visit_codes(adm)
            for c in (*adm.diagnoses, *adm.procedures):
                if c.description:
                    titles.setdefault(_code_key(c), c.description)
            meds: list[str] = []
            for order in adm.medications:
                report.orders_seen += 1
                drug, route = order_drug(order, mapper, config.unmapped_drugs)
                routes[route] += 1
                if drug is None:
                    report.orders_dropped_unmapped += 1
                    continue
                names[drug][order.name] += 1
                meds.append(drug)
            meds = list(dict.fromkeys(meds))
            if not diags or not meds:  # the benchmark joins diagnoses, procedures and drugs per admission
                report.visits_without_codes_or_drugs += 1
                continue
            if extractor is not None and adm.notes:
                mentions, skipped = note_codes(extractor, kg, adm.notes)
                report.note_mentions_skipped += skipped
                for key, title in mentions.items():
                    if key not in diags:
                        diags.append(key)
                        report.note_mentions += 1
                        titles.setdefault(key, title)
            visits.append((diags, procs, meds))
        if len(visits) < config.min_visits:
            report.patients_below_min_visits += 1
            continue
        raw.append((patient.id, visits))
    report.orders_by_route = dict(routes)

    diag_counts = Counter(c for _, vs in raw for v in vs for c in v[0])
    proc_counts = Counter(c for _, vs in raw for v in vs for c in v[1])
    med_counts = Counter(c for _, vs in raw for v in vs for c in v[2])
    diag_vocab = _top_k_vocab(diag_counts, config.top_diag)
    proc_vocab = _top_k_vocab(proc_counts, config.top_proc)
    med_vocab = [w for w, _ in sorted(med_counts.items(), key=lambda kv: (-kv[1], kv[0]))[: config.top_med]]
    d_idx = {w: i for i, w in enumerate(diag_vocab)}
    p_idx = {w: i for i, w in enumerate(proc_vocab)}
    m_idx = {w: i for i, w in enumerate(med_vocab)}

    patient_ids: list[str] = []
    encoded: list[list[Visit]] = []
    for pid, visits in raw:
        enc: list[Visit] = []
        for diags, procs, meds in visits:
            d = [d_idx.get(c, 1) for c in diags]
            p = [p_idx.get(c, 1) for c in procs]
            report.diag_oov += sum(1 for c in diags if c not in d_idx)
            report.proc_oov += sum(1 for c in procs if c not in p_idx)
            m = [m_idx[c] for c in meds if c in m_idx]
            report.med_dropped_outside_top_k += len(meds) - len(m)
            if m:
                enc.append((list(dict.fromkeys(d)), list(dict.fromkeys(p)), m))
            else:
                report.visits_without_codes_or_drugs += 1
        if len(enc) >= config.min_visits:
            patient_ids.append(pid)
            encoded.append(enc)
        else:
            report.patients_below_min_visits += 1
    report.patients_kept = len(patient_ids)
    report.visits_kept = sum(len(v) for v in encoded)

    dataset = MedRecDataset(
        patient_ids,
        encoded,
        diag_vocab,
        proc_vocab,
        med_vocab,
        {k: v for k, v in titles.items() if k in d_idx or k in p_idx},
        {m: [n for n, _ in names[m].most_common(5)] for m in med_vocab},
        None,
        report,
    )
    dataset.ddi = load_ddi(dataset.med_vocab, config.ddi_pairs, config.ddi_matrix)
    log.info(
        "medrec dataset: %d patients, %d visits, vocab diag=%d proc=%d med=%d",
        report.patients_kept,
        report.visits_kept,
        len(diag_vocab),
        len(proc_vocab),
        len(med_vocab),
    )
    return dataset


def load_ddi(med_vocab: Sequence[str], pairs_path: Path | None, matrix_path: Path | None) -> np.ndarray | None:
    """The DDI adjacency over ``med_vocab`` from a pairs file or a user's ``.npy`` matrix."""
    if matrix_path is not None:
        adj = np.load(matrix_path, allow_pickle=False).astype(np.float32)
        if adj.shape != (len(med_vocab), len(med_vocab)):
            raise RecordError(
                matrix_path, None, "shape", f"DDI matrix is {adj.shape}, medication vocabulary has {len(med_vocab)}"
            )
        return adj
    if pairs_path is not None:
        return ddi_matrix(med_vocab, read_ddi_pairs(pairs_path))
    return None


def build_from_store(store: PatientStore, config: MedRecDataConfig) -> MedRecDataset:
    return build_dataset(store.iter_patients(CohortFilter.parse(config.cohort)), config)


# --------------------------------------------------------------------------- GAMENet/SafeDrug pickles


def import_gamenet(records_path: str | Path, voc_path: str | Path, ddi_path: str | Path | None = None) -> MedRecDataset:
    """Read ``records_final.pkl``, ``voc_final.pkl`` and ``ddi_A_final.pkl`` through the allow-list unpickler.

    GAMENet vocabularies have no padding/OOV entries; two are prepended, so diagnosis and
    procedure ids shift by 2 (medication ids are unchanged).
    """
    from ehrflow.training.safe_pickle import Voc, safe_load

    records_path, voc_path = Path(records_path), Path(voc_path)
    records = safe_load(records_path)
    vocs = safe_load(voc_path)
    if not isinstance(vocs, dict) or not all(isinstance(vocs.get(k), Voc) for k in ("diag_voc", "pro_voc", "med_voc")):
        raise RecordError(voc_path, None, "diag_voc/pro_voc/med_voc", "expected a dict of three Voc objects")

    def words(key: str) -> list[str]:
        idx2word = vocs[key].idx2word
        n = len(idx2word)
        if sorted(idx2word) != list(range(n)):
            raise RecordError(voc_path, None, f"{key}.idx2word", "indices are not 0..n-1")
        return [str(idx2word[i]) for i in range(n)]

    diag, proc, med = words("diag_voc"), words("pro_voc"), words("med_voc")
    if not isinstance(records, list):
        raise RecordError(records_path, None, None, f"expected a list of patients, got {type(records).__name__}")
    visits: list[list[Visit]] = []
    for p_no, patient in enumerate(records):
        if not isinstance(patient, list):
            raise RecordError(records_path, f"patient {p_no}", None, "a patient must be a list of visits")
        enc: list[Visit] = []
        for v_no, visit in enumerate(patient):
            if not isinstance(visit, (list, tuple)) or len(visit) < 3:
                raise RecordError(records_path, f"patient {p_no} visit {v_no}", None, "expected [diag, proc, med]")
            for name, ids, size in (
                ("diag", visit[0], len(diag)),
                ("proc", visit[1], len(proc)),
                ("med", visit[2], len(med)),
            ):
                if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < size for i in ids):
                    raise RecordError(
                        records_path, f"patient {p_no} visit {v_no}", name, f"ids must be ints in [0, {size})"
                    )
            enc.append(([i + 2 for i in visit[0]], [i + 2 for i in visit[1]], list(visit[2])))
        visits.append(enc)
    ddi = None
    if ddi_path is not None:
        ddi = np.asarray(safe_load(ddi_path), dtype=np.float32)
        if ddi.shape != (len(med), len(med)):
            raise RecordError(ddi_path, None, "shape", f"DDI matrix is {ddi.shape}, med_voc has {len(med)} entries")
    report = DatasetReport(patients_seen=len(visits), patients_kept=len(visits), visits_kept=sum(map(len, visits)))
    return MedRecDataset(
        [f"gamenet-{i}" for i in range(len(visits))],
        visits,
        [PAD, OOV, *diag],
        [PAD, OOV, *proc],
        med,
        {},
        {m: [] for m in med},
        ddi,
        report,
    )


# --------------------------------------------------------------------------- representations


class RepresentationConfig(BaseModel):
    """Text and molecule inputs of the NLA-MMR-style model."""

    text_encoder: Literal["default", "hashed"] = "default"
    """``default``: ehrflow's sentence embedder (cached on disk); ``hashed``: token hashing, no model (fast tests)."""
    text_model: str | None = None
    """A local sentence-transformers directory instead of the default model."""
    cache_dir: Path | None = None
    smiles_path: Path | None = None
    """``atc3<TAB>smiles`` file (e.g. ``atc3_smiles.tsv``); drugs without SMILES get text only."""
    molecule_method: Literal["morgan", "ngram", "gin"] | None = None
    """``None``: Morgan fingerprints when RDKit is installed, hashed SMILES n-grams otherwise;
    ``gin``: molecule graphs encoded by a GIN trained with the model (needs RDKit)."""
    molecule_bits: int = Field(1024, ge=16)
    use_kg: bool = True
    """Look ICD titles and drug names/classes up in the default knowledge graph when it is installed."""


_GRAPH_ARRAYS = ("atoms", "edges", "atom_molecule", "molecule_drug")


@dataclass
class Representations:
    diag_text: np.ndarray
    proc_text: np.ndarray
    med_text: np.ndarray
    med_mol: np.ndarray
    med_has_mol: np.ndarray
    molecule_method: str
    drugs_without_smiles: list[str]
    graphs: MoleculeGraphs | None = None
    """The drug classes' molecule graphs when ``molecule_method`` is ``gin`` (``med_mol`` is then unused)."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        graphs = {}
        if self.graphs is not None:
            graphs = {f"graph_{f}": getattr(self.graphs, f) for f in _GRAPH_ARRAYS}
        np.savez(
            path,
            diag_text=self.diag_text,
            proc_text=self.proc_text,
            med_text=self.med_text,
            med_mol=self.med_mol,
            med_has_mol=self.med_has_mol,
            molecule_method=np.array(self.molecule_method),
            drugs_without_smiles=np.array(self.drugs_without_smiles, dtype=str),
            **graphs,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Representations:
        from ehrflow.knowledge.molecules import MoleculeGraphs

        with np.load(path, allow_pickle=False) as z:
            return cls(
                z["diag_text"],
                z["proc_text"],
                z["med_text"],
                z["med_mol"],
                z["med_has_mol"],
                str(z["molecule_method"]),
                [str(x) for x in z["drugs_without_smiles"]],
                MoleculeGraphs(*(z[f"graph_{f}"] for f in _GRAPH_ARRAYS), n_drugs=len(z["med_text"]))
                if "graph_atoms" in z.files
                else None,
            )


class HashedTextEncoder:
    """Token-hashing bag of words: a model-free text vector for tests and throughput runs."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for token in re.findall(r"[a-z0-9]+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


def _default_kg():  # noqa: ANN202 - the KG type is optional at import time
    try:
        from ehrflow.knowledge.graph import KnowledgeGraph

        return KnowledgeGraph.default()
    except (ImportError, FileNotFoundError, OSError, ValueError) as exc:
        log.info("medrec: no knowledge graph (%s); code descriptions and ATC/drug names are used", exc)
        return None


def _icd_with_dot(system: str, code: str) -> str:
    """MIMIC writes ICD codes without the dot; the KG ids carry it."""
    if system == "ICD9CM":
        cut = 4 if code.startswith("E") else 3
    elif system == "ICD10CM":
        cut = 3
    else:
        return code
    return code if len(code) <= cut or "." in code else f"{code[:cut]}.{code[cut:]}"


def code_text(key: str, titles: dict[str, str], kg) -> str:  # noqa: ANN001
    """A code's title: the KG node name when the KG has the code, else the record's description, else the code."""
    system, _, code = key.partition(":")
    if kg is not None and system in {"ICD9CM", "ICD10CM"}:
        node = kg.get(f"{system}:{_icd_with_dot(system, code)}") or kg.get(key)
        if node is not None:
            return node.name
    return titles.get(key) or key.replace(":", " ")


def drug_text(med: str, names: list[str], kg) -> str:  # noqa: ANN001
    """Drug class text: the KG's matching drug names and pharmacologic classes, else the ATC code and order names."""
    parts = [med if not med.startswith("NAME:") else med[5:]]
    parts += names
    if kg is not None:
        for name in names[:3]:
            for match in kg.lexical_lookup(name, types=["drug"])[:1]:
                node = match.node
                parts.append(node.name + (f": {node.definition}" if node.definition else ""))
                classes = [n.name for _, n in kg.neighbors(node.id, limit=20) if n.type == "pharmacologic_class"]
                parts += classes[:3]
    return "; ".join(dict.fromkeys(p for p in parts if p))


def build_representations(dataset: MedRecDataset, config: RepresentationConfig) -> Representations:
    """Patient-side code texts, drug texts and molecule fingerprints, aligned with the vocabularies."""
    from ehrflow.knowledge.molecules import MoleculeFeaturizer, molecule_graphs, read_atc3_smiles

    kg = _default_kg() if config.use_kg else None
    if config.text_encoder == "hashed":
        encoder = HashedTextEncoder()
    else:
        from ehrflow.training.features import load_text_encoder

        encoder = load_text_encoder(config.text_model, config.cache_dir)

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(encoder.encode(texts), dtype=np.float32)

    special = {PAD: "", OOV: "other code"}
    diag_text = encode([special.get(k) or code_text(k, dataset.code_titles, kg) for k in dataset.diag_vocab])
    proc_text = encode([special.get(k) or code_text(k, dataset.code_titles, kg) for k in dataset.proc_vocab])
    med_text = encode([drug_text(m, dataset.drug_names.get(m, []), kg) for m in dataset.med_vocab])
    diag_text[0] = proc_text[0] = 0.0  # padding carries nothing

    smiles = read_atc3_smiles(config.smiles_path) if config.smiles_path is not None else {}
    graphs = None
    if config.molecule_method == "gin":
        graphs = molecule_graphs([smiles.get(med, []) for med in dataset.med_vocab])
        med_mol = np.zeros((len(dataset.med_vocab), 1), dtype=np.float32)
        has_mol = graphs.has_molecule()
        method = "gin"
    else:
        featurizer = MoleculeFeaturizer(n_bits=config.molecule_bits, method=config.molecule_method)
        med_mol = np.zeros((len(dataset.med_vocab), config.molecule_bits), dtype=np.float32)
        has_mol = np.zeros(len(dataset.med_vocab), dtype=bool)
        for i, med in enumerate(dataset.med_vocab):
            fp = featurizer.featurize_group(smiles.get(med, []))
            if fp is not None:
                med_mol[i], has_mol[i] = fp, True
        method = featurizer.method
    missing = [med for med, has in zip(dataset.med_vocab, has_mol, strict=True) if not has]
    if missing:
        log.info("medrec: %d of %d drugs have no SMILES and use text only", len(missing), len(dataset.med_vocab))
    dataset.report.drugs_without_smiles = missing
    return Representations(diag_text, proc_text, med_text, med_mol, has_mol, method, missing, graphs)


# --------------------------------------------------------------------------- split


def split_by_patient(n_patients: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Seeded patient-level split: 2/3 train, then the rest halved into test and validation (SafeDrug order)."""
    order = np.random.default_rng(seed).permutation(n_patients).tolist()
    split_point = int(n_patients * 2 / 3)
    eval_len = int((n_patients - split_point) / 2)
    return order[:split_point], order[split_point + eval_len :], order[split_point : split_point + eval_len]


__all__ = [
    "OOV",
    "PAD",
    "DatasetReport",
    "DrugMapper",
    "HashedTextEncoder",
    "MedRecDataConfig",
    "MedRecDataset",
    "build_dataset",
    "build_from_store",
    "ddi_matrix",
    "import_gamenet",
    "load_ddi",
    "ndc11",
    "note_codes",
    "note_extractor",
    "order_drug",
    "read_ddi_pairs",
    "RepresentationConfig",
    "Representations",
    "build_representations",
    "split_by_patient",
    "visit_codes",
    "visit_time",
]
