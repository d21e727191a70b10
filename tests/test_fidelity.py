"""Fidelity to the released code (docs/fidelity.md): small references written from the released formulas,
compared with difffeat on float64 tensors (several seeds, absent classes, ignored pixels, imbalance up to
1000:1), and the data-set profiles that set the released hyper-parameters together."""

import dataclasses
import doctest
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import downstream.profiles as profiles_module
from difffeat.errors import UserError
from downstream.losses import (
    LDAMLoss,
    SegLoss,
    TLAADRWLoss,
    VSLoss,
    adrw_weights,
    aucseg_loss,
    drw_weights,
    ldam_loss,
    ldam_margins,
    pixel_auc_loss,
    tla_adrw_loss,
    vs_loss,
)
from downstream.optim import SAM, SSESAM, ImbSAM, tail_classes
from downstream.profiles import METADATA_KEYS, TASKS, profile, profile_names, settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
COUNTS = [1000.0, 400.0, 90.0, 20.0, 5.0, 1.0]  # imbalance 1000:1


@pytest.fixture(autouse=True)
def _grad_enabled():  # a session fixture elsewhere switches autograd off
    with torch.enable_grad():
        yield


def logits_and_targets(seed, n=24):
    k = len(COUNTS)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * 3, torch.randint(0, k, (n,), generator=g)


# ---- wang22ti/DDC losses.py and cifar_train.py, written out in numpy ------------------------------------------


def ddc_vs(x, target, cls_num_list, gamma, tau, weight=None, use_multiplicative=True):
    """DDC `VSLoss`: x / Δ' + ι, Δ' = (1/n)^γ / min (1/n)^γ, ι = τ·log(n / Σn); CE with `weight`."""
    cls_num_list = np.asarray(cls_num_list)
    temp = (1.0 / cls_num_list) ** gamma
    delta = torch.from_numpy(temp / np.min(temp))
    iota = torch.from_numpy(tau * np.log(cls_num_list / cls_num_list.sum()))
    output = x / delta + iota if use_multiplicative else x + iota
    return F.cross_entropy(output, target, weight=weight)


def ddc_ldam(x, target, cls_num_list, max_m=0.5, s=30, weight=None):
    """DDC `LDAMLoss`: m = n^(−1/4)·max_m/max; CE(s·(x − m_y on the target entry), weight)."""
    m_list = 1.0 / np.sqrt(np.sqrt(np.asarray(cls_num_list)))
    m_list = torch.from_numpy(m_list * (max_m / np.max(m_list)))
    index = F.one_hot(target, x.shape[1]).bool()
    output = torch.where(index, x - m_list[target][:, None], x)
    return F.cross_entropy(s * output, target, weight=weight)


