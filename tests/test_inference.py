"Predictor against fastai, ONNX against torch, abstention, Grad-CAM, and `cxr-covid predict` / `dashboard` end to end."
import io, json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_in_process
import torch
from PIL import Image

from cxr_covid_nbdev import core, inference
from cxr_covid_nbdev.core import LABELS, IMAGENET_MEAN, IMAGENET_STD, NOT_CERTAIN
from cxr_covid_nbdev.data import read_radiograph
from cxr_covid_nbdev.inference import Predictor, overlay, ABSTAIN_NOT_CERTAIN, ABSTAIN_OOD


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
def fastai_learner(cxr_real):
    "A fastai Learner trained for one quick epoch on 3 real images per class, 64 px squish, ImageNet normalisation"
    from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, Resize, Normalize, imagenet_stats,
                                   RandomSplitter, vision_learner, resnet18)
    core.seed_everything(0)
    files, labels = _files(cxr_real, 3)
    lab = dict(zip(map(str, files), labels))
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=list(LABELS))), get_y=lambda f: lab[str(f)],
                    splitter=RandomSplitter(0.25, seed=0), item_tfms=Resize(64, method='squish'),
                    batch_tfms=Normalize.from_stats(*imagenet_stats)).dataloaders(files, bs=4, num_workers=0, device='cpu')
    learn = vision_learner(dls, resnet18, pretrained=False)
    learn.fit(1, 1e-3)
    return learn


@pytest.fixture(scope='module')
def untrained_dir(tmp_path_factory):
    torch.manual_seed(1)
    return core.save_model_dir(core.create_model('resnet18', 4), _meta(temperature=1.7),
                               tmp_path_factory.mktemp('untrained')/'model')


def _fastai_probs(learn, files):
    with learn.no_bar(): probs, _ = learn.get_preds(dl=learn.dls.test_dl(files, bs=4))
    return probs.numpy()


@pytest.mark.parametrize('backend', ['torch', 'onnx'])
def test_predictor_matches_fastai(fastai_learner, cxr_real, tmp_path, backend):
    "Same real images, same network: Predictor's probabilities are fastai's, through get_preds and predict"
    learn = fastai_learner
    mdir = core.save_model_dir(learn.model, _meta(), tmp_path/'m')
    pr = Predictor(mdir, backend=backend)
    files, _ = _files(cxr_real, 2, offset=5)
    got, want = pr.predict_paths(files, bs=3), _fastai_probs(learn, files)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - want.mean(0)).max() > 1e-3, "the images must give different answers for the check to mean anything"
    with learn.no_bar(): _, _, p = learn.predict(files[0])
    np.testing.assert_allclose([pr.predict(files[0]).probs[l] for l in LABELS], p.numpy(), atol=1e-4)


def test_predictor_prepare_size_matches_fastai_on_prepared_files(fastai_learner, cxr_real, tmp_path):
    "A model trained on a `prepare`d set (longest side 256) answers for an original file as fastai does for its prepared copy"
    learn = fastai_learner
    mdir = core.save_model_dir(learn.model, _meta(prepare_size=256), tmp_path/'m')
    files, _ = _files(cxr_real, 1, offset=7)
    prepared = []
    for i, f in enumerate(files):
        img = read_radiograph(f)
        assert max(img.size) > 256
        core.fit_longest_side(img, 256).save(tmp_path/f'{i}.png')
        prepared.append(tmp_path/f'{i}.png')
    np.testing.assert_allclose(Predictor(mdir, backend='onnx').predict_paths(files), _fastai_probs(learn, prepared), atol=1e-4)
    # without prepare_size the answers differ: the check can fail
    assert np.abs(Predictor(mdir, backend='torch').predict_paths(files) -
                  Predictor(core.save_model_dir(learn.model, _meta(), tmp_path/'m2'), backend='torch').predict_paths(files)).max() > 1e-6


def test_onnx_agrees_with_torch_and_is_cached_once(untrained_dir, cxr_real):
    files, _ = _files(cxr_real, 2)
    x = np.stack([inference.Preprocess(64)(read_radiograph(f)) for f in files])
    po, pt = Predictor(untrained_dir, backend='onnx'), Predictor(untrained_dir, backend='torch')
    np.testing.assert_allclose(po.predict_logits(x), pt.predict_logits(x), atol=1e-4)
    onnx = inference.cache_dir()/'onnx'/f"{po.meta['sha256']}.onnx"
    assert onnx.is_file() and po.backend == 'onnx' and Predictor(untrained_dir).backend == 'onnx'
    mtime = onnx.stat().st_mtime_ns
    Predictor(untrained_dir, backend='onnx')
    assert onnx.stat().st_mtime_ns == mtime, "the export is made once per weights file"
    assert not [p for p in onnx.parent.iterdir() if p.name.endswith('.tmp')]


