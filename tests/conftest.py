import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = [
    "data.patch_size=32",
    "data.lb_num=4",
    "data.synthetic.train_per_domain=8",
    "data.synthetic.test_per_domain=4",
    "data.synthetic.num_domains=2",
    "model.base_channels=4",
    "train.batch_size=2",
    "train.unlabelled_batch_size=2",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "eval.batch_size=8",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides that make configs/demo.yaml train in a second on a CPU."""
    return list(TINY)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
