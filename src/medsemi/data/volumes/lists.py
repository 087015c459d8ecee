"""The VerSemi case lists (spec versemi.md 1.2-1.3) as objects.

The released lists are shipped as package data in ``medsemi/data/volumes/versemi_lists/`` (copied verbatim
from ``maxwell0027/VerSemi`` ``datalist/``, commit e331a7b; CRLF line endings and missing final
newlines are tolerated: names are stripped, blank lines skipped). A user folder holding files with
the same names can replace them (``list_dir``).

Files used: ``train_lab_{10,20}.txt``, ``train_unlab_{10,20}.txt`` and the four test lists
``test.txt`` (pancreas), ``test_la.txt``, ``test_spleen.txt``, ``test_lung.txt``. Cases are grouped
by task with the file-name rule of spec 1.2. The per-dataset ``*_lab_*`` lists are never used by
the original ``train.py`` (spec 1.3); :func:`per_task_labelled_lists` reads them for checking.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from medsemi.data.volumes.cases import TASK_NAMES, task_id_from_name

RATIOS: tuple[int, ...] = (10, 20)
TEST_LISTS: dict[int, str] = {1: "test.txt", 2: "test_la.txt", 3: "test_spleen.txt", 4: "test_lung.txt"}
PER_TASK_PREFIX: dict[int, str] = {1: "panc", 2: "la", 3: "sp", 4: "lt"}
PACKAGE_LISTS = "versemi_lists"


def parse_list(text: str) -> list[str]:
    """One case name per line; whitespace (including ``\\r``) stripped, blank lines dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_list(file_name: str, list_dir: str | Path | None = None) -> list[str]:
    """Read a list file from ``list_dir`` or, when None, from the shipped release lists."""
    if list_dir is None:
        res = resources.files("medsemi.data.volumes").joinpath(PACKAGE_LISTS, file_name)
        if not res.is_file():
            raise FileNotFoundError(f"shipped list {file_name!r} missing from medsemi.data/{PACKAGE_LISTS}")
        return parse_list(res.read_text(encoding="utf-8"))
    path = Path(list_dir) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list file not found")
    return parse_list(path.read_text(encoding="utf-8"))


def group_by_task(names: list[str]) -> dict[int, tuple[str, ...]]:
    """Group names by task id (1..4), keeping list order; every real task is a key."""
    out: dict[int, list[str]] = {t: [] for t in TASK_NAMES}
    for n in names:
        out[task_id_from_name(n)].append(n)
    return {t: tuple(v) for t, v in out.items()}


@dataclass(frozen=True)
class VerSemiSplit:
    """Cases of one VerSemi experiment.

    ``labelled`` / ``unlabelled``: training cases in list order (the loaders shuffle anyway);
    ``test``: per task id (1 pancreas, 2 LA, 3 spleen, 4 lung). ``*_by_task`` group by task id.
    """

    ratio: int
    labelled: tuple[str, ...]
    unlabelled: tuple[str, ...]
    test: dict[int, tuple[str, ...]]
    source: str

    @property
    def labelled_by_task(self) -> dict[int, tuple[str, ...]]:
        return group_by_task(list(self.labelled))

    @property
    def unlabelled_by_task(self) -> dict[int, tuple[str, ...]]:
        return group_by_task(list(self.unlabelled))

    @property
    def train_pool(self) -> tuple[str, ...]:
        return self.labelled + self.unlabelled

    @property
    def all_test(self) -> tuple[str, ...]:
        return tuple(n for t in sorted(self.test) for n in self.test[t])

    def summary(self) -> dict[str, object]:
        """Counts: total and per task name, for labelled, unlabelled and test."""
        lab, unl = self.labelled_by_task, self.unlabelled_by_task
        return {
            "ratio": self.ratio,
            "labelled": len(self.labelled),
            "unlabelled": len(self.unlabelled),
            "labelled_per_task": {TASK_NAMES[t]: len(v) for t, v in lab.items()},
            "unlabelled_per_task": {TASK_NAMES[t]: len(v) for t, v in unl.items()},
            "test_per_task": {TASK_NAMES[t]: len(v) for t, v in self.test.items()},
        }

    def validate(self) -> list[str]:
        """Problems with the split: duplicates, labelled/unlabelled overlap, train/test overlap."""
        problems: list[str] = []
        if not self.labelled:
            problems.append(f"{self.source}: no labelled cases (train_lab_{self.ratio}.txt is empty)")
        for what, names in (("labelled", self.labelled), ("unlabelled", self.unlabelled)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                problems.append(f"{self.source}: duplicate {what} cases {dup[:5]}")
        both = sorted(set(self.labelled) & set(self.unlabelled))
        if both:
            problems.append(f"{self.source}: cases both labelled and unlabelled: {both[:5]}")
        leak = sorted(set(self.train_pool) & set(self.all_test))
        if leak:
            problems.append(f"{self.source}: training cases also in a test list: {leak[:5]}")
        for t, names in self.test.items():
            wrong = [n for n in names if task_id_from_name(n) != t]
            if wrong:
                problems.append(f"{self.source}: {TEST_LISTS[t]} holds cases of another task: {wrong[:5]}")
        return problems


def load_versemi_split(
    ratio: int = 20, list_dir: str | Path | None = None, *, strict: bool = True
) -> VerSemiSplit:
    """Load ``train_lab_<ratio>.txt``, ``train_unlab_<ratio>.txt`` and the four test lists.

    ``ratio``: 10 or 20 (percent labelled; the original hard-codes 20, spec 1.3). ``list_dir``: a folder
    with files of the same names (default: the shipped release lists). ``strict``: raise ``ValueError``
    listing the problems of :meth:`VerSemiSplit.validate`.
    """
    if ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {RATIOS}, got {ratio}")
    source = str(list_dir) if list_dir is not None else f"medsemi.data/{PACKAGE_LISTS}"
    lab = read_list(f"train_lab_{ratio}.txt", list_dir)
    unl = read_list(f"train_unlab_{ratio}.txt", list_dir)
    test = {t: tuple(read_list(f, list_dir)) for t, f in TEST_LISTS.items()}
    split = VerSemiSplit(ratio, tuple(lab), tuple(unl), test, source)
    if strict:
        problems = split.validate()
        if problems:
            raise ValueError("invalid VerSemi split:\n  " + "\n  ".join(problems))
    return split


def per_task_labelled_lists(
    ratio: int = 20, list_dir: str | Path | None = None
) -> dict[int, tuple[str, ...]]:
    """The per-dataset ``{panc,la,sp,lt}_lab_<ratio>.txt`` lists (unused by the original training)."""
    return {t: tuple(read_list(f"{p}_lab_{ratio}.txt", list_dir)) for t, p in PER_TASK_PREFIX.items()}


def iterations_per_epoch(
    n_labelled: int, n_unlabelled: int | None = None, *, batch_size: int = 8, repeats: int = 5
) -> int:
    """Iterations per epoch of the original loaders (spec 1.8).

    Stage 1: ``(repeats * n_labelled) // batch_size`` (drop_last). Stage 2 (``n_unlabelled`` given):
    the shorter of that and ``n_unlabelled // batch_size``.
    """
    lab = (repeats * n_labelled) // batch_size
    if n_unlabelled is None:
        return lab
    return min(lab, n_unlabelled // batch_size)