def test_predict_paths_workers_and_bad_files(untrained_dir, cxr_real, tmp_path, dicom_file):
    files, _ = _files(cxr_real, 2)
    (tmp_path/'truncated.jpg').write_bytes(files[0].read_bytes()[:300])
    (tmp_path/'empty.png').write_bytes(b'')
    paths = [files[0], tmp_path/'truncated.jpg', *files[1:], tmp_path/'empty.png', dicom_file('RG1_UNCI.dcm')]
    pr = Predictor(untrained_dir)
    a = pr.predict_paths(paths, bs=3, num_workers=0)
    fail0 = pr.failures
    b = pr.predict_paths(paths, bs=2, num_workers=2)
    np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)
    assert np.isnan(a[[1, len(paths) - 2]]).all() and not np.isnan(np.delete(a, [1, len(paths) - 2], 0)).any()
    np.testing.assert_allclose(np.delete(a, [1, len(paths) - 2], 0).sum(1), 1, atol=1e-6)
    assert [p for p, _ in fail0] == [p for p, _ in pr.failures] == [tmp_path/'truncated.jpg', tmp_path/'empty.png']
    assert 'empty' in pr.failures[1][1]
    one = pr.predict(files[0])
    np.testing.assert_allclose(a[0], [one.probs[l] for l in LABELS], atol=1e-6)


def _favouring(model_dir, label):
    "The network of `model_dir` with its head pushed towards `label` (logits still depend on the image)"
    model, _ = core.load_model_dir(model_dir)
    bn, lin = model[1][-3], model[1][-1]
    assert isinstance(bn, torch.nn.BatchNorm1d) and isinstance(lin, torch.nn.Linear) and lin.bias is None
    with torch.no_grad():
        bn.bias.add_(1.); lin.weight[LABELS.index(label)] += 0.05
    return model


def test_temperature_and_abstention(untrained_dir, cxr_real, tmp_path):
    files, _ = _files(cxr_real, 2)
    f = files[0]
    pt = Predictor(untrained_dir, backend='torch')
    p = pt.predict(f)
    logits = pt.predict_logits(inference.Preprocess(64)(read_radiograph(f))[None])[0]
    np.testing.assert_allclose([p.probs[l] for l in LABELS], core.softmax_t(logits[None], 1.7)[0], atol=1e-6)
    assert p.ood_score == pytest.approx(float(core.energy_score(logits[None])[0]), abs=1e-6)
    # the trained Not Certain class wins -> abstain with that reason
    nc = Predictor(core.save_model_dir(_favouring(untrained_dir, NOT_CERTAIN), _meta(), tmp_path/'nc'))
    q = nc.predict(f)
    assert (q.label, q.top_label, q.abstained, q.reason) == (NOT_CERTAIN, NOT_CERTAIN, True, ABSTAIN_NOT_CERTAIN)
    # a verdict when a disease class wins and the energy is below the threshold
    covid = _favouring(untrained_dir, 'COVID-19')
    e = Predictor(core.save_model_dir(covid, _meta(), tmp_path/'c')).predict(f)
    assert (e.label, e.top_label, e.abstained, e.reason) == ('COVID-19', 'COVID-19', False, None)
    ok = Predictor(core.save_model_dir(covid, _meta(ood={'method': 'energy', 'threshold': e.ood_score + 0.5}), tmp_path/'ok'))
    assert not ok.predict(f).abstained
    # energy above the model's threshold -> abstain as out of distribution, keeping the top class and probabilities
    ood = Predictor(core.save_model_dir(covid, _meta(ood={'method': 'energy', 'threshold': e.ood_score - 0.5}), tmp_path/'ood'))
    r = ood.predict(f)
    assert (r.label, r.abstained, r.top_label) == (NOT_CERTAIN, True, 'COVID-19') and r.reason.startswith(ABSTAIN_OOD)
    assert r.probs == pytest.approx(e.probs, abs=1e-6)
    assert ood.predict(files[1]).ood_score != pytest.approx(r.ood_score), "logits still depend on the image"


def test_gradcam_and_overlay(untrained_dir, cxr_real):
    files, _ = _files(cxr_real, 1)
    pr = Predictor(untrained_dir)
    p = pr.predict(files[0], cam=True)
    assert p.cam.shape == (64, 64) and p.cam.min() >= 0 and p.cam.max() <= 1 and p.cam.std() > 0
    img = read_radiograph(files[0])
    ov = overlay(img, p.cam)
    assert ov.mode == 'RGB' and ov.size == img.size
    assert np.abs(np.asarray(ov, float) - np.asarray(img.convert('RGB'), float)).mean() > 5


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


def test_dicom_header_rules_out_other_body_parts(untrained_dir, dicom_file, tmp_path):
    "RG3 (a tibia, BodyPartExamined EXTREMITY) is refused from its header, one at a time and streamed; its pixels alone are not"
    from PIL import Image
    from cxr_covid_nbdev.data import read_radiograph
    from cxr_covid_nbdev.inference import Predictor, ABSTAIN_HEADER
    pr = Predictor(untrained_dir)
    rg1, rg3 = dicom_file('RG1_UNCI.dcm'), dicom_file('RG3_UNCI.dcm')
    p = pr.predict(rg3)
    assert p.abstained and p.label == 'Not Certain' and p.reason == f"{ABSTAIN_HEADER}: body part EXTREMITY"
    assert pr.predict(rg3.read_bytes(), name='upload.dcm').reason == p.reason
    streamed = {path: pred for path, pred, _ in pr.iter_predict([rg1, rg3], bs=2)}
    assert streamed[rg3].reason == p.reason
    assert streamed[rg1].reason is None or not streamed[rg1].reason.startswith(ABSTAIN_HEADER)
    png = tmp_path/'tibia.png'; read_radiograph(rg3).save(png)   # the same pixels without a header
    assert pr.predict(png).reason is None or not pr.predict(png).reason.startswith(ABSTAIN_HEADER)


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
