"""Molecular features from SMILES, for drug representations in medication recommendation.

RDKit Morgan fingerprints when RDKit is installed; otherwise hashed character n-grams of the
SMILES string, a weaker but dependency-free stand-in so the rest of the pipeline still runs.
``molecule_graphs`` turns the same SMILES into atom/bond arrays for a trainable graph encoder
(``ehrflow.models.medrec.MoleculeGIN``).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ehrflow.records.errors import RecordError

log = logging.getLogger(__name__)

try:  # RDKit is optional: a pip wheel exists for common platforms, not for all
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    HAVE_RDKIT = True
except ImportError:  # pragma: no cover - exercised only where RDKit is missing
    HAVE_RDKIT = False


def _ngram_fingerprint(smiles: str, n_bits: int, ngram: tuple[int, int] = (2, 4)) -> np.ndarray:
    """Hashed presence of SMILES character n-grams: keeps local substructure tokens without RDKit."""
    vec = np.zeros(n_bits, dtype=np.float32)
    for n in range(ngram[0], ngram[1] + 1):
        for i in range(len(smiles) - n + 1):
            digest = hashlib.blake2b(smiles[i : i + n].encode(), digest_size=8).digest()
            vec[int.from_bytes(digest, "little") % n_bits] = 1.0
    return vec


class MoleculeFeaturizer:
    """SMILES -> fixed-size binary fingerprint (``method`` is ``"morgan"`` or ``"ngram"``)."""

    def __init__(self, n_bits: int = 1024, radius: int = 2, method: str | None = None) -> None:
        if method is None:
            method = "morgan" if HAVE_RDKIT else "ngram"
        if method == "morgan" and not HAVE_RDKIT:
            raise ImportError("method='morgan' needs RDKit: pip install rdkit")
        if method not in {"morgan", "ngram"}:
            raise ValueError(f"unknown molecule featurizer {method!r}; choose 'morgan' or 'ngram'")
        self.method = method
        self.n_bits = n_bits
        self.radius = radius
        self._generator = (
            rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits) if method == "morgan" else None
        )

    def featurize(self, smiles: str) -> np.ndarray | None:
        """The fingerprint, or ``None`` when RDKit cannot parse the SMILES."""
        if self._generator is None:
            return _ngram_fingerprint(smiles, self.n_bits)
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return None
        return self._generator.GetFingerprintAsNumPy(mol).astype(np.float32)

    def featurize_group(self, smiles_list: Iterable[str]) -> np.ndarray | None:
        """Mean fingerprint over a drug class's member molecules (SafeDrug averages members the same way)."""
        fps = [fp for s in smiles_list if (fp := self.featurize(s)) is not None]
        if not fps:
            return None
        return np.mean(fps, axis=0).astype(np.float32)


_ELEMENTS = ("C", "N", "O", "S", "F", "Cl", "Br", "I", "P")
ATOM_FEATURES = len(_ELEMENTS) + 1 + 6 + 3 + 1 + 5 + 1
"""Element (9 common + other), degree 0-5, formal charge -1/0/+1, aromatic, hydrogens 0-4, in a ring."""


def _one_hot(value: int, size: int) -> list[float]:
    out = [0.0] * size
    out[min(max(value, 0), size - 1)] = 1.0
    return out


def _atom_features(atom) -> list[float]:  # noqa: ANN001 - an RDKit Atom
    symbol = atom.GetSymbol()
    element = _ELEMENTS.index(symbol) if symbol in _ELEMENTS else len(_ELEMENTS)
    return [
        *_one_hot(element, len(_ELEMENTS) + 1),
        *_one_hot(atom.GetDegree(), 6),
        *_one_hot(atom.GetFormalCharge() + 1, 3),
        float(atom.GetIsAromatic()),
        *_one_hot(atom.GetTotalNumHs(), 5),
        float(atom.IsInRing()),
    ]


@dataclass
class MoleculeGraphs:
    """Every parsed molecule of every drug class as one disjoint graph (arrays, so they save to ``.npz``)."""

    atoms: np.ndarray  # [A, ATOM_FEATURES] float32
    edges: np.ndarray  # [2, E] int64, each bond in both directions
    atom_molecule: np.ndarray  # [A] int64: the molecule of each atom
    molecule_drug: np.ndarray  # [N] int64: the drug class of each molecule
    n_drugs: int

    def has_molecule(self) -> np.ndarray:
        """[n_drugs] bool: which drug classes have at least one parsed molecule."""
        return np.bincount(self.molecule_drug, minlength=self.n_drugs) > 0


def molecule_graphs(smiles_by_drug: Sequence[Sequence[str]]) -> MoleculeGraphs:
    """Atom features and bonds of each drug class's member molecules; unparsable SMILES are skipped."""
    if not HAVE_RDKIT:
        raise ImportError("molecule graphs need RDKit: pip install rdkit")
    atoms: list[list[float]] = []
    edges: list[tuple[int, int]] = []
    atom_molecule: list[int] = []
    molecule_drug: list[int] = []
    for drug, smiles_list in enumerate(smiles_by_drug):
        for smiles in smiles_list:
            mol = Chem.MolFromSmiles(smiles)
            if mol is None or mol.GetNumAtoms() == 0:
                continue
            offset, index = len(atoms), len(molecule_drug)
            atoms.extend(_atom_features(a) for a in mol.GetAtoms())
            atom_molecule.extend([index] * mol.GetNumAtoms())
            for bond in mol.GetBonds():
                a, b = offset + bond.GetBeginAtomIdx(), offset + bond.GetEndAtomIdx()
                edges += [(a, b), (b, a)]
            molecule_drug.append(drug)
    return MoleculeGraphs(
        np.asarray(atoms, dtype=np.float32).reshape(-1, ATOM_FEATURES),
        np.asarray(edges, dtype=np.int64).reshape(-1, 2).T.copy(),
        np.asarray(atom_molecule, dtype=np.int64),
        np.asarray(molecule_drug, dtype=np.int64),
        len(smiles_by_drug),
    )


def read_atc3_smiles(path: str | Path) -> dict[str, list[str]]:
    """``atc3<TAB>smiles`` rows (one per member molecule) -> ATC-3 class -> SMILES list."""
    path = Path(path)
    out: dict[str, list[str]] = defaultdict(list)
    with path.open(newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["atc3", "smiles"]:
            raise RecordError(path, 1, "header", f"expected columns 'atc3<TAB>smiles', got {header!r}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise RecordError(path, line_no, "atc3/smiles", "row needs an ATC-3 code and a SMILES string")
            out[row[0].strip()].append(row[1].strip())
    return dict(out)


__all__ = ["HAVE_RDKIT", "MoleculeFeaturizer", "read_atc3_smiles"]