def ddc_weights(cls_num_list, rule, epoch=0, t_reweight=160, tro=0.0):
    """DDC `cifar_train.py` per-class weights: DRW (betas [0, 0.9999] by epoch // t_reweight) and ADRW."""
    n = np.asarray(cls_num_list)
    if rule == "DRW":
        beta = [0, 0.9999][epoch // t_reweight]
        w = (1.0 - beta) / (1.0 - np.power(beta, n))
    else:
        w = (n / n.sum()) ** (-tro)
    return torch.from_numpy(w / np.sum(w) * len(n))


@pytest.mark.parametrize("seed", range(3))
def test_vs_la_ldam_drw_adrw_equal_the_ddc_formulas(seed):
    z, y = logits_and_targets(seed)
    for gamma, tau in ((0.05, 1.0), (0.3, 1.0), (0.0, 0.75)):  # DDC's script, the VS paper's code, LA
        assert torch.allclose(vs_loss(z, y, COUNTS, gamma, tau), ddc_vs(z, y, COUNTS, gamma, tau), rtol=1e-12)
        assert torch.allclose(VSLoss(COUNTS, gamma, tau)(z, y), ddc_vs(z, y, COUNTS, gamma, tau), rtol=1e-12)
    cosine = torch.tanh(z / 3)
    for epoch in (0, 159, 160, 199):
        w = ddc_weights(COUNTS, "DRW", epoch)
        assert torch.allclose(drw_weights(COUNTS, epoch, 160).double(), w, rtol=1e-6)  # ours: float32
        want = ddc_ldam(cosine, y, COUNTS, weight=w)
        assert torch.allclose(ldam_loss(cosine, y, ldam_margins(COUNTS, 0.5), 30.0, weight=w), want, rtol=1e-12)
    assert torch.allclose(LDAMLoss(COUNTS)(cosine.float(), y), ddc_ldam(cosine, y, COUNTS).float(), rtol=1e-5)
    for nu, tau in ((0.25, 0.75), (0.15, 1.0)):
        w = ddc_weights(COUNTS, "ADRW", tro=nu)
        assert torch.allclose(adrw_weights(COUNTS, nu).double(), w, rtol=1e-6)
        want = ddc_vs(z, y, COUNTS, 0.0, tau, weight=w.float().double(), use_multiplicative=False)
        assert torch.allclose(tla_adrw_loss(z, y, COUNTS, tau, nu), want, rtol=1e-12)
    schedule = TLAADRWLoss(COUNTS, total_epochs=200, gamma=0.05, tau=1.0, stage2_tau=0.75, nu=0.25)
    schedule.set_epoch(159)
    assert torch.allclose(schedule(z, y), ddc_vs(z, y, COUNTS, 0.05, 1.0), rtol=1e-12)


# ---- SAM (cool-xuan/Imbalanced_SAM imbsam.py) and SSE-SAM (Zemdalk/SSE-SAM ssesam.py, utils/trainval.py) --------


def make_problem(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 3, 0, 1, 0, 0, 1, 2, 0, 1, 0, 1])
    return [w, b], x, y


def per_sample(params, x, y):
    w, b = params
    return F.cross_entropy(x @ w.T + b, y, reduction="none")


def released_perturb(leaves, grads, rho):
    """ε = ρ·g/(‖g‖ + 1e-16) added in place, the global norm over all parameters (both repos' first_step)."""
    grad_norm = torch.norm(torch.stack([torch.norm(g, p=2) for g in grads]), p=2) + 1.e-16
    eps = [g * (rho / grad_norm) for g in grads]
    with torch.no_grad():
        for p, e in zip(leaves, eps):
            p.add_(e)
    return eps


def released_sam(params, x, y, rho, steps, **sgd):
    leaves = [p.clone().requires_grad_() for p in params]
    base = torch.optim.SGD(leaves, **sgd)
    for _ in range(steps):
        eps = released_perturb(leaves, torch.autograd.grad(per_sample(leaves, x, y).mean(), leaves), rho)
        grads = torch.autograd.grad(per_sample(leaves, x, y).mean(), leaves)
        with torch.no_grad():
            for p, e, g in zip(leaves, eps, grads):
                p.sub_(e)
                p.grad = g
        base.step()
    return leaves


def released_ssesam(params, x, y, tail, rho_head, rho_tail, gamma, total_epochs, epochs, **sgd):
    """One step per epoch; `update_rho` after each: ρ_H = 0 once epoch_count ≥ total_epochs·γ."""
    leaves = [p.clone().requires_grad_() for p in params]
    base = torch.optim.SGD(leaves, **sgd)
    tail_mask = torch.isin(y, torch.tensor(tail))
    rhos, cut_epoch = [rho_head, rho_tail], total_epochs * gamma
    for epoch in range(epochs):
        grad_sum = [torch.zeros_like(p) for p in leaves]
        for group, mask in ((0, ~tail_mask), (1, tail_mask)):
            loss = per_sample(leaves, x[mask], y[mask]).sum() / y.size(0)
            eps = released_perturb(leaves, torch.autograd.grad(loss, leaves), rhos[group])
            loss = per_sample(leaves, x[mask], y[mask]).sum() / y.size(0)
            for s, g in zip(grad_sum, torch.autograd.grad(loss, leaves)):
                s.add_(g)
            with torch.no_grad():
                for p, e in zip(leaves, eps):
                    p.sub_(e)
        for p, s in zip(leaves, grad_sum):
            p.grad = s
        base.step()
        if epoch + 1 >= cut_epoch:
            rhos[0] = 0
    return leaves


