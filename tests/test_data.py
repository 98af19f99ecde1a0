"Dataset layouts, `prepare`, near-duplicates and the patient split, on real images"
import io, json, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_covid_nbdev.core import LABELS, MANIFEST_COLUMNS, file_digest
from cxr_covid_nbdev import data
from cxr_covid_nbdev.data import (read_dataset, prepare, near_duplicates, image_hash, detect_layout,
                                  split_groups, straddling)


@pytest.fixture(scope='module')
def real_manifest(cxr_real):
    return pd.read_csv(cxr_real/'manifest.csv', keep_default_na=False)


def copy_subset(cxr, rows, dest):
    "Copy real images `rows` (manifest rows of `cxr`) to `dest` with their manifest"
    for p in rows.path:
        (dest/p).parent.mkdir(parents=True, exist_ok=True); shutil.copy(cxr/p, dest/p)
    rows.to_csv(dest/'manifest.csv', index=False)
    return dest


@pytest.fixture(scope='module')
def subset(real_manifest):
    "6 real images per class, with two Cohen patients that have several films"
    multi = real_manifest[real_manifest.patient_id.str.startswith('cohen:')].patient_id.value_counts()
    pats = list(multi[multi >= 2].index[:2])
    rows = pd.concat([real_manifest[real_manifest.patient_id.isin(pats)],
                      real_manifest[~real_manifest.patient_id.isin(pats)].groupby('label').head(6)])
    return rows.drop_duplicates('path').reset_index(drop=True)


# --- read_dataset --------------------------------------------------------------------------------

def test_read_real_sample(cxr_real, real_manifest):
    df = read_dataset(cxr_real)
    assert df.attrs['layout'] == 'manifest' and df.attrs['prepare_size'] is None
    assert list(df.columns[:6]) == list(MANIFEST_COLUMNS)
    assert len(df) == len(real_manifest) and set(df.label) == set(LABELS)
    assert all(Path(p).is_absolute() for p in df.path) and Path(df.path[5]).is_file()
    assert df.sha1[7] == file_digest(df.path[7])
    assert {'view', 'license', 'source_repo'} <= set(df.columns)
    assert (df.split == '').all()
    # the manifest CSV itself is a source too
    test = read_dataset(cxr_real/'manifest.csv')
    assert test.path.tolist() == df.path.tolist()


def test_read_train_keeps_split(cxr_train):
    df = read_dataset(cxr_train)
    m = pd.read_csv(cxr_train/'manifest.csv', keep_default_na=False)
    assert df.split.tolist() == m.split.tolist() and set(df.split) == {'train', 'valid'}
    assert df.sha1.tolist() == m.sha1.tolist()
    assert df.sha1[100] == file_digest(df.path[100])
    assert {'age_group', 'subtype'} <= set(df.columns)


def test_unknown_label_names_file_and_labels(cxr_real, real_manifest, tmp_path):
    rows = real_manifest.head(3).copy()
    copy_subset(cxr_real, rows, tmp_path)
    rows.loc[1, 'label'] = 'Tuberculosis'
    rows.to_csv(tmp_path/'manifest.csv', index=False)
    with pytest.raises(ValueError) as e: read_dataset(tmp_path)
    assert rows.path[1] in str(e.value) and 'Tuberculosis' in str(e.value) and all(l in str(e.value) for l in LABELS)


def test_class_folders_without_manifest(cxr_real, real_manifest, tmp_path):
    rows = real_manifest.groupby('label').head(2)
    copy_subset(cxr_real, rows, tmp_path)
    (tmp_path/'manifest.csv').unlink()
    (tmp_path/'Normal'/'notes.txt').write_text('not an image file, not listed')
    df = read_dataset(tmp_path)
    assert df.attrs['layout'] == 'folders' and len(df) == len(rows)
    assert sorted(df.label) == sorted(rows.label)
    (tmp_path/'Tuberculosis').mkdir(); shutil.copy(cxr_real/rows.path.iloc[0], tmp_path/'Tuberculosis'/'x.jpg')
    with pytest.raises(ValueError, match='Tuberculosis.*accepted labels'): read_dataset(tmp_path)


