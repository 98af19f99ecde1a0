"""Batch-1 CPU latency of prediction, end to end (read -> preprocess -> forward -> softmax), and `cxr-covid predict` throughput.

Compared, on the same network and the same real cxr-real images, in one run (each round times every method
in turn, over all images, so that load from other processes hits every method alike; methods are not
interleaved image by image because ONNX Runtime's and OpenMP's spin-waiting threads slow whatever runs next):

* `Predictor(backend='onnx').predict(path)` and `Predictor(backend='torch').predict(path)`;
* fastai's `learn.predict(path)` with a `Learner` around the same network and the same transforms
  (`Resize(size, method='squish')`, ImageNet `Normalize`);
* the floor: ONNX Runtime's raw forward of the same network exported with `torch.onnx`
  (preprocessed tensor in, logits out), and eager torch's raw forward for reference.

fastai and eager torch are timed with torch's default thread count and again with one thread: on a small,
shared VM, OpenMP's threads can wait on each other so badly that one thread is several times faster, and
that would flatter the ONNX backend.

Settings: resnet50 at 350 px (the paper's) and the tiny test setting, resnet18 at 64 px. Untrained weights:
timing does not depend on them. Usage: `python benchmarks/bench_predict.py [--images N] [--rounds R]
[--folder-images K] [--settings resnet50:350,resnet18:64]`. Not a test: numbers depend on the machine.
"""
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

warnings.filterwarnings('ignore')
from cxr_covid_nbdev import core, inference
from cxr_covid_nbdev.data import read_radiograph


def real_images(n:int)->list:
    "`n` cxr-real images, spread over the four classes"
    real = core.shared_data_dir()/'cxr-real'
    df = pd.read_csv(real/'manifest.csv').sort_values('path')
    per = -(-n // 4)
    return [real/p for p in df.groupby('label', sort=True).head(per).path][:n]


def fastai_learner(model, meta, files):
    "A fastai Learner around `model` with the training transforms of `meta`"
    from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, Resize, Normalize, imagenet_stats,
                                   Learner, CrossEntropyLossFlat, parent_label)
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=list(meta['labels']))), get_y=parent_label,
                    item_tfms=Resize(meta['size'], method='squish'), batch_tfms=Normalize.from_stats(*imagenet_stats)
                   ).dataloaders(files, bs=2, num_workers=0, device='cpu')
    return Learner(dls, model, loss_func=CrossEntropyLossFlat())


def bench_latency(arch:str, size:int, files:list, rounds:int, tmp:Path)->dict:
    torch.manual_seed(0)
    meta = {'arch': arch, 'labels': list(core.LABELS), 'size': size, 'prepare_size': None,
            'mean': list(core.IMAGENET_MEAN), 'std': list(core.IMAGENET_STD), 'imagenet_pretrained': False,
            'weights_source': 'none (benchmark)', 'temperature': 1.0, 'ood': None}
    mdir = core.save_model_dir(core.create_model(arch, 4), meta, tmp/f'{arch}-{size}')
    t0 = time.perf_counter(); onnx = Predictor(mdir, backend='onnx'); t_load = time.perf_counter() - t0
    tch = Predictor(mdir, backend='torch')
    learn = fastai_learner(core.load_model_dir(mdir)[0], onnx.meta, files)
    floor_sess = inference._ort_session(inference.onnx_model(onnx.model, onnx.meta))
    xs = [onnx.preprocess(read_radiograph(f))[None] for f in files]

    def fastai_predict(i):
        with learn.no_bar(): return learn.predict(files[i])[2].numpy()
    def floor(i): return floor_sess.run(None, {'input': xs[i]})[0]
    def torch_fwd(i):
        with torch.inference_mode(): return tch.model(torch.from_numpy(xs[i])).numpy()
    methods = {'predictor_onnx': lambda i: onnx.predict(files[i]), 'predictor_torch': lambda i: tch.predict(files[i]),
               'fastai_learn_predict': fastai_predict, 'ort_raw_forward': floor, 'torch_raw_forward': torch_fwd,
               'fastai_learn_predict_1thread': fastai_predict, 'torch_raw_forward_1thread': torch_fwd}
    threads = {k: (1 if k.endswith('_1thread') else torch.get_num_threads()) for k in methods}
    # agreement, and warm-up
    for i in range(len(files)):
        p_onnx = np.array(list(onnx.predict(files[i]).probs.values()))
        assert np.abs(p_onnx - fastai_predict(i)).max() < 1e-4, "Predictor and fastai disagree"
        for f in methods.values(): f(i)
    times = {k: [] for k in methods}
    for _ in range(rounds):  # method by method within a round: ONNX Runtime's and OpenMP's spinning threads would slow whatever runs next
        for k, f in methods.items():
            torch.set_num_threads(threads[k])
            for i in range(len(files)):
                t = time.perf_counter(); f(i); times[k].append(time.perf_counter() - t)
    res = {k: {'median_ms': 1e3*statistics.median(v), 'mean_ms': 1e3*statistics.fmean(v)} for k, v in times.items()}
    med = {k: v['median_ms'] for k, v in res.items()}
    res['ratios'] = {'fastai_predict / predictor_onnx (target >= 3)': med['fastai_learn_predict']/med['predictor_onnx'],
                     'predictor_onnx / ort_raw_forward (target <= 1.3)': med['predictor_onnx']/med['ort_raw_forward'],
                     'predictor_torch / predictor_onnx': med['predictor_torch']/med['predictor_onnx'],
                     'fastai_predict / predictor_torch': med['fastai_learn_predict']/med['predictor_torch'],
                     'fastai_predict (1 torch thread) / predictor_onnx': med['fastai_learn_predict_1thread']/med['predictor_onnx']}
    torch.set_num_threads(threads['predictor_torch'])
    res['predictor_first_load_s (incl. ONNX export)'] = t_load
    res['model_dir'] = str(mdir)
    return res


