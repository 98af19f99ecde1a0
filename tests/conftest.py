"Shared fixtures: where the real data lives, and small models trained once per test session."
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO/'test-artifacts'


def shared_data_dir() -> Path:
    "`$CXR_SHARED/data`, or `../shared/data` beside the checkout: real images are never copied into the repo"
    root = Path(os.environ.get('CXR_SHARED') or REPO.parent/'shared')
    data = root/'data'
    if not (data/'cxr-real'/'manifest.csv').is_file():
        raise RuntimeError(f"Real data not found at {data}: set CXR_SHARED to the folder that holds data/cxr-real")
    return data


@pytest.fixture(scope='session')
def cxr_real() -> Path:
    "The 371-image developers' sample, one folder per class plus manifest.csv"
    return shared_data_dir()/'cxr-real'


@pytest.fixture(scope='session')
def cxr_train() -> Path:
    "The 2,884-image training corpus with a patient-level split column"
    return shared_data_dir()/'cxr-train'


@pytest.fixture(scope='session')
def dicom_file():
    "Path of a real DICOM file shipped by PyPI's pydicom-data (RG1_UNCI.dcm, RG1_J2KR.dcm, RG3_UNCI.dcm...)"
    from pydicom.data import get_testdata_file
    return lambda name: Path(get_testdata_file(name))


@pytest.fixture(scope='session')
def artifacts() -> Path:
    "Folder for screenshots and other files a test leaves for people to look at"
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


TINY_PER_CLASS = 12


@pytest.fixture(scope='session')
def tiny_training_data(cxr_real):
    "The small real training set of `tiny_model_dir`: 12 cxr-real images per class, with a patient-level split"
    from cxr_covid_nbdev.data import read_dataset
    from cxr_covid_nbdev.train import with_split
    df = read_dataset(cxr_real)
    return with_split(df.groupby('label', sort=True).head(TINY_PER_CLASS), seed=0)


@pytest.fixture(scope='session')
def tiny_model_dir(tiny_training_data, tmp_path_factory) -> Path:
    "A model folder trained once per session by `train.train_model`: resnet18, 64 px, 1 frozen + 1 unfrozen epoch, random init"
    from cxr_covid_nbdev.train import train_model
    out = tmp_path_factory.mktemp('tiny-model')/'model'
    return train_model(tiny_training_data, out, arch='resnet18', size=64, epochs=1, freeze_epochs=1, bs=16,
                       pretrained=False, seed=0, progress=False)


@pytest.fixture
def train_folder(tiny_training_data, tmp_path) -> Path:
    "The tiny training set as a data set folder (`manifest.csv` with relative paths) that `cxr-covid train` reads"
    d = tmp_path/'data'
    import pandas as pd
    from cxr_covid_nbdev.core import LABELS
    for l in LABELS: (d/l).mkdir(parents=True)
    rows = []
    for p, l, pid, sp in zip(tiny_training_data.path, tiny_training_data.label, tiny_training_data.patient_id, tiny_training_data.split):
        (d/l/Path(p).name).symlink_to(p)
        rows.append({'path': f'{l}/{Path(p).name}', 'label': l, 'patient_id': pid, 'split': sp})
    pd.DataFrame(rows).to_csv(d/'manifest.csv', index=False)
    return d


class CliResult:
    "What a `cxr-covid` run gave: `returncode`, `stdout`, `stderr`"
    def __init__(self, returncode, stdout, stderr): self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli_in_process(*args, env=None) -> CliResult:
    """`cxr-covid ARGS` run in this process through `cli.main`, the console script's entry point (argparse's exit
    status included): seconds cheaper than a new Python per call, for refusals. End-to-end tests run the real script."""
    import contextlib, io
    from cxr_covid_nbdev.cli import main
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try: rc = main([str(a) for a in args])
            except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return CliResult(rc, out.getvalue(), err.getvalue())


# `make test` runs pytest on two workers (`-n 2 --dist loadgroup`). Each module is one group, so its module-scoped
# fixtures (a docs build, a Ray cluster, trained models) are made once; test_retrain, as long as several modules
# together, is split in two halves that share its seed model (the first half trains it while the other worker runs
# test_batch). The longest groups start first, so that the two workers finish together (durations of `make test`).
LONGEST_FIRST = ('test_retrain-a', 'test_batch', 'test_retrain-b', 'test_train', 'test_evaluate', 'test_dashboard_browser',
                 'test_inference', 'test_docs_browser', 'test_crossval', 'test_default_model', 'test_registry')
RETRAIN_A = ('test_good_inbox_is_promoted_and_served', 'test_malformed_inbox_changes_nothing',
             'test_failed_run_leaves_registry_unchanged')


def _group(item) -> str:
    mod = item.module.__name__.rsplit('.', 1)[-1]
    if mod != 'test_retrain': return mod
    return f"{mod}-{'a' if item.originalname in RETRAIN_A else 'b'}"


def pytest_collection_modifyitems(config, items):
    for item in items: item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = lambda item: LONGEST_FIRST.index(_group(item)) if _group(item) in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order within a group is kept