def test_kermany_layout(cxr_real, real_manifest, tmp_path):
    ker = real_manifest[real_manifest.path.str.contains('kermany')].groupby('label').head(3)
    expect = []
    for i, r in enumerate(ker.itertuples()):
        pid = r.patient_id.split(':')[1]
        split = ['train', 'test', 'val'][i % 3]
        if r.label == 'Normal': cls, name, sub = 'NORMAL', f'{pid}-0001.jpeg', ''
        else:
            kind = 'bacteria' if 'bacteria' in r.path else 'virus'
            cls, name, sub = 'PNEUMONIA', f'{pid}_{kind}_{i}.jpeg', {'bacteria': 'bacterial', 'virus': 'viral'}[kind]
        d = tmp_path/'chest_xray'/split/cls; d.mkdir(parents=True, exist_ok=True)
        shutil.copy(cxr_real/r.path, d/name)
        expect.append((str((d/name).resolve()), r.label, r.patient_id, {'val': 'valid'}.get(split, split), sub))
    (tmp_path/'chest_xray'/'__MACOSX').mkdir()
    for src in (tmp_path, tmp_path/'chest_xray'):
        df = read_dataset(src)
        assert df.attrs['layout'] == 'kermany'
        got = sorted(zip(df.path, df.label, df.patient_id, df.split, df.subtype))
        assert got == sorted(expect)
        assert set(df.source) == {'kermany'} and set(df.age_group) == {'pediatric'}


def test_cohen_layout(cxr_real, real_manifest, tmp_path):
    cohen = real_manifest[real_manifest.patient_id.str.startswith('cohen:')]
    cov = cohen[cohen.label == 'COVID-19'].iloc[:3]
    lat = cohen[cohen.view == 'L'].iloc[:1]
    ct = cohen[cohen.view.isin(['Axial', 'Coronal'])].iloc[:1]
    nrm = real_manifest[real_manifest.label == 'Normal'].iloc[:1]
    pna = real_manifest[real_manifest.label == 'Pneumonia'].iloc[:1]
    (tmp_path/'images').mkdir()
    meta, want = [], {}
    def add(r, finding, view, modality='X-ray', label=None, age=''):
        fn = Path(r.path).name
        shutil.copy(cxr_real/r.path, tmp_path/'images'/fn)
        meta.append(dict(patientid=r.patient_id.split(':')[-1] or '999', offset='', sex='M', age=age, finding=finding,
                         survival='', view=view, modality=modality, date='', location='', folder='images',
                         filename=fn, doi='', url='', license='CC BY 4.0', clinical_notes='', other_notes=''))
        if label: want[fn] = label
    for r in cov.itertuples(): add(r, 'COVID-19', r.view, age='65', label='COVID-19')
    for r in lat.itertuples(): add(r, 'COVID-19', 'L', label='Not Certain')
    for r in ct.itertuples(): add(r, 'COVID-19', r.view, modality='CT', label='Not Certain')
    for r in nrm.itertuples(): add(r, 'No Finding', 'PA', label='Normal', age='12')
    for r in pna.itertuples(): add(r, 'Pneumonia/Bacterial/Streptococcus', 'AP', label='Pneumonia')
    meta.append({**meta[0], 'filename': 'missing.jpg'})  # listed, not on disk
    meta.append({**meta[0], 'finding': 'todo', 'filename': Path(cov.path.iloc[0]).name})
    pd.DataFrame(meta).to_csv(tmp_path/'metadata.csv', index=False)
    df = read_dataset(tmp_path)
    assert df.attrs['layout'] == 'cohen'
    assert dict(zip(df.path.map(lambda p: Path(p).name), df.label)) == want
    assert len(df) == len(want)
    assert all(pid.startswith('cohen:') for pid in df.patient_id)
    assert df.set_index(df.path.map(lambda p: Path(p).name)).subtype[Path(pna.path.iloc[0]).name] == 'bacterial'
    assert set(df.age_group) >= {'adult', 'pediatric'}
    reasons = ' '.join(e['reason'] for e in df.attrs['excluded'])
    assert 'file not found' in reasons and "'todo'" in reasons


def test_raddb_layout(cxr_real, real_manifest, tmp_path):
    want = {}
    for folder, label, sub in (('COVID', 'COVID-19', True), ('Normal', 'Normal', True),
                               ('Viral Pneumonia', 'Pneumonia', False), ('Lung_Opacity', None, True)):
        rows = real_manifest[real_manifest.label == (label or 'Pneumonia')].iloc[:2]
        d = tmp_path/folder/('images' if sub else '')
        d.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(rows.itertuples()):
            fn = f'{folder.replace(" ", "_")}-{i + 1}.png'
            Image.open(cxr_real/r.path).save(d/fn)
            if label: want[fn] = label
        if sub:
            (tmp_path/folder/'masks').mkdir()
            Image.open(cxr_real/rows.path.iloc[0]).point(lambda v: 255 * (v > 128)).save(tmp_path/folder/'masks'/'m.png')
    df = read_dataset(tmp_path)
    assert df.attrs['layout'] == 'raddb'
    assert dict(zip(df.path.map(lambda p: Path(p).name), df.label)) == want
    assert len(df.attrs['excluded']) == 2 and 'Lung_Opacity' in df.attrs['excluded'][0]['reason']
    assert set(df.subtype[df.label == 'Pneumonia']) == {'viral'}
    # the same tree read as plain class folders fails on the Lung_Opacity folder
    with pytest.raises(ValueError, match='Lung_Opacity'): read_dataset(tmp_path, layout='folders')


