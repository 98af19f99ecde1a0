"""`cxr-covid predict` and `cxr-covid dashboard` end to end, and the Predictor where a test needs what a notebook lacks.

What `nbs/05_inference.ipynb` cannot check beside the code: the `cxr-covid` entry point (`cli.main`, a later
notebook) and its console script in their own processes, the session's trained tiny model (`conftest`), and a process
environment whose ONNX cache cannot be written. The Predictor against fastai, ONNX against torch, abstention,
Grad-CAM and the DICOM header rule are checked in the notebook, on the same real images."""
import json, os, subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_in_process
import torch
from PIL import Image

from cxr_covid_nbdev import core, inference
from cxr_covid_nbdev.core import LABELS, IMAGENET_MEAN, IMAGENET_STD
from cxr_covid_nbdev.inference import Predictor


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    "ONNX exports go to a per-session temporary cache, never to the user's"
    monkeypatch.setenv('CXR_COVID_CACHE', str(tmp_path_factory.getbasetemp()/'cxr-cache'))


def _files(cxr_real, per_class, offset=0):
    df = pd.read_csv(cxr_real/'manifest.csv').sort_values('path')
    df = df.groupby('label', sort=True).nth(list(range(offset, offset + per_class)))
    return [cxr_real/p for p in df.path], list(df.label)


def _meta(size=64, **kw):
    return {'arch': 'resnet18', 'labels': list(LABELS), 'size': size, 'prepare_size': None,
            'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD), 'imagenet_pretrained': False,
            'weights_source': 'none', 'temperature': 1.0, 'ood': {'method': 'energy', 'threshold': 1e9}, **kw}


@pytest.fixture(scope='module')
def untrained_dir(tmp_path_factory):
    torch.manual_seed(1)
    return core.save_model_dir(core.create_model('resnet18', 4), _meta(temperature=1.7),
                               tmp_path_factory.mktemp('untrained')/'model')


def test_tiny_trained_model(tiny_model_dir, cxr_real, dicom_file):
    "The training engineer's model folder loads and predicts; its meta drives the preprocessing"
    pr = Predictor(tiny_model_dir)
    assert pr.labels == list(LABELS) and pr.preprocess.size == pr.meta['size']
    files, labels = _files(cxr_real, 3, offset=20)
    probs = pr.predict_paths(files + [dicom_file('RG1_UNCI.dcm')])
    assert probs.shape == (len(files) + 1, 4) and not np.isnan(probs).any()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)


