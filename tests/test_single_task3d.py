"""Single-task 3D baselines: the N-d BCP box, the plain VNet, the task filter of the volume family, the
method/data fit checks, a CPU run per method on the synthetic volumes, and the per-task comparison."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from medsemi.config import ConfigError, load_config
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.data.synthetic.volumes3d import Synthetic3DConfig, generate_synthetic_volumes, synthetic_lists
from medsemi.data.volumes.cases import TASK_NAMES, task_id_from_name
from medsemi.engine.trainer import Trainer
from medsemi.families.volumes import build_volume_family
from medsemi.methods.bcp import bcp_box
from medsemi.methods.registry import get_method
from medsemi.nets.build import build_model
from medsemi.nets.vnet import SegVNet
from medsemi.workflows.compare import compare_methods, merge_tasks

CPU3D = "configs/versemi/synthetic3d_cpu.yaml"
METHODS_3D = ("supervised3d", "mean_teacher3d", "uamt3d", "cps3d", "bcp3d")
TINY3D = ["model.base_channels=2", "train.batch_size=2", "train.unlabelled_batch_size=2", "train.device=cpu",
          "train.progress_bar=false", "train.tensorboard=false",
          "data.options.synthetic={n_per_task: 6, size_min: 32, size_max: 34}"]


def single_task_cfg(method: str, *extra: str):
    return load_config(CPU3D, [*TINY3D, "data.options.task=la", "model.name=vnet", f"method.name={method}", *extra],
                       replace_method=True)


# ---------------------------------------------------------------------------------------------- BCP box
def _bcp_box_2d_reference(batch: int, h: int, w: int, g: torch.Generator, ratio: float, per_sample: bool):
    """The 2D box as BCP draws it, one sample at a time (y from the first uniform, x from the second)."""
    n = batch if per_sample else 1
    u = torch.rand((n, 2), generator=g, dtype=torch.float64)
    ph, pw = int(h * ratio), int(w * ratio)
    out = torch.zeros(n, h, w)
    for i in range(n):
        y = min(int(math.floor(float(u[i, 0]) * max(h - ph, 1))), max(h - ph, 1) - 1)
        x = min(int(math.floor(float(u[i, 1]) * max(w - pw, 1))), max(w - pw, 1) - 1)
        out[i, y:y + ph, x:x + pw] = 1
    return out.expand(batch, h, w)


@pytest.mark.parametrize("per_sample", [False, True])
def test_bcp_box_2d_unchanged_by_the_nd_form(per_sample: bool) -> None:
    for h, w, ratio in ((32, 32, 2 / 3), (30, 45, 2 / 3), (16, 20, 1.0)):
        got = bcp_box(6, (h, w), torch.Generator().manual_seed(3), ratio=ratio, per_sample=per_sample)
        ref = _bcp_box_2d_reference(6, h, w, torch.Generator().manual_seed(3), ratio, per_sample)
        assert torch.equal(got, ref)


def test_bcp_box_3d_is_a_two_thirds_cuboid() -> None:
    spatial = (24, 30, 18)
    boxes = bcp_box(400, spatial, torch.Generator().manual_seed(0), per_sample=True)
    sides = [int(s * 2 / 3) for s in spatial]
    assert boxes.shape == (400, *spatial) and (boxes.sum((1, 2, 3)) == math.prod(sides)).all()
    for axis, (size, side) in enumerate(zip(spatial, sides)):
        others = tuple(d for d in (1, 2, 3) if d != axis + 1)
        occupied = boxes.amax(dim=others)  # (B, size)
        assert (occupied.sum(1) == side).all()
        starts = occupied.argmax(1)
        assert set(starts.tolist()) == set(range(size - side))  # BCP's exclusive randint, every value
    shared = bcp_box(3, spatial, torch.Generator().manual_seed(1))
    assert torch.equal(shared[0], shared[2])


# ---------------------------------------------------------------------------------------------- network
def test_plain_vnet_shapes_and_dropout() -> None:
    info = DatasetInfo("v", 1, LabelSpec("exclusive", ("background", "foreground")), ("la",), (32, 32, 32))
    cfg = single_task_cfg("uamt3d", "model.dropout=0.5")
    net = build_model(cfg.model, info)
    assert isinstance(net, SegVNet) and net.takes_task_ids is False
    x = torch.randn(2, 1, 32, 32, 32)
    net.train()
    a, b = net(x), net(x)
    assert a.shape == (2, 2, 32, 32, 32) and not torch.equal(a, b)  # dropout is live in train mode
    net.eval()
    assert torch.equal(net(x), net(x))
    with pytest.raises(ValueError, match="vnet needs 3D data"):
        build_model(cfg.model, DatasetInfo("i", 1, info.label_spec, ("a",), (32, 32)))


# ---------------------------------------------------------------------------------------------- data
def test_synthetic_generator_gives_every_task_a_single_task_split() -> None:
    vols = generate_synthetic_volumes(Synthetic3DConfig(size_range=(32, 33)))
    lists = synthetic_lists(vols)
    tests = {1: "test", 2: "test_la", 3: "test_spleen", 4: "test_lung"}
    for ratio in (10, 20):
        for task in TASK_NAMES:
            lab = [n for n in lists[f"train_lab_{ratio}"] if task_id_from_name(n) == task]
            unl = [n for n in lists[f"train_unlab_{ratio}"] if task_id_from_name(n) == task]
            assert lab and unl and lists[tests[task]], (ratio, task)
            assert not set(lab) & set(unl) and not set(lab + unl) & set(lists[tests[task]])


def test_task_filter_keeps_one_task() -> None:
    family = build_volume_family(single_task_cfg("mean_teacher3d"))
    assert family.info.domains == ("la",) and family.options["selection"] == "la"
    names = [v.name for v in (*family.labelled_volumes, *family.unlabelled_volumes)]
    assert names and all(task_id_from_name(n) == 2 for n in names)
    assert list(family.test_volumes) == [2] and family.test_volumes[2]
    assert family.unlabelled_volumes
    with pytest.raises(ConfigError, match="choose one of pancreas, la, spleen, lung"):
        build_volume_family(single_task_cfg("mean_teacher3d", "data.options.task=heart"))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("config, overrides, message", [
    (CPU3D, ["method.name=mean_teacher", "model.name=vnet"],
     r"^method 'mean_teacher' is for 2D images but data.format=synthetic3d is 3D volume data "
     r"\(use method.name=mean_teacher3d\)$"),
    ("configs/demo.yaml", ["method.name=cps3d"],
     r"^method 'cps3d' is for 3D volumes but data.format=synthetic is 2D image data \(use method.name=cps\)$"),
    (CPU3D, ["method.name=uamt3d", "model.name=vnet"],
     r"^method 'uamt3d' trains on one task at a time but data.format=synthetic3d holds the tasks pancreas, la, "
     r"spleen, lung; choose one with data.options.task=<name>$"),
])
def test_method_and_data_mismatch_stops_before_training(tmp_path, config, overrides, message) -> None:
    cfg = load_config(config, overrides, replace_method=True)
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def la_family():
    return build_volume_family(single_task_cfg("mean_teacher3d"))


@pytest.mark.parametrize("method", METHODS_3D)
def test_3d_run_loss_goes_down(tmp_path, la_family, method: str) -> None:
    assert get_method(method).spatial_dims == 3 and get_method(method).single_task
    cfg = single_task_cfg(method, "train.iterations=10", "train.eval_every=10", "train.checkpoint_every=10",
                          "train.log_every=5", "train.lr=0.003", "eval.surface_metrics=never")
    trainer = Trainer(cfg, tmp_path / "run", family=la_family)
    trainer.fit()
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    evals = [r for r in records if r["kind"] == "eval"]
    assert "test_student_dice_la" in evals[-1] and np.isfinite(evals[-1]["test_student_dice_la"])


# ---------------------------------------------------------------------------------------------- comparison
def test_merge_tasks_means_over_tasks() -> None:
    def run(task: str, dice: float) -> dict:
        per = {task: {"foreground": {"dice": dice, "hd95": 2 * dice}}}
        return {"best_test": {"per_domain": per, "macro": per[task]}, "last_student": {"per_domain": per,
                                                                                         "macro": per[task]}}
    merged = merge_tasks({"la": run("la", 0.5), "lung": run("lung", 0.1), "spleen": run("spleen", float("nan"))})
    best = merged["best_test"]
    assert list(best["per_domain"]) == ["la", "lung", "spleen"]
    assert math.isclose(best["macro"]["foreground"]["dice"], 0.3) and math.isclose(best["mean_dice"], 0.3)
    assert math.isclose(best["macro"]["foreground"]["hd95"], 0.6)


def test_compare_trains_multi_task_once_and_single_task_per_task(tmp_path) -> None:
    out = tmp_path / "cmp"
    overrides = [*TINY3D, "train.iterations=2", "train.eval_every=2", "train.checkpoint_every=2",
                 "method.stage1_iterations=1", "eval.surface_metrics=never", f"data.root={tmp_path / 'volumes'}"]
    summary = compare_methods(CPU3D, ["versemi", "supervised3d"], 1, out, overrides)
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["supervised3d-la-seed0", "supervised3d-lung-seed0", "supervised3d-pancreas-seed0",
                    "supervised3d-spleen-seed0", "versemi-seed0"]
    assert load_config(out / "supervised3d-la-seed0" / "config.yaml").model.name == "vnet"
    md = (out / "comparison.md").read_text()
    for head in ("pancreas Dice", "la Jaccard", "spleen HD95", "lung ASD", "mean Dice", "mean ASD"):  # HD95/ASD: "—"
        assert head in md
    assert "| versemi |" in md and "| supervised3d |" in md
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    sup = {r["scope"]: float(r["mean"]) for r in rows
           if r["protocol"] == "best_test" and r["method"] == "supervised3d" and r["metric"] == "dice"}
    tasks = [sup[t] for t in TASK_NAMES.values()]
    assert math.isclose(sup["macro"], float(np.nanmean(tasks)), rel_tol=1e-9)
    for task in TASK_NAMES.values():  # each task's column is that task's own run
        own = json.loads((out / f"supervised3d-{task}-seed0" / "eval.json").read_text())
        assert math.isclose(sup[task], own["best_test"]["per_domain"][task]["foreground"]["dice"])
    assert summary["results"]["versemi"][0]["best_test"]["per_domain"].keys() == set(TASK_NAMES.values())


def test_predict_resolves_a_single_task_model_to_its_task() -> None:
    from medsemi.workflows.predict3d import resolve_task

    tasks = {str(k): v for k, v in TASK_NAMES.items()}
    spec = LabelSpec("exclusive", ("background", "foreground"))
    one = DatasetInfo("v", 1, spec, ("la",), (32, 32, 32), extra={"tasks": tasks, "task": "la"})
    assert resolve_task(one, None) == 2 and resolve_task(one, 2) == 2
    with pytest.raises(ValueError, match="trained on task 2 = la only"):
        resolve_task(one, 3)
    every = DatasetInfo("v", 1, spec, tuple(TASK_NAMES.values()), (32, 32, 32), extra={"tasks": tasks, "task": ""})
    with pytest.raises(ValueError, match="pass --task"):
        resolve_task(every, None)


@pytest.mark.parametrize("name, task, ratio, labelled", [
    ("la_8", "la", 10, 8), ("la_16", "la", 20, 16),
    ("pancreas_10", "pancreas", 10, 6), ("pancreas_20", "pancreas", 20, 12),
])
def test_single_task_configs(name: str, task: str, ratio: int, labelled: int) -> None:
    from medsemi.data.volumes.cases import TASK_IDS
    from medsemi.data.volumes.lists import load_versemi_split
    from medsemi.families.volumes import _one_task

    cfg = load_config(f"configs/single_task/{name}.yaml")
    split = _one_task(load_versemi_split(ratio), TASK_IDS[task])  # the packaged VerSemi lists
    assert len(split.labelled) == labelled and split.unlabelled and split.test[TASK_IDS[task]]
    assert cfg.data.options["task"] == task and cfg.data.options["ratio"] == ratio
    assert cfg.model.name == "vnet" and cfg.train.iterations == 6000 and cfg.data.patch_size == 96
    assert (cfg.train.batch_size, cfg.train.unlabelled_batch_size) == (2, 2)
    assert get_method(cfg.method.name).single_task
    for method in METHODS_3D:  # every single-task method runs on the same file with one override
        assert load_config(f"configs/single_task/{name}.yaml", [f"method.name={method}"]).method.name == method


def test_foreground_dice_of_the_3d_lineage() -> None:
    """``sup_dice: foreground`` (the *3d defaults except CPS) = CE + UA-MT's foreground Dice, by hand."""
    from medsemi.losses import weighted_ce, weighted_dice
    from medsemi.methods.supervised import Supervised3D

    g = torch.Generator().manual_seed(0)
    z = torch.randn((2, 2, 8, 8, 8), generator=g)
    y = (torch.rand((2, 8, 8, 8), generator=g) > 0.7).long()
    p1, y1 = torch.softmax(z.double(), 1)[:, 1], y.double()
    ref = 1 - (2 * (p1 * y1).sum() + 1e-10) / ((p1 * p1).sum() + (y1 * y1).sum() + 1e-10)
    spec = LabelSpec("exclusive", ("background", "foreground"))
    assert torch.allclose(weighted_dice(z, y, None, spec, skip_background=True).double(), ref, atol=1e-6)
    assert not torch.allclose(weighted_dice(z, y, None, spec).double(), ref, atol=1e-3)  # default: both classes
    info = DatasetInfo("v", 1, spec, ("la",), (8, 8, 8))
    method = Supervised3D(Supervised3D.Options(), torch.nn.Identity(), None, info)
    total, ce, dice = method.supervised_loss(z, y)
    assert torch.allclose(dice.double(), ref, atol=1e-6) and torch.allclose(total, ce + dice)
    assert torch.allclose(ce, weighted_ce(z, y, None, spec))
    assert get_method("cps3d").Options().sup_dice == "all"  # SSL4MIS's DiceLoss over every class
    assert {get_method(m).Options().sup_dice for m in ("mean_teacher3d", "uamt3d")} == {"foreground"}