@pytest.mark.parametrize("seed", range(3))
def test_sam_and_ssesam_equal_the_released_steps(seed):
    sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    params, x, y = make_problem(seed)
    want = released_sam(params, x, y, 0.05, 3, **sgd)
    ours = [p.clone().requires_grad_() for p in params]
    opt = SAM(ours, torch.optim.SGD, rho=0.05, **sgd)
    for _ in range(3):
        opt.step(lambda: per_sample(ours, x, y).mean())
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(ours, want))
    # SSE-SAM over 5 "epochs" of one step, γ = 0.6: group-wise for 3, tail-only for 2
    want = released_ssesam(params, x, y, [2, 3], 0.05, 0.1, 0.6, 5, 5, **sgd)
    ours = [p.clone().requires_grad_() for p in params]
    opt = SSESAM(ours, torch.optim.SGD, tail_classes=[2, 3], rho_head=0.05, rho_tail=0.1, gamma=0.6,
                 total_epochs=5, **sgd)
    for _ in range(5):
        opt.step(lambda: (per_sample(ours, x, y), y))
        opt.epoch_end()
    assert opt.switched
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(ours, want))


def test_imbsam_profile_settings_reproduce_the_released_split():
    counts = [int(500 * 0.01 ** (c / 99)) for c in range(100)]
    imb = settings("cifar100-lt", "imbsam")
    assert len(tail_classes(counts, imb["eta"])) == 30
    opt = ImbSAM([torch.zeros(2, requires_grad=True)], torch.optim.SGD, tail_classes=tail_classes(counts, imb["eta"]),
                 rho=imb["rho"], tail_weight=imb["tail_weight"], lr=0.01)
    assert opt.tail_weight == 2.0 and len(opt.tail) == 30


# ---- AUCSeg: the released SquareAUCLoss (mmseg/models/losses/auc_loss.py) + mmseg CE ----------------------------


