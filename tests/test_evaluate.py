"""End to end: `cxr-covid prepare` -> `cxr-covid train` -> `cxr-covid evaluate --json`, checked against scikit-learn.

Not a notebook check: the three commands run as processes, one after another, on a model trained for the test."""
import json, subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_in_process
import torch

from cxr_covid_nbdev.core import LABELS, fit_longest_side, load_model_dir, model_input, read_meta, softmax_t
from cxr_covid_nbdev.data import read_dataset, read_radiograph
from cxr_covid_nbdev.external import evaluate_model, sample_per_class

from test_metrics import check_against_sklearn

pytestmark = pytest.mark.slow


def cli(*args):
    return subprocess.run(['cxr-covid', *map(str, args)], capture_output=True, text=True, timeout=900)


def subset_csv(df, path):
    "A manifest CSV (absolute paths) of some real images"
    df[['path', 'label', 'patient_id']].to_csv(path, index=False)
    return path


@pytest.fixture(scope='module')
def pipeline(cxr_real, tmp_path_factory):
    "prepare 12 real images per class at 96 px, train a tiny model on them, and an evaluation set they do not contain"
    tmp = tmp_path_factory.mktemp('e2e')
    df = read_dataset(cxr_real)
    train = df.groupby('label', sort=True).head(12)
    rest = df[~df.path.isin(train.path)]
    r = cli('prepare', subset_csv(train, tmp/'train.csv'), '--out', tmp/'prep', '--size', 96, '--workers', 1)
    assert r.returncode == 0, r.stderr
    r = cli('train', tmp/'prep', '--out', tmp/'model', '--no-pretrained', '--arch', 'resnet18', '--size', 64,
            '--epochs', 1, '--freeze-epochs', 0, '--bs', 16, '--cam-per-class', 0, '--quiet')
    assert r.returncode == 0, r.stderr
    assert 'validation accuracy' in r.stdout
    return tmp, subset_csv(rest, tmp/'external.csv')


def test_end_to_end(pipeline):
    tmp, external = pipeline
    model = tmp/'model'
    meta = read_meta(model)
    assert meta['prepare_size'] == 96 and meta['size'] == 64
    r = cli('evaluate', external, '--model', model, '--per-class', 5, '--seed', 3, '--train-manifest', tmp/'prep',
            '--json', tmp/'report.json')
    assert r.returncode == 0, r.stderr
    for text in ('precision', 'recall', 'AUROC', 'Confusion matrix', 'Near-duplicates of the training data', *LABELS):
        assert text in r.stdout, text
    rep = json.loads((tmp/'report.json').read_text())
    for k in ('labels', 'n', 'accuracy', 'macro_f1', 'weighted', 'per_class', 'confusion_matrix', 'auroc',
              'covid_sensitivity_at_95_specificity', 'ece', 'duplicates_with_training', 'model', 'data', 'predictions'):
        assert k in rep, k
    assert rep['n'] == 20 and rep['data']['counts'] == {l: 5 for l in LABELS}
    assert rep['model']['sha256'] == meta['sha256'] and rep['model']['arch'] == 'resnet18'
    # the sample is the seeded one
    ext = read_dataset(external)
    root = Path(ext.attrs['root'])  # paths in reports are relative to the data root
    assert not any(Path(p['path']).is_absolute() for p in rep['predictions'])
    assert sorted(str((root/p['path']).resolve()) for p in rep['predictions']) == sorted(sample_per_class(ext, 5, seed=3).path)
    # every number is scikit-learn's on the reported predictions
    y = [p['label'] for p in rep['predictions']]
    probs = np.array([p['probs'] for p in rep['predictions']])
    check_against_sklearn(rep, y, probs, n_boot=1000, seed=3)
    # and the predictions are the model's: read, shrink to prepare_size, squish, temperature-scaled softmax
    net, m = load_model_dir(model)
    x = torch.from_numpy(np.stack([model_input(fit_longest_side(read_radiograph(root/p['path']), 96), 64) for p in rep['predictions']]))
    with torch.no_grad(): ref = softmax_t(net(x).numpy(), m['temperature'])
    assert np.allclose(probs, ref, atol=1e-4)
    # the evaluation images are not the training images
    dup = rep['duplicates_with_training']
    train_paths = set(read_dataset(tmp/'prep').path)
    assert all(str(tmp/'prep'/d['train_image']) in train_paths and d['image'] in set(p['path'] for p in rep['predictions']) for d in dup['pairs'])
    assert dup['train_manifest'] == 'prep'
    assert dup['count'] == len(dup['pairs'])
    assert set(dup['images_by_split']) <= {'train', 'valid'} and sum(dup['images_by_split'].values()) >= dup['images']


