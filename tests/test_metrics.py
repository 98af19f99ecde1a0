"""`metrics.compute_metrics`: every number checked against scikit-learn, on predictions of a real trained tiny model.

Not in `nbs/03_metrics.ipynb`: the predictions come from a model trained with `train`, a later notebook."""
import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support,
                             roc_auc_score, roc_curve)

from cxr_covid_nbdev.core import LABELS, load_model_dir, model_input, softmax_t
from cxr_covid_nbdev.data import read_dataset, read_radiograph
from cxr_covid_nbdev.metrics import (compute_metrics, format_metrics, metrics_table, plot_confusion_matrix, plot_reliability, plot_roc)


def check_against_sklearn(m: dict, y_true, probs, labels=LABELS, n_boot=None, seed=42):
    "Assert that `m` (from `compute_metrics`) matches scikit-learn on `y_true`, `probs`"
    labels = list(labels)
    y, p = np.array([labels.index(v) for v in y_true]), np.asarray(probs, dtype=np.float64)
    pred = p.argmax(1)
    k = list(range(len(labels)))
    assert m['labels'] == labels and m['n'] == len(y)
    assert m['accuracy'] == pytest.approx(accuracy_score(y, pred))
    present = sorted(set(np.asarray(y).tolist()))  # macro F1 over the classes in the data
    assert m['macro_f1'] == pytest.approx(f1_score(y, pred, labels=present, average='macro', zero_division=0))
    wp, wr, wf, _ = precision_recall_fscore_support(y, pred, labels=k, average='weighted', zero_division=0)
    assert (m['weighted']['precision'], m['weighted']['recall'], m['weighted']['f1']) == pytest.approx((wp, wr, wf))
    assert m['confusion_matrix'] == confusion_matrix(y, pred, labels=k).tolist()
    for i, l in enumerate(labels):
        c = m['per_class'][l]
        pr, rc, f, s = precision_recall_fscore_support(y == i, pred == i, average='binary', zero_division=0)
        assert (c['precision'], c['recall'], c['f1']) == pytest.approx((pr, rc, f))
        assert c['support'] == int((y == i).sum())
        assert c['accuracy'] == pytest.approx(accuracy_score(y == i, pred == i))
        a = m['auroc'][l]
        if 0 < (y == i).sum() < len(y):
            assert a['value'] == pytest.approx(roc_auc_score(y == i, p[:, i]))
            if n_boot:  # the same seeded resamples, scored one by one by scikit-learn
                idx = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
                b = [roc_auc_score((y == i)[j], p[j, i]) for j in idx if 0 < (y == i)[j].sum() < len(y)]
                assert a['ci95'] == pytest.approx([np.percentile(b, 2.5), np.percentile(b, 97.5)])
        else: assert a == {'value': None, 'ci95': None}
    # COVID-19 sensitivity at 95% specificity: best point of scikit-learn's ROC with FPR <= 5%
    ci = labels.index('COVID-19')
    s = m['covid_sensitivity_at_95_specificity']
    if 0 < (y == ci).sum() < len(y):
        fpr, tpr, thr = roc_curve(y == ci, p[:, ci], drop_intermediate=False)
        assert s['sensitivity'] == pytest.approx(tpr[fpr <= 0.05].max())
        if s['threshold'] is not None:
            called = p[:, ci] >= s['threshold']
            assert called[y == ci].mean() == pytest.approx(s['sensitivity'])
            assert 1 - called[y != ci].mean() == pytest.approx(s['specificity'])
            assert s['specificity'] >= 0.95
    # ECE: scikit-learn's reliability curve (15 uniform bins) weighted by bin counts
    conf, correct = p.max(1), (pred == y).astype(int)
    frac_pos, mean_conf = calibration_curve(correct, conf, n_bins=15, strategy='uniform')
    edges = np.linspace(0, 1, 16)
    counts = np.array([((conf > lo) | (lo == 0)) & (conf <= hi) for lo, hi in zip(edges[:-1], edges[1:])]).sum(1)
    counts = counts[counts > 0]
    assert m['ece'] == pytest.approx(float((counts * np.abs(frac_pos - mean_conf)).sum() / counts.sum()))


@pytest.fixture(scope='module')
def predictions(tiny_model_dir, tiny_training_data, cxr_real):
    "Calibrated probabilities of the tiny model on 10 real images per class it was not trained on"
    model, meta = load_model_dir(tiny_model_dir)
    df = read_dataset(cxr_real)
    df = df[~df.path.isin(tiny_training_data.path)].groupby('label', sort=True).head(10)
    import torch
    x = torch.from_numpy(np.stack([model_input(read_radiograph(p), meta['size']) for p in df.path]))
    with torch.no_grad(): logits = model(x).numpy()
    return df.label.tolist(), softmax_t(logits, meta['temperature'])


def test_compute_metrics_matches_sklearn(predictions):
    y, p = predictions
    m = compute_metrics(y, p, n_boot=200, seed=7)
    check_against_sklearn(m, y, p, n_boot=200, seed=7)
    assert compute_metrics(y, p, n_boot=200, seed=7) == m  # seeded, so reproducible
    assert 0 <= m['ece'] <= 1


def test_missing_class_has_no_auroc(predictions):
    y, p = predictions
    keep = [i for i, v in enumerate(y) if v != 'Pneumonia']
    m = compute_metrics([y[i] for i in keep], p[keep], n_boot=50)
    assert m['auroc']['Pneumonia'] == {'value': None, 'ci95': None}
    assert m['per_class']['Pneumonia']['support'] == 0
    check_against_sklearn(m, [y[i] for i in keep], p[keep])


def test_table_and_figures(predictions, artifacts):
    y, p = predictions
    m = compute_metrics(y, p, n_boot=50)
    t = metrics_table(m)
    assert list(t.index) == list(LABELS)
    assert t.loc['Normal', 'support'] == y.count('Normal')
    text = format_metrics(m)
    assert 'Confusion matrix' in text and 'COVID-19 sensitivity at 95% specificity' in text
    for name, fig in [('confusion', plot_confusion_matrix(m)), ('roc', plot_roc(y, p)), ('reliability', plot_reliability(y, p))]:
        fig.savefig(artifacts/f'metrics_{name}.png', dpi=60)
        assert (artifacts/f'metrics_{name}.png').stat().st_size > 1000
