"""Adaptation, the posterior update, label accounting and the runner on tiny float64 features."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
from brute_force import dense_glm_moments
from torch.func import jacrev
from torch.nn import functional as F

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.active import acquisition, loop
from laplace_vlm.active.acquisition import Strategy
from laplace_vlm.active.adaptation import (
    FinetuneSettings,
    cv_folds,
    finetune_image_projection,
    sgd_step,
)
from laplace_vlm.active.config import ActiveLearningConfig, ActiveLearningProblem
from laplace_vlm.active.experiment import run_experiment
from laplace_vlm.active.posterior_update import classification_factor_sums, update_posterior
from laplace_vlm.active.reference import greedy_epig, online_update
from laplace_vlm.active.report import summarize
from laplace_vlm.active.selection import weighted_scores
from laplace_vlm.cli import active as cli_active

D, D_IMG, D_TXT, C = 6, 8, 5, 3


def _laplace(seed: int = 0, bias: bool = False) -> DualEncoderLaplace:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(D, D_IMG, generator=g, dtype=torch.float64)
    if bias:  # an nn.Linear with a bias: folded into a joint [W | b] factor by default
        linear = torch.nn.Linear(D_IMG, D).double()
        with torch.no_grad():
            linear.weight.copy_(image)
            linear.bias.copy_(torch.randn(D, generator=g, dtype=torch.float64))
        image = linear
    la = DualEncoderLaplace(
        None, "classification",
        image_projection=image,
        text_projection=torch.randn(D, D_TXT, generator=g, dtype=torch.float64),
        logit_scale=math.log(10.0), prior_precision=1.0,
    )  # fmt: skip
    pairs = [(torch.randn(8, D_IMG, generator=g, dtype=torch.float64),
              torch.randn(8, D_TXT, generator=g, dtype=torch.float64)) for _ in range(3)]  # fmt: skip
    la.fit(pairs)
    return la


def _problem(seed: int = 0, with_val: bool = False) -> ActiveLearningProblem:
    """Labels from a random linear rule of the activations: learnable, not trivial."""
    g = torch.Generator().manual_seed(100 + seed)
    rule = torch.randn(D_IMG, C, generator=g, dtype=torch.float64)

    def split(n):
        x = torch.randn(n, D_IMG, generator=g, dtype=torch.float64)
        return x, (x @ rule).argmax(-1)

    pool, test, val = split(60), split(25), split(15)
    text = torch.randn(C, D_TXT, generator=g, dtype=torch.float64)
    extra = {"val": val[0], "val_labels": val[1]} if with_val else {}
    return ActiveLearningProblem(*pool, *test, class_text=text, **extra)


def _dense_ggn(la, acts: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
    """J^T (diag p - p p^T) J of the C-way cosine logits w.r.t. the image weight, summed."""
    W_t, scale = la.heads.text_projection.weight, la.heads.logit_scale.exp()
    t = F.normalize(class_text @ W_t.T, dim=-1)
    W = la.heads.image_projection.weight.detach()  # (D, d_img [+ 1]) with a folded bias
    total = torch.zeros(W.numel(), W.numel(), dtype=torch.float64)
    ones = torch.ones(len(acts), W.shape[1] - acts.shape[1], dtype=acts.dtype)
    for a in torch.cat([acts, ones], 1):
        logits_of = lambda w: scale * F.normalize(w.view_as(W) @ a, dim=0) @ t.T  # noqa: E731
        J = jacrev(logits_of)(W.flatten())  # (C, P)
        p = torch.softmax(logits_of(W.flatten()), -1)
        total += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return total


@pytest.mark.parametrize("bias", [False, True])
def test_classification_curvature_is_the_dense_c_way_ggn(bias):
    la, p = _laplace(bias=bias), _problem()
    acts, labels = p.pool[:5], p.pool_labels[:5]
    B, A, loss = classification_factor_sums(la, (acts, labels), p.class_text)
    singles = [classification_factor_sums(la, (acts[i : i + 1], labels[i : i + 1]), p.class_text)
               for i in range(5)]  # fmt: skip
    # one image: the KFAC factor product is its exact GGN; several: the sums add up
    dense = _dense_ggn(la, acts, p.class_text)
    torch.testing.assert_close(sum(torch.kron(b, a) for b, a, _ in singles), dense)
    torch.testing.assert_close(B, sum(b for b, _, _ in singles))
    design = la.heads.design("image", acts)
    torch.testing.assert_close(A, design.T @ design)
    assert loss.item() == pytest.approx(sum(s[2].item() for s in singles), rel=1e-12)
    # every class prompt is a class whatever the labels: five images of one class add the
    # same curvature (as one class batch they would add none)
    same = (acts, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(classification_factor_sums(la, same, p.class_text)[0], B)
    assert B.trace() > 0


def test_update_posterior_adds_the_image_curvature_and_keeps_the_text_head():
    la, p = _laplace(), _problem()
    new = (p.pool[:7], p.pool_labels[:7])
    (B0, A0), (Bt, At) = la.H_facs.kfacs[0], la.H_facs.kfacs[-1]
    n0 = la.n_data
    var_before = la.predictive_moments({"image": new[0], "text": p.class_text})[1]
    updated = copy.deepcopy(la)
    update_posterior(updated, la.heads.image_projection, new, p.class_text)
    B, A, _ = classification_factor_sums(la, new, p.class_text)
    assert updated.n_data == n0 + 7
    (B1, A1), (Bt1, At1) = updated.H_facs.kfacs[0], updated.H_facs.kfacs[-1]
    torch.testing.assert_close(torch.kron(B1, A1), torch.kron(B0 + B, (A0 * n0 + A) / (n0 + 7)))
    torch.testing.assert_close(torch.kron(Bt1, At1), torch.kron(Bt, At))  # text head as it was
    var_after = updated.predictive_moments({"image": new[0], "text": p.class_text})[1]
    assert (var_after.mean(-1) < var_before.mean(-1)).all()  # labelled inputs got more certain


def test_update_posterior_moves_the_mean_to_the_new_projection():
    la, p = _laplace(), _problem()
    proj = copy.deepcopy(la.heads.image_projection)
    with torch.no_grad():
        proj.weight.add_(0.1)
    update_posterior(la, proj, None, p.class_text)
    torch.testing.assert_close(la.mean[: D * D_IMG], proj.weight.flatten())
    with pytest.raises(ValueError, match="projection"):
        update_posterior(la, torch.nn.Linear(3, 2).double(), None, p.class_text)


def test_cv_folds_partition_and_stratify():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 2)
    folds = cv_folds(labels, 4, generator=3)
    assert sorted(torch.cat(folds).tolist()) == list(range(14)) and len(folds) == 4
    for c in range(3):
        counts = [int((labels[f] == c).sum()) for f in folds]
        assert max(counts) - min(counts) <= 1
    # no class with 4 points (every class twice): scikit-learn cannot stratify, plain folds
    pairs = torch.arange(6).repeat(2)
    folds = cv_folds(pairs, 4, generator=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(12)) and len(folds) == 4
    assert [len(f) for f in cv_folds(torch.tensor([0, 1, 1]), 5, generator=0)] == [1, 1, 1]
    with pytest.raises(ValueError, match="n_folds"):
        cv_folds(labels, 1)


def test_sgd_step_is_one_gradient_step_of_the_cross_entropy():
    la, p = _laplace(), _problem()
    x, y = p.pool[:4], p.pool_labels[:4]
    W = la.heads.image_projection.weight.detach().clone().requires_grad_()
    t = F.normalize(la.heads.embed_text(p.class_text), dim=-1).detach()
    loss = F.cross_entropy(la.heads.scale * F.normalize(x @ W.T, dim=-1) @ t.T, y)
    (grad,) = torch.autograd.grad(loss, W)
    stepped = sgd_step(la.heads, (x, y), p.class_text, lr=0.3)
    torch.testing.assert_close(stepped.weight, W.detach() - 0.3 * grad)
    assert torch.equal(la.heads.image_projection.weight, W.detach())  # heads untouched


@pytest.mark.parametrize("logit_bias", [None, -2.0])
def test_member_gradients_equal_autograd_of_the_weighted_cross_entropy(logit_bias):
    """The closed-form fine-tuning gradient (stacked members, an unfolded bias, SigLIP's logit
    bias) against autograd through the one cosine-logit formula, in float64."""
    from laplace_vlm.active.adaptation import _member_ce, _Members, _set_member_grads

    la, p = _laplace(), _problem()
    heads = la.heads
    if logit_bias is not None:
        heads.logit_bias = torch.tensor(logit_bias, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    init = torch.nn.Linear(D_IMG, D).double()
    with torch.no_grad():
        init.weight.copy_(torch.randn(D, D_IMG, generator=g, dtype=torch.float64))
        init.bias.copy_(torch.randn(D, generator=g, dtype=torch.float64))
    members = _Members(init, 3)
    x, y = p.pool[:7], p.pool_labels[:7]
    kept = torch.rand(3, 7, generator=g) > 0.3  # some rows are not a member's
    weights = torch.rand(3, 7, generator=g, dtype=torch.float64) * kept
    text_unit = F.normalize(heads.embed_text(p.class_text), dim=-1).detach()
    (weights * _member_ce(heads, members, x, y, text_unit)).sum().backward()
    expected = [param.grad.clone() for param in members.params]
    _set_member_grads(heads, members, x, y, text_unit, weights)
    for got, want in zip(members.params, expected):
        torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-12)


def test_greedy_epig_update_against_a_dense_recomputation():
    """Online picks (lr 0) equal a from-scratch rebuild at every step; each pick adds exactly
    its dense C-way GGN (the outer product a a^T, not the reference's scalar ||a||^2)."""
    la, p = _laplace(), _problem()
    cfg = _tiny_config(n_samples=64, n_epig_targets=25, epig_lr=0.0)
    region = torch.arange(12)
    strategy = Strategy.parse("epig")
    order = greedy_epig(la, p, region, 4, strategy, cfg, torch.Generator().manual_seed(5),
                        loop.LabelOracle(p.pool_labels))  # fmt: skip
    g, picked = torch.Generator().manual_seed(5), []
    for _ in range(4):  # the naive loop: the posterior rebuilt from la with all picks so far
        rebuilt = copy.deepcopy(la)
        if picked:
            idx = torch.tensor(picked)
            update_posterior(rebuilt, la.heads.image_projection,
                             (p.pool[idx], p.pool_labels[idx]), p.class_text)  # fmt: skip
        free = torch.tensor([i for i in region.tolist() if i not in picked])
        scores, _ = weighted_scores(rebuilt, p.pool[free], p, strategy, cfg, g)
        picked.append(int(free[acquisition.select(scores, 1, strategy, generator=g)]))
    assert order.tolist() == picked
    one = copy.deepcopy(la)
    before = one.factor_sums()
    online_update(one, (p.pool[picked[:1]], p.pool_labels[picked[:1]]), p.class_text, 0.0)
    after = one.factor_sums()
    dB, dA = after.B_image - before.B_image, after.A_image - before.A_image
    torch.testing.assert_close(torch.kron(dB, dA), _dense_ggn(la, p.pool[picked[:1]],
                                                              p.class_text))  # fmt: skip
    assert torch.linalg.matrix_rank(dA).item() == 1


def test_zero_shot_row_nlpd_against_a_dense_laplace_predictive():
    """A Laplace number of the runner on a small slice: the budget-0 NLPD and accuracy of the
    linearised predictive from the dense posterior covariance and autodiff Jacobians."""
    la, p = _laplace(), _problem()
    cfg = _tiny_config(strategies=("random",), seeds=(0,), rounds=1, pred_type="glm")
    row = run_experiment(la, p, cfg)["random"][0][0]
    mean, cov = dense_glm_moments(la, {"image": p.test, "text": p.class_text})
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    probs = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)
    expected = -torch.log(probs[torch.arange(len(p.test_labels)), p.test_labels]).mean()
    assert row["nlpd"] == pytest.approx(expected.item(), rel=1e-6)
    assert row["acc"] == pytest.approx((probs.argmax(-1) == p.test_labels).double().mean().item())
    assert row["label_entropy"] == 0.0 and row["class_counts"] == [0] * C


