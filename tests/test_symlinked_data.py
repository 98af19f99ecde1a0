"""The data and the registry reached through symbolic links (data on another disk, `../shared` a link): every path a
report keeps is relative to the data root, the same as through the real folder, and never climbs out of it.

The path-sensitive steps of crossval, evaluate, batch scoring and the registry, each on the tiny real model."""
import os
from pathlib import Path

import pandas as pd
import pytest

from cxr_covid_nbdev.core import rel_path, resolve_model_dir
from cxr_covid_nbdev.crossval import held_out_groups, loso_split
from cxr_covid_nbdev.data import read_dataset, with_sites


@pytest.fixture(scope='module')
def linked(cxr_real, tmp_path_factory):
    "cxr-real reached through a link to the shared folder (as `../shared -> /mnt/disk/shared`), and the real folder"
    link = tmp_path_factory.mktemp('elsewhere')/'shared'
    link.symlink_to(cxr_real.resolve().parents[1], target_is_directory=True)
    data = link/'data'/'cxr-real'
    assert data.resolve() == cxr_real.resolve() and str(data) != str(data.resolve())
    return data, cxr_real.resolve()


def test_crossval_folds_keep_paths_relative_to_a_linked_root(linked):
    data, real = linked
    via_link, via_real = with_sites(read_dataset(data)), with_sites(read_dataset(real))
    assert held_out_groups(via_link) == held_out_groups(via_real)
    for g in held_out_groups(via_link):
        tr, te = loso_split(via_link, 'site', g)
        held = {rel_path(p, via_link.attrs['root']) for p in te.path}
        assert held == {rel_path(p, data) for p in te.path} == {rel_path(p, real) for p in loso_split(via_real, 'site', g)[1].path}
        assert not any(h.startswith('..') for h in held) and set(tr.path).isdisjoint(te.path)


def test_evaluate_names_images_relative_to_a_linked_root(linked, tiny_model_dir):
    from cxr_covid_nbdev.external import evaluate_model
    data, real = linked
    a, b = (evaluate_model(tiny_model_dir, d, per_class=2, n_boot=10) for d in (data, real))
    paths = [p['path'] for p in a['predictions']]
    assert paths == [p['path'] for p in b['predictions']] and len(paths) == 8
    assert all(not p.startswith(('..', '/')) and (real/p).is_file() for p in paths)


def test_batch_scoring_through_a_link_resumes(linked, tiny_model_dir, tmp_path):
    from cxr_covid_nbdev.batch import score_archive
    data, _ = linked
    folder = data/'Normal'
    out = tmp_path/'scores.csv'
    first = score_archive([folder], out, model_dir=tiny_model_dir, progress=False)
    assert first['inputs'] == first['scored'] == len(list(folder.iterdir())) and first['errors'] == 0
    again = score_archive([folder], out, model_dir=tiny_model_dir, progress=False)
    assert again['scored'] == 0 and again['already_done'] == first['inputs']
    assert len(pd.read_csv(out)) == first['inputs']


def test_registry_through_a_link(tiny_model_dir, tmp_path):
    from cxr_covid_nbdev.registry import Registry
    (tmp_path/'disk'/'registry').mkdir(parents=True)
    (tmp_path/'registry').symlink_to(tmp_path/'disk'/'registry', target_is_directory=True)
    reg = Registry(tmp_path/'registry')
    v = reg.add(tiny_model_dir)
    reg.promote(v, reason='through a link')
    assert reg.production() == v and resolve_model_dir(registry=reg.root) == reg.root/v
    assert os.path.samefile(resolve_model_dir(registry=reg.root), tmp_path/'disk'/'registry'/v)
