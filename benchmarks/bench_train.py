"""CPU training throughput: images/s of a training epoch through the library against a plain PyTorch loop.

Both train the same network (`core.create_model(arch)`, EfficientNet-Lite0 by default), with Adam, the same batch
size, on the same real cxr-train images, on this machine, in one run:

* the library: `train.make_dataloaders` + `train.make_learner` (the path of `cxr-covid train`): fastai, the
  model-input rule, and the prepared-image cache (each file is decoded, shrunk and squished once; later epochs
  read it from memory), with the paper's contrast augmentation on the batches;
* the plain loop: a `torch.utils.data.Dataset` that opens each JPEG with PIL, squishes it to the input size and
  normalises it, every epoch, then forward, backward and step.

The first epoch of the library pays for the cache; the steady state is the mean of the later epochs. Usage:
`python benchmarks/bench_train.py [--images 256] [--epochs 3] [--arch efficientnet_lite0] [--size 224] [--bs 32]`.
Not a test: numbers depend on the machine.
"""
import argparse, os, tempfile, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

warnings.filterwarnings('ignore')
from cxr_covid_nbdev import augment, core
from cxr_covid_nbdev.train import make_dataloaders, make_learner, starting_weights, read_training_data


def images(n:int)->pd.DataFrame:
    "`n` training rows of cxr-train spread over the classes, and 8 validation rows"
    df = read_training_data(core.shared_data_dir()/'cxr-train')
    tr = df[df.split == 'train'].sample(frac=1, random_state=0).groupby('label').head(-(-n // 4)).head(n)
    return pd.concat([tr, df[df.split == 'valid'].head(8)])


def library_epochs(df, arch, size, bs, epochs, work)->list:
    "Seconds of each training epoch through `make_dataloaders` and `make_learner`"
    dls = make_dataloaders(df, size, bs, None, None, 0, 0, torch.device('cpu'), 'paper', core.arch_stats(arch))
    learn = make_learner(dls, starting_weights(arch, pretrained=False), augment.recipe('paper'), work)
    learn.unfreeze()
    res = []
    for _ in range(epochs):
        t = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        res.append(time.perf_counter() - t)
    return res


class PlainImages(torch.utils.data.Dataset):
    "JPEG -> squished, normalised tensor, decoded every time it is asked for"
    def __init__(self, df, size, arch):
        self.paths, self.y, self.size = list(df.path), [core.LABELS.index(l) for l in df.label], size
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) for v in core.arch_stats(arch))
    def __len__(self): return len(self.paths)
    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert('RGB').resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.).permute(2, 0, 1)
        return (x - self.mean) / self.std, self.y[i]


def plain_epochs(df, arch, size, bs, epochs)->list:
    "Seconds of each epoch of a plain PyTorch training loop over the same rows"
    model = core.create_model(arch).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    dl = torch.utils.data.DataLoader(PlainImages(df, size, arch), batch_size=bs, shuffle=True, num_workers=0, drop_last=True)
    res = []
    for _ in range(epochs):
        t = time.perf_counter()
        for x, y in dl:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
        res.append(time.perf_counter() - t)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=256); ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--arch', default='efficientnet_lite0'); ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--bs', type=int, default=32)
    args = ap.parse_args()
    df = images(args.images)
    tr = df[df.split == 'train']
    n = len(tr) // args.bs * args.bs  # both drop the last partial batch (fastai does by default)
    print(f"{args.arch} at {args.size} px, batch {args.bs}, {n} real training images per epoch, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        lib = library_epochs(df, args.arch, args.size, args.bs, args.epochs, work)
    plain = plain_epochs(tr, args.arch, args.size, args.bs, args.epochs)
    rate = lambda ts: [n / t for t in ts]
    for name, ts in (('library (fastai, cached views)', lib), ('plain PyTorch loop', plain)):
        print(f"  {name:<32} " + '  '.join(f"epoch {i + 1}: {r:5.1f} img/s" for i, r in enumerate(rate(ts))))
    steady = lambda ts: n / float(np.mean(ts[1:])) if len(ts) > 1 else n / ts[0]
    print(f"  steady state: library {steady(lib):.1f} img/s, plain loop {steady(plain):.1f} img/s, "
          f"ratio library / plain {steady(lib) / steady(plain):.2f}; first epochs {rate(lib)[0] / rate(plain)[0]:.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == '__main__': main()
