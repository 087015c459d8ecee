"""VerSemi options a user of the original code would miss (issue 12, section 4): duplicate-balanced and
other-ratio lists, a best checkpoint per stage, numbered checkpoints, ``bn_update_per_query``, the optional
EMA teacher, importing the original's checkpoints, and the report's wording."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medsemi.cli import main
from medsemi.config import load_config
from medsemi.data.synthetic.volumes3d import Synthetic3DConfig, write_synthetic_dataset
from medsemi.data.volumes.lists import load_versemi_split
from medsemi.engine.trainer import Trainer
from medsemi.families.select import build_family
from medsemi.nets.task_prompted import TaskPromptedVNet
from medsemi.workflows.evaluate_run import evaluate_model_file, evaluate_run
from medsemi.workflows.import_checkpoint import default_versemi_config, import_checkpoint

REPO = Path(__file__).resolve().parents[1]
CPU_CFG = REPO / "configs" / "versemi" / "synthetic3d_cpu.yaml"
TINY = [
    "train.iterations=6", "method.stage1_iterations=3", "train.eval_every=3", "train.checkpoint_every=6",
    "train.log_every=1", "train.batch_size=2", "train.unlabelled_batch_size=2", "train.device=cpu",
    "train.progress_bar=false", "train.tensorboard=false", "data.options.strides=[32,32,32]",
    "data.options.synthetic.n_per_task=4", "data.options.synthetic.size_max=36",
]


# ----------------------------------------------------------------------------- lists
@pytest.fixture(scope="module")
def h5_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("h5")
    write_synthetic_dataset(root, Synthetic3DConfig(n_per_task=4, size_range=(32, 36)))
    return root


def _own_lists(root: Path, ratio: int, duplicate: bool) -> Path:
    """Lists of ``ratio`` made from the written ones; ``duplicate`` repeats every labelled case (balancing
    by duplication, as the first public lists did)."""
    out = root / f"lists_{ratio}_{duplicate}"
    shutil.copytree(root / "lists", out, dirs_exist_ok=True)
    lab = (root / "lists" / "train_lab_20.txt").read_text().split()
    unl = (root / "lists" / "train_unlab_20.txt").read_text().split()
    (out / f"train_lab_{ratio}.txt").write_text("\n".join(lab + (lab if duplicate else [])) + "\n")
    (out / f"train_unlab_{ratio}.txt").write_text("\n".join(unl) + "\n")
    return out


def _versemi_cfg(root: Path, list_dir: Path, ratio: int, *extra: str):
    return load_config(CPU_CFG, [*TINY, "data.format=versemi", f"data.root={root}", f"data.list_dir={list_dir}",
                                 f"data.options.ratio={ratio}", *extra])


def test_duplicates_refused_unless_allowed(h5_root):
    lists = _own_lists(h5_root, 20, duplicate=True)
    with pytest.raises(ValueError, match="allow_duplicates"):
        build_family(_versemi_cfg(h5_root, lists, 20))
    fam = build_family(_versemi_cfg(h5_root, lists, 20, "data.options.allow_duplicates=true"))
    names = fam.split.labelled
    assert len(names) == 2 * len(set(names))  # every case twice: twice as often in the labelled stream
    first = {v.name: v for v in fam.labelled_volumes[: len(names) // 2]}
    assert all(v is first[v.name] for v in fam.labelled_volumes[len(names) // 2:])  # read once
    with pytest.raises(ValueError, match="duplicate"):
        load_versemi_split(20, lists)


def test_other_ratio_needs_own_lists(h5_root):
    lists = _own_lists(h5_root, 30, duplicate=False)
    fam = build_family(_versemi_cfg(h5_root, lists, 30))
    assert fam.split.ratio == 30 and len(fam.labelled_volumes) == len(fam.split.labelled) > 0
    with pytest.raises(ValueError, match="list_dir"):
        build_family(load_config(CPU_CFG, [*TINY, "data.format=versemi", f"data.root={h5_root}",
                                           "data.options.ratio=30"]))
    with pytest.raises(ValueError, match="list_dir"):
        load_versemi_split(30)


# ----------------------------------------------------------------------------- a two-stage run with the options
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(CPU_CFG, [*TINY, "train.keep_every=2", "method.ema=true", "method.bn_update_per_query=true"])
    torch.manual_seed(0)
    tr = Trainer(cfg, run_dir)
    tr.fit()
    return tr, run_dir


def test_best_checkpoint_per_stage_and_report(run):
    tr, run_dir = run
    ck = run_dir / "checkpoints"
    stage1 = torch.load(ck / "best_test_stage1.pt", weights_only=False)
    stage2 = torch.load(ck / "best_test.pt", weights_only=False)
    assert stage1["iteration"] == 3  # stage 1 ends after 3 steps; evaluations at 3 (stage 1) and 6 (stage 2)
    assert stage2["iteration"] == 6
    assert set(tr.best) >= {"test", "test_stage1"}
    results = evaluate_run(run_dir, cfg=tr.cfg, family=tr.family, device="cpu")
    assert {"best_test", "best_test_stage1", "last_student", "last_teacher"} <= set(results)
    report = (run_dir / "report.md").read_text()
    assert "best_test_stage1" in report and "Tasks pancreas, la, spleen, lung" in report
    assert "Labelled domain" not in report and "labelled domain" not in report and "| task | class |" in report


def test_numbered_checkpoints_are_models(run, tmp_path):
    tr, run_dir = run
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("iter_*.pt")) == ["iter_2.pt", "iter_4.pt", "iter_6.pt"]
    state = torch.load(ck / "iter_4.pt", weights_only=False)
    assert state["iteration"] == 4 and "model" in state and "config" in state
    res = evaluate_model_file(ck / "iter_6.pt", device="cpu", out_dir=tmp_path / "ev")
    last = torch.load(ck / "last.pt", weights_only=False)
    student = {k[len("student."):]: v for k, v in last["method"].items() if k.startswith("student.")}
    for k, v in student.items():  # iter_6 is the final student
        assert torch.equal(state_model(ck / "iter_6.pt")[k], v), k
    assert res["iter_6"]["iteration"] == 6 and (tmp_path / "ev" / "report.md").exists()


def state_model(path):
    return torch.load(path, weights_only=False)["model"]


def test_ema_teacher_is_evaluated(run):
    tr, run_dir = run
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("test_teacher_dice" in r for r in records if r["kind"] == "eval")
    assert tr.method.teacher is not None
    assert not all(torch.equal(a, b) for a, b in zip(tr.method.teacher.parameters(), tr.student.parameters()))


def test_ema_teacher_update_rule(tmp_path):
    cfg = load_config(CPU_CFG, [*TINY, "method.ema=true", "method.pipeline=released_main"])
    tr = Trainer(cfg, tmp_path / "run")
    tr.fit(stop_after=1)  # k = 0: alpha 0, the teacher is a copy of the student (weights and BN buffers)
    for (name, t), s in zip(tr.method.teacher.state_dict().items(), tr.student.state_dict().values()):
        if t.is_floating_point():  # weights and running statistics (the batch counter is not copied)
            assert torch.equal(t, s), name
    t1 = [p.clone() for p in tr.method.teacher.parameters()]
    tr._stop = False
    tr.fit(stop_after=1)  # k = 1: alpha = min(1 - 1/2, 0.99) = 0.5
    for a, p, s in zip(t1, tr.method.teacher.parameters(), tr.student.parameters()):
        assert torch.allclose(p, 0.5 * a + 0.5 * s, atol=1e-7)
    assert load_config(CPU_CFG).method.ema is False  # off by default: no teacher
    assert Trainer(load_config(CPU_CFG, [*TINY]), tmp_path / "plain").method.teacher is None


@pytest.mark.parametrize(("per_query", "updates"), [(False, 2), (True, 4)])
def test_bn_update_per_query_option(tmp_path, per_query, updates):
    # stage 1: the original's 4 passes (x with own tasks; the composite with 5, t_a, t_b) are 2 shared passes
    cfg = load_config(CPU_CFG, [*TINY, "method.pipeline=released_main", f"method.bn_update_per_query={per_query}"])
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.student.bn_update_per_query is per_query
    tr.fit(stop_after=1)
    assert int(tr.student.gap[0].num_batches_tracked) == updates
    assert int(tr.student.precls_conv[0].num_batches_tracked) == updates


# ----------------------------------------------------------------------------- import-checkpoint
def original_names(ours: dict) -> dict:
    """Our names written back the way vnet_odod_mix.py + DataParallel name them (independent of the code)."""
    out = {}
    for k, v in ours.items():
        if k.startswith("backbone."):
            block, rest = k[len("backbone."):].split(".", 1)
            k = f"{block}.conv.{rest}"
        elif k.startswith("gap."):
            k = "GAP." + k[len("gap."):]
        out["module." + k] = v
    return out


@pytest.fixture(scope="module")
def original_pth(tmp_path_factory):
    torch.manual_seed(3)
    net = TaskPromptedVNet(1, base_filters=4)
    net.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        net(torch.randn(2, 1, 32, 32, 32), torch.tensor([1, 3]))
    path = tmp_path_factory.mktemp("orig") / "450.pth"
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    torch.save({"net": original_names(net.state_dict()), "opt": opt.state_dict(), "epoch": 450}, path)
    net.eval()
    return path, net


def test_original_names_cover_the_network(original_pth):
    path, net = original_pth
    names = set(torch.load(path, weights_only=True)["net"])
    assert {"module.block_one.conv.0.weight", "module.block_one_dw.conv.0.bias", "module.block_five_up.conv.0.weight",
            "module.GAP.0.running_var", "module.controller.weight", "module.precls_conv.2.weight"} <= names


def test_import_checkpoint_predicts_and_evaluates(original_pth, tmp_path):
    nib = pytest.importorskip("nibabel")
    from medsemi.workflows.predict import predict_folder

    path, net = original_pth
    out = tmp_path / "imported.pt"
    assert main(["import-checkpoint", "--config", str(CPU_CFG), "versemi", str(path), str(out), *TINY]) == 0
    state = torch.load(out, weights_only=False)
    assert state["iteration"] == 450 and state["imported_from"] == str(path)
    for k, v in net.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    # predict: the same segmentation as the original network queried directly
    cfg = load_config(CPU_CFG, TINY)
    fam = build_family(cfg)
    vol = fam.test_volumes[2][0]
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(vol.image, np.eye(4)), str(tmp_path / "in" / "case.nii.gz"))
    written = predict_folder(out, tmp_path / "in", tmp_path / "pred", device="cpu", task=2)
    assert written and np.asarray(nib.load(str(written[0])).dataobj).shape == vol.image.shape
    # evaluate: equal to evaluating the original network itself
    res = evaluate_model_file(out, device="cpu", out_dir=tmp_path / "ev")["imported"]
    ref = fam.evaluate({"net": net}, cfg, torch.device("cpu"), surface=False)["test"]["net"]
    assert res["mean_dice"] == pytest.approx(ref["mean_dice"])
    for task in ("pancreas", "la", "spleen", "lung"):
        assert res["per_domain"][task]["foreground"]["dice"] == pytest.approx(
            ref["per_domain"][task]["foreground"]["dice"])
    assert "Tasks" in (tmp_path / "ev" / "report.md").read_text()


def test_import_checkpoint_refusals(original_pth, tmp_path):
    path, net = original_pth
    out = tmp_path / "a.pt"
    import_checkpoint("versemi", path, out)  # no config: the paper's setting, width read from the weights
    cfg = torch.load(out, weights_only=False)["config"]
    assert cfg["model"]["base_channels"] == 4 and cfg["data"]["patch_size"] == 96
    assert default_versemi_config(16).model.base_channels == 16
    with pytest.raises(FileExistsError):
        import_checkpoint("versemi", path, out)  # never overwrites
    bad = tmp_path / "bad.pth"
    sd = original_names(net.state_dict())
    sd["module.block_nine.conv.0.weight"] = torch.zeros(1)
    torch.save(sd, bad)  # a bare state dict is accepted, an unknown name is not
    with pytest.raises(ValueError, match="block_nine"):
        import_checkpoint("versemi", bad, tmp_path / "b.pt")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"net": original_names(net.state_dict()), "args": Synthetic3DConfig()}, unsafe)
    with pytest.raises(ValueError, match="weights-only"):  # an arbitrary object is not unpickled
        import_checkpoint("versemi", unsafe, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="base filters"):
        import_checkpoint("versemi", path, tmp_path / "d.pt", load_config(CPU_CFG, ["model.base_channels=8"]))


def test_released_preset_keeps_adam_across_stages(tmp_path):
    cfg = load_config(CPU_CFG, [*TINY, "method.preset=released", "method.pipeline=two_stage"])
    assert cfg.method.compat_cons_broadcast and not cfg.method.reset_optimizer_at_stage2
    tr = Trainer(cfg, tmp_path / "run")
    tr.fit(stop_after=4)  # stage 1 (3 steps) and the first stage-2 step
    first = next(iter(tr.student.parameters()))
    assert tr.optimizer.state[first]["step"].item() == 4  # one Adam throughout, as train.py's main


def test_cli_evaluates_a_model_file(run, tmp_path, capsys):
    tr, run_dir = run
    out = tmp_path / "ev"
    assert main(["evaluate", str(run_dir / "checkpoints" / "iter_2.pt"), "eval.surface_metrics=never",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "eval.json").read_text())["iter_2"]["iteration"] == 2
    assert "iter_2: model file" in capsys.readouterr().out
