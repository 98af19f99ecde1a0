"""Throughput of `data.prepare` against a plain single-process Pillow loop, on the same real files.

    python benchmarks/bench_prepare.py [--src DIR] [--limit N] [--size 350] [--workers N]

The baseline opens each file, converts it to grayscale, shrinks it (LANCZOS, longer side <= size) and
saves it as JPEG quality 90: the least a preparation step must do. `prepare` also validates each file
through `read_radiograph` (DICOM, EXIF, 16-bit, alpha...), hashes it for near-duplicates, makes the
patient-level split and writes the manifest and report atomically, on `--workers` processes. Both
numbers come from this one run, on this machine.
"""
import argparse, os, sys, tempfile, time
from pathlib import Path

import pandas as pd
from PIL import Image

from cxr_covid_nbdev.core import shared_data_dir
from cxr_covid_nbdev.data import prepare, read_dataset


def plain_loop(paths, out:Path, size:int)->None:
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        im = Image.open(p).convert('L')
        im.thumbnail((size, size), Image.LANCZOS)
        im.save(out/f'{i}.jpg', quality=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--src', default=str(shared_data_dir()/'cxr-train'), help='dataset (default: cxr-train)')
    ap.add_argument('--limit', type=int, default=None, help='use a seeded random sample of N images')
    ap.add_argument('--size', type=int, default=350)
    ap.add_argument('--workers', type=int, default=None, help='prepare processes (default: all cores)')
    args = ap.parse_args(argv)
    df = read_dataset(args.src)
    if args.limit and args.limit < len(df): df = df.sample(n=args.limit, random_state=0).sort_index()
    workers = args.workers or os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        df[['path', 'label', 'patient_id', 'split']].to_csv(tmp/'manifest.csv', index=False)
        t0 = time.perf_counter(); plain_loop(df.path.tolist(), tmp/'plain', args.size); t_plain = time.perf_counter() - t0
        t0 = time.perf_counter(); prepare(tmp/'manifest.csv', tmp/'prep', size=args.size, n_workers=workers); t_prep = time.perf_counter() - t0
        n_out = len(read_dataset(tmp/'prep'))
    n = len(df)
    print(f"{n} images from {args.src}, size {args.size}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"plain Pillow loop, 1 process : {t_plain:7.2f} s  {n / t_plain:7.1f} images/s")
    print(f"prepare, {workers} worker(s)       : {t_prep:7.2f} s  {n / t_prep:7.1f} images/s  ({n_out} written)")
    print(f"ratio prepare / plain        : {t_plain / t_prep:7.2f}x")


if __name__ == '__main__': main()
