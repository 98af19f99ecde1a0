"""The model registry through the `cxr-covid` entry point and in other processes (tiny real models, no training).

What `nbs/07_registry.ipynb` cannot check beside the code: `cli.main` (a later notebook), the installed console
script, two processes adding at once, and `cxr-covid predict` in its own process on a broken production pointer.
The registry's own behaviour (add, promote, rollback, seeding, damaged versions, doctor) is checked in the notebook."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
from conftest import cli_in_process
import torch

from cxr_covid_nbdev.core import (LABELS, IMAGENET_MEAN, IMAGENET_STD, create_model, save_model_dir, read_meta,
                                  resolve_model_dir, file_digest)
from cxr_covid_nbdev.registry import Registry


def tiny_model(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    meta = {'arch': 'resnet18', 'labels': list(LABELS), 'size': 32, 'prepare_size': None, 'mean': IMAGENET_MEAN,
            'std': IMAGENET_STD, 'imagenet_pretrained': False, 'weights_source': 'none', 'temperature': 1.0, 'ood': None}
    return save_model_dir(create_model('resnet18', len(LABELS)), meta, out, metrics={'macro_f1': seed / 10})


def snapshot(root: Path) -> dict:
    "sha256 of every file under `root`, by relative path"
    return {str(p.relative_to(root)): file_digest(p, 'sha256') for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    "Three real (untrained) resnet18 model folders; tests only read them"
    d = tmp_path_factory.mktemp('models')
    return [tiny_model(d/f'm{i}', i) for i in range(3)]


def cli(*args, env=None):
    "`cxr-covid ARGS` in this process (the console script is `cli.main`); one test runs the real script"
    return cli_in_process(*args, env=env)


def test_cli(tmp_path, models):
    r = tmp_path/'registry'
    out = cli('registry', 'add', models[0], '--promote', '--registry', r)
    assert out.returncode == 0, out.stderr
    v0 = out.stdout.strip()
    v1 = cli('registry', 'add', models[1], '--registry', r).stdout.strip()
    listing = cli('registry', 'list', '--registry', r)
    assert listing.returncode == 0 and v0 in listing.stdout and v1 in listing.stdout
    assert [l.split()[0] for l in listing.stdout.splitlines()[1:]] == [v0, v1]
    assert cli('registry', 'promote', v1, '--reason', 'better', '--registry', r).returncode == 0
    shown = json.loads(cli('registry', 'show', v1, '--registry', r).stdout)
    assert shown['production'] and shown['history'][-1]['reason'] == 'better'
    assert cli('registry', 'rollback', '--registry', r).returncode == 0
    assert Registry(r).production() == v0
    bad = cli('registry', 'promote', 'nope', '--registry', r)
    assert bad.returncode == 2 and 'No version' in bad.stderr and 'Traceback' not in bad.stderr
    env_out = cli('registry', 'list', env={'CXR_COVID_REGISTRY': str(r)})
    assert v0 in env_out.stdout


def test_console_script(tmp_path, models):
    "The installed `cxr-covid` script: one line on error, exit status 2, no traceback"
    r = tmp_path/'registry'
    Registry(r).add(models[0])
    run = lambda *a: subprocess.run(['cxr-covid', 'registry', *map(str, a), '--registry', r], capture_output=True, text=True)
    out = run('rollback')
    assert out.returncode == 2 and 'no production model' in out.stderr and 'Traceback' not in out.stderr


def test_concurrent_adds_get_distinct_versions(tmp_path, models):
    "Two processes adding at once: both versions land, with distinct numbers"
    r = tmp_path/'registry'
    code = 'import sys; from cxr_covid_nbdev.registry import Registry; print(Registry(sys.argv[1]).add(sys.argv[2]))'
    ps = [subprocess.Popen([sys.executable, '-c', code, str(r), str(m)], stdout=subprocess.PIPE, text=True) for m in models]
    vs = [p.communicate()[0].strip() for p in ps]
    assert all(p.returncode == 0 for p in ps)
    assert sorted(vs) == Registry(r).versions()
    assert sorted(v[:5] for v in vs) == ['v0001', 'v0002', 'v0003']


def test_add_refuses_a_model_that_cannot_load(tmp_path, models):
    "Weights that are not safetensors, with a matching sha256 in meta.json, are refused by `add`; the registry is unchanged"
    import shutil
    bad = tmp_path/'bad'; shutil.copytree(models[0], bad)
    (bad/'model.safetensors').write_bytes(b'not a safetensors file at all')
    meta = read_meta(bad); meta['sha256'] = file_digest(bad/'model.safetensors', 'sha256')
    (bad/'meta.json').write_text(json.dumps(meta))
    reg = Registry(tmp_path/'reg'); v = reg.add(models[0]); reg.promote(v, 'first')
    before = snapshot(reg.root)
    with pytest.raises(ValueError, match='cannot be used as a model'): reg.add(bad)
    r = cli('registry', 'add', bad, '--promote', '--registry', reg.root)
    assert r.returncode == 2 and 'cannot be used as a model' in r.stderr
    assert snapshot(reg.root) == before


@pytest.mark.parametrize('damage', ['outside', 'no-meta', 'garbage'])
def test_broken_production_is_an_error_that_names_the_fix(tmp_path, models, damage, monkeypatch):
    "A production pointer outside the registry, a production version without meta.json, or an unreadable pointer: no silent fallback"
    reg = Registry(tmp_path/'reg')
    v1, v2 = reg.add(models[0]), reg.add(models[1])
    reg.promote(v1, 'one'); reg.promote(v2, 'two')
    if damage == 'outside':
        (tmp_path/'x').mkdir(); shutil_copy = __import__('shutil').copytree(models[2], tmp_path/'x'/'m')
        reg.pointer.write_text(json.dumps({'version': '../x/m'}))
    elif damage == 'no-meta':
        (reg.root/v2/'meta.json').chmod(0o644); (reg.root/v2/'meta.json').unlink()
    else: reg.pointer.write_text('{not json')
    monkeypatch.setenv('CXR_COVID_REGISTRY', str(reg.root))
    with pytest.raises(Exception, match='registry rollback'): resolve_model_dir()
    r = subprocess.run(['cxr-covid', 'predict', str(models[0]/'meta.json')], capture_output=True, text=True,
                       env={**os.environ, 'CXR_COVID_REGISTRY': str(reg.root)}, timeout=300)
    assert r.returncode == 2 and 'registry rollback' in r.stderr and 'Traceback' not in r.stderr
    if damage == 'no-meta':
        reg.rollback('v2 lost its meta.json')
        assert resolve_model_dir() == reg.root/v1


def test_doctor_cli(tmp_path, models):
    reg = Registry(tmp_path/'reg'); reg.add(models[0])
    (reg.root/'.v0009-x.partial').mkdir()
    r = cli('registry', 'doctor', '--registry', reg.root)
    assert r.returncode == 0 and 'partial folder' in r.stdout and '--fix' in r.stdout
    r = cli('registry', 'doctor', '--registry', reg.root, '--fix')
    assert r.returncode == 0 and 'fixed' in r.stdout and not list(reg.root.glob('.*.partial'))
