"""torchrun with two CPU processes (gloo): ranks start equal, average gradients and stay equal."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_rank_training_keeps_ranks_identical(tmp_path, tiny_overrides):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from medsemi.config import load_config
        from medsemi.engine.trainer import Trainer
        cfg = load_config({str(REPO / 'configs' / 'demo.yaml')!r},
                          {tiny_overrides!r} + ["method.name=mean_teacher", "train.iterations=3",
                                                "train.eval_every=3"])
        trainer = Trainer(cfg, {str(tmp_path / 'run')!r})
        trainer.fit()
        torch.save(trainer.method.state_dict(), {str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.pt")
        dist.destroy_process_group()
    """))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script)],  # standalone: a free port
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    for key in a:
        if key.startswith("student.") and a[key].dtype.is_floating_point and "running" not in key:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
