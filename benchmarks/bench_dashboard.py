"""The dashboard under load: N pages open at once, each uploading a real film; upload-to-verdict time and memory.

`cxr-covid dashboard` (`dashboard.serve_dashboard`; the shipped default model unless `--model`) is started on a free
port with `max_sessions` = N (the cap is tested elsewhere). N Chromium pages (Playwright, a browser each) open it at
once; when all show the upload button, each uploads one real cxr-real film at the same moment. Each page times
itself, from just before its file is chosen to its verdict card, and to its Grad-CAM. Reported: p50/p95/max of
both, the time to open the pages, the memory (RSS) of the server (prediction service and Voila) alone, with N
sessions, so the memory per session; then the pages close and the time until culling frees every session (and the
memory left). Usage: `python benchmarks/bench_dashboard.py [--pages 10] [--model DIR] [--threads T] [--json out.json]`.
Not a test: numbers depend on the machine (2 cores here: the N sessions and N browsers share them).
"""
import argparse, json, shutil, statistics, time
from pathlib import Path

import psutil

from cxr_covid_nbdev.core import default_model_dir, shared_data_dir
from cxr_covid_nbdev.docs import CHROMIUM_ARGS
from cxr_covid_nbdev.dashboard import serve_dashboard


def tree_rss_mb(proc: psutil.Process) -> float:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try: total += p.memory_info().rss
        except psutil.Error: pass
    return total / 2**20


def n_kernels(proc: psutil.Process) -> int:
    n = 0
    for c in proc.children(recursive=True):
        try: n += c.status() != psutil.STATUS_ZOMBIE and 'ipykernel' in ' '.join(c.cmdline())
        except psutil.Error: pass
    return n


def pct(xs, q): return sorted(xs)[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--pages', type=int, default=10)
    ap.add_argument('--model', default=None)
    ap.add_argument('--threads', type=int, default=None)  # the prediction service's; default: every core
    ap.add_argument('--cull-idle', type=int, default=60)  # short enough to see the memory freed, long enough that a slow page keeps its kernel
    ap.add_argument('--json', default=None)
    a = ap.parse_args(argv)
    films = sorted((shared_data_dir()/'cxr-real'/'COVID-19').glob('*.jpg'))[:a.pages]
    res = {'pages': a.pages, 'threads': a.threads}
    with serve_dashboard(a.model or default_model_dir(), max_sessions=a.pages, cull_idle_s=a.cull_idle, cull_interval_s=1,
                         threads=a.threads) as (url, proc):
        server = psutil.Process(proc.pid)
        time.sleep(2); res['server_mb'] = round(tree_rss_mb(server))
        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            # a browser each, as separate visitors: one Chromium holds at most 6 connections to a host, and each
            # open page keeps some, so the 7th page of one browser would wait for a free one
            browsers = [p.chromium.launch(executable_path=shutil.which('chromium'), args=CHROMIUM_ARGS) for _ in range(a.pages)]
            pages = [b.new_page(viewport={'width': 1280, 'height': 900}) for b in browsers]
            t0, opened = time.time(), []
            for pg in pages: pg.goto(url, wait_until='commit', timeout=600_000)
            for pg in pages:
                pg.wait_for_selector('.cxr-upload', timeout=600_000); opened.append(time.time() - t0)
            res['all_open_s'] = round(time.time() - t0, 1)
            res['kernels'] = n_kernels(server)
            res['n_sessions_mb'] = round(tree_rss_mb(server))
            res['mb_per_session'] = round((res['n_sessions_mb'] - res['server_mb']) / a.pages)
            # every page uploads at the same moment; each page times itself (performance.now) from just before its
            # file is chosen to the moment its verdict card appears, and to the moment the Grad-CAM is in (status done)
            watch = """() => { window.__t0 = performance.now(); window.__verdict = window.__done = null;
                new MutationObserver((m, o) => {
                    if (!window.__verdict && document.querySelector('.cxr-results .cxr-verdict, .cxr-results .cxr-error'))
                        window.__verdict = performance.now() - window.__t0;
                    if (document.querySelector('.cxr-status [data-upload="1"]')) { window.__done = performance.now() - window.__t0; o.disconnect(); }
                }).observe(document.body, {childList: true, subtree: true, attributes: true}); }"""
            for pg, film in zip(pages, films):
                with pg.expect_file_chooser() as fc: pg.click('.cxr-upload')
                pg.evaluate(watch); fc.value.set_files(str(film))
            lat, done = [], []
            for pg in pages:
                pg.wait_for_selector('.cxr-status [data-upload="1"]', timeout=600_000)
                pg.wait_for_function('window.__done !== null', timeout=60_000)
                lat.append(pg.evaluate('window.__verdict') / 1000); done.append(pg.evaluate('window.__done') / 1000)
            summary = lambda xs: {'p50': round(statistics.median(xs), 2), 'p95': round(pct(xs, 0.95), 2), 'max': round(max(xs), 2),
                                  'all': [round(x, 2) for x in xs]}
            res['upload_to_verdict_s'], res['upload_to_gradcam_s'] = summary(lat), summary(done)
            res['peak_mb'] = round(tree_rss_mb(server))
            for pg in pages: pg.close()
            t0 = time.time()
            while n_kernels(server) and time.time() - t0 < 120: time.sleep(0.5)
            res['freed_after_close_s'] = round(time.time() - t0, 1)
            res['left_mb'] = round(tree_rss_mb(server))
            for b in browsers: b.close()
    print(json.dumps(res, indent=1))
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main()
