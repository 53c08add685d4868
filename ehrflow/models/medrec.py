"""Medication-recommendation models (plain torch), all behind one batched interface.

Every model maps a batch of patients, padded to ``[B, T, L]`` code ids (0 = padding) and
``[B, T, M]`` medication multi-hots, to per-visit logits ``[B, T, M]``. The prediction for visit
``t`` may use visit ``t``'s diagnoses and procedures and the medications of visits ``< t`` only,
which is the GAMENet/SafeDrug/NLA-MMR setting.

- ``NLAMMR``: NLA-MMR-style alignment of a patient vector (frozen code-title embeddings plus
  learned code embeddings, a GRU over visits, attention over earlier visits' drugs) with drug
  vectors (drug text plus molecule projections) by a dot product, plus learned per-drug repeat
  terms for drugs given at earlier visits and at the previous one.
- ``GAMENet`` (Shang et al., AAAI 2019): GRU patient encoders, graph-augmented drug memory
  (EHR co-occurrence GCN minus a learnt share of the DDI GCN) and dynamic memory over visits.
- ``MultiHotLinear`` / ``MultiHotMLP``: logistic-regression and MLP multi-label baselines on the
  current visit's codes.

ehrflow's own models (not GAMENet, kept as published) take ``bias_init``: each drug's training
log-odds, so that few-step training on small cohorts starts from the base rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Visit = tuple[Sequence[int], Sequence[int], Sequence[int]]


@dataclass
class MedRecBatch:
    diag: Tensor  # [B, T, Ld] long, 0 = padding
    proc: Tensor  # [B, T, Lp] long
    meds: Tensor  # [B, T, M] float multi-hot: the target of visit t and the history of visits > t
    visit_mask: Tensor  # [B, T] bool

    def to(self, device: torch.device | str) -> MedRecBatch:
        return MedRecBatch(self.diag.to(device), self.proc.to(device), self.meds.to(device), self.visit_mask.to(device))


def collate(patients: Sequence[Sequence[Visit]], n_meds: int) -> MedRecBatch:
    """Pad a list of patients (each a list of visits) into one batch."""
    b = len(patients)
    t = max((len(p) for p in patients), default=1) or 1
    ld = max((len(v[0]) for p in patients for v in p), default=1) or 1
    lp = max((len(v[1]) for p in patients for v in p), default=1) or 1
    diag = torch.zeros(b, t, ld, dtype=torch.long)
    proc = torch.zeros(b, t, lp, dtype=torch.long)
    meds = torch.zeros(b, t, n_meds)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, patient in enumerate(patients):
        for j, (d, p, m) in enumerate(patient):
            if d:
                diag[i, j, : len(d)] = torch.as_tensor(list(d))
            if p:
                proc[i, j, : len(p)] = torch.as_tensor(list(p))
            if m:
                meds[i, j, torch.as_tensor(list(m))] = 1.0
            mask[i, j] = True
    return MedRecBatch(diag, proc, meds, mask)


def _bag(embedding: nn.Embedding, ids: Tensor, mean: bool = False) -> Tensor:
    """Sum (or mean) of the embeddings of a padded id tensor ``[..., L]`` -> ``[..., D]``."""
    vectors = embedding(ids)
    if not mean:
        return vectors.sum(-2)
    count = (ids != 0).sum(-1, keepdim=True).clamp(min=1)
    return vectors.sum(-2) / count


def history_attention(query: Tensor, keys: Tensor, visit_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Attention of each visit over strictly earlier visits: weights ``[B, T, T]`` and a has-history flag ``[B, T]``."""
    t = query.shape[1]
    scores = query @ keys.transpose(1, 2)
    earlier = torch.ones(t, t, dtype=torch.bool, device=query.device).tril(-1)
    allowed = earlier.unsqueeze(0) & visit_mask.unsqueeze(1)
    has_history = allowed.any(-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores.masked_fill(~has_history.unsqueeze(-1), 0.0), dim=-1)
    return weights * allowed, has_history


def _initial_bias(n_meds: int, bias_init: Tensor | None) -> Tensor:
    """Zeros, or a copy of the given per-drug start (e.g. each drug's training log-odds)."""
    return torch.zeros(n_meds) if bias_init is None else bias_init.float().clone()