def test_detect_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError): read_dataset(tmp_path/'nope')
    (tmp_path/'x.txt').write_text('x')
    with pytest.raises(ValueError): read_dataset(tmp_path/'x.txt')
    with pytest.raises(ValueError, match='Unknown layout'): read_dataset(tmp_path, layout='imagenet')


# --- near-duplicates -----------------------------------------------------------------------------

def test_near_duplicate_of_resized_reencoded_copy(cxr_real, real_manifest, tmp_path):
    paths = [cxr_real/p for p in real_manifest.groupby('label').head(3).path]
    im = Image.open(paths[0]).convert('L')
    im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.BICUBIC).save(tmp_path/'copy.png')
    im.save(tmp_path/'copy.jpg', quality=50)
    nd = near_duplicates(paths + [tmp_path/'copy.png', tmp_path/'copy.jpg'])
    found = {frozenset((Path(a).name, Path(b).name)) for a, b in zip(nd.a, nd.b)}
    assert found == {frozenset((paths[0].name, 'copy.png')), frozenset((paths[0].name, 'copy.jpg')),
                     frozenset(('copy.png', 'copy.jpg'))}
    assert (nd.distance <= data.DUP_DISTANCE).all()
    assert image_hash(paths[0]) == image_hash(paths[0].read_bytes()) == image_hash(im)


def test_near_duplicates_real_vs_train(cxr_real, cxr_train, real_manifest):
    "Same films, different bytes: 512 px q90 in cxr-real, 384 px q85 in cxr-train"
    some = real_manifest.path[::12].tolist()
    assert all(file_digest(cxr_real/p) != file_digest(cxr_train/p) for p in some)
    nd = near_duplicates([cxr_real/p for p in some], [cxr_train/p for p in some])
    pairs = {(Path(a).relative_to(cxr_real).as_posix(), Path(b).relative_to(cxr_train).as_posix()) for a, b in zip(nd.a, nd.b)}
    assert pairs == {(p, p) for p in some}


# --- prepare -------------------------------------------------------------------------------------

