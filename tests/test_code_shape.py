"""The shape of the code, read from the whole repository: notebook order is dependency order, functions stay short.

Not a notebook check: it reads every notebook and every module of the package at once.
"""
import ast, json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES, MAX_PARAMS = 40, 8
# The few functions allowed past the limits, and why.
LONG_OK = {}
MANY_PARAMS_OK = {
    'train_model': 'the recipe entry point: every setting of a training run, as the paper states them',
    'crossval': 'the recipe entry point of leave-one-site-out: the training settings plus the folds',
    'run_retrain': 'the retraining entry point: the papermill parameters of a scheduled run',
    'prepare': 'every option of `cxr-covid prepare`',
    'evaluate_model': 'every option of `cxr-covid evaluate`',
    'make_dataloaders': "fastai's DataLoaders settings of the recipe, passed through from `train_model`",
    'score_archive': 'every option of `cxr-covid predict --out` (engine, cluster, actors, parts)',
}
IMPORT_RE = re.compile(r"from\s+cxr_covid_nbdev\.(\w+)\s+import|import\s+cxr_covid_nbdev\.(\w+)|from\s+\.(\w+)\s+import"
                       r"|import_module\(['\"]cxr_covid_nbdev\.(\w+)['\"]\)")


def _cells(nb: Path) -> list:
    return [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']


def _notebook_of_module() -> dict:
    "module name -> the numbered notebook that exports it (`#| default_exp`)"
    res = {}
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        for src in _cells(nb):
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', src, re.M)
            if m: res[m.group(1)] = nb.name
    return res


def test_no_notebook_imports_a_later_one():
    "Every notebook, code and checks alike, imports only from notebooks before it: read them in order and nothing is missing"
    home = _notebook_of_module()
    assert {'core', 'data', 'inference', 'train', 'cli'} <= set(home)
    later = []
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        for src in _cells(nb):
            for m in IMPORT_RE.finditer(src):
                mod = next(g for g in m.groups() if g)
                if mod in home and home[mod] > nb.name: later.append(f"{nb.name} imports {mod} from the later {home[mod]}")
    assert not later, later


def _functions():
    for f in sorted((ROOT/'cxr_covid_nbdev').glob('*.py')):
        if f.name.startswith('_'): continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ('self', 'cls')]
                # the body, from the docstring on: a docments signature spends one line per parameter
                yield f.stem, node.name, node.end_lineno - node.body[0].lineno + 1, len(params)


def test_functions_are_short_and_take_few_parameters():
    "No function body over 40 lines, no function over 8 parameters, apart from the exceptions named above"
    fns = list(_functions())
    assert len(fns) > 200
    long = [f"{m}.{n}: {k} lines" for m, n, k, _ in fns if k > MAX_LINES and n not in LONG_OK]
    many = [f"{m}.{n}: {p} parameters" for m, n, _, p in fns if p > MAX_PARAMS and n not in MANY_PARAMS_OK]
    assert not long, f"functions over {MAX_LINES} lines: {long}"
    assert not many, f"functions over {MAX_PARAMS} parameters: {many}"
    names = {n for _, n, _, _ in fns}
    assert set(LONG_OK) | set(MANY_PARAMS_OK) <= names, 'an exception names a function that no longer exists'