def test_evaluating_on_training_images_finds_them(pipeline):
    "Every training image evaluated against its own prepared copy is reported as a near-duplicate"
    tmp, _ = pipeline
    rep = evaluate_model(tmp/'model', tmp/'train.csv', per_class=2, seed=0, train_manifest=tmp/'prep', n_boot=50)
    dup = rep['duplicates_with_training']
    assert dup['images'] == rep['n'] == 8
    prep = read_dataset(tmp/'prep')
    split_of = dict(zip(prep.path, prep.split))
    assert all(d['split'] == split_of[str(tmp/'prep'/d['train_image'])] for d in dup['pairs'])


def test_unreadable_images_are_reported_not_scored(pipeline, tmp_path):
    tmp, external = pipeline
    df = read_dataset(external).groupby('label', sort=True).head(2)
    bad = tmp_path/'broken.jpg'
    bad.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    df = pd.concat([df, pd.DataFrame([{'path': str(bad), 'label': 'Normal', 'patient_id': ''}])], ignore_index=True)
    rep = evaluate_model(tmp/'model', subset_csv(df, tmp_path/'m.csv'), n_boot=20)
    assert rep['n'] == 8 and [u['path'] for u in rep['data']['unreadable']] == ['broken.jpg']


def test_evaluate_refusals(pipeline, tmp_path):
    tmp, external = pipeline
    r = cli_in_process('evaluate', tmp_path/'nope', '--model', tmp/'model')
    assert r.returncode == 2 and 'does not exist' in r.stderr
    r = cli_in_process('evaluate', external, '--model', tmp_path)
    assert r.returncode == 2 and 'not a model folder' in r.stderr
    r = cli_in_process('evaluate', external, '--model', tmp/'model', '--per-class', 0, '--json', tmp_path/'r.json')
    assert r.returncode == 2 and 'per_class' in r.stderr and not (tmp_path/'r.json').exists()


def test_evaluate_group_by(pipeline):
    "`--group-by site` and any manifest column: per-group recall with Wilson intervals, in the JSON and the printed table"
    tmp, external = pipeline
    r = cli('evaluate', external, '--model', tmp/'model', '--per-class', 4, '--group-by', 'site', '--json', tmp/'sites.json')
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp/'sites.json').read_text())
    g = rep['groups']['results']
    assert rep['groups']['column'] == 'site' and set(g) <= {'guangzhou', 'literature', 'ct', 'mri', 'photos'}
    assert sum(v['n'] for v in g.values()) == rep['n'] and 'By site:' in r.stdout
    for name, v in g.items():
        assert name in r.stdout
        for l, rc in v['recall'].items():
            assert rc['ci95'][0] <= rc['value'] <= rc['ci95'][1] and rc['n'] > 0
    # the recalls follow from the predictions
    preds = pd.DataFrame(rep['predictions'])
    preds['pred'] = [LABELS[int(np.argmax(p))] for p in preds.probs]
    lit = preds[preds.path.str.contains('cohen_|cxnet_') & (preds.label == 'COVID-19')]
    assert g['literature']['recall']['COVID-19']['k'] == int((lit.pred == 'COVID-19').sum())
    r = cli('evaluate', external, '--model', tmp/'model', '--per-class', 2, '--group-by', 'source_repo')
    assert r.returncode == 2 and "cannot group by 'source_repo'" in r.stderr