def test_prepare_round_trip_and_split(cxr_real, subset, tmp_path):
    src = copy_subset(cxr_real, subset, tmp_path/'src')
    # a re-encoded, resized copy of a film under another name and without a patient id: a duplicate
    dup_of = subset[subset.label == 'Normal'].iloc[0]
    im = Image.open(cxr_real/dup_of.path)
    im.resize((im.width // 2, im.height // 2)).save(src/'Normal'/'dup_copy.jpg', quality=70)
    rows = pd.concat([subset, pd.DataFrame([dict(path='Normal/dup_copy.jpg', label='Normal', patient_id='')])])
    rows.to_csv(src/'manifest.csv', index=False)
    out = prepare(src, tmp_path/'prep', size=96, valid_pct=0.5, seed=3, n_workers=2)
    man = pd.read_csv(out/'manifest.csv', keep_default_na=False)
    assert not any(Path(p).is_absolute() for p in man.path)
    df = read_dataset(out)
    assert df.attrs['layout'] == 'prepared' and df.attrs['prepare_size'] == 96
    assert len(df) == len(rows) and sorted(df.label) == sorted(rows.label)
    for p, sha in zip(df.path, df.sha1):
        im = Image.open(p)
        assert im.format == 'JPEG' and im.mode == 'L' and max(im.size) <= 96 and file_digest(p) == sha
    assert set(df.split) == {'train', 'valid'}
    meta = json.loads((out/'prepare.json').read_text())
    assert meta['size'] == 96 and meta['seed'] == 3 and meta['n_images'] == len(rows)
    assert sum(sum(c.values()) for c in meta['counts'].values()) == len(rows)
    # no patient and no duplicate on both sides
    for pid, g in df[df.patient_id != ''].groupby('patient_id'): assert g.split.nunique() == 1, pid
    orig = df.set_index(df.original.map(lambda p: Path(p).name))
    assert orig.split[Path(dup_of.path).name] == orig.split['dup_copy.jpg']
    rep = json.loads((out/'report.json').read_text())
    assert rep['straddling'] == [] and rep['skipped'] == []
    grp = [g for g in rep['near_duplicates']['groups'] if any('dup_copy' in o for o in g['originals'])]
    assert len(grp) == 1 and not grp[0]['cross_split']
    # not overwritten by accident
    with pytest.raises(FileExistsError): prepare(src, out, size=96)


def test_bad_files_change_nothing(cxr_real, subset, tmp_path):
    src = copy_subset(cxr_real, subset, tmp_path/'src')
    a = prepare(src, tmp_path/'a', size=64, n_workers=2, seed=5)
    good = (cxr_real/subset.path.iloc[0]).read_bytes()
    bad = {'Normal/zero.jpg': b'', 'Normal/text.png': b'just text\n', 'COVID-19/cut.jpg': good[: len(good) // 3],
           'Pneumonia/bomb.png': None}
    b = io.BytesIO(); Image.open(cxr_real/subset.path.iloc[1]).save(b, 'PNG'); bomb = bytearray(b.getvalue())
    import struct, zlib
    bomb[16:24] = struct.pack('>II', 50000, 50000); bomb[29:33] = struct.pack('>I', zlib.crc32(bytes(bomb[12:29])))
    bad['Pneumonia/bomb.png'] = bytes(bomb)
    for p, content in bad.items(): (src/p).write_bytes(content)
    pd.concat([subset, pd.DataFrame(dict(path=list(bad), label=[p.split('/')[0] for p in bad]))]).to_csv(src/'manifest.csv', index=False)
    b_out = prepare(src, tmp_path/'b', size=64, n_workers=2, seed=5)
    assert (a/'manifest.csv').read_bytes() == (b_out/'manifest.csv').read_bytes()
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in (d/'images').rglob('*') if p.is_file()}
    assert files(a) == files(b_out)
    rep = json.loads((b_out/'report.json').read_text())
    reasons = {Path(s['path']).name: s['reason'] for s in rep['skipped']}
    assert set(reasons) == {'zero.jpg', 'text.png', 'cut.jpg', 'bomb.png'}
    assert 'empty' in reasons['zero.jpg'] and 'truncated' in reasons['cut.jpg'] and 'bomb' in reasons['bomb.png']
    assert json.loads((b_out/'prepare.json').read_text())['n_skipped'] == 4


def test_prepare_keeps_given_split_and_reports_cross_source_duplicates(cxr_real, cxr_train, tmp_path):
    tm = pd.read_csv(cxr_train/'manifest.csv', keep_default_na=False)
    rows = pd.concat([tm[tm.split == 'train'].groupby('label').head(3), tm[tm.split == 'valid'].groupby('label').head(2)])
    copy_subset(cxr_train, rows, tmp_path/'train')
    # the same films from cxr-real (other bytes, no split column): they must follow the given split
    rm = pd.read_csv(cxr_real/'manifest.csv', keep_default_na=False)
    rrows = rm[rm.path.isin(rows.path)].head(4)
    assert len(rrows) >= 2
    copy_subset(cxr_real, rrows, tmp_path/'real')
    out = prepare([tmp_path/'train', tmp_path/'real'], tmp_path/'prep', size=64, n_workers=1)
    df = read_dataset(out)
    t = df[df.input == str((tmp_path/'train').resolve())]
    assert dict(zip(t.source_path, t.split)) == dict(zip(rows.source_path, rows.split))
    r = df[df.input == str((tmp_path/'real').resolve())]
    assert dict(zip(r.source_path, r.split)) == dict(zip(rrows.source_path, rows.set_index('path').split[rrows.path]))
    rep = json.loads((out/'report.json').read_text())
    cross = [g for g in rep['near_duplicates']['groups'] if g['cross_input']]
    assert len(cross) == len(rrows) == rep['near_duplicates']['cross_input']
    assert {Path(o).name for g in cross for o in g['originals']} == {Path(p).name for p in rrows.path}
    assert not any(g['cross_split'] for g in cross)
    assert rep['straddling'] == []


def test_straddling_given_split_is_reported(cxr_train, tmp_path):
    tm = pd.read_csv(cxr_train/'manifest.csv', keep_default_na=False)
    pid = tm[tm.patient_id != ''].patient_id.value_counts().index[0]
    rows = tm[tm.patient_id == pid].copy()
    assert len(rows) >= 2
    rows['split'] = ['train'] + ['valid'] * (len(rows) - 1)
    copy_subset(cxr_train, rows, tmp_path/'src')
    out = prepare(tmp_path/'src', tmp_path/'prep', size=64, n_workers=1)
    df = read_dataset(out)
    assert set(df.split) == {'train', 'valid'}  # kept as given ...
    rep = json.loads((out/'report.json').read_text())
    assert len(rep['straddling']) == 1 and rep['straddling'][0]['patients'] == [pid]  # ... and reported


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


def test_split_groups_link_patients_and_duplicates():
    df = pd.DataFrame(dict(patient_id=['a', 'b', 'a', '', '', 'c'], label='Normal', split='', path=list('uvwxyz')))
    g = split_groups(df, pd.DataFrame(dict(i=[3, 1], j=[5, 4])))
    assert g[0] == g[2] and g[1] == g[4] and g[3] == g[5] and len(set(g)) == 3
    assert straddling(df.assign(split=['train', 'train', 'valid', 'train', 'train', 'train']), g)[0]['patients'] == ['a']