class MultiHotLinear(nn.Module):
    """Logistic regression on the multi-hot of the current visit's diagnoses and procedures."""

    def __init__(self, n_diag: int, n_proc: int, n_meds: int, bias_init: Tensor | None = None) -> None:
        super().__init__()
        self.diag = nn.Embedding(n_diag, n_meds, padding_idx=0)
        self.proc = nn.Embedding(n_proc, n_meds, padding_idx=0)
        self.bias = nn.Parameter(_initial_bias(n_meds, bias_init))

    def forward(self, batch: MedRecBatch) -> Tensor:
        return _bag(self.diag, batch.diag) + _bag(self.proc, batch.proc) + self.bias


class MultiHotMLP(nn.Module):
    """One-hidden-layer MLP on the same input as ``MultiHotLinear``."""

    def __init__(
        self,
        n_diag: int,
        n_proc: int,
        n_meds: int,
        hidden: int = 128,
        dropout: float = 0.3,
        bias_init: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.diag = nn.Embedding(n_diag, hidden, padding_idx=0)
        self.proc = nn.Embedding(n_proc, hidden, padding_idx=0)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_meds))
        if bias_init is not None:
            self.out[-1].bias.data = _initial_bias(n_meds, bias_init)

    def forward(self, batch: MedRecBatch) -> Tensor:
        return self.out(_bag(self.diag, batch.diag) + _bag(self.proc, batch.proc) + self.bias)


class _GCN(nn.Module):
    """GAMENet's two-layer GCN over a drug graph with identity node features."""

    def __init__(self, adj: Tensor, dim: int, dropout: float) -> None:
        super().__init__()
        n = adj.shape[0]
        a = adj + torch.eye(n)
        deg = a.sum(1)
        self.register_buffer("adj", a / deg.clamp(min=1).unsqueeze(1))  # row normalisation, as GAMENet
        self.w1 = nn.Linear(n, dim)
        self.w2 = nn.Linear(dim, dim, bias=False)
        self.b2 = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> Tensor:
        h = F.relu(self.adj @ self.w1.weight.T + self.w1.bias)  # the first layer's input is the identity
        return self.adj @ self.w2(self.dropout(h)) + self.b2


