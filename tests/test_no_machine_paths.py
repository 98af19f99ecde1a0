"""No tracked file holds a path of the machine it was made on.

Run records, reports, notebooks and model folders store paths relative to the data root, the run
folder or the registry. This scans every tracked JSON, CSV and notebook file, and every
model folder's text files, for absolute filesystem paths (URLs and DOIs are not paths)."""
import re, subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r'(?<![\w.:/~-])(?:/(?:work|root|home|tmp|usr|opt|var|mnt|srv|Users|private|scratch|data)/[\w.-]+|[A-Z]:\\\\[\w.-]+)')


def tracked(*suffixes):
    out = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO/p for p in out if p.endswith(suffixes) and (REPO/p).is_file()]


def test_the_pattern_finds_machine_paths_and_spares_urls():
    for bad in ('"/work/main/.bundle/x"', "'/root/.pyenv/lib/python3.11'", 'see /home/ann/data.csv', '"C:\\\\Users\\\\x"'):
        assert ABSOLUTE.search(bad), bad
    for ok in ('https://doi.org/10.1101/2020.04.21.20063263', '../shared/data/cxr-train', 'COVID-19/cohen_1.jpg',
               'http://127.0.0.1:8866/voila/render/x', 'file:///usr/share/x'):
        assert not ABSOLUTE.search(ok), ok


def test_no_absolute_paths_in_tracked_records():
    files = tracked('.json', '.csv', '.ipynb') + [p for p in (REPO/'cxr_covid_nbdev'/'models').rglob('*')
                                                       if p.is_file() and p.suffix in ('.json', '.md')]
    assert len(files) > 20
    found = {str(f.relative_to(REPO)): m.group(0) for f in files for m in [ABSOLUTE.search(f.read_text(errors='replace'))] if m}
    assert not found, f"machine paths in tracked files: {found}"
