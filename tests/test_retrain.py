"""Scheduled retraining end to end, with real images: promotion, rejection of a label-flipped inbox, a run killed
with SIGKILL, two runs at once, a malformed inbox, rollback. One tiny production model (resnet18, 64 px) for all.

Not a notebook check: runs in their own kernels, SIGKILL, and two runs at once. One run goes through papermill in its
own kernel as cron starts it (`test_good_inbox_is_promoted_and_served`), and the killed and concurrent runs are real
`cxr-covid retrain` processes; the other decisions run the same notebook in this process (`run_retrain(kernel=False)`),
which saves a kernel start and the libraries' imports per run."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pandas as pd
import pytest

from cxr_covid_nbdev.core import LABELS, file_digest, read_meta, resolve_model_dir
from cxr_covid_nbdev.registry import Registry
from cxr_covid_nbdev.retrain import INBOX_COLUMNS, run_retrain

pytestmark = pytest.mark.slow
FLIP = {'COVID-19': 'Normal', 'Normal': 'COVID-19', 'Pneumonia': 'Not Certain', 'Not Certain': 'Pneumonia'}
CLI = [sys.executable, '-c', 'import sys; from cxr_covid_nbdev.cli import main; sys.exit(main())']


def snapshot(root: Path) -> dict:
    "sha256 of every file of the registry (the run lock aside), by relative path"
    return {str(p.relative_to(root)): file_digest(p, 'sha256') for p in sorted(root.rglob('*'))
            if p.is_file() and p.name != '.retrain.lock'}


@pytest.fixture(scope='module')
def corpus(cxr_train):
    m = pd.read_csv(cxr_train/'manifest.csv', keep_default_na=False, dtype=str)
    return m[m.patient_id != ''].sample(frac=1, random_state=0).assign(path=lambda d: [str(cxr_train/p) for p in d.path])


@pytest.fixture(scope='module')
def base_data(corpus, tmp_path_factory):
    "Reference data: 24 training and 12 validation images per class of cxr-train, by its patient split"
    rows = pd.concat([corpus[(corpus.label == l) & (corpus.split == s)].head(n)
                      for l in LABELS for s, n in (('train', 24), ('valid', 12))])
    f = tmp_path_factory.mktemp('base')/'manifest.csv'
    rows.to_csv(f, index=False)
    return f


def unseen(corpus, base_data, n):
    "`n` images per class of cxr-train patients that are not in the reference data"
    base = pd.read_csv(base_data, keep_default_na=False, dtype=str)
    rest = corpus[~corpus.patient_id.isin(base.patient_id)]
    return pd.concat([rest[rest.label == l].head(n) for l in LABELS]).reset_index(drop=True)


@pytest.fixture(scope='module')
def new_cases(corpus, base_data): return unseen(corpus, base_data, 10)


@pytest.fixture(scope='module')
def external(corpus, base_data, new_cases, tmp_path_factory):
    "External set: 3 images per class of other patients that have another image left (for an inbox row)"
    used = set(pd.read_csv(base_data, keep_default_na=False, dtype=str).patient_id) | set(new_cases.patient_id)
    rest = corpus[~corpus.patient_id.isin(used)]
    multi = rest[rest.patient_id.duplicated(keep=False)].drop_duplicates('patient_id')
    rows = pd.concat([multi[multi.label == l].head(3) for l in LABELS])
    f = tmp_path_factory.mktemp('external')/'manifest.csv'
    rows.to_csv(f, index=False)
    other = rest[rest.patient_id.isin(rows.patient_id) & ~rest.path.isin(rows.path)].head(1)
    return f, other


@pytest.fixture(scope='module')
def seed_model(base_data, tmp_path_factory):
    """The production model the runs start from: good enough (macro-F1 well above chance) that flipped labels hurt it.
    Under pytest-xdist the two halves of this module (`conftest.RETRAIN_A`) share it: the first to come trains it."""
    from filelock import FileLock
    from cxr_covid_nbdev.train import train_model
    root = tmp_path_factory.getbasetemp().parent if os.environ.get('PYTEST_XDIST_WORKER') else tmp_path_factory.mktemp('seed')
    out = root/'retrain-seed-model'
    with FileLock(str(root/'retrain-seed-model.lock')):
        if not out.is_dir():  # written atomically: a folder that exists is whole
            train_model(base_data, out, arch='resnet18', size=64, epochs=6, freeze_epochs=0, bs=16, pretrained=False,
                        seed=0, progress=False, cam_per_class=0)
    return out


@pytest.fixture
def registry(tmp_path, seed_model):
    reg = Registry(tmp_path/'registry')
    reg.promote(reg.add(seed_model), 'seed model of the tests')
    return reg


def make_inbox(folder: Path, cases: pd.DataFrame, flip: bool = False, extra: list = ()) -> Path:
    "Copy the cases' images into an inbox folder with a validated manifest (paths relative to the inbox)"
    (folder/'images').mkdir(parents=True)
    rows = []
    for r in cases.itertuples():
        dst = folder/'images'/f"{r.Index:03d}_{Path(r.path).name}"
        shutil.copyfile(r.path, dst)
        rows.append(dict(path=str(dst.relative_to(folder)), label=FLIP[r.label] if flip else r.label,
                         patient_id=r.patient_id, validated_by='dr test', validated_at='2024-06-01T09:00:00Z'))
    pd.DataFrame(rows + list(extra), columns=list(INBOX_COLUMNS)).to_csv(folder/'manifest.csv', index=False)
    return folder


def start_cli_run(inbox, registry, base_data, runs, *extra) -> subprocess.Popen:
    return subprocess.Popen(CLI + ['retrain', '--inbox', str(inbox), '--registry', str(registry.root), '--base-data',
                                   str(base_data), '--runs-dir', str(runs), '--bs', '16', *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(runs: Path, steps: set, proc: subprocess.Popen, timeout: float = 300) -> dict:
    "Poll the run's status.json until it reaches one of `steps`"
    t0 = time.time()
    while time.time() - t0 < timeout:
        for f in runs.glob('*/status.json'):
            try: st = json.loads(f.read_text())
            except (json.JSONDecodeError, FileNotFoundError): continue
            if st['step'] in steps: return st
        if proc.poll() is not None: pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail(f"run did not reach {steps} in {timeout} s")


def wait_gone(pid: int, timeout: float = 30) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try: os.kill(pid, 0)
        except ProcessLookupError: return True
        time.sleep(0.1)
    return False


def test_good_inbox_is_promoted_and_served(tmp_path, registry, base_data, new_cases, external, monkeypatch):
    external_data, ext_patient_case = external
    bad_rows = [dict(path=Path(new_cases.path[0]).name, label='Normal', patient_id='p', validated_by='', validated_at=''),
                dict(path='images/missing.png', label='Normal', patient_id='q', validated_by='dr', validated_at='2024-06-01'),
                dict(path='images/x.png', label='Tuberculosis', patient_id='r', validated_by='dr', validated_at='2024-06-01')]
    inbox = make_inbox(tmp_path/'inbox', pd.concat([new_cases, ext_patient_case], ignore_index=True), extra=bad_rows)
    before = registry.production()
    rep = run_retrain(inbox, registry.root, base_data, external_data, runs_dir=tmp_path/'runs', epochs=1, bs=16,
                      f1_tolerance=1.0, recall_tolerance=1.0)
    assert rep['status'] == 'promoted', rep.get('decision')
    v = rep['candidate_version']
    assert registry.production() == v != before and rep['production_after'] == v
    assert [e['action'] for e in registry.history()][-1] == 'promote'
    monkeypatch.setenv('CXR_COVID_REGISTRY', str(registry.root))
    assert resolve_model_dir() == registry.path(v)  # what `predict` and the dashboard's next session load
    assert read_meta(registry.path(v))['init_from'] == str(registry.path(before))
    promo = json.loads((registry.path(v)/'promotion.json').read_text())
    assert promo['gate'] == rep['gate'] and promo['metrics'] == rep['metrics']
    assert 'macro_f1' in json.loads((registry.path(v)/'metrics.json').read_text())  # the training layout, kept
    run_dir = Path(rep['out_dir'])
    assert (run_dir/'retrain.ipynb').is_file() and json.loads((run_dir/'run.json').read_text()) == rep
    ib = rep['inbox']  # every row once: accepted, quarantined by the audit, or rejected with its reason
    assert ib['rows'] == len(new_cases) + 1 + len(bad_rows) == ib['accepted'] + ib['quarantined'] + ib['rejected']
    assert ib['quarantined'] == len(rep['quarantined']) < len(new_cases) and ib['rejected'] >= len(bad_rows)
    reasons = ' | '.join(r['reason'] for r in rep['rejected'])
    assert 'not validated' in reasons and 'no such file' in reasons and 'Unknown label' in reasons
    ext_name = Path(ext_patient_case.path.iloc[0]).name
    assert 'belongs to the external validation set' in reasons or any(q['path'].endswith(ext_name) for q in rep['quarantined'])
    assert {(c['against'], c['set']) for c in rep['gate']['checks']} == {(a, s) for a in ('production', 'control') for s in ('valid', 'external')}
    assert set(rep['inbox_effect']) == {'valid', 'external'} and Path(rep['control']['path']).is_dir()
    assert rep['metrics']['candidate']['external']['n'] == len(pd.read_csv(external_data))
    assert sum(rep['data']['new']['train'].values()) > 0
    ref = pd.read_csv(base_data, keep_default_na=False, dtype=str)
    for who in ('candidate', 'production', 'control'):  # all on the same, fixed reference validation split
        assert rep['metrics'][who]['valid']['n'] == (ref.split == 'valid').sum()
    # the reference validation split did not move
    merged = pd.read_csv(run_dir/'training_manifest.csv', keep_default_na=False, dtype=str)
    assert merged[merged.origin == 'reference'].split.tolist() == ref.split.tolist()
    # the same inbox again: nothing new to learn from
    rep2 = run_retrain(inbox, registry.root, base_data, external_data, runs_dir=tmp_path/'runs', epochs=1, bs=16, f1_tolerance=1.0,
                       kernel=False)
    assert rep2['status'] == 'skipped' and registry.production() == v
    # and rollback restores the previous production model
    registry.rollback('test')
    assert registry.production() == before and resolve_model_dir() == registry.path(before)


def test_label_flipped_inbox_is_rejected(tmp_path, registry, base_data, corpus):
    """40 new cases, COVID-19 and Normal swapped: the production model disputes them far more often than trusted labels, so
    the audit holds the whole inbox back (every row quarantined, nothing trained) and the registry does not change by a byte"""
    cases = unseen(corpus, base_data, 20)
    cases = cases[cases.label.isin(['COVID-19', 'Normal'])].reset_index(drop=True)
    inbox = make_inbox(tmp_path/'inbox', cases, flip=True)
    before = snapshot(registry.root)
    rep = run_retrain(inbox, registry.root, base_data, runs_dir=tmp_path/'runs', epochs=1, bs=16, kernel=False)
    assert snapshot(registry.root) == before  # production unchanged, byte for byte
    assert rep['status'] in ('rejected', 'skipped') and not rep['decision']['promote'], rep['decision']
    q = rep['quarantined']
    assert rep['inbox']['quarantined'] == len(q) == len(cases) and rep['audit']['hold_inbox']  # the whole inbox is held back
    assert rep['status'] == 'skipped' and 'whole inbox is held back' in rep['decision']['reason']
    assert rep['audit']['inbox_disputed'] > rep['audit']['reference_disputed'] * rep['audit']['inbox_rows'] / rep['audit']['reference_rows']
    truth = {Path(p).name: l for p, l in zip(cases.path, cases.label)}
    for r in q:  # each with the model's opinion, by the inbox-relative path
        assert r['path'].startswith('images/') and r['label'] == FLIP[truth[Path(r['path']).name[4:]]]
        assert r['model_label'] in LABELS and r['probability_of_label'] <= r['model_probability']
    # the next night, same inbox: held back again, still without training anything
    rep2 = run_retrain(inbox, registry.root, base_data, runs_dir=tmp_path/'runs', epochs=1, bs=16, kernel=False)
    assert rep2['status'] == 'skipped' and rep2['audit']['hold_inbox'] and 'candidate' not in rep2
    assert snapshot(registry.root) == before


def test_true_labels_of_the_flipped_inbox_pass_the_audit(tmp_path, registry, base_data, corpus):
    """The same 40 cases with their true labels: the audit does not hold the inbox back, and it can be promoted (the gate's
    tolerances are the operator's: one epoch of fine-tuning the tiny production model costs it some validation films)"""
    cases = unseen(corpus, base_data, 20)
    cases = cases[cases.label.isin(['COVID-19', 'Normal'])].reset_index(drop=True)
    rep = run_retrain(make_inbox(tmp_path/'inbox', cases), registry.root, base_data, runs_dir=tmp_path/'runs', epochs=1, bs=16,
                      f1_tolerance=1.0, recall_tolerance=1.0, kernel=False)
    assert (Path(rep['out_dir'])/'retrain.ipynb').is_file()  # the executed notebook, kept as papermill keeps it
    assert not rep['audit']['hold_inbox'] and rep['inbox']['accepted'] >= len(cases) // 2, rep['audit']
    assert rep['status'] == 'promoted' and registry.production() == rep['candidate_version'], rep['decision']


def test_sigkill_during_training_leaves_registry_usable(tmp_path, registry, base_data, new_cases):
    inbox = make_inbox(tmp_path/'inbox', new_cases)
    before, prod = snapshot(registry.root), registry.production()
    p = start_cli_run(inbox, registry, base_data, tmp_path/'runs', '--epochs', '3', '--f1-tolerance', '1')
    st = wait_for_step(tmp_path/'runs', {'training'}, p)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert wait_gone(st['pid']), "the papermill kernel outlived its killed parent"
    assert snapshot(registry.root) == before and registry.production() == prod
    assert not [q for q in registry.root.iterdir() if q.name.startswith('.v')]
    assert resolve_model_dir(registry=registry.root) == registry.path(prod)
    assert json.loads((registry.root/'.retrain.lock').read_text())['pid'] == p.pid  # a stale lock is left
    rep = run_retrain(inbox, registry.root, base_data, runs_dir=tmp_path/'runs2', epochs=0, bs=16, dry_run=True, kernel=False)
    assert rep['status'] == 'dry-run' and rep['stale_lock_taken_over']['pid'] == p.pid
    assert snapshot(registry.root) == before


def test_second_run_is_refused(tmp_path, registry, base_data, new_cases):
    inbox = make_inbox(tmp_path/'inbox', new_cases)
    p = start_cli_run(inbox, registry, base_data, tmp_path/'runs', '--dry-run')
    try:
        wait_for_step(tmp_path/'runs', {'start', 'data', 'training'}, p)
        out = subprocess.run(CLI + ['retrain', '--inbox', str(inbox), '--registry', str(registry.root), '--base-data',
                                    str(base_data), '--runs-dir', str(tmp_path/'runs2')], capture_output=True, text=True)
        assert out.returncode == 2, out
        assert f'another retraining run (pid {p.pid}, started ' in out.stderr and 'holds the lock' in out.stderr
        assert not (tmp_path/'runs2').exists()
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait()


@pytest.mark.parametrize('content', [b'path,label\nimages/a.png,Normal\n', bytes(range(256)) * 8, b''],
                         ids=['missing-columns', 'binary', 'empty'])
def test_malformed_inbox_changes_nothing(tmp_path, registry, base_data, content, capsys):
    inbox = tmp_path/'inbox'; inbox.mkdir()
    (inbox/'manifest.csv').write_bytes(content)
    before = snapshot(registry.root)
    from cxr_covid_nbdev.cli import main
    rc = main(['retrain', '--inbox', str(inbox), '--registry', str(registry.root), '--base-data', str(base_data),
               '--runs-dir', str(tmp_path/'runs')])
    err = capsys.readouterr().err
    assert rc == 2 and 'manifest.csv' in err and ('lacks the column' in err or 'not a readable CSV' in err), err
    assert snapshot(registry.root) == before and not (tmp_path/'runs').exists()
    assert not (registry.root/'.retrain.lock').exists()


def test_failed_run_leaves_registry_unchanged(tmp_path, registry, base_data, new_cases, capsys):
    "A run that fails inside the notebook (here: reference data without a validation split) exits 1, changes nothing"
    ref = pd.read_csv(base_data, keep_default_na=False, dtype=str)
    no_valid = tmp_path/'no_valid.csv'; ref[ref.split == 'train'].to_csv(no_valid, index=False)
    inbox = make_inbox(tmp_path/'inbox', new_cases.head(4))
    before = snapshot(registry.root)
    from cxr_covid_nbdev.cli import main
    rc = main(['retrain', '--inbox', str(inbox), '--registry', str(registry.root), '--base-data', str(no_valid),
               '--runs-dir', str(tmp_path/'runs'), '--no-kernel'])
    err = capsys.readouterr().err
    assert rc == 1 and 'failed' in err and 'no validation split' in err, err
    rep = json.loads(next((tmp_path/'runs').glob('*/run.json')).read_text())
    assert rep['status'] == 'failed' and 'no validation split' in rep['error']
    assert snapshot(registry.root) == before
    assert (registry.root/'.retrain.lock').read_text() == ''  # released
