"""`cxr-covid prepare` through the `cxr-covid` entry point, on real images.

What `nbs/01_data.ipynb` cannot check beside the code: `cli.main` lives in a later notebook. Layouts, `prepare`,
near-duplicates and the patient split are checked in the notebook, on the same real images."""
import shutil

import pandas as pd
import pytest

from cxr_covid_nbdev.data import read_dataset


@pytest.fixture(scope='module')
def subset(cxr_real):
    "8 real images, two per class"
    return pd.read_csv(cxr_real/'manifest.csv', keep_default_na=False).groupby('label').head(2).reset_index(drop=True)


def copy_subset(cxr, rows, dest):
    "Copy real images `rows` (manifest rows of `cxr`) to `dest` with their manifest"
    for p in rows.path:
        (dest/p).parent.mkdir(parents=True, exist_ok=True); shutil.copy(cxr/p, dest/p)
    rows.to_csv(dest/'manifest.csv', index=False)
    return dest


def test_cli_prepare(cxr_real, subset, tmp_path, capsys):
    from cxr_covid_nbdev import cli
    src = copy_subset(cxr_real, subset.head(8), tmp_path/'src')
    rc = cli.main(['prepare', str(src), '--out', str(tmp_path/'out'), '--size', '48', '--seed', '1', '--workers', '1'])
    assert rc == 0 and read_dataset(tmp_path/'out').attrs['prepare_size'] == 48
    assert '8 images at 48 px' in capsys.readouterr().out
    rc = cli.main(['prepare', str(src), '--out', str(tmp_path/'out')])
    assert rc == 2 and 'already exists' in capsys.readouterr().err
    rc = cli.main(['prepare', str(tmp_path/'nope'), '--out', str(tmp_path/'out2')])
    assert rc == 2 and not (tmp_path/'out2').exists()