class GAMENet(nn.Module):
    """GAMENet: patient query from two GRUs; facts from the graph memory and from earlier visits' drugs."""

    def __init__(
        self,
        n_diag: int,
        n_proc: int,
        n_meds: int,
        ehr_adj: Tensor,
        ddi_adj: Tensor | None,
        dim: int = 64,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        self.diag = nn.Embedding(n_diag, dim, padding_idx=0)
        self.proc = nn.Embedding(n_proc, dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.gru_diag = nn.GRU(dim, 2 * dim, batch_first=True)
        self.gru_proc = nn.GRU(dim, 2 * dim, batch_first=True)
        self.query = nn.Sequential(nn.ReLU(), nn.Linear(4 * dim, dim))
        self.ehr_gcn = _GCN(ehr_adj, dim, dropout)
        self.ddi_gcn = _GCN(ddi_adj, dim, dropout) if ddi_adj is not None else None
        self.inter = nn.Parameter(torch.tensor(0.0))
        self.output = nn.Sequential(nn.ReLU(), nn.Linear(3 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, n_meds))

    def forward(self, batch: MedRecBatch) -> Tensor:
        o1, _ = self.gru_diag(self.dropout(_bag(self.diag, batch.diag)))
        o2, _ = self.gru_proc(self.dropout(_bag(self.proc, batch.proc)))
        query = self.query(torch.cat([o1, o2], -1))  # [B, T, D]
        memory = self.ehr_gcn()
        if self.ddi_gcn is not None:
            memory = memory - self.inter * self.ddi_gcn()
        fact1 = torch.softmax(query @ memory.T, -1) @ memory
        weights, has_history = history_attention(query, query, batch.visit_mask)
        fact2 = (weights @ batch.meds) @ memory  # attention-weighted drug multi-hots of earlier visits
        fact2 = torch.where(has_history.unsqueeze(-1), fact2, fact1)
        return self.output(torch.cat([query, fact1, fact2], -1))


class MoleculeGIN(nn.Module):
    """GIN (Xu et al., ICLR 2019) over every member molecule of every drug class: sum readout per
    molecule, mean over a class's molecules (as SafeDrug averages members). Classes without a
    molecule get zeros. The graphs are buffers: the whole set is encoded in each forward pass."""

    def __init__(
        self,
        atoms: Tensor,
        edges: Tensor,
        atom_molecule: Tensor,
        molecule_drug: Tensor,
        n_drugs: int,
        dim: int,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.register_buffer("atoms", atoms.float())
        self.register_buffer("edges", edges.long())
        self.register_buffer("atom_molecule", atom_molecule.long())
        self.register_buffer("molecule_drug", molecule_drug.long())
        counts = torch.bincount(molecule_drug.long(), minlength=n_drugs).clamp(min=1)
        self.register_buffer("molecules_per_drug", counts.float().unsqueeze(-1))
        self.n_molecules = int(molecule_drug.numel())
        self.n_drugs = n_drugs
        self.embed = nn.Linear(atoms.shape[1], dim)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(layers)
        )
        self.eps = nn.Parameter(torch.zeros(layers))

    def forward(self) -> Tensor:
        h = self.embed(self.atoms)
        source, target = self.edges
        for eps, mlp in zip(self.eps, self.mlps, strict=True):
            neighbours = torch.zeros_like(h).index_add_(0, target, h[source])
            h = F.relu(mlp((1 + eps) * h + neighbours))
        molecules = h.new_zeros(self.n_molecules, h.shape[1]).index_add_(0, self.atom_molecule, h)
        drugs = h.new_zeros(self.n_drugs, h.shape[1]).index_add_(0, self.molecule_drug, molecules)
        return drugs / self.molecules_per_drug


class NLAMMR(nn.Module):
    """Patient and drug vectors in one space, scored by a dot product (NLA-MMR-style alignment).

    Patient side: per visit, the mean of frozen code-title text embeddings (projected) plus
    learned code embeddings, for diagnoses and procedures, through a GRU; then attention over
    earlier visits mixes in the vectors of the drugs given then. Drug side: projected drug text
    plus projected molecule fingerprint, or a ``MoleculeGIN`` over the class's molecule graphs
    (zero for drugs without SMILES), plus a learned id vector.

    Two per-drug repeat weights add ``repeat[m] * share of earlier visits (attention-weighted) that
    had drug m`` and ``repeat_last[m] * (drug m at the previous visit)`` to the logits: averaging
    earlier drugs into one vector loses which drugs they were, and chronic medication repeats from
    visit to visit, most often from the last one. Both start at 3 logits (``repeat_init``,
    ``last_visit_init``); ``bias_init`` is meant to be each drug's log-odds in the training visits
    (``ehrflow.training.medrec.drug_log_odds``). These starts were chosen over zero starts, a
    per-drug repeat estimate and other splits of the 3 logits by mean validation Jaccard on the demo
    cohorts, five splits each.
    """

    def __init__(
        self,
        diag_text: Tensor,
        proc_text: Tensor,
        med_text: Tensor,
        med_mol: Tensor,
        med_has_mol: Tensor,
        dim: int = 128,
        dropout: float = 0.3,
        bias_init: Tensor | None = None,
        repeat_init: float = 3.0,
        last_visit_init: float = 3.0,
        molecule_encoder: MoleculeGIN | None = None,
    ) -> None:
        super().__init__()
        n_diag, n_proc, n_meds = diag_text.shape[0], proc_text.shape[0], med_text.shape[0]
        self.diag_text = nn.Embedding.from_pretrained(diag_text.float(), freeze=True, padding_idx=0)
        self.proc_text = nn.Embedding.from_pretrained(proc_text.float(), freeze=True, padding_idx=0)
        self.register_buffer("med_text", med_text.float())
        self.register_buffer("med_mol", med_mol.float())
        self.register_buffer("med_has_mol", med_has_mol.float().unsqueeze(-1))
        self.diag_id = nn.Embedding(n_diag, dim, padding_idx=0)
        self.proc_id = nn.Embedding(n_proc, dim, padding_idx=0)
        self.text_proj = nn.Linear(diag_text.shape[1], dim)
        self.visit = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.drug_text_proj = nn.Sequential(nn.Linear(med_text.shape[1], dim), nn.ReLU(), nn.Linear(dim, dim))
        self.molecule_encoder = molecule_encoder
        self.mol_proj = (
            nn.Sequential(nn.Linear(med_mol.shape[1], dim), nn.ReLU(), nn.Linear(dim, dim))
            if molecule_encoder is None
            else None
        )
        self.med_id = nn.Parameter(torch.zeros(n_meds, dim))
        self.merge = nn.Linear(2 * dim, dim)
        self.bias = nn.Parameter(_initial_bias(n_meds, bias_init))
        self.repeat = nn.Parameter(torch.full((n_meds,), repeat_init))
        self.repeat_last = nn.Parameter(torch.full((n_meds,), last_visit_init))
        self.scale = 1.0 / math.sqrt(dim)

    def drug_vectors(self) -> Tensor:
        molecules = self.mol_proj(self.med_mol) if self.mol_proj is not None else self.molecule_encoder()
        return self.drug_text_proj(self.med_text) + self.med_has_mol * molecules + self.med_id

    def forward(self, batch: MedRecBatch) -> Tensor:
        diag = self.text_proj(_bag(self.diag_text, batch.diag, mean=True)) + _bag(self.diag_id, batch.diag, mean=True)
        proc = self.text_proj(_bag(self.proc_text, batch.proc, mean=True)) + _bag(self.proc_id, batch.proc, mean=True)
        visits = self.visit(torch.cat([diag, proc], -1))
        patient, _ = self.gru(visits)  # causal over visits
        drugs = self.drug_vectors()  # [M, D]
        weights, _ = history_attention(patient * self.scale, visits, batch.visit_mask)
        earlier_drugs = weights @ batch.meds  # attention-weighted drug multi-hots of earlier visits
        history = earlier_drugs @ drugs / earlier_drugs.sum(-1, keepdim=True).clamp(min=1e-6)
        patient = self.merge(torch.cat([patient, history], -1))
        previous = torch.cat([torch.zeros_like(batch.meds[:, :1]), batch.meds[:, :-1]], 1)  # visit t-1's drugs
        repeats = self.repeat * earlier_drugs + self.repeat_last * previous
        return (patient @ drugs.T) * self.scale + self.bias + repeats


# ------------------------------------------------------------------------------------------- loss


def multilabel_margin_targets(target: Tensor) -> Tensor:
    """Multi-hot ``[N, M]`` -> the index list ``F.multilabel_margin_loss`` wants (positives first, then -1)."""
    order = torch.argsort(-target, dim=1, stable=True)
    k = target.sum(1, keepdim=True).long()
    positions = torch.arange(target.shape[1], device=target.device).unsqueeze(0)
    return torch.where(positions < k, order, torch.full_like(order, -1))


def ddi_rate_of(pred: Tensor, ddi_adj: Tensor) -> float:
    """Share of predicted drug pairs (unordered, within a visit) that interact; 0 when there are no pairs."""
    pairs = (pred.sum(1) * (pred.sum(1) - 1) / 2).sum()
    if pairs <= 0:
        return 0.0
    bad = torch.einsum("ni,ij,nj->", pred, ddi_adj, pred) / 2
    return float(bad / pairs)


def medrec_loss(
    logits: Tensor,
    target: Tensor,
    ddi_adj: Tensor | None = None,
    target_ddi: float | None = None,
    kp: float = 0.05,
) -> tuple[Tensor, dict[str, float]]:
    """0.95 BCE + 0.05 multi-label margin; with ``target_ddi``, SafeDrug's controllable DDI loss.

    When the batch's predicted DDI rate exceeds ``target_ddi`` the loss becomes
    ``beta * L_acc + (1 - beta) * L_ddi`` with ``beta = max(0, 1 + (target - rate) / kp)`` (the
    SafeDrug paper's rule; its released code writes ``min``, which makes beta never positive).
    ``logits`` and ``target`` are ``[N, M]`` over the batch's real visits.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    margin = F.multilabel_margin_loss(torch.sigmoid(logits), multilabel_margin_targets(target))
    accuracy_loss = 0.95 * bce + 0.05 * margin
    stats = {"bce": float(bce.detach()), "margin": float(margin.detach())}
    if ddi_adj is None or target_ddi is None:
        return accuracy_loss, stats
    prob = torch.sigmoid(logits)
    ddi_loss = 0.0005 * torch.einsum("ni,ij,nj->n", prob, ddi_adj, prob).mean()
    rate = ddi_rate_of((prob >= 0.5).float().detach(), ddi_adj)
    stats.update(ddi_loss=float(ddi_loss.detach()), batch_ddi_rate=rate)
    if rate <= target_ddi:
        return accuracy_loss, stats
    beta = max(0.0, 1.0 + (target_ddi - rate) / kp)
    stats["beta"] = beta
    return beta * accuracy_loss + (1.0 - beta) * ddi_loss, stats


MODEL_NAMES = ("nlammr", "gamenet", "logreg", "mlp")

__all__ = [
    "GAMENet",
    "MODEL_NAMES",
    "MedRecBatch",
    "MoleculeGIN",
    "MultiHotLinear",
    "MultiHotMLP",
    "NLAMMR",
    "collate",
    "ddi_rate_of",
    "history_attention",
    "medrec_loss",
    "multilabel_margin_targets",
]
