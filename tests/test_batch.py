"""Archive scoring and multi-process training end to end: what cannot run inside a notebook. `cxr-covid predict --out`
in its own process killed with SIGKILL and rerun, Ray Data actors on a local Ray (one Ray for the module) against the
local engine, an actor's process killed mid-job, and `cxr-covid train` under torchrun with two gloo processes. The unit
checks of `batch` and of `train.process_role` live beside the code in nbs/05a_batch.ipynb and nbs/04_train.ipynb."""
import os, signal, subprocess, sys, threading, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_covid_nbdev import core
from cxr_covid_nbdev.batch import score_archive, prob_column, ResultStore
from cxr_covid_nbdev.core import LABELS

PER_CLASS = 6
DICOMS = ('RG1_UNCI.dcm', 'RG1_J2KR.dcm', 'RG3_UNCI.dcm')
PROBS = [prob_column(l) for l in LABELS]


def _cli(*args):
    "`cxr-covid ARGS` as a new process running this checkout's code (`python -m cxr_covid_nbdev.cli`)"
    return [sys.executable, '-m', 'cxr_covid_nbdev.cli', *map(str, args)]


@pytest.fixture(scope='module')
def archive(cxr_real, dicom_file, tmp_path_factory) -> Path:
    "A small archive: real cxr-real images per class, the pydicom-data DICOMs, and three files that cannot be read"
    d = tmp_path_factory.mktemp('archive')
    m = pd.read_csv(cxr_real/'manifest.csv').groupby('label', sort=True).head(PER_CLASS)
    for p in m.path:
        (d/p).parent.mkdir(parents=True, exist_ok=True)
        (d/p).symlink_to(cxr_real/p)
    (d/'dicom').mkdir()
    for n in DICOMS: (d/'dicom'/n).symlink_to(dicom_file(n))
    (d/'bad').mkdir()
    (d/'bad'/'truncated.jpg').write_bytes((cxr_real/m.path.iloc[0]).read_bytes()[:400])
    (d/'bad'/'empty.png').write_bytes(b'')
    (d/'bad'/'not-an-image.jpg').write_bytes(b'this is a text file, not a radiograph\n' * 20)
    return d


BAD = {'bad/truncated.jpg', 'bad/empty.png', 'bad/not-an-image.jpg'}


def _rel(df, root):
    return df.assign(path=[os.path.relpath(p, root) for p in df.path]).set_index('path').sort_index()


@pytest.fixture(scope='module')
def local_results(archive, tiny_model_dir, tmp_path_factory) -> pd.DataFrame:
    "The archive scored once by the local engine, indexed by path relative to the archive"
    out = tmp_path_factory.mktemp('local')/'results.parquet'
    s = score_archive([archive], out, model_dir=tiny_model_dir, bs=8, progress=False)
    assert s['scored'] == s['inputs'] == 4 * PER_CLASS + len(DICOMS) + len(BAD)
    return _rel(pd.read_parquet(out), archive)


def test_corrupt_files_are_rows_with_a_reason(local_results):
    bad = local_results[local_results.error.notna()]
    assert set(bad.index) == BAD
    assert 'empty file' in bad.error['bad/empty.png'] and 'damaged or truncated' in bad.error['bad/truncated.jpg']
    assert bad[PROBS].isna().all().all() and bad.verdict.isna().all()
    good = local_results[local_results.error.isna()]
    np.testing.assert_allclose(good[PROBS].sum(axis=1), 1, atol=1e-6)
    assert set(good.verdict) <= set(LABELS) and good.sha1.str.len().eq(40).all()
    assert good.loc['dicom/RG3_UNCI.dcm', 'verdict'] == 'Not Certain' and 'EXTREMITY' in good.loc['dicom/RG3_UNCI.dcm', 'reason']


@pytest.fixture(scope='module')
def local_ray():
    "One local Ray with two CPUs (two actors) for the module"
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _scorer_pids() -> list:
    import psutil
    return [p.pid for p in psutil.process_iter(['cmdline']) if '_Scorer' in ' '.join(p.info['cmdline'] or [])]