def test_a_single_task_hdf5_folder(tmp_path) -> None:
    """A folder holding one task's cases (VerSemi's HDF5 layout, lists naming only that task, the other
    tasks' lists empty) trains and evaluates like a VerSemi task."""
    from medsemi.data.synthetic.volumes3d import write_synthetic_dataset

    root = tmp_path / "la_only"
    write_synthetic_dataset(root, Synthetic3DConfig(n_per_task=6, size_range=(32, 33)))
    for h5 in root.glob("*.h5"):
        if task_id_from_name(h5.stem) != 2:
            h5.unlink()
    for lst in (root / "lists").glob("*.txt"):
        keep = [n for n in lst.read_text().split() if task_id_from_name(n) == 2]
        lst.write_text("".join(f"{n}\n" for n in keep))
    cfg = load_config(CPU3D, [*TINY3D, "data.format=versemi", f"data.root={root}", f"data.list_dir={root / 'lists'}",
                              "data.options.task=la", "model.name=vnet", "method.name=supervised3d",
                              "train.iterations=2", "train.eval_every=2", "eval.surface_metrics=never"],
                      replace_method=True)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_student_dice_la" in record


def test_single_task_method_with_the_task_prompted_network_is_refused(tmp_path) -> None:
    cfg = load_config(CPU3D, [*TINY3D, "data.options.task=la", "method.name=cps3d"], replace_method=True)
    assert cfg.model.name == "versemi_vnet"
    with pytest.raises(ConfigError, match="^method 'cps3d' trains a plain single-task network but "
                                          "model.name=versemi_vnet takes task prompts; set model.name=vnet$"):
        Trainer(cfg, tmp_path / "run")
