"""Leave-one-site-out from the command line and as a papermill run, on real images at a tiny size.

What cannot run inside `nbs/06a_crossval.ipynb`: the `cxr-covid crossval` process and the papermill
notebook that keeps an executed copy of the run."""
import json, os, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_in_process

from cxr_covid_nbdev.data import read_dataset, with_sites
from cxr_covid_nbdev.crossval import loso_split, held_out_groups

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    return subprocess.run(['cxr-covid', *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope='module')
def report(cxr_real, tmp_path_factory):
    out = tmp_path_factory.mktemp('cv')/'cv.json'
    r = cli('crossval', cxr_real, '--recipe', 'robust', '--arch', 'resnet18', '--size', 32,
            '--epochs', 1, '--freeze-epochs', 0, '--bs', 8, '--per-class', 6, '--no-pretrained', '--seed', 1, '--json', out)
    assert r.returncode == 0, r.stderr
    assert 'mean unseen-site recall' in r.stdout and 'Leave one site out: guangzhou, literature' in r.stdout
    return json.loads(out.read_text())


def test_held_out_sites_are_disjoint_from_training(report, cxr_real):
    df = with_sites(read_dataset(cxr_real))
    assert report['groups'] == held_out_groups(df) == ['guangzhou', 'literature']
    assert [(f['group'], f['recipe']) for f in report['folds']] == [(g, 'robust') for g in report['groups']]
    for f in report['folds']:
        tr, te = loso_split(df, 'site', f['group'])
        assert f['group'] not in f['train_groups'] and set(f['train_groups']) == set(tr.site)
        assert set(tr.path).isdisjoint(te.path)
        held = {os.path.relpath(p, cxr_real.resolve()) for p in te.path}
        assert {p['path'] for p in f['predictions']} == held and f['n_test'] == len(held)
        assert f['n_train'] <= 6 * 4


def test_summary_follows_from_the_folds(report):
    for name, s in report['summary'].items():
        folds = [f for f in report['folds'] if f['recipe'] == name]
        normal = [f['unseen']['recall']['Normal'] for f in folds if 'Normal' in f['unseen']['recall']]
        assert s['recall']['Normal']['pooled']['k'] == sum(r['k'] for r in normal)
        means = [s['recall'][l]['site_mean'] for l in ('COVID-19', 'Normal', 'Pneumonia') if s['recall'][l]['site_mean'] is not None]
        assert s['mean_unseen_recall'] == pytest.approx(sum(means) / len(means))
        called = sum(p['label'] == 'Normal' and max(range(4), key=lambda i: p['probs'][i]) == 0 for f in folds for p in f['predictions'])
        assert s['covid_fpr']['Normal']['k'] == called


def test_refusals(cxr_real, tmp_path):
    r = cli_in_process('crossval', cxr_real, '--hold-out', 'hospital', '--no-pretrained')
    assert r.returncode == 2 and "cannot hold out 'hospital'" in r.stderr and 'Traceback' not in r.stderr
    r = cli_in_process('crossval', cxr_real, '--groups', 'mars', '--no-pretrained', '--epochs', 1)
    assert r.returncode == 2 and "no row has site == 'mars'" in r.stderr


def test_papermill_run(cxr_real, tmp_path):
    "The papermill notebook is a thin shell over `crossval`: its run folder holds crossval.json and run.json, without machine paths"
    from cxr_covid_nbdev import docs
    run = tmp_path/'runs'/'20990101T000000Z'
    run.mkdir(parents=True)
    r = subprocess.run([sys.executable, '-m', 'papermill', str(REPO/'papermill_runs'/'crossval.ipynb'), str(run/'crossval.ipynb'),
                        '-p', 'data', str(cxr_real), '-p', 'out_dir', str(run), '-p', 'figures_dir', str(tmp_path/'figs'),
                        '-y', 'recipes: [paper]\ngroups: [guangzhou]', '-p', 'per_class', '4'],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep, meta = json.loads((run/'crossval.json').read_text()), json.loads((run/'run.json').read_text())
    assert meta['kind'] == 'crossval' and not Path(meta['parameters']['data']).is_absolute()
    assert [f['group'] for f in rep['folds']] == ['guangzhou'] and (tmp_path/'figs'/'crossval_recall.png').is_file()
    cv = docs.latest_crossval(tmp_path/'runs')
    assert cv['name'] == run.name and 'mean recall over COVID-19, Normal and Pneumonia' in docs.unseen_results(cv).data
