"""The clinician dashboard in Debian's Chromium: `cxr-covid dashboard` served by Voila, driven with Playwright.

Not a notebook check: it runs the Voila server and the prediction service as processes and drives Chromium."""
import os, re, signal, socket, subprocess, time
from pathlib import Path

import pytest

from cxr_covid_nbdev.core import LABELS, NOT_CERTAIN, read_meta
from cxr_covid_nbdev.dashboard import _free_port

pytestmark = pytest.mark.browser
CHROMIUM = '/usr/bin/chromium'
ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking']


def _wait_port(port, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None: raise RuntimeError(f"cxr-covid dashboard exited with status {proc.returncode}")
        try: socket.create_connection(('127.0.0.1', port), timeout=1).close(); return
        except OSError: time.sleep(1)
    raise TimeoutError(f"the dashboard did not open port {port} in {timeout}s")


@pytest.fixture(scope='module')
def dashboard(tiny_model_dir, tmp_path_factory):
    "`cxr-covid dashboard --model <tiny model>` on a free port; yields (url, log file); always stopped"
    if not Path(CHROMIUM).is_file(): pytest.skip(f"{CHROMIUM} is not installed (make browser)")
    port, tmp = _free_port(), tmp_path_factory.mktemp('dashboard')
    log = tmp/'server.log'
    env = {**os.environ, 'CXR_COVID_CACHE': str(tmp/'cache')}
    with open(log, 'wb') as out:
        proc = subprocess.Popen(['cxr-covid', 'dashboard', '--model', str(tiny_model_dir), '--port', str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
    try:
        _wait_port(port, proc)
        yield f'http://127.0.0.1:{port}/', log, tmp
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(20)


def _upload(page, files, n):
    "Choose `files` in the upload button and wait for the dashboard's `n`-th answer"
    with page.expect_file_chooser() as fc: page.click('.cxr-upload')
    fc.value.set_files([str(f) for f in files])
    page.wait_for_selector(f'.cxr-status [data-upload="{n}"]', timeout=180_000)
    return page.locator('.cxr-results > *')


def _check_result(card, name):
    "A result card: file name, a verdict or an abstention with its reason, four bars summing to 100%, image and Grad-CAM"
    assert card.locator('.cxr-filename').inner_text() == name
    verdict = card.locator('.cxr-verdict').inner_text()
    first = verdict.split(':')[0].split(' (')[0].strip()
    assert first in LABELS, verdict
    abstained = 'cxr-abstained' in card.locator('.cxr-verdict').get_attribute('class')
    assert abstained == (first == NOT_CERTAIN)
    if abstained: assert 'abstains' in verdict and any(r in verdict for r in ('usable frontal chest radiograph', 'unlike the training images',
                                                                            'no plausible lung fields', 'unusable image'))
    bars = card.locator('.cxr-bar')
    assert bars.count() == len(LABELS)
    assert [bars.nth(i).get_attribute('data-label') for i in range(len(LABELS))] == list(LABELS)
    values = [float(bars.nth(i).locator('.cxr-bar-value').inner_text().rstrip('%')) for i in range(len(LABELS))]
    assert abs(sum(values) - 100) < 0.5, values
    top = card.locator('.cxr-bar.cxr-top').get_attribute('data-label')
    assert values[list(LABELS).index(top)] == max(values)
    if not abstained: assert first == top
    for cls in ('cxr-image', 'cxr-cam'):
        img = card.locator(f'.{cls} img')
        assert img.count() == 1 and img.evaluate('e => e.complete && e.naturalWidth > 0')
    return first, abstained


def _fit_viewport(page):
    "Make the window as tall as the dashboard, scrolled to the top, so that a screenshot shows all of it"
    page.evaluate("for (const e of [document.scrollingElement, document.querySelector('#rendered_cells')]) if (e) e.scrollTop = 0")
    h = page.evaluate("document.querySelector('.cxr-app').getBoundingClientRect().bottom")
    page.set_viewport_size({'width': 1280, 'height': int(h) + 120})


def test_dashboard_uploads(dashboard, tiny_model_dir, cxr_real, dicom_file, artifacts, tmp_path):
    from playwright.sync_api import sync_playwright
    url, log, server_dir = dashboard
    cxr = sorted((cxr_real/'COVID-19').glob('*.jpg'))[0]
    corrupt = tmp_path/'corrupt.png'
    corrupt.write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(64))
    meta = read_meta(tiny_model_dir)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 900})
            page.goto(url, timeout=180_000)
            page.wait_for_selector('.cxr-upload', timeout=240_000)
            # what every visitor sees: the research-use notice, the model's version and its card
            assert 'not a diagnosis' in page.locator('.cxr-notice').inner_text()
            assert page.locator('.cxr-model-version .cxr-version').inner_text() == (meta.get('version') or meta['sha256'][:12])
            page.click('.cxr-model-card .jupyter-widget-Collapse-header')
            if (tiny_model_dir/'model_card.md').is_file():
                first_line = next(l for l in (tiny_model_dir/'model_card.md').read_text().splitlines() if l.strip()).lstrip('# ').strip()
                page.wait_for_function('t => document.querySelector(".cxr-model-card").innerText.includes(t)', arg=first_line[:40], timeout=30_000)
            page.click('.cxr-model-card .jupyter-widget-Collapse-header')  # fold it again

            # 1. a real chest radiograph
            cards = _upload(page, [cxr], 1)
            assert cards.count() == 1
            _check_result(cards.nth(0), cxr.name)

            # 2. two DICOM files at once: a chest CR and a tibia (RG3, whose header says EXTREMITY): the tibia is refused
            rg1, rg3 = dicom_file('RG1_UNCI.dcm'), dicom_file('RG3_UNCI.dcm')
            cards = _upload(page, [rg1, rg3], 2)
            assert cards.count() == 2
            _check_result(cards.nth(0), 'RG1_UNCI.dcm')
            assert _check_result(cards.nth(1), 'RG3_UNCI.dcm') == (NOT_CERTAIN, True)
            assert 'body part EXTREMITY' in cards.nth(1).locator('.cxr-verdict').inner_text()
            _fit_viewport(page)
            page.screenshot(path=str(artifacts/'dashboard.png'), full_page=True)
            page.set_viewport_size({'width': 1280, 'height': 900})

            # 3. a corrupt file: a plain message, no result, no traceback
            cards = _upload(page, [corrupt], 3)
            assert cards.count() == 1 and page.locator('.cxr-result').count() == 0
            msg = page.locator('.cxr-error').inner_text()
            assert 'Could not read this file' in msg and 'corrupt.png' in msg
            assert 'could not be used' in page.locator('.cxr-status').inner_text()
            assert 'Traceback' not in page.inner_text('body')
            _fit_viewport(page)
            page.screenshot(path=str(artifacts/'dashboard-error.png'), full_page=True)

            # 4. the next upload works
            cards = _upload(page, [cxr], 4)
            assert cards.count() == 1 and page.locator('.cxr-error').count() == 0
            _check_result(cards.nth(0), cxr.name)

            # 5. blank and tiny images: Not Certain, with the reason
            from PIL import Image
            blanks = [tmp_path/'black.png', tmp_path/'white.png', tmp_path/'dot.png']
            Image.new('L', (2000, 2400), 0).save(blanks[0]); Image.new('L', (512, 512), 255).save(blanks[1])
            Image.new('L', (1, 1), 128).save(blanks[2])
            cards = _upload(page, blanks, 5)
            assert cards.count() == 3
            for k, (f, why) in enumerate(zip(blanks, ('nearly uniform', 'nearly uniform', 'too small'))):
                assert _check_result(cards.nth(k), f.name) == (NOT_CERTAIN, True)
                assert 'unusable image' in cards.nth(k).locator('.cxr-verdict').inner_text() and why in cards.nth(k).locator('.cxr-verdict').inner_text()
        finally:
            browser.close()
    # nothing uploaded was written beside the server or named in its log
    assert not [p for p in server_dir.rglob('*') if p.is_file() and p.suffix.lower() in ('.png', '.jpg', '.dcm')]
    text = log.read_text(errors='replace')
    assert 'RG1_UNCI' not in text and cxr.name not in text and 'Traceback' not in text


