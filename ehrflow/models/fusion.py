"""Multimodal fusion models for stay-level prediction (plain torch, sized from ``FusionModelConfig``).

Inputs (a dict of tensors, batch first): ``values``/``mask`` (B, bins, variables) in z-space,
``static`` (B, S), optional ``stats`` (B, K) per-variable summary statistics, and optional text
embeddings ``notes``/``summary`` (B, D) with presence masks ``notes_mask``/``summary_mask`` (B,).

- Time series: a GRU-D-style input decay (missing values decay from the last observation toward
  the training mean at a learned per-variable rate) feeds a GRU (default) or a Transformer.
- **EMERGE** (Zhu et al., 2024): note and summary embeddings are fused by a learned gate; EHR
  tokens and text tokens attend to each other (cross-attention); attention pooling with a
  per-sample LayerNorm makes one representation for the task heads.
- **MEDFuse** (Phan et al., 2024): masked lab-test modelling pretrains the time-series encoder
  (``pretrain_loss``); shared and modality-specific projections are disentangled with a CLUB
  mutual-information upper bound (Cheng et al., 2020), weighted by ``mi_weight``.

A missing modality never produces NaN: text keys are masked, and a learned "null" token is always
present for attention to fall back on.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call

Task = Literal["mortality", "readmission", "phenotypes"]
StatsLayout = Literal["summary", "summary+trajectory"]
"""Six summary statistics per variable, or those and seven trajectory statistics (``features.trajectory_stats``)."""


class FusionModelConfig(BaseModel):
    n_variables: int = Field(ge=1)
    n_bins: int = Field(ge=1)
    n_static: int = Field(0, ge=0)
    n_stats: int = Field(0, ge=0)
    """0: no summary-statistics branch."""
    stats_layout: StatsLayout = "summary+trajectory"
    text_dim: int = Field(0, ge=0)
    use_notes: bool = False
    use_summary: bool = False
    variant: Literal["emerge", "medfuse"] = "emerge"
    encoder: Literal["gru", "transformer"] = "gru"
    hidden: int = Field(64, ge=4)
    layers: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    bin_hours: float = Field(1.0, gt=0)
    tasks: list[Task] = Field(default_factory=lambda: ["mortality"])
    n_phenotypes: int = Field(10, ge=1)
    mi_weight: float = Field(0.1, ge=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)

    @property
    def uses_text(self) -> bool:
        return self.use_notes or self.use_summary


def decay_inputs(values: torch.Tensor, mask: torch.Tensor, bin_hours: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-filled last values and hours since the last observation, recomputed from ``mask``.

    Recomputing in the model (not the data loader) keeps masked pretraining honest: a value hidden
    from the encoder is hidden from its forward-fill too.
    """
    steps = values.shape[1]
    last = torch.zeros_like(values[:, 0])
    since = torch.zeros_like(values[:, 0])
    lasts, deltas = [], []
    for step in range(steps):
        observed = mask[:, step]
        deltas.append(since)
        last = torch.where(observed > 0, values[:, step], last)
        lasts.append(last)
        since = torch.where(observed > 0, torch.full_like(since, bin_hours), since + bin_hours)
    return torch.stack(lasts, 1), torch.stack(deltas, 1)