def released_square_auc(pred, target, num_classes, gamma=1.0, loss_weight=1.0, ignore_index=255):
    """AUCSeg `AUCLoss.forward` (ovo) with `SquareAUCLoss.calLossPerCLassNaive`, K ≥ 3."""
    pred = torch.sigmoid(pred)
    pred = pred.transpose(0, 1).reshape(num_classes, -1).transpose(0, 1)
    target = target.reshape(-1)
    keep = torch.where(target != ignore_index)[0]
    pred, target = pred[keep, :], target[keep]
    Y = torch.stack([target.eq(i).double() for i in range(num_classes)], 1)
    N = Y.sum(0)
    D = 1 / N[target.long()]
    kb = num_classes - int((N == 0).sum())
    loss = torch.zeros((), dtype=pred.dtype)
    for i in range(num_classes):
        if N[i] == 0:
            continue
        Di, Yi, predi = D / N[i], Y[:, i], pred[:, i]
        diff = predi - gamma * Yi
        nD = Di * (1 - Yi)
        S = N[i] * nD + ((kb - 1) * Yi / N[i])
        A = (diff * S).dot(diff)
        B = diff.dot(nD) * Yi.dot(diff)
        loss = loss + 0.5 * A - B
    return loss / (kb * (kb - 1)) * loss_weight


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["cityscapes", "ade20k"])
def test_aucseg_objective_with_profile_settings_equals_the_released_one(seed, name):
    """w_auc·SquareAUCLoss + mmseg CE (divided by all pixels) = ours with the profile's λ = w_auc/2 and
    ce_average="all", value and gradient, with absent classes and ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    k = 7
    logits = torch.randn(2, k, 6, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([0, 1, 3, 4, 6])[torch.randint(0, 5, (2, 6, 5), generator=g)]  # 2 and 5 absent
    labels[1, :2] = 255
    cfg = settings(name, "aucseg")
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = SegLoss("aucseg", cfg["auc_weight"], cfg["margin"], ce_average=cfg["ce_average"])(a, labels)[0]
    released = (released_square_auc(b, labels, k, cfg["margin"], cfg["released_auc_loss_weight"])
                + F.cross_entropy(b, labels, reduction="none", ignore_index=255).mean())
    assert torch.allclose(ours, released, rtol=1e-12)
    ours.backward()
    released.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-14)
    # the hidden ½: the released value is half of the plain mean OvO loss
    half = released_square_auc(logits, labels, k)
    assert torch.allclose(pixel_auc_loss(logits, labels), 2 * half, rtol=1e-12)
    assert torch.allclose(aucseg_loss(logits, labels, 0.0, ce_average="all"),
                          F.cross_entropy(logits, labels, ignore_index=255, reduction="sum") / labels.numel())


# ---- data-set profiles ------------------------------------------------------------------------------------------


def test_profile_names_and_unknown_name():
    assert profile_names() == sorted(["cifar100-lt", "cifar10-lt", "imagenet-lt", "inat", "ade20k", "cityscapes",
                                      "coco-stuff"])
    with pytest.raises(UserError) as err:
        profile("cifar-100")
    assert "cifar-100" in str(err.value) and all(n in str(err.value) for n in profile_names())
    with pytest.raises(UserError, match="no section"):
        settings("inat", "aucseg")
    first = profile("ade20k")
    first["memory_bank"]["tail_classes"].clear()
    assert len(profile("ade20k")["memory_bank"]["tail_classes"]) == 124  # a fresh copy each time


def test_every_section_names_its_released_source():
    for name in profile_names():
        chosen = profile(name)
        assert chosen["task"] in TASKS and chosen["description"] and chosen["num_classes"] > 1
        sections = {k: v for k, v in chosen.items() if isinstance(v, dict)}
        assert sections, name
        for key, section in sections.items():
            assert re.match(r"[\w-]+/[\w.-]+ \S", section["source"]), (name, key)  # "owner/repo path…"
            assert set(settings(name, key)) == set(section) - set(METADATA_KEYS)
            for alternative in section.get("alternatives", []):
                assert re.match(r"[\w-]+/[\w.-]+ \S", alternative["source"]), (name, key)


@pytest.mark.parametrize("name, k, n_tail, auc_weight, ratio, resize", [
    ("ade20k", 150, 124, 2.0, 0.05, 0.4),
    ("cityscapes", 19, 7, 0.5, 1.0, 1.0),
    ("coco-stuff", 171, 123, 0.5, 0.05, 0.1),
])
def test_segmentation_profiles_are_the_released_configs(name, k, n_tail, auc_weight, ratio, resize):
    chosen = profile(name)
    tail = chosen["memory_bank"]["tail_classes"]
    assert chosen["num_classes"] == k and len(tail) == n_tail == len(set(tail))
    assert all(0 <= c < k for c in tail)
    assert settings(name, "aucseg") == {"auc_weight": auc_weight, "released_auc_loss_weight": 2 * auc_weight,
                                        "margin": 1.0, "ce_average": "all"}
    assert settings(name, "memory_bank") == {"tail_classes": tail, "capacity": 5, "sample_ratio": ratio,
                                             "resize_ratio": resize}
    if name == "cityscapes":  # traffic light, rider, truck, bus, train, motorcycle, bicycle
        assert tail == [6, 12, 14, 15, 16, 17, 18]
    if name == "ade20k":  # every class but the 26 most frequent (ids 0–25)
        assert sorted(tail) == list(range(26, 150)) and tail[:4] == [26, 27, 31, 28]
    if name == "coco-stuff":
        assert tail[:5] == [3, 20, 97, 89, 87] and tail[-3:] == [167, 70, 78] and 0 not in tail


def test_classification_profiles_are_the_released_settings():
    dm = {n: settings(n, "dirmixe") for n in ("cifar100-lt", "cifar10-lt", "imagenet-lt", "inat")}
    assert dm["cifar100-lt"] == {"tau": 1.3, "lambda_var": 5.0, "trials": 60, "concentration": 1e4}
    assert dm["cifar10-lt"] == {**dm["cifar100-lt"], "lambda_var": 15.0}
    assert dm["imagenet-lt"] == {**dm["cifar100-lt"], "tau": 1.6, "lambda_var": 1.0}
    assert dm["inat"] == {**dm["cifar100-lt"], "lambda_var": 1.0, "concentration": 1e5}
    agnostic = {n: settings(n, "test_agnostic") for n in dm}
    assert (agnostic["imagenet-lt"]["dirichlet_ratio"], agnostic["imagenet-lt"]["dirichlet_concentration"]) == (50, 1e4)
    assert (agnostic["inat"]["dirichlet_ratio"], agnostic["inat"]["dirichlet_concentration"]) == (3, 1e5)
    assert agnostic["cifar100-lt"]["forward_ratios"] == [100, 50, 25, 10, 5, 2]
    assert agnostic["inat"]["backward_ratios"] == [2, 3]
    vs = profile("cifar100-lt")["vs"]
    assert (vs["gamma"], vs["tau"]) == (0.05, 1.0) and "DDC" in vs["source"]
    assert [(a["gamma"], a["tau"]) for a in vs["alternatives"]] == [(0.3, 1.0)]
    assert "VS-Loss" in vs["alternatives"][0]["source"]
    assert settings("cifar100-lt", "imbsam") == {"rho": 0.05, "eta": 20, "tail_weight": 2.0}
    assert settings("cifar100-lt", "ssesam") == {"rho_head": 0.05, "rho_tail": 0.1, "gamma": 0.7, "eta": 100}
    assert settings("cifar100-lt", "sam_schedule") == {"lr_schedule": "epoch-cosine", "nesterov": False}
    assert settings("cifar10-lt", "shots") == {"many_above": 1000, "few_below": 200}


def test_profile_settings_are_accepted_by_the_modules_they_configure():
    counts = [int(500 * 0.01 ** (c / 99)) for c in range(100)]
    params = [torch.zeros(3, requires_grad=True)]
    imb = settings("cifar100-lt", "imbsam")
    ImbSAM(params, torch.optim.SGD, tail_classes=tail_classes(counts, imb.pop("eta")), lr=0.1, **imb)
    sse = settings("cifar100-lt", "ssesam")
    SSESAM(params, torch.optim.SGD, tail_classes=tail_classes(counts, sse.pop("eta")), lr=0.1, **sse)
    for name in ("cifar100-lt", "cifar10-lt"):
        VSLoss(counts, **settings(name, "vs"))
        TLAADRWLoss(counts, total_epochs=200, **settings(name, "tla_adrw"))
        LDAMLoss(counts, **settings(name, "ldam"))
    for name in ("ade20k", "cityscapes", "coco-stuff"):
        cfg = settings(name, "aucseg")
        cfg.pop("released_auc_loss_weight")
        SegLoss("aucseg", **cfg)
    # modules outside losses/optim, by their package-level names
    from downstream.cls import AggregationConfig, DirMixEConfig
    from downstream.seg import ImageMemoryBank

    for name in ("cifar100-lt", "cifar10-lt", "imagenet-lt", "inat"):
        DirMixEConfig(**settings(name, "dirmixe"))
        fields = {f.name for f in dataclasses.fields(AggregationConfig)}
        assert set(settings(name, "test_time_aggregation")) <= fields
    for name in ("ade20k", "cityscapes", "coco-stuff"):
        ImageMemoryBank(**settings(name, "memory_bank"))


def test_profiles_docstring_examples():
    result = doctest.testmod(profiles_module)
    assert result.attempted > 0 and result.failed == 0, result  # examples that vanish fail too


# ---- docs/fidelity.md -----------------------------------------------------------------------------------------

METHODS = ["Pixel AUC loss", "LA", "VS", "LDAM", "CB / DRW", "TLA + ADRW", "DRAUC", "TKPR", "SAM", "ImbSAM",
           "SSE-SAM", "AUCSeg memory bank", "DirMixE"]


def test_fidelity_doc_has_a_section_per_method_and_the_dirmixe_items():
    text = DOC.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    for method in METHODS:
        assert method in headings, method
    for heading in headings:
        if heading not in METHODS:
            continue
        body = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
        assert "Released code" in body and "Agreement" in body and "Departures" in body, heading
    dirmixe = text.split("## DirMixE\n", 1)[1].split("\n## ", 1)[0]
    assert "PLACEHOLDER" not in text
    for item in ("Logit shift", "Test-time aggregation schedule", "Where test-time aggregation adapts",
                 "Dirichlet test protocol"):
        assert item in dirmixe, item


def test_config_choices_equal_the_modules_they_name():
    """Configs import no torch, so a few choice lists are written twice: they must stay equal."""
    from downstream.cls import config as cls_config
    from downstream.losses import CE_AVERAGES, drauc, tkpr
    from downstream.optim import RELEASED_TAIL_WEIGHT
    from downstream.seg.config import SegTrainConfig

    assert cls_config.DRAUC_ALPHA_STEPS == drauc.ALPHA_STEPS
    assert set(cls_config.TKPR_SURROGATES) == set(tkpr.SURROGATES)
    assert cls_config.IMBSAM_RELEASED_TAIL_WEIGHT == RELEASED_TAIL_WEIGHT
    ce_average = next(f for f in dataclasses.fields(SegTrainConfig) if f.name == "ce_average")
    assert ce_average.metadata["choices"] == CE_AVERAGES


def test_every_profile_sets_real_config_fields_with_valid_values():
    """What `--profile` applies: each classification profile for every method and optimizer, each segmentation
    profile, gives values of existing config fields that the config accepts."""
    from downstream.cls import ClsTrainConfig
    from downstream.cls.config import METHODS, OPTIMIZERS
    from downstream.cls.profile import profile_fields as cls_fields
    from downstream.seg.config import SegTrainConfig
    from downstream.seg.profile import profile_fields as seg_fields

    cls_names = {f.name for f in dataclasses.fields(ClsTrainConfig)}
    cls_names |= {f"{f.name}.{sub.name}" for f in dataclasses.fields(ClsTrainConfig) if f.metadata.get("nested")
                  for sub in dataclasses.fields(f.metadata["nested"])}  # a sub-config's fields: dirmixe.tau
    for name in ("cifar100-lt", "cifar10-lt", "imagenet-lt", "inat"):
        for method in METHODS:
            for optim in OPTIMIZERS:
                fields = cls_fields(name, method, optim)
                assert set(fields) <= cls_names and {"many_above", "dirichlet_ratio"} <= set(fields)
                head = "cosine" if method == "dirmixe" else None
                if method == "drauc" and optim != "none":
                    continue
                ClsTrainConfig.from_dict(dict(features=["f"], labels="l", out="o", method=method, optim=optim,
                                              head=head, **fields)).resolve()
    assert cls_fields("cifar100-lt", "la", "imbsam")["imbsam_tail_weight"] == 2.0
    assert "imbsam_tail_weight" not in cls_fields("cifar100-lt", "la", "ssesam")
    for optim in ("imbsam", "ssesam"):  # the SAM scripts' schedule comes with either optimizer, and only with them
        assert cls_fields("cifar100-lt", "la", optim)["lr_schedule"] == "epoch-cosine"
    assert "lr_schedule" not in cls_fields("cifar100-lt", "la", "sam")
    seg_names = {f.name for f in dataclasses.fields(SegTrainConfig)}
    for name in ("ade20k", "cityscapes", "coco-stuff"):
        fields = seg_fields(name)
        assert set(fields) <= seg_names
        SegTrainConfig.from_dict(dict(features=["f"], masks="m", out="o", **fields)).validate()
        assert fields["tail_classes"] == profile(name)["memory_bank"]["tail_classes"]
    with pytest.raises(UserError, match="segmentation profile"):
        cls_fields("ade20k", "ce", "none")
    with pytest.raises(UserError, match="classification profile"):
        seg_fields("inat")


# ---- issue #26 item 3: the SAM scripts' schedule, DRAUC's reference point and λ period, Dirichlet ties ----------
def test_epoch_cosine_is_the_sam_scripts_scheduler_stepped_before_each_epoch():
    """cool-xuan/Imbalanced_SAM and Zemdalk/SSE-SAM: SGD(momentum 0.9) without Nesterov, CosineAnnealingLR(T_max =
    E, eta_min = 0), `scheduler.step()` at the start of each training epoch; the rate is constant within an epoch."""
    import warnings

    from downstream.cls import ClsTrainConfig
    from downstream.cls.objective import OPTIMIZERS, epoch_cosine_rate

    epochs, lr = 7, 0.1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    released = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about stepping the scheduler before the optimizer
        for _ in range(epochs):
            scheduler.step()
            released.append(opt.param_groups[0]["lr"])
    assert [epoch_cosine_rate(lr, e, epochs) for e in range(epochs)] == pytest.approx(released, abs=1e-15)
    config = ClsTrainConfig(features=["f"], labels="l", out="o", optim="imbsam", lr_schedule="epoch-cosine",
                            nesterov=False)
    built = OPTIMIZERS["imbsam"].build([torch.zeros(2, requires_grad=True)], config, [1])
    sgd = built.base_optimizer if hasattr(built, "base_optimizer") else built
    assert sgd.param_groups[0]["nesterov"] is False and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(Exception, match="lr_schedule"):
        ClsTrainConfig(features=["f"], labels="l", out="o", method="drauc", lr_schedule="epoch-cosine").validate()


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_drauc_reference_moves_at_half_and_three_quarters_under_either_schedule(schedule):
    """EldercatSAM/DRAUC `train.py`: `update_regularizer` at `decay_epochs` (50, 75) whatever `--lr-schedule`."""
    from types import SimpleNamespace

    from downstream.cls.drauc import DRAUCUpdater
    from downstream.losses import DRAUCLoss

    moved = []
    stub = SimpleNamespace(config=SimpleNamespace(epochs=100, drauc_schedule=schedule), loss=DRAUCLoss(num_classes=3),
                           optimizer=SimpleNamespace(update_reference=lambda: moved.append(stub.epoch)))
    for epoch in range(100):
        DRAUCUpdater.start_epoch(stub, epoch)
    assert moved == [50, 75]


def test_drauc_lambda_period_restarts_every_epoch_as_released():
    """EldercatSAM/DRAUC `train.py`: per epoch `dis_cum = []`, then for batch i: append the batch's mean cost; when
    i % period == 0: λ ← λ − η(ε − mean(dis_cum)), dis_cum = [] (equal batch sizes: the mean of batch means is ours)."""
    from downstream.losses import DRAUCLoss

    gen = torch.Generator().manual_seed(0)
    loss = DRAUCLoss(epsilon=0.5, lambda_lr=0.02, lambda_period=10)
    lam, batches = 1.0, 13
    for _ in range(3):
        loss.restart_dual_period()
        dis_cum = []
        for i in range(batches):
            costs = torch.rand(8, generator=gen, dtype=torch.float64)
            loss.update_dual(costs, torch.zeros(8, dtype=torch.long))
            dis_cum.append(float(costs.mean()))
            if i % 10 == 0:
                lam = lam - 0.02 * (0.5 - sum(dis_cum) / len(dis_cum))
                dis_cum = []
        assert float(loss.lambdas[0]) == pytest.approx(lam, rel=1e-12)


def test_dirichlet_ranks_order_tied_classes_as_the_imagenet_and_inat_scripts():
    """scongl/DirMixE `test_training_{imagenet,inat}_dirmixe.py`: `sorted_idx = np.argsort(train_cls_num_list)[::-1]`,
    the i-th profile size to class sorted_idx[i]."""
    from downstream.cls.label_shift import class_ranks

    for counts in ([5, 5, 3, 3, 3, 1], [2] * 12, list(np.random.default_rng(0).integers(1, 4, 40))):
        sorted_idx = np.argsort(counts)[::-1]
        released = np.empty(len(counts), dtype=np.int64)
        released[sorted_idx] = np.arange(len(counts))
        assert (class_ranks(len(counts), counts, ties="released") == released).all()
    assert list(class_ranks(6, [5, 5, 3, 3, 3, 1], ties="released"))[:2] == [1, 0]  # the reversal: 1 before 0
    assert list(class_ranks(6, [5, 5, 3, 3, 3, 1])) == [0, 1, 2, 3, 4, 5]  # "index", the SADE profiles' order
