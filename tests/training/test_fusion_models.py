import pytest
import torch

from ehrflow.models.fusion import CLUB, FusionModel, FusionModelConfig, decay_inputs

B, T, V, S, D = 6, 8, 5, 4, 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine run ~10x faster on one thread than on two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(text_present: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(B, T, V, generator=g) < 0.4).float()
    notes_mask = torch.tensor([text_present, False, text_present, False, True, False])
    summary_mask = torch.tensor([text_present, text_present, False, False, False, False])
    return {
        "values": torch.randn(B, T, V, generator=g) * mask,
        "mask": mask,
        "static": torch.randn(B, S, generator=g),
        "stats": torch.randn(B, V * 6, generator=g),
        "notes": torch.randn(B, D, generator=g) * notes_mask[:, None],
        "notes_mask": notes_mask,
        "summary": torch.randn(B, D, generator=g) * summary_mask[:, None],
        "summary_mask": summary_mask,
    }


def _config(**kw) -> FusionModelConfig:
    base = dict(
        n_variables=V,
        n_bins=T,
        n_static=S,
        n_stats=V * 6,
        text_dim=D,
        use_notes=True,
        use_summary=True,
        hidden=16,
        heads=2,
        tasks=["mortality", "readmission", "phenotypes"],
        n_phenotypes=3,
    )
    return FusionModelConfig(**{**base, **kw})


@pytest.mark.parametrize("variant", ["emerge", "medfuse"])
@pytest.mark.parametrize("encoder", ["gru", "transformer"])
def test_forward_shapes_and_finite_with_missing_modalities(variant, encoder):
    torch.manual_seed(0)
    model = FusionModel(_config(variant=variant, encoder=encoder))
    out = model(_batch())  # sample 3 and 5 have no text at all
    assert out["mortality"].shape == (B,) and out["readmission"].shape == (B,) and out["phenotypes"].shape == (B, 3)
    assert all(torch.isfinite(v).all() for v in out.values())
    loss = out["mortality"].sum() + out["phenotypes"].sum() + out["aux_loss"]
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_time_series_only_model_ignores_text_inputs():
    model = FusionModel(_config(use_notes=False, use_summary=False, text_dim=0)).eval()
    batch = _batch()
    changed = dict(batch, notes=batch["notes"] + 5.0)
    torch.testing.assert_close(model(batch)["mortality"], model(changed)["mortality"])


def test_text_changes_predictions_only_where_present():
    model = FusionModel(_config(dropout=0.0)).eval()
    batch = _batch()
    changed = dict(batch, notes=batch["notes"] + 3.0 * batch["notes_mask"][:, None])
    before, after = model(batch)["mortality"], model(changed)["mortality"]
    has_notes = batch["notes_mask"]
    assert not torch.allclose(before[has_notes], after[has_notes])
    torch.testing.assert_close(before[~has_notes], after[~has_notes])


def test_per_sample_normalisation_makes_predictions_batch_independent():
    model = FusionModel(_config()).eval()
    batch = _batch()
    alone = model({k: v[:1] for k, v in batch.items()})["mortality"]
    torch.testing.assert_close(alone, model(batch)["mortality"][:1], atol=1e-5, rtol=1e-5)


def test_decay_inputs_forward_fill_and_hours_since_last():
    values = torch.tensor([[[1.0], [0.0], [3.0], [0.0]]])
    mask = torch.tensor([[[1.0], [0.0], [1.0], [0.0]]])
    last, delta = decay_inputs(values, mask, bin_hours=2.0)
    assert last.flatten().tolist() == [1, 1, 3, 3]
    assert delta.flatten().tolist() == [0, 2, 4, 2]


def test_masked_lab_pretraining_loss_hides_values_and_learns():
    torch.manual_seed(0)
    model = FusionModel(_config(variant="medfuse", mask_ratio=0.75))
    batch = _batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        loss = model(batch, pretrain=True, generator=torch.Generator().manual_seed(step % 3))["pretrain_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_club_bound_is_larger_for_dependent_than_independent_variables():
    torch.manual_seed(0)
    x, x_new = torch.randn(512, 4), torch.randn(512, 4)
    pairs = {
        "dependent": (x + 0.1 * torch.randn(512, 4), x_new + 0.1 * torch.randn(512, 4)),
        "independent": (torch.randn(512, 4), torch.randn(512, 4)),
    }
    estimates = {}
    for name, (y, y_new) in pairs.items():
        club = CLUB(4, 16)
        optimizer = torch.optim.Adam(club.parameters(), lr=1e-2)
        for _ in range(100):
            loss = club.fit_loss(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        estimates[name] = float(club.upper_bound(x_new, y_new))  # on held-out pairs
    assert estimates["dependent"] > 1.0 > abs(estimates["independent"])


def test_text_without_dimension_is_a_config_error():
    with pytest.raises(ValueError, match="text_dim"):
        FusionModel(_config(text_dim=0))