def _cli(*args, env=None):
    return subprocess.run(['cxr-covid', *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_cli_predict(untrained_dir, cxr_real, tmp_path, dicom_file):
    files, _ = _files(cxr_real, 1)
    d = tmp_path/'in'; (d/'sub').mkdir(parents=True)
    for f in files: (d/f.name).symlink_to(f)
    (d/'sub'/'scan').symlink_to(dicom_file('RG1_UNCI.dcm'))  # DICOM without a suffix
    (d/'notes.txt').write_text('not an image')               # not picked up from a folder
    (d/'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'x' * 50)
    cams = tmp_path/'cams'
    r = _cli('predict', d, '--model', untrained_dir, '--json', '--cam', cams, '--bs', 2, '--workers', 1,
             env={'CXR_COVID_CACHE': str(inference.cache_dir())})
    assert r.returncode == 1, r.stderr
    recs = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(recs) == len(files) + 2
    bad = [x for x in recs if 'error' in x]
    assert [Path(x['path']).name for x in bad] == ['broken.png'] and 'skipped' in r.stderr and 'broken.png' in r.stderr
    good = [x for x in recs if 'error' not in x]
    pr = Predictor(untrained_dir)
    for x in good:
        assert set(x['probs']) == set(LABELS) and x['label'] in LABELS and isinstance(x['abstained'], bool)
        want = pr.predict(x['path']).probs
        assert all(abs(x['probs'][l] - want[l]) < 1e-5 for l in LABELS)
        im = Image.open(x['cam']); im.load()
        assert im.mode == 'RGB' and Path(x['cam']).parent == cams
    assert len(list(cams.glob('*.png'))) == len(good) and not list(cams.glob('.*'))
    t = _cli('predict', *files, '--model', untrained_dir, env={'CXR_COVID_CACHE': str(inference.cache_dir())})
    assert t.returncode == 0, t.stderr
    lines = t.stdout.splitlines()
    assert lines[0].split()[:2] == ['label', 'COVID-19'] and len(lines) == len(files) + 1
    assert all(str(f) in l for f, l in zip(files, lines[1:]))


def test_cli_predict_refusals(untrained_dir, tmp_path):
    r = cli_in_process('predict', tmp_path/'nope.png', '--model', untrained_dir)
    assert r.returncode == 1 and 'no such file' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path/'empty').mkdir()
    r = cli_in_process('predict', tmp_path/'empty', '--model', untrained_dir)
    assert r.returncode == 2 and 'no image' in r.stderr and 'Traceback' not in r.stderr
    r = cli_in_process('predict', tmp_path/'empty', '--model', tmp_path)
    assert r.returncode == 2 and 'not a model folder' in r.stderr


def test_cli_dashboard_without_model(tmp_path, monkeypatch, capsys):
    "No --model, no production model, no packaged model: the NoModelError message and status 2"
    from cxr_covid_nbdev import cli
    monkeypatch.setenv('CXR_COVID_REGISTRY', str(tmp_path/'registry'))
    monkeypatch.setattr(core, 'default_model_dir', lambda: tmp_path/'no-default')
    assert cli.main(['dashboard', '--port', '8899']) == 2
    err = capsys.readouterr().err
    assert 'No model yet' in err and 'Traceback' not in err


def test_auto_backend_falls_back_to_torch(untrained_dir, tmp_path, monkeypatch, cxr_real):
    "When the ONNX export cannot be cached, 'auto' warns and uses torch; an explicit 'onnx' fails"
    (tmp_path/'not-a-folder').write_text('x')
    monkeypatch.setenv('CXR_COVID_CACHE', str(tmp_path/'not-a-folder'))
    with pytest.warns(UserWarning, match='using torch'): pr = Predictor(untrained_dir)
    assert pr.backend == 'torch'
    files, _ = _files(cxr_real, 1)
    assert pr.predict(files[0]).label in LABELS
    with pytest.raises(OSError): Predictor(untrained_dir, backend='onnx')
    with pytest.raises(ValueError, match='backend'): Predictor(untrained_dir, backend='tensorrt')


def test_cli_predict_goes_on_past_missing_files_and_symlink_loops(untrained_dir, cxr_real, tmp_path):
    "A missing path or a symlink loop is one failed input: the other files are still predicted, and the status is 1"
    files, _ = _files(cxr_real, 1)
    (tmp_path/'loop-a').symlink_to(tmp_path/'loop-b'); (tmp_path/'loop-b').symlink_to(tmp_path/'loop-a')
    r = _cli('predict', tmp_path/'missing.png', tmp_path/'loop-a', *files, '--model', untrained_dir, '--json')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    recs = [json.loads(l) for l in r.stdout.splitlines()]
    assert [Path(x['path']).name for x in recs if 'error' in x] == ['missing.png', 'loop-a']
    assert len([x for x in recs if 'error' not in x]) == len(files)


def test_blank_and_tiny_images_are_not_certain(untrained_dir, tmp_path):
    "All-black, all-white and 1×1 images get Not Certain with the reason, in `predict --json`"
    from PIL import Image
    Image.new('L', (2000, 2400), 0).save(tmp_path/'black.png'); Image.new('L', (512, 512), 255).save(tmp_path/'white.png')
    Image.new('L', (1, 1), 128).save(tmp_path/'dot.png')
    r = _cli('predict', tmp_path/'black.png', tmp_path/'white.png', tmp_path/'dot.png', '--model', untrained_dir, '--json')
    assert r.returncode == 0, r.stderr
    recs = {Path(x['path']).name: x for x in map(json.loads, r.stdout.splitlines())}
    for name, why in (('black.png', 'nearly uniform'), ('white.png', 'nearly uniform'), ('dot.png', 'too small')):
        assert recs[name]['label'] == 'Not Certain' and recs[name]['abstained'] and why in recs[name]['reason'], recs[name]
