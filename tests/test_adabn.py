"""AdaBN-style evaluation: BatchNorm statistics re-estimated per domain, weights untouched."""

import torch
from torch import nn

from medsemi.cli import main
from medsemi.data.contract import LabelSpec
from medsemi.evaluation.adabn import adapt_batchnorm, images_by_domain
from medsemi.evaluation.evaluate import evaluate_networks
from medsemi.metrics import MetricPolicy


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))


def test_statistics_are_those_of_the_given_images_and_the_original_is_untouched():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(12, 1, 8, 8) * 3 + 2
    adapted = adapt_batchnorm(net, images, batch_size=4)
    features = net[0](images)
    assert torch.allclose(adapted[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([features[i : i + 4].var(dim=(0, 2, 3)) for i in range(0, 12, 4)]).mean(0)
    assert torch.allclose(adapted[1].running_var, per_batch_var, atol=1e-4)
    assert not adapted.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, q in zip(net.parameters(), adapted.parameters()):
        assert torch.equal(p, q)


def test_evaluation_uses_each_domains_own_statistics():
    net = _net()
    spec = LabelSpec("exclusive", ("background", "fg"))
    img_a = torch.randn(4, 1, 8, 8)
    img_b = torch.randn(4, 1, 8, 8) * 5 - 3
    label = (img_a[:, 0] > 0).long()
    splits = {
        "a": {"image": img_a, "label": label, "name": [f"a{i}" for i in range(4)]},
        "b": {"image": img_b, "label": label, "name": [f"b{i}" for i in range(4)]},
    }
    pool = {"image": torch.cat([img_a, img_b]), "domain": torch.tensor([0] * 4 + [1] * 4)}
    adapt = images_by_domain(pool, ("a", "b"))
    assert torch.equal(adapt["a"], img_a) and torch.equal(adapt["b"], img_b)
    plain = evaluate_networks({"s": net}, splits, spec, MetricPolicy())["s"]["records"]
    adapted = evaluate_networks({"s": net}, splits, spec, MetricPolicy(), adapt_images=adapt)["s"]["records"]
    assert plain != adapted


def test_evaluate_cli_with_bn_adaptation_writes_elsewhere(tmp_path, tiny_overrides):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    assert main(["train", str(repo / "configs" / "demo.yaml"), *tiny_overrides, "train.iterations=2",
                 "train.eval_every=2", "--run-dir", str(run)]) == 0
    original = (run / "report.md").read_text()
    out = tmp_path / "adabn"
    assert main(["evaluate", str(run), "eval.bn_adaptation=true", "--out", str(out)]) == 0
    assert "re-estimated per test domain" in (out / "report.md").read_text()
    assert (run / "report.md").read_text() == original


def test_trainer_evaluates_with_per_domain_statistics(tmp_path, tiny_overrides):
    from pathlib import Path

    from medsemi.config import load_config
    from medsemi.engine.trainer import Trainer

    repo = Path(__file__).resolve().parents[1]
    for method in ("supervised", "mean_teacher"):  # without and with a cached unlabelled pool
        cfg = load_config(repo / "configs" / "demo.yaml", [*tiny_overrides, f"method.name={method}",
                          "train.iterations=2", "train.eval_every=2", "eval.bn_adaptation=true"])
        trainer = Trainer(cfg, tmp_path / method)
        adapt = trainer.family.adapt_images(cfg, trainer.device)
        assert sorted(adapt) == list(trainer.family.info.domains)
        n = sum(len(v) for v in adapt.values())
        assert n == len(trainer.family.unlabelled)
        trainer.fit()
        assert trainer.best["test"]["iteration"] == 2
