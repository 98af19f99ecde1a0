"""Build the compendium the way CI does (Jupyter Book, warnings are errors) and read it in Chromium.

Not a notebook check: the build executes every notebook, and the site is read in a browser."""
import json
from pathlib import Path

import pytest

from cxr_covid_nbdev import docs
from cxr_covid_nbdev.core import fmt_number

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[1]
ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking']


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The site, built once for this module with `-W` (a warning or a broken cross-reference fails the build), from the
    notebooks `make nbtest` ran where they are unchanged since"""
    return docs.build(tmp_path_factory.mktemp('docs'), strict=True, reuse=docs.repo_root()/'_build'/'nbtest').parent


@pytest.fixture(scope='module')
def page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium', args=ARGS)
        pg = b.new_page(viewport={'width': 1280, 'height': 900})
        yield pg
        b.close()


def _open(page, site, name):
    page.goto((site/f'{name}.html').as_uri())
    page.wait_for_load_state('load')


def _table(page, table_id):
    "The table's body rows as {row header: [cell texts]}"
    rows = page.locator(f'table#{table_id} tbody tr')
    out = {}
    for i in range(rows.count()):
        r = rows.nth(i)
        out[r.locator('th').first.inner_text().strip()] = [c.strip() for c in r.locator('td').all_inner_texts()]
    return out


def _check_images(page):
    imgs = page.locator('article img')
    widths = page.eval_on_selector_all('article img', 'els => els.map(e => [e.getAttribute("src").slice(0, 60), e.complete, e.naturalWidth])')
    bad = [w for w in widths if not (w[1] and w[2] > 0)]
    assert not bad, f"images that did not load: {bad}"
    return imgs.count()


def _expect_run_table(page, metrics):
    t = _table(page, 'results-table')
    assert list(t) == list(metrics['labels'])
    for lab, cells in t.items():
        pc = metrics['per_class'][lab]
        want = [fmt_number(pc.get(k)) for k in ('precision', 'recall', 'f1', 'accuracy', 'support')]
        assert cells[:5] == want, (lab, cells, want)
        assert cells[5] == fmt_number(metrics['auroc'][lab])
    s = _table(page, 'summary-table')
    assert s['accuracy'] == [fmt_number(metrics['accuracy'])] and s['macro F1'] == [fmt_number(metrics['macro_f1'])]
    assert s['validation images'] == [fmt_number(metrics['n'])]


@pytest.mark.parametrize('name', ['index', '13_results'])
def test_page_shows_the_run_json(site, page, artifacts, name):
    "The front page and the results chapter hold the numbers of the newest run's metrics.json, and their figures load"
    _open(page, site, name)
    run = docs.latest_run()
    if run is None:
        assert 'Not available yet' in page.inner_text('article')
        assert page.locator('table#results-table').count() == 0
    else:
        metrics = json.loads((run/'metrics.json').read_text())
        _expect_run_table(page, metrics)
        assert run.name in page.inner_text('article')
    if name == 'index': assert page.locator('article .cell_input').count() == 0, 'the front page reads as prose: no code'
    n = _check_images(page)
    if name == '13_results' and run is not None and json.loads((run/'metrics.json').read_text()).get('confusion_matrix'):
        assert n >= 1, 'the results chapter draws the confusion matrix'
    page.screenshot(path=str(artifacts/f'docs-{name}.png'), full_page=True)


def test_every_page_builds_and_links_resolve(site, page, artifacts, cxr_train):
    "Each chapter exists, its figures load, and no page shows an execution error"
    for nb in sorted((REPO/'nbs').glob('1[1-9]_*.ipynb')):
        _open(page, site, nb.stem)
        text = page.inner_text('article')
        assert 'Traceback' not in text, nb.stem
        _check_images(page)
    _open(page, site, '11_provenance')
    n = sum(1 for _ in open(cxr_train/'manifest.csv')) - 1
    assert _table(page, 'counts-split')['all'][-1] == str(n)
    assert page.locator('article img').count() >= 1, 'the provenance chapter draws the age/source confound'
    page.screenshot(path=str(artifacts/'docs-provenance.png'), full_page=True)


def test_external_page_shows_its_json(site, page, artifacts):
    "Each evaluation on the generalisation page: its per-class table, accuracy, macro F1 and duplicate count are its JSON's"
    found = sorted(f for d in docs.list_runs() for f in d.glob('*.json') if f.stem.lower().startswith(('external', 'evaluat')))
    _open(page, site, '14_external')
    text = page.inner_text('article')
    assert len(found) == page.locator('table[id^="evaluation-table-"]').count()
    for k, f in enumerate(found):
        ext = json.loads(f.read_text())
        t = _table(page, f'evaluation-table-{k}')
        assert list(t) == list(ext['labels'])
        for lab, cells in t.items():
            pc = ext['per_class'][lab]
            assert cells[:5] == [fmt_number(pc.get(c)) for c in ('precision', 'recall', 'f1', 'accuracy', 'support')], (f.name, lab, cells)
        assert f"Accuracy {fmt_number(ext['accuracy'])}, macro F1 {fmt_number(ext['macro_f1'])}, n = {ext['n']}." in text
        dup = ext.get('duplicates_with_training')
        if dup is not None: assert f"{dup['images']} of its {ext['n']} images are near-duplicates" in text
        if not docs.is_external(ext): assert 'not external' in text
    cv = docs.latest_crossval()
    if cv: assert page.locator('table#crossval-table').count() == 1
    page.screenshot(path=str(artifacts/'docs-external.png'), full_page=True)


def test_dashboard_page_and_footer(site, page):
    "The dashboard chapter holds a captioned picture of the dashboard; every page has the disclaimer and no download button"
    _open(page, site, '16_dashboard')
    fig = page.locator('article figure')
    assert fig.count() >= 1 and 'dashboard' in fig.first.locator('figcaption').inner_text().lower()
    assert fig.first.locator('img').evaluate('e => e.complete && e.naturalWidth > 600')
    for name in ('index', '16_dashboard', 'library/03_metrics'):
        _open(page, site, name)
        assert 'not a medical device' in page.inner_text('footer, .bd-footer-content, .footer-content, body')
        assert page.locator('.dropdown-download-buttons, .btn-download-source-button').count() == 0


def test_library_pages_render_show_doc(site, page):
    "A library page shows `show_doc`'s signature and docments, not the call, and its examples' outputs"
    _open(page, site, 'library/03_metrics')
    text = page.inner_text('article')
    assert 'def compute_metrics(' in text and 'show_doc(' not in text
    assert page.locator('article figure img').count() >= 1