def _adamw_reference(heads, init, x, y, text, lr, wd, epochs):
    """One projection trained alone, full batch; returns its weights after every epoch."""
    proj = copy.deepcopy(init).requires_grad_(True)
    t = F.normalize(heads.embed_text(text), dim=-1).detach()
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=wd)
    states = [proj.weight.detach().clone()]
    for _ in range(epochs):
        loss = F.cross_entropy(heads.scale * F.normalize(proj(x), dim=-1) @ t.T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(proj.weight.detach().clone())
    return states


def test_cross_validated_finetuning_equals_separate_trainings():
    la, p = _laplace(), _problem()
    x, y = p.pool[:20], p.pool_labels[:20]
    folds = cv_folds(y, 4, generator=0)
    settings = FinetuneSettings(lr=0.05, epochs=25, patience=None, batch_size=64)
    res = finetune_image_projection(la.heads, (x, y), p.class_text, folds=folds,
                                    settings=settings, generator=0)  # fmt: skip
    init, t = la.heads.image_projection, F.normalize(la.heads.embed_text(p.class_text), dim=-1)
    curves = torch.zeros(26, dtype=torch.float64)
    for f, held in enumerate(folds):
        train = torch.ones(20, dtype=torch.bool)
        train[held] = False
        states = _adamw_reference(la.heads, init, x[train], y[train], p.class_text, 0.05, 5e-2, 25)
        torch.testing.assert_close(res.fold_projections[f].weight, states[res.best_epoch])
        for e, W in enumerate(states):  # summed held-out cross-entropy at every epoch
            logits = la.heads.scale * F.normalize(x[held] @ W.T, dim=-1) @ t.T
            curves[e] += F.cross_entropy(logits, y[held], reduction="sum").detach()
    assert res.best_epoch == int(curves.argmin()) > 0
    assert res.best_val_loss == pytest.approx(curves.min().item() / 20, rel=1e-9)
    full = _adamw_reference(la.heads, init, x, y, p.class_text, 0.05, 5e-2, res.best_epoch)
    torch.testing.assert_close(res.projection.weight, full[-1])
    assert torch.equal(la.heads.image_projection.weight, init.weight)  # heads untouched


def test_finetune_validation_arguments():
    la, p = _laplace(), _problem()
    train = (p.pool[:10], p.pool_labels[:10])
    with pytest.raises(ValueError, match="exactly one"):
        finetune_image_projection(la.heads, train, p.class_text)
    with pytest.raises(ValueError, match="val"):
        finetune_image_projection(
            la.heads, train, p.class_text, val=(p.test[:0], p.test_labels[:0])
        )
    short = finetune_image_projection(
        la.heads, train, p.class_text, val=(p.test, p.test_labels),
        settings=FinetuneSettings(lr=10.0, epochs=50, patience=1),
    )  # fmt: skip
    assert short.epochs_run <= short.best_epoch + 1  # patience 1: one epoch past the best


def _tiny_config(**kw) -> ActiveLearningConfig:
    base = dict(strategies=("random_untargeted", "random", "map_entropy", "bald_power", "epig",
                            "epig_density_power"),
                rounds=2, budget=6, seeds=(0, 1), k=2, n_samples=20, n_epig_targets=8,
                epochs=15, patience=5, cv_folds=3, pseudo_counts=(1.0, 100.0))  # fmt: skip
    return ActiveLearningConfig(**{**base, **kw})


@pytest.mark.parametrize("protocol", ["rounds", "reference"])
def test_labels_used_are_exactly_the_budget(monkeypatch, protocol):
    asked: list[int] = []
    original = loop.LabelOracle.__call__

    def spy(self, indices):
        asked.append(len(indices))
        return original(self, indices)

    monkeypatch.setattr(loop.LabelOracle, "__call__", spy)
    la, cfg = _laplace(), _tiny_config(strategies=("random", "bald"), seeds=(0,), protocol=protocol)
    results = run_experiment(la, _problem(with_val=False), cfg)  # no validation split exists
    for rows in results.values():
        assert sorted(rows) == [0, 6, 12]
        assert [rows[b][0]["labels_used"] for b in (0, 6, 12)] == [0, 6, 12]
    # rounds: the whole support is looked up again each round, never a label beyond it
    assert max(asked) == 12 and len(asked) == 4
    split = _tiny_config(strategies=("random",), seeds=(0,), validation="target_split",
                         protocol=protocol)  # fmt: skip
    rows = run_experiment(la, _problem(with_val=True), split)["random"]
    assert [rows[b][0]["labels_used"] for b in (6, 12)] == [6 + 15, 12 + 15]  # + the split


def test_mini_runner_end_to_end_seeded_and_in_the_json_schema():
    la = _laplace()
    cfg = _tiny_config(strategies=("random_untargeted", "map_entropy", "bald_power",
                                   "epig_density_power"))  # fmt: skip
    before = copy.deepcopy(la.H_facs.kfacs)
    summary = summarize(run_experiment(la, _problem, cfg))
    assert all(torch.equal(a, b) for x, y in zip(before, la.H_facs.kfacs) for a, b in zip(x, y))
    assert list(summary) == list(cfg.strategies)
    for rows in summary.values():
        assert list(rows) == ["0", "6", "12"]
        assert all({"acc_mean", "acc_std", "ece_mean"} <= set(r) for r in rows.values())
    # budget 0 is the same zero-shot model for every strategy
    assert len({rows["0"]["acc_mean"] for rows in summary.values()}) == 1
    # seeded: a rerun of a part reproduces its numbers
    part = _tiny_config(strategies=("bald_power",), seeds=(1,))
    again = summarize(run_experiment(la, _problem, part))["bald_power"]
    assert all(again[b]["acc_mean"] == summary["bald_power"][b]["acc_per_seed"][1] for b in again)


def test_config_validation_and_presets():
    for kwargs, match in ((dict(strategies=("bald", "nope")), "strategy"),
                          (dict(targeting="l2"), "targeting"), (dict(budget=0), "budget"),
                          (dict(cv_folds=1), "cv_folds"), (dict(protocol="x"), "protocol"),
                          (dict(epig_lr=-1.0), "epig_lr"), (dict(epig_lr=math.nan), "epig_lr"),
                          (dict(epig_lr=math.inf), "epig_lr"), (dict(beta=math.nan), "beta"),
                          (dict(strategies=("bald_balanced_x",)), "strategy")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ActiveLearningConfig(**kwargs)
    assert ActiveLearningConfig(protocol="reference").finetune.lr == 1e-5
    assert ActiveLearningConfig(protocol="reference", lr=1e-3).finetune.lr == 1e-3
    assert ActiveLearningConfig(budget=7, rounds=3).budgets == (7, 14, 21)


def test_cli_options_are_generated_from_the_dataclasses():
    from laplace_vlm.experiments.active import DemoSetting

    parser = cli_active.configure_parser(argparse.ArgumentParser())
    args = parser.parse_args([])
    # every default is the dataclass's, so the generated config equals the default one
    assert cli_active.dataclass_from_args(ActiveLearningConfig, args) == ActiveLearningConfig()
    assert cli_active.dataclass_from_args(DemoSetting, args) == DemoSetting()
    args = parser.parse_args(["--seeds", "3", "--strategies", "bald,epig_power", "--no-clean",
                              "--pseudo-counts", "1,10", "--protocol", "reference"])  # fmt: skip
    cfg = cli_active.dataclass_from_args(ActiveLearningConfig, args)
    assert cfg.seeds == (0, 1, 2) and cfg.strategies == ("bald", "epig_power")
    assert cfg.pseudo_counts == (1.0, 10.0) and cfg.protocol == "reference"
    for bad in (["--budget", "0"], ["--protocol", "x"], ["--beta", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(cli_active.CliError, match="strategy"):
        cli_active.dataclass_from_args(ActiveLearningConfig,
                                       parser.parse_args(["--strategies", "foo"]))  # fmt: skip
