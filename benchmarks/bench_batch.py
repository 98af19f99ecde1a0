"""Archive scoring throughput: the local engine against Ray actors, on this machine, in one run.

The same real cxr-real images and the same model (by default the packaged one: ResNet-50 at 350 px) are scored
with `batch.score_rows` in this process (ONNX Runtime with its own thread choice, every core) and with
`batch.ray_rows` on a local Ray with one actor per core (one ONNX thread each), `--rounds` times each in turn.
For each engine: the images/s from the first row to the last (steady state), and the wall time including
start-up (Ray: the actors start and load the model). While the Ray job runs, the resident and unique memory of
each actor process is sampled; the largest is the memory per actor. If a GPU is present, a round of actors
with `gpus_per_actor=1` is added (one actor on the GPU, torch on CUDA).

Usage: `python benchmarks/bench_batch.py [--images N] [--rounds R] [--bs B] [--model DIR]`. Not a test: numbers
depend on the machine (on 2 cores, expect little gain from Ray: the local engine already uses both).
"""
import argparse, json, os, platform, tempfile, threading, time, warnings
from pathlib import Path

import pandas as pd

warnings.filterwarnings('ignore')
from cxr_covid_nbdev import core
from cxr_covid_nbdev.batch import score_rows, ray_rows, _ray_init
from cxr_covid_nbdev.inference import Predictor


def real_images(n:int)->list:
    "`n` cxr-real images, spread over the four classes"
    real = core.shared_data_dir()/'cxr-real'
    df = pd.read_csv(real/'manifest.csv').sort_values('path')
    return [real/p for p in df.groupby('label', sort=True).head(-(-n // 4)).path][:n]


def timed(rows)->dict:
    """Consume `rows`; seconds to the first row, and the steady images/s: the rows that arrived after the first
    batch, over the time from the first batch to the last row (rows arrive a batch at a time)"""
    t0 = time.perf_counter(); first = last = None; n = errors = n_first = 0
    for r in rows:
        last = time.perf_counter()
        if first is None: first = last
        n += 1; errors += r['error'] is not None
        if last - first < 0.05: n_first = n  # still the first batch
    return {'images': n, 'errors': errors, 'wall_s': round(last - t0, 2), 'first_row_s': round(first - t0, 2),
            'steady_img_s': round((n - n_first) / (last - first), 2) if n > n_first and last > first else None}


class ActorMemory(threading.Thread):
    "Samples the resident and unique memory of the `_Scorer` actor processes until stopped"
    def __init__(self): super().__init__(daemon=True); self.stop, self.rss, self.uss, self.pids = threading.Event(), 0, 0, set()
    def run(self):
        import psutil
        while not self.stop.is_set():
            for p in psutil.process_iter(['cmdline']):
                if '_Scorer' not in ' '.join(p.info['cmdline'] or []): continue
                try: m = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied): continue
                self.pids.add(p.pid); self.rss, self.uss = max(self.rss, m.rss), max(self.uss, m.uss)
            time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=128)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--bs', type=int, default=8)
    ap.add_argument('--model', default=None, help='model folder (default: the packaged one)')
    a = ap.parse_args()
    import ray, torch
    os.environ.setdefault('CXR_COVID_CACHE', tempfile.mkdtemp())
    files, mdir = real_images(a.images), Path(a.model) if a.model else core.default_model_dir()
    cores = os.cpu_count()
    t0 = time.perf_counter(); pr = Predictor(mdir); load_s = time.perf_counter() - t0  # also leaves the ONNX export for the actors
    t0 = time.perf_counter(); _ray_init(None); ray_init_s = time.perf_counter() - t0
    res = {'local': [], 'ray': [], 'ray_gpu': []}
    for _ in range(a.rounds):
        res['local'].append(timed(score_rows(pr, files, a.bs)))
        mem = ActorMemory(); mem.start()
        res['ray'].append(timed(ray_rows(files, pr.model_dir, pr.labels, a.bs, actors=cores)))
        mem.stop.set(); mem.join()
        res['ray'][-1].update(actor_rss_mib=round(mem.rss / 2**20), actor_uss_mib=round(mem.uss / 2**20), actors_seen=len(mem.pids))
        if torch.cuda.is_available():
            res['ray_gpu'].append(timed(ray_rows(files, pr.model_dir, pr.labels, a.bs, actors=1, gpus_per_actor=1)))
    ray.shutdown()
    best = {k: max((r['steady_img_s'] or 0) for r in v) for k, v in res.items() if v}
    out = {'machine': f"{platform.processor() or platform.machine()}, {cores} cores", 'model': f"{pr.meta['arch']} at {pr.meta['size']} px",
           'images': len(files), 'bs': a.bs, 'model_load_s': round(load_s, 2), 'ray_init_s': round(ray_init_s, 2),
           'best_steady_img_s': best, 'ray_over_local': round(best['ray'] / best['local'], 2),
           'memory_per_actor_mib': {'rss': max(r['actor_rss_mib'] for r in res['ray']), 'uss': max(r['actor_uss_mib'] for r in res['ray'])},
           'rounds': res}
    print(f"{out['model']}, {len(files)} cxr-real images, bs {a.bs}, {out['machine']}")
    print(f"  local (1 process, ONNX on every core): {best['local']:.2f} img/s steady")
    print(f"  ray ({cores} actors, 1 ONNX thread each): {best['ray']:.2f} img/s steady; ray/local = {out['ray_over_local']:.2f}")
    print(f"  memory per actor: {out['memory_per_actor_mib']['rss']} MiB resident, {out['memory_per_actor_mib']['uss']} MiB unique; "
          f"ray.init {out['ray_init_s']} s, first Ray row after {min(r['first_row_s'] for r in res['ray'])} s")
    if best.get('ray_gpu'): print(f"  ray, 1 actor on the GPU: {best['ray_gpu']:.2f} img/s steady")
    print(json.dumps(out))


if __name__ == '__main__': main()
