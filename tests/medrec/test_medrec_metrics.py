"""Med-rec metrics, loss and model wiring on hand-made tensors (no data, no Ray)."""

import math
import warnings

import numpy as np
import pytest
import torch

from ehrflow.models.medrec import NLAMMR, GAMENet, MultiHotLinear, collate, ddi_rate_of, medrec_loss
from ehrflow.training.medrec import (
    bootstrap_rounds,
    cohort_metrics,
    ddi_guard_probs,
    ddi_rate,
    drug_log_odds,
    visit_metrics,
)


def test_visit_metrics_by_hand():
    truth = np.array([[1, 1, 0, 0], [0, 0, 1, 0]])
    prob = np.array([[0.9, 0.2, 0.7, 0.1], [0.1, 0.1, 0.8, 0.6]])
    m = visit_metrics(truth, prob)
    # visit 1: pred {0,2}, true {0,1}: J=1/3, P=1/2, R=1/2, F1=1/2; visit 2: pred {2,3}, true {2}: J=1/2, P=1/2, R=1, F1=2/3
    assert m["jaccard"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # PRAUC: visit 1 ranks 0 (true), 2, 1 (true), 3 -> AP = (1 + 2/3)/2; visit 2 ranks 2 (true) first -> 1
    assert m["prauc"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_empty_predictions_and_labels_do_not_divide_by_zero():
    truth = np.zeros((2, 5))
    truth[1, 3] = 1
    prob = np.zeros((2, 5))  # nothing predicted anywhere; visit 0 has no true drug either
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would warn
        m = visit_metrics(truth, prob)
        c = cohort_metrics([truth], [prob], np.zeros((5, 5)))
        all_empty = visit_metrics(np.zeros((1, 5)), np.zeros((1, 5)))
    assert m["jaccard"] == 0.0 and m["f1"] == 0.0 and m["precision"] == 0.0
    assert c["ddi_rate"] == 0.0 and c["avg_drugs"] == 0.0
    assert math.isnan(all_empty["prauc"]) and all_empty["jaccard"] == 0.0


def test_ddi_rate_counts_interacting_pairs_within_visits():
    ddi = np.zeros((4, 4))
    ddi[0, 1] = ddi[1, 0] = 1
    # visit a: {0,1,2} -> 3 pairs, 1 bad; visit b: {1} -> no pairs; visit c: {0,1} -> 1 pair, 1 bad
    assert ddi_rate([np.array([0, 1, 2]), np.array([1]), np.array([0, 1])], ddi) == pytest.approx(2 / 4)
    assert math.isnan(ddi_rate([np.array([0, 1])], None))
    pred = torch.tensor([[1.0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
    assert ddi_rate_of(pred, torch.as_tensor(ddi, dtype=torch.float32)) == pytest.approx(2 / 4)


def test_ddi_guard_drops_the_least_likely_interacting_drug():
    ddi = np.zeros((4, 4))
    ddi[0, 1] = ddi[1, 0] = 1.0
    probs = np.array([[0.9, 0.7, 0.8, 0.1], [0.9, 0.2, 0.8, 0.1]])
    strict = ddi_guard_probs(probs, ddi, limit=0.0, threshold=0.5)
    assert [set(np.flatnonzero(r >= 0.5)) for r in strict] == [{0, 2}, {0, 2}]  # drug 1 (0.7 < 0.9) goes
    assert 0.49 < strict[0, 1] < 0.5 and strict[0, 3] == 0.1 and (strict[1] == probs[1]).all()
    lenient = ddi_guard_probs(probs, ddi, limit=1 / 3, threshold=0.5)  # 1 interacting pair of 3 is allowed
    assert (lenient == probs).all()


def test_ddi_guard_keeps_every_visit_under_the_limit():
    rng = np.random.default_rng(0)
    upper = np.triu(rng.random((30, 30)) < 0.15, 1)
    ddi = (upper | upper.T).astype(float)
    probs = rng.random((200, 30)).astype(np.float32)  # as the models output
    for limit in (0.0, 0.05, 0.2):
        guarded = ddi_guard_probs(probs, ddi, limit=limit, threshold=0.5)
        rows = [np.flatnonzero(r >= 0.5) for r in guarded]
        assert max(ddi_rate([r], ddi) for r in rows) <= limit + 1e-12
        assert ddi_rate(rows, ddi) < ddi_rate([np.flatnonzero(r >= 0.5) for r in probs], ddi)
        kept = guarded >= 0.5
        assert (probs[kept] == guarded[kept]).all() and not (kept & (probs < 0.5)).any()


def test_bootstrap_is_seeded_and_has_spread():
    rng = np.random.default_rng(1)
    truths = [(rng.random((3, 6)) > 0.5).astype(float) for _ in range(20)]
    probs = [rng.random((3, 6)) for _ in range(20)]
    a = bootstrap_rounds(truths, probs, None, rounds=10, fraction=0.8, seed=3)
    b = bootstrap_rounds(truths, probs, None, rounds=10, fraction=0.8, seed=3)
    assert a == b
    assert set(a) == {"jaccard", "f1", "prauc", "ddi_rate", "avg_drugs"}
    assert 0 < a["jaccard"].mean < 1 and a["jaccard"].sd > 0
    assert math.isnan(a["ddi_rate"].mean)  # no DDI matrix given
    with pytest.raises(ValueError, match="no test patients"):
        bootstrap_rounds([], [], None)


def test_ddi_loss_takes_over_only_above_target():
    torch.manual_seed(0)
    ddi = torch.ones(4, 4) - torch.eye(4)
    target = torch.tensor([[1.0, 0, 0, 0]])
    all_on = torch.full((1, 4), 5.0, requires_grad=True)  # predicts every drug: every pair interacts
    loss, stats = medrec_loss(all_on, target, ddi, target_ddi=0.06)
    assert stats["batch_ddi_rate"] == 1.0 and stats["beta"] == 0.0
    assert loss.item() == pytest.approx(stats["ddi_loss"])
    one_on = torch.tensor([[5.0, -5, -5, -5]])
    loss, stats = medrec_loss(one_on, target, ddi, target_ddi=0.06)
    assert stats["batch_ddi_rate"] == 0.0 and "beta" not in stats
    assert loss.item() == pytest.approx(0.95 * stats["bce"] + 0.05 * stats["margin"])


@pytest.mark.parametrize("name", ["nlammr", "gamenet", "logreg"])
def test_a_visit_never_sees_its_own_drugs(name):
    """Visit t may use visits < t's drugs only: changing visit t's (or later) drugs leaves its logits alone."""
    torch.manual_seed(0)
    n_diag, n_proc, n_meds = 12, 8, 10
    if name == "nlammr":
        model = NLAMMR(
            torch.randn(n_diag, 16),
            torch.randn(n_proc, 16),
            torch.randn(n_meds, 16),
            torch.rand(n_meds, 32),
            torch.tensor([True] * 5 + [False] * 5),
            dim=8,
        )
    elif name == "gamenet":
        model = GAMENet(n_diag, n_proc, n_meds, (torch.rand(n_meds, n_meds) > 0.5).float(), torch.eye(n_meds), dim=8)
    else:
        model = MultiHotLinear(n_diag, n_proc, n_meds)
    model.eval()
    patient = [([2, 3], [2], [0, 1]), ([4], [3, 5], [2]), ([5, 6], [], [3, 4])]
    changed = [*patient[:1], (patient[1][0], patient[1][1], [7, 8, 9]), (patient[2][0], patient[2][1], [9])]
    a = model(collate([patient], n_meds))
    b = model(collate([changed], n_meds))
    assert a.shape == (1, 3, n_meds)
    assert torch.allclose(a[0, :2], b[0, :2])  # visits 0 and 1 do not see their own / later drugs
    if name != "logreg":
        assert not torch.allclose(a[0, 2], b[0, 2])  # visit 2 does see visit 1's drugs


def test_drug_log_odds_counts_visits_with_laplace_smoothing():
    from ehrflow.training.medrec_data import OOV, PAD, MedRecDataset

    visits = [[([2], [2], [0, 1]), ([2], [], [0])], [([3], [2], [0, 0])], [([3], [], [2])]]
    dataset = MedRecDataset(["a", "b", "c"], visits, [PAD, OOV, "d1", "d2"], [PAD, OOV, "p1"], ["m0", "m1", "m2"])
    odds = drug_log_odds(dataset, [0, 1])  # patient c (the only one with m2) is not in the training set
    # 3 training visits: m0 in all 3 (a repeated id counts once), m1 in 1, m2 in none; (k + 1) / (3 + 2)
    expected = [math.log(p / (1 - p)) for p in (4 / 5, 2 / 5, 1 / 5)]
    assert np.allclose(odds, expected)


def test_nlammr_repeat_term_favours_drugs_given_at_earlier_visits():
    """At initialisation a drug given at the previous visit scores ``repeat_init + last_visit_init`` logits more,
    one given only at an older visit ``repeat_init`` times its attention share."""
    torch.manual_seed(0)
    n_meds = 6
    model = NLAMMR(
        torch.randn(5, 16),
        torch.randn(4, 16),
        torch.randn(n_meds, 16),
        torch.rand(n_meds, 32),
        torch.ones(n_meds, dtype=torch.bool),
        dim=8,
        bias_init=torch.full((n_meds,), -2.0),
    ).eval()
    with torch.no_grad():
        model.med_id.zero_()
        model.merge.weight.zero_()  # isolate the repeat term from the (random) history vector
        model.merge.bias.zero_()
    before = [([2], [2], [3]), ([3], [2], [1])]
    logits = model(collate([before], n_meds))[0, 1]
    assert torch.allclose(logits, torch.full((n_meds,), -2.0) + 6.0 * torch.eye(n_meds)[3])
    older = [([2], [2], [3]), ([3], [2], [1]), ([4], [3], [0])]
    logits = model(collate([older], n_meds))[0, 2]
    assert logits[1] > logits[3] > logits[2]  # last visit's drug > older visit's drug > never given


def test_molecule_graphs_and_gin_encode_each_drug_class():
    pytest.importorskip("rdkit")
    from ehrflow.knowledge.molecules import ATOM_FEATURES, molecule_graphs
    from ehrflow.models.medrec import MoleculeGIN

    aspirin, ethanol = "CC(=O)Oc1ccccc1C(=O)O", "CCO"
    graphs = molecule_graphs([[aspirin, ethanol], [], ["not a smiles"], [ethanol]])
    assert graphs.atoms.shape == (13 + 3 + 3, ATOM_FEATURES)
    assert graphs.edges.shape == (2, 2 * (13 + 2 + 2))  # each bond in both directions
    assert graphs.molecule_drug.tolist() == [0, 0, 3]
    assert graphs.has_molecule().tolist() == [True, False, False, True]
    t = torch.as_tensor
    gin = MoleculeGIN(t(graphs.atoms), t(graphs.edges), t(graphs.atom_molecule), t(graphs.molecule_drug), 4, dim=8)
    out = gin()
    assert out.shape == (4, 8)
    assert torch.all(out[1] == 0) and torch.all(out[2] == 0)  # classes without a parsed molecule
    assert not torch.allclose(out[0], out[3])  # aspirin + ethanol vs ethanol alone
    out.sum().backward()
    assert gin.embed.weight.grad is not None and gin.embed.weight.grad.abs().sum() > 0