def test_docs_screenshot_of_the_dashboard(dashboard, tmp_path):
    "`docs.dashboard_screenshot` (what `make docs-screenshot` runs) uploads a film and the tibia and writes the page whole"
    from PIL import Image
    from cxr_covid_nbdev import docs
    url, _, _ = dashboard
    out = docs.dashboard_screenshot(tmp_path/'shots'/'dashboard.png', url)
    assert out == tmp_path/'shots'/'dashboard.png' and [p.name for p in out.parent.iterdir()] == ['dashboard.png']
    w, h = Image.open(out).size
    assert w == 1280 and h > 900  # two result cards below the header


def test_sessions_are_capped_and_freed(tiny_model_dir, tmp_path, monkeypatch):
    """At most `max_sessions` kernels: the next visitor gets a "busy" page; a closed page's kernel is culled, and the
    memory held returns to within 300 MB of one idle session. Ten sessions opened and closed one after another leave
    none, within the cull interval."""
    import urllib.error, urllib.request
    import psutil
    from playwright.sync_api import sync_playwright
    from cxr_covid_nbdev.dashboard import serve_dashboard
    monkeypatch.setenv('CXR_COVID_CACHE', str(tmp_path/'cache'))
    def kernels():
        out = []
        for c in server.children(recursive=True):
            try:
                if c.status() != psutil.STATUS_ZOMBIE and 'ipykernel' in ' '.join(c.cmdline()): out.append(c)
            except psutil.Error: pass  # gone while we looked
        return out
    def rss_mb():
        total = 0
        for p in [server, *server.children(recursive=True)]:
            try: total += p.memory_info().rss
            except psutil.Error: pass
        return total / 2**20
    def all_culled(timeout=30):
        end = time.time() + timeout
        while kernels() and time.time() < end: time.sleep(0.25)
        return not kernels()
    with serve_dashboard(tiny_model_dir, max_sessions=2, cull_idle_s=2, cull_interval_s=1) as (url, proc), sync_playwright() as p:
        server = psutil.Process(proc.pid)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        def open_session():
            pg = browser.new_page()
            pg.goto(url, timeout=180_000); pg.wait_for_selector('.cxr-upload', timeout=180_000)
            return pg
        a = open_session()
        one_idle = rss_mb()
        b = open_session()
        assert len(kernels()) == 2
        with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(url, timeout=60)
        assert e.value.code == 503
        busy = browser.new_page(); busy.goto(url)
        assert 'Busy, try again in a minute' in busy.inner_text('body') and len(kernels()) == 2
        for pg in (a, b, busy): pg.close()
        assert all_culled(), 'the closed pages kept their kernels'
        for _ in range(10):  # one after another: each visitor comes when a session is free
            end = time.time() + 30
            while len(kernels()) >= 2 and time.time() < end: time.sleep(0.25)
            open_session().close()
        assert all_culled(), 'sessions opened and closed one after another were not all freed'
        assert rss_mb() < one_idle + 300, (rss_mb(), one_idle)
        browser.close()