def test_ray_matches_local_and_survives_a_killed_actor(local_ray, archive, tiny_model_dir, local_results, tmp_path):
    """Two Ray actors give the local engine's rows (probabilities within 1e-5), even though one actor's process is killed
    with SIGKILL mid-job: Ray restarts it and retries its batch, and no row is missing or doubled (one job, one actor pool
    start-up: each costs seconds)"""
    out, res = tmp_path/'ray.parquet', {}
    job = threading.Thread(target=lambda: res.update(score_archive([archive], out, engine='ray', model_dir=tiny_model_dir, bs=1,
                                                                   actors=2, part_rows=1, progress=False)))
    job.start()
    parts, killed, end = out.with_name(out.name + '.parts'), None, time.time() + 300
    while killed is None and job.is_alive() and time.time() < end:
        pids = _scorer_pids()
        if pids and len(list(parts.glob('part-*.parquet'))) >= 2:  # the actors are scoring
            os.kill(pids[0], signal.SIGKILL); killed = pids[0]
        time.sleep(0.05)
    assert killed is not None, "the job ended before an actor could be killed"
    remaining = len(local_results) - len(list(parts.glob('part-*.parquet')))
    job.join(300)
    assert not job.is_alive() and res, "the job did not finish after losing an actor"
    assert remaining > 0 and killed not in _scorer_pids()
    assert (res['scored'], res['errors']) == (len(local_results), len(BAD))
    r = _rel(pd.read_parquet(out), archive)
    assert list(r.index) == list(local_results.index) and r.index.is_unique
    np.testing.assert_allclose(r[PROBS].to_numpy(float), local_results[PROBS].to_numpy(float), atol=1e-5, rtol=0)
    pd.testing.assert_series_equal(r.verdict, local_results.verdict)
    pd.testing.assert_series_equal(r.error, local_results.error)
    assert (r.sha1.fillna('') == local_results.sha1.fillna('')).all()


def test_sigkill_halfway_then_rerun_gives_every_input_once(archive, tiny_model_dir, local_results, tmp_path):
    out = tmp_path/'results.csv'
    cmd = _cli('predict', archive, '--model', tiny_model_dir, '--out', out, '--bs', 2, '--part-rows', 2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts, end = out.with_name(out.name + '.parts'), time.time() + 300
    while proc.poll() is None and time.time() < end and len(list(parts.glob('part-*.parquet'))) < 3: time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL); proc.communicate(timeout=60)
    assert not out.exists()
    done = len(ResultStore(out).read())
    assert 0 < done < len(local_results)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(local_results)} inputs, {len(local_results) - done} scored now, {done} already there" in r.stderr, r.stderr
    res = _rel(pd.read_csv(out), archive)
    assert list(res.index) == list(local_results.index) and res.index.is_unique and not parts.exists()
    np.testing.assert_allclose(res[PROBS].to_numpy(float), local_results[PROBS].to_numpy(float), atol=1e-6, rtol=0)


def test_torchrun_two_gloo_processes_write_one_valid_model(train_folder, tmp_path):
    out = tmp_path/'models'/'m'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m', 'cxr_covid_nbdev.cli',
           'train', train_folder, '--out', out, '--arch', 'resnet18', '--size', '32', '--epochs', '1', '--freeze-epochs', '1',
           '--bs', '8', '--no-pretrained', '--device', 'cpu', '--quiet']
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('Saved ') == 1, r.stdout  # rank 0 alone reports (and writes)
    assert [p.name for p in out.parent.iterdir()] == ['m']  # one folder, no temporary leftovers
    model, meta = core.load_model_dir(out)  # checks the weights against meta's sha256
    assert meta['sha256'] == core.file_digest(out/'model.safetensors', 'sha256')
    assert meta['recipe']['processes'] == 2 and meta['labels'] == list(LABELS)
    assert core.check_model_runs(out)['arch'] == 'resnet18'