class TimeSeriesEncoder(nn.Module):
    """(B, T, V) values and mask -> (B, T, H) representations."""

    def __init__(self, cfg: FusionModelConfig):
        super().__init__()
        v, h = cfg.n_variables, cfg.hidden
        self.bin_hours = cfg.bin_hours
        self.horizon = cfg.n_bins * cfg.bin_hours
        self.decay_weight = nn.Parameter(torch.full((v,), 0.1))
        self.decay_bias = nn.Parameter(torch.zeros(v))
        self.input = nn.Sequential(nn.Linear(3 * v, h), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.kind = cfg.encoder
        if cfg.encoder == "gru":
            self.rnn = nn.GRU(
                h, h, num_layers=cfg.layers, batch_first=True, dropout=cfg.dropout if cfg.layers > 1 else 0
            )
        else:
            self.position = nn.Parameter(torch.randn(cfg.n_bins, h) * 0.02)
            layer = nn.TransformerEncoderLayer(
                h, cfg.heads, dim_feedforward=2 * h, dropout=cfg.dropout, batch_first=True, norm_first=True
            )
            self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last, delta = decay_inputs(values, mask, self.bin_hours)
        gamma = torch.exp(-torch.relu(self.decay_weight * delta + self.decay_bias))
        imputed = mask * values + (1 - mask) * gamma * last
        scaled_delta = torch.log1p(delta) / math.log1p(self.horizon)
        x = self.input(torch.cat([imputed, mask, scaled_delta], dim=-1))
        if self.kind == "gru":
            return self.rnn(x)[0]
        return self.transformer(x + self.position[: x.shape[1]])


class AttentionPool(nn.Module):
    """Masked attention pooling over tokens, then a per-sample LayerNorm (batch-size independent)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        scores = self.score(tokens).squeeze(-1).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return self.norm((weights.unsqueeze(-1) * tokens).sum(1))


class GatedTextFusion(nn.Module):
    """EMERGE's gate between note and summary representations; falls back to whichever is present."""

    def __init__(self, text_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.note = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.summary = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.gate = nn.Linear(2 * hidden, hidden)

    def forward(
        self, notes: torch.Tensor, notes_mask: torch.Tensor, summary: torch.Tensor, summary_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        note_tok, summary_tok = self.note(notes), self.summary(summary)
        gate = torch.sigmoid(self.gate(torch.cat([note_tok, summary_tok], -1)))
        nm, sm = notes_mask.unsqueeze(-1).float(), summary_mask.unsqueeze(-1).float()
        gate = gate * nm * sm + nm * (1 - sm)  # only notes -> 1, only summary -> 0
        fused = gate * note_tok + (1 - gate) * summary_tok
        return note_tok, summary_tok, fused, notes_mask | summary_mask


class CLUB(nn.Module):
    """CLUB upper bound on I(x; y) with a Gaussian variational q(y | x) (Cheng et al., ICML 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.logvar = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Tanh())

    def _moments(self, x: torch.Tensor, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not frozen:
            return self.mu(x), self.logvar(x)
        mu = functional_call(self.mu, {k: p.detach() for k, p in self.mu.named_parameters()}, (x,))
        logvar = functional_call(self.logvar, {k: p.detach() for k, p in self.logvar.named_parameters()}, (x,))
        return mu, logvar

    def fit_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of q(y|x): trains q only (the encoders are detached)."""
        mu, logvar = self._moments(x.detach(), frozen=False)
        return (((mu - y.detach()) ** 2) / logvar.exp() + logvar).mean() / 2

    def upper_bound(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The MI estimate the encoders minimise (q frozen for this term)."""
        mu, logvar = self._moments(x, frozen=True)
        positive = -((mu - y) ** 2) / 2 / logvar.exp()
        negative = -((y.unsqueeze(0) - mu.unsqueeze(1)) ** 2).mean(1) / 2 / logvar.exp()
        return (positive.sum(-1) - negative.sum(-1)).mean()


class FusionModel(nn.Module):
    """EMERGE or MEDFuse fusion over time series, static data, statistics and text embeddings."""

    def __init__(self, cfg: FusionModelConfig):
        super().__init__()
        if cfg.uses_text and cfg.text_dim <= 0:
            raise ValueError("text modalities are enabled but text_dim is 0")
        self.cfg = cfg
        h = cfg.hidden
        self.ts = TimeSeriesEncoder(cfg)
        self.static = nn.Sequential(nn.Linear(cfg.n_static, h), nn.GELU()) if cfg.n_static else None
        self.stats = (
            nn.Sequential(nn.Linear(cfg.n_stats, 2 * h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * h, h))
            if cfg.n_stats
            else None
        )
        self.reconstruct = nn.Linear(h, cfg.n_variables)
        self.ehr_pool = AttentionPool(h)
        if cfg.uses_text:
            self.text = GatedTextFusion(cfg.text_dim, h, cfg.dropout)
            self.null_token = nn.Parameter(torch.zeros(1, 1, h))
        if cfg.variant == "emerge" and cfg.uses_text:
            self.ehr_to_text = nn.MultiheadAttention(h, cfg.heads, dropout=cfg.dropout, batch_first=True)
            self.text_to_ehr = nn.MultiheadAttention(h, cfg.heads, dropout=cfg.dropout, batch_first=True)
            self.ehr_norm = nn.LayerNorm(h)
            self.text_norm = nn.LayerNorm(h)
            self.fused_pool = AttentionPool(h)
        if cfg.variant == "medfuse":
            self.shared_ehr = nn.Linear(h, h)
            self.specific_ehr = nn.Linear(h, h)
            self.club_ehr = CLUB(h, h)
            parts = 2
            if cfg.uses_text:
                self.shared_text = nn.Linear(h, h)
                self.specific_text = nn.Linear(h, h)
                self.club_text = CLUB(h, h)
                parts = 3
            self.merge = nn.Sequential(nn.LayerNorm(parts * h), nn.Linear(parts * h, h), nn.GELU())
        self.dropout = nn.Dropout(cfg.dropout)
        out = {"mortality": 1, "readmission": 1, "phenotypes": cfg.n_phenotypes}
        self.heads = nn.ModuleDict({task: nn.Linear(h, out[task]) for task in cfg.tasks})

    def _ehr_tokens(self, batch: dict[str, torch.Tensor], values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = [self.ts(values, mask)]
        if self.static is not None:
            tokens.append(self.static(batch["static"]).unsqueeze(1))
        if self.stats is not None:
            tokens.append(self.stats(batch["stats"]).unsqueeze(1))
        return torch.cat(tokens, 1)

    def _text(self, batch: dict[str, torch.Tensor], size: int, device: torch.device):
        zeros = torch.zeros(size, self.cfg.text_dim, device=device)
        absent = torch.zeros(size, dtype=torch.bool, device=device)
        notes, nm = (batch["notes"], batch["notes_mask"].bool()) if self.cfg.use_notes else (zeros, absent)
        summary, sm = (batch["summary"], batch["summary_mask"].bool()) if self.cfg.use_summary else (zeros, absent)
        return self.text(notes, nm, summary, sm), nm, sm

    def forward(
        self, batch: dict[str, torch.Tensor], pretrain: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Task logits (``mortality``/``readmission``: (B,), ``phenotypes``: (B, P)) and ``aux_loss``;
        with ``pretrain`` only ``pretrain_loss`` (going through ``forward`` keeps DDP's gradient sync)."""
        if pretrain:
            return {"pretrain_loss": self.pretrain_loss(batch, generator)}
        values, mask = batch["values"], batch["mask"]
        b, device = values.shape[0], values.device
        ehr = self._ehr_tokens(batch, values, mask)
        ehr_valid = torch.ones(ehr.shape[:2], dtype=torch.bool, device=device)
        aux = torch.zeros((), device=device)
        if not self.cfg.uses_text:
            rep = self.ehr_pool(ehr, ehr_valid)
            if self.cfg.variant == "medfuse":
                rep, aux = self._disentangle(rep, None, None)
        elif self.cfg.variant == "emerge":
            (note_tok, summary_tok, fused, any_text), nm, sm = self._text(batch, b, device)
            text = torch.cat([self.null_token.expand(b, 1, -1), torch.stack([note_tok, summary_tok, fused], 1)], 1)
            text_valid = torch.stack([torch.ones_like(nm), nm, sm, any_text], 1)
            ehr_ctx = self.ehr_to_text(ehr, text, text, key_padding_mask=~text_valid, need_weights=False)[0]
            text_ctx = self.text_to_ehr(text, ehr, ehr, need_weights=False)[0]
            ehr = self.ehr_norm(ehr + ehr_ctx)
            text = self.text_norm(text + text_ctx)
            rep = self.fused_pool(torch.cat([ehr, text[:, 1:]], 1), torch.cat([ehr_valid, text_valid[:, 1:]], 1))
        else:
            (_, _, fused, any_text), _, _ = self._text(batch, b, device)
            rep, aux = self._disentangle(self.ehr_pool(ehr, ehr_valid), fused, any_text)
        rep = self.dropout(rep)
        out = {task: head(rep) for task, head in self.heads.items()}
        for task in ("mortality", "readmission"):
            if task in out:
                out[task] = out[task].squeeze(-1)
        out["aux_loss"] = aux
        return out

    def _disentangle(
        self, ehr: torch.Tensor, text: torch.Tensor | None, text_present: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MEDFuse: shared + specific parts per modality; CLUB keeps them apart, an MSE aligns shared parts."""
        shared_e, specific_e = self.shared_ehr(ehr), self.specific_ehr(ehr)
        aux = self.cfg.mi_weight * self.club_ehr.upper_bound(shared_e, specific_e) + self.club_ehr.fit_loss(
            shared_e, specific_e
        )
        if text is None or text_present is None:
            return self.merge(torch.cat([shared_e, specific_e], -1)), aux
        present = text_present.float().unsqueeze(-1)
        shared_t, specific_t = self.shared_text(text) * present, self.specific_text(text) * present
        if text_present.sum() > 1:
            st, pt = shared_t[text_present], specific_t[text_present]
            aux = aux + self.cfg.mi_weight * self.club_text.upper_bound(st, pt) + self.club_text.fit_loss(st, pt)
            aux = aux + ((shared_e[text_present] - st) ** 2).mean()
        shared = (shared_e + shared_t) / (1 + present)
        return self.merge(torch.cat([shared, specific_e, specific_t], -1)), aux

    def pretrain_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Masked lab-test modelling: hide ``mask_ratio`` of the observed values and reconstruct them."""
        values, mask = batch["values"], batch["mask"]
        draw = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
        hidden = (draw < self.cfg.mask_ratio) & (mask > 0)
        if not hidden.any():
            return torch.zeros((), device=values.device, requires_grad=True)
        visible = mask * (~hidden).float()
        states = self.ts(values * visible, visible)
        predicted = self.reconstruct(states)
        return ((predicted - values) ** 2)[hidden].mean()


__all__ = [
    "CLUB",
    "AttentionPool",
    "FusionModel",
    "FusionModelConfig",
    "GatedTextFusion",
    "StatsLayout",
    "TimeSeriesEncoder",
]