def bench_cli(mdir:Path, files:list, workers:int, tmp:Path)->dict:
    "Wall time of `cxr-covid predict --json` on a folder of N images and on 1 image; images/s overall and in steady state"
    d = tmp/f'folder-{len(files)}'
    if not d.exists():
        d.mkdir()
        for i, f in enumerate(files): (d/f'{i:04d}{f.suffix}').symlink_to(f)
    def run(src):
        t = time.perf_counter()
        r = subprocess.run(['cxr-covid', 'predict', str(src), '--model', str(mdir), '--json', '--workers', str(workers)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return time.perf_counter() - t, len(r.stdout.splitlines())
    t1, _ = run(d/f'0000{files[0].suffix}')
    tn, n = run(d)
    assert n == len(files)
    return {'images': n, 'workers': workers, 'wall_s': tn, 'images_per_s': n/tn, 'one_image_wall_s': t1,
            'steady_images_per_s': (n - 1)/(tn - t1) if tn > t1 else None}


Predictor = inference.Predictor

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=8, help='real images timed per round')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--folder-images', type=int, default=64, help='images in the folder given to `cxr-covid predict`')
    ap.add_argument('--settings', default='resnet50:350,resnet18:64')
    ap.add_argument('--json', help='also write the results to this file')
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='bench-predict-'))
    os.environ['CXR_COVID_CACHE'] = str(tmp/'cache')
    out = {'machine': {'python': platform.python_version(), 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                       'load_avg_start': os.getloadavg(), **{k: core.library_versions()[k] for k in ('torch', 'fastai', 'onnxruntime')}}}
    files = real_images(args.images)
    for setting in args.settings.split(','):
        arch, size = setting.split(':')
        print(f"\n== {arch} at {size} px: batch-1 latency over {args.images} real images x {args.rounds} rounds", flush=True)
        r = bench_latency(arch, int(size), files, args.rounds, tmp)
        for k in ('predictor_onnx', 'predictor_torch', 'fastai_learn_predict', 'ort_raw_forward', 'torch_raw_forward',
                  'fastai_learn_predict_1thread', 'torch_raw_forward_1thread'):
            print(f"  {k:<28} median {r[k]['median_ms']:8.1f} ms   mean {r[k]['mean_ms']:8.1f} ms")
        for k, v in r['ratios'].items(): print(f"  {k:<50} {v:6.2f}")
        for workers in (0, 1):
            c = bench_cli(Path(r['model_dir']), real_images(args.folder_images), workers, tmp)
            r[f'cli_workers{workers}'] = c
            print(f"  cxr-covid predict, {c['images']} images, --workers {workers}: {c['wall_s']:.1f} s wall = "
                  f"{c['images_per_s']:.1f} images/s (one image alone: {c['one_image_wall_s']:.1f} s; "
                  "steady state " + (f"{c['steady_images_per_s']:.1f} images/s)" if c['steady_images_per_s'] else "n/a: too noisy)"), flush=True)
        out[setting] = r
    out['machine']['load_avg_end'] = os.getloadavg()
    print(f"\nload average at start {out['machine']['load_avg_start']}, at end {out['machine']['load_avg_end']} "
          f"({os.cpu_count()} CPUs)")
    if args.json: core.atomic_write_json(args.json, out)


if __name__ == '__main__': main()
