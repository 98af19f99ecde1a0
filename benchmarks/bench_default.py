"""Per-image latency of the shipped default model against the default it replaced, both through the `Predictor`.

`Predictor(model_dir).predict(path)` end to end (read -> lung check -> preprocess -> forward -> calibrated softmax ->
verdict) on the same real cxr-real images, batch 1, for the default in `cxr_covid_nbdev/models/default` and each
earlier default in `models/previous/`, in one run: each round times every model in turn over all images. Usage:
`python benchmarks/bench_default.py [--images 16] [--rounds 3]`. Not a test: numbers depend on the machine.
"""
import argparse, os, statistics, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore')
from cxr_covid_nbdev import core
from cxr_covid_nbdev.inference import Predictor
from bench_predict import real_images


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=16); ap.add_argument('--rounds', type=int, default=3)
    args = ap.parse_args()
    files = real_images(args.images)
    with tempfile.TemporaryDirectory() as cache:
        os.environ['CXR_COVID_CACHE'] = cache  # the ONNX exports of this run only
        models = {'default': core.default_model_dir(), **{f'previous/{d.name}': d for d in core.previous_model_dirs()}}
        preds = {k: Predictor(d) for k, d in models.items()}
        for p in preds.values():
            for f in files: p.predict(f)  # warm-up (ONNX export, lung segmenter)
        times = {k: [] for k in preds}
        for _ in range(args.rounds):
            for k, p in preds.items():
                for f in files:
                    t = time.perf_counter(); p.predict(f); times[k].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"batch-1 Predictor latency, {len(files)} real images x {args.rounds} rounds, {os.cpu_count()} CPUs:")
    for k, p in preds.items():
        print(f"  {k:<40} {p.meta['arch']} at {p.meta['size']} px ({p.backend}): median {med[k]:7.1f} ms")
    for k in med:
        if k != 'default': print(f"  {k} / default: {med[k] / med['default']:.2f}x")


if __name__ == '__main__': main()
