"""MkDocs hook: the parts of the pages that are generated from the code at build time.

- ``<!-- api: dkl.data -->`` becomes the module's docstring and one mkdocstrings entry per name
  in its ``__all__``: the API reference cannot miss a public name.
- ``<!-- presets: kd -->`` becomes the tables of the bundled presets of one group, read from the
  preset YAMLs (resolved with ``_base_``), so the hyper-parameters shown are the ones that run.
- ``<!-- cli -->`` becomes the help of ``dkl`` and of each of its subcommands.
- ``<!-- results: benchmarks/results -->`` becomes the measured reports committed there.
- MathJax (from the ``docs`` extra's ``django-static-mathjax``) is copied into ``_static/mathjax/``
  so formulas render without internet; ``check_site.py`` checks the built site for that.

``tests/test_docs.py`` imports this file too (it needs no MkDocs).
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

API_MARKER = re.compile(r"^<!-- api: (?P<module>[\w.]+) -->$", flags=re.MULTILINE)
PRESETS_MARKER = re.compile(r"^<!-- presets: (?P<group>\w+) -->$", flags=re.MULTILINE)
CLI_MARKER = re.compile(r"^<!-- cli -->$", flags=re.MULTILINE)
RESULTS_MARKER = re.compile(r"^<!-- results: (?P<folder>[\w/.-]+) -->$", flags=re.MULTILINE)


# --------------------------------------------------------------------------------------------
# API reference
# --------------------------------------------------------------------------------------------


def module_file(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def public_names(module: str) -> list[str]:
    """The module's ``__all__``, read from its source (no import: no torch needed)."""
    tree = ast.parse(module_file(module).read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{module} has no __all__: the API reference lists a module's __all__")


def defined_names(module: str) -> set[str]:
    """Names the module's source binds at top level (what static analysis can document)."""
    names: set[str] = set()
    for node in ast.parse(module_file(module).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


#: names a module builds on first access (its ``__getattr__``): described here instead
LAZY = {
    "dkl.integrations.transformers.DistillationTrainer": (
        "`with_distillation(transformers.Trainer)`: Hugging Face's `Trainer` with the loss step "
        "of `DistillationMixin`. It is built on first access, so importing "
        "`dkl.integrations.transformers` does not import transformers."
    ),
}


#: the names a reader looks for first, in that order; the rest of ``__all__`` follows as written
IMPORTANCE: dict[str, tuple[str, ...]] = {
    "dkl": (
        "ikl_loss",
        "IKLLoss",
        "kl_loss",
        "KLLoss",
        "dkl_loss",
        "DKLLoss",
        "gkl_loss",
        "GKLLoss",
        "ClassPrior",
    ),
    "dkl.api": ("train", "make_trainer", "load_run"),
    "dkl.config": ("load_config", "Config", "list_presets", "ConfigError"),
    "dkl.train": ("Task", "Trainer", "StepContext", "RunContext"),
    "dkl.models": ("create_model", "load_weights", "register_model", "list_models"),
    "dkl.data": ("build_datasets", "register_dataset", "DataInfo", "DataRequest", "list_datasets"),
    "dkl.llm": (
        "fused_linear_ikl",
        "fused_linear_kl",
        "FusedLinearIKLLoss",
        "topk_ikl_loss",
        "topk_kl_loss",
        "topk_logprobs",
        "TopKCache",
    ),
    "dkl.integrations.transformers": (
        "DistillationTrainer",
        "DistillationArguments",
        "with_distillation",
        "DistillationMixin",
    ),
    "dkl.recipes": ("register_recipe", "get_recipe", "list_recipes"),
}


def ordered_names(module: str) -> list[str]:
    """The module's ``__all__``, the most used names first (:data:`IMPORTANCE`)."""
    names = public_names(module)
    first = [n for n in IMPORTANCE.get(module, ()) if n in names]
    return first + [n for n in names if n not in first]


def api_markdown(module: str) -> str:
    """The module docstring, then one heading per public name, the most used first."""
    parts = [f"::: {module}\n    options:\n      members: false\n      show_root_heading: false\n"]
    defined = defined_names(module)
    for name in ordered_names(module):
        path = f"{module}.{name}"
        if name in defined:
            parts.append(f"::: {path}\n")
        else:  # built at run time: no source to read
            text = LAZY.get(path, "Built on first access (the module's `__getattr__`).")
            parts.append(f"## `{name}` {{ #{path} }}\n\n{text}\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Preset tables
# --------------------------------------------------------------------------------------------

DASH = "–"


def _get(cfg: dict, key: str):
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _num(x) -> str:
    if isinstance(x, bool) or x is None:
        return DASH if x is None else ("on" if x else "off")
    if isinstance(x, float):
        if abs(x - 8 / 255) < 1e-12:
            return "8/255"
        if 0 < abs(x) < 1e-3:
            return f"{x:.0e}".replace("e-0", "e-")
        return f"{x:g}"
    return str(x)


def _lr(cfg: dict) -> str:
    o, s = cfg["optim"], cfg["sched"]
    sched = s["name"]
    if sched == "multistep":
        sched = f"×{s['gamma']:g} at {', '.join(str(m) for m in s['milestones'])}"
    elif sched == "usb_cosine":
        sched = f"warm-up {s['warmup']:g} + cosine"
    wd = f", wd {_num(o['weight_decay'])}" if o["weight_decay"] else ""
    return f"{o['name']} {_num(o['lr'])}{wd}, {sched}"


def _length(cfg: dict) -> str:
    t = cfg["train"]
    if t["iterations"]:
        return f"{t['iterations']:,} it"
    return f"{t['epochs']} ep"


# --- knowledge distillation
def _kd_pair(cfg: dict) -> str:
    teacher = _get(cfg, "distill.teacher.name") or DASH
    return f"{teacher} → {cfg['model']['name']}" if teacher != DASH else cfg["model"]["name"]


def _kd_loss(cfg: dict) -> str:
    d = cfg["distill"]
    ce, t, m = _num(d["ce_weight"]), _num(d["temperature"]), d["method"]
    if m == "ce":
        return "CE"
    if m == "kd":
        return f"{ce}·CE + {_num(d['kd_weight'])}·T²·KL, T = {t}"
    if m == "dkd":
        return f"{ce}·CE + DKD(α {_num(d['alpha'])}, β {_num(d['beta'])}), T = {t}"
    weights = "GI prior" if d["gi"] else f"T₂ = {_num(d['weight_temperature'])}"
    gamma = f", γ {_num(d['gamma'])}" if m == "gkl" else ""
    return f"{ce}·CE + {m.upper()}(α {_num(d['alpha'])}, β {_num(d['beta'])}{gamma}), T = {t}, {weights}"


def _warmup(cfg: dict) -> str:
    d = cfg["distill"]
    return _num(d["warmup"]) if d["method"] in ("dkd", "ikl", "gkl") else DASH


# --- adversarial training
def _adv_loss(cfg: dict) -> str:
    a = cfg["adversarial"]
    m = a["method"]
    if m == "standard":
        return "CE on clean inputs"
    if m == "pgd_at":
        return "CE on adversarial inputs"
    if m == "trades":
        return f"CE + {_num(a['trades_beta'])}·KL"
    gamma = f", γ {_num(a['gamma'])}" if m == "gkl_at" else ""
    view = f"; + {a['aug_view']} view ×{_num(a['aug_weight'])}" if a["aug_view"] else ""
    return (
        f"CE + {m[:3].upper()}(α {_num(a['alpha'])}, β {_num(a['beta'])}{gamma}), "
        f"prior T {_num(a['prior_temperature'])}{view}"
    )


def _attack(cfg: dict) -> str:
    a = cfg["adversarial"]
    if a["method"] == "standard":
        return DASH
    at = a["attack"]
    loss = at["loss"] or {"ikl_at": "ikl", "gkl_at": "gkl", "trades": "kl", "pgd_at": "ce"}.get(
        a["method"], "?"
    )
    if loss == "ikl":
        loss = f"ikl (α {_num(at['alpha'])}, β {_num(at['beta'])})"
    eps = _num(at["eps"]) + (" fixed" if at["fixed_eps"] else " ramped")
    step = f", step {_num(at['step_size'])}" if at["step_size"] else ""
    return f"{loss}, {at['budget']}, ε {eps}{step}"


def _awp_ema(cfg: dict) -> str:
    a = cfg["adversarial"]
    awp = (
        f"AWP {_num(a['awp']['gamma'])} from {a['awp']['start_epoch']}"
        if a["awp"]["gamma"]
        else "no AWP"
    )
    ema = f"EMA {_num(a['ema']['tau'])}" if a["ema"]["tau"] else "no EMA"
    return f"{awp}; {ema}"


# --- semi-supervised learning
def _ssl_loss(cfg: dict) -> str:
    s = cfg["semisup"]
    m = s["method"]
    if m == "supervised":
        return "CE on the labeled images"
    mask = f"mask ≥ {_num(s['threshold'])}, λ_u {_num(s['lambda_u'])}"
    if m == "fixmatch":
        label = "hard" if s["hard_label"] else f"soft, T {_num(s['pl_temperature'])}"
        return f"CE on pseudo-labels ({label}); {mask}"
    if m == "meanteacher":
        return f"MSE of probabilities vs EMA {_num(s['ema_momentum'])}; {mask}"
    ikl = (
        f"IKL(α {_num(s['alpha'])}, β {_num(s['beta'])}, T {_num(s['temperature'])}, "
        f"T₂ {_num(s['weight_temperature'])})"
    )
    teacher = f" vs EMA {_num(s['ema_momentum'])}" if m == "meanteacher_ikl" else ""
    return f"{ikl}{teacher}; {mask}"


def _labels(cfg: dict) -> str:
    s = cfg["semisup"]
    return f"{cfg['data']['name']}, {s['num_labels_per_class']}/class"


Column = tuple[str, Callable[[dict], str]]


@dataclass(frozen=True)
class Table:
    title: str
    patterns: tuple[str, ...]
    columns: tuple[Column, ...]


_PRESET = ("preset", None)  # filled per row
_KD_COLUMNS: tuple[Column, ...] = (
    ("teacher → student", _kd_pair),
    ("method", lambda c: c["distill"]["method"]),
    ("loss", _kd_loss),
    ("warm-up", _warmup),
    ("lr", _lr),
    ("length · batch", lambda c: f"{_length(c)} · {c['data']['batch_size']}"),
)
_ADV_COLUMNS: tuple[Column, ...] = (
    ("data · model", lambda c: f"{c['data']['name']} · {c['model']['name']}"),
    ("loss", _adv_loss),
    ("training attack", _attack),
    ("AWP · EMA", _awp_ema),
    ("lr", _lr),
    ("length · batch", lambda c: f"{_length(c)} · {c['data']['batch_size']}"),
)
_SSL_COLUMNS: tuple[Column, ...] = (
    ("data · labels", _labels),
    ("model", lambda c: c["model"]["name"]),
    ("unlabeled loss", _ssl_loss),
    ("lr", _lr),
    (
        "length · batch",
        lambda c: (
            f"{_length(c)} · {c['data']['batch_size']} + "
            f"{c['data']['batch_size'] * c['semisup']['uratio']}"
        ),
    ),
)

TABLES: dict[str, tuple[Table, ...]] = {
    "kd": (
        Table("CIFAR-100", ("kd/cifar100_*",), _KD_COLUMNS),
        Table("ImageNet", ("kd/imagenet_*",), _KD_COLUMNS),
        Table("Digits (CPU, the demo)", ("kd/digits_*",), _KD_COLUMNS),
        Table("Other", ("kd/*",), _KD_COLUMNS),
    ),
    "adversarial": (
        Table(
            "IKL-AT and GKL-AT on CIFAR",
            ("adversarial/cifar*_ikl_at*", "adversarial/cifar*_gkl_at*"),
            _ADV_COLUMNS,
        ),
        Table("Baselines on CIFAR", ("adversarial/cifar*",), _ADV_COLUMNS),
        Table("Digits (CPU, the demo)", ("adversarial/digits_*",), _ADV_COLUMNS),
        Table("Other", ("adversarial/*",), _ADV_COLUMNS),
    ),
    "semisup": (
        Table("CIFAR-100, 200 labels", ("semisup/cifar100_*",), _SSL_COLUMNS),
        Table("Digits (CPU, the demo)", ("semisup/digits_*",), _SSL_COLUMNS),
        Table("Other", ("semisup/*",), _SSL_COLUMNS),
    ),
}


def preset_comment(name: str) -> list[str]:
    """The lines of the preset's leading comment block."""
    from dkl.config import PRESET_DIR

    lines: list[str] = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def _summary_lines(lines: list[str]) -> int:
    """How many lines the first statement takes: up to a full stop, or a title line (one that
    ends in a word and is followed by a capital, a file name or a path)."""
    for i, line in enumerate(lines[:-1]):
        nxt = lines[i + 1].split(" ")[0]
        if (
            line.endswith(".")
            or (line[-1:].isalnum() or line.endswith(")"))
            and (nxt[:1].isupper() or any(c in nxt for c in "_/"))
        ):
            return i + 1
    return len(lines)


def preset_notes(name: str) -> str:
    """What the preset is, in one statement, and the sentences of its comment that quote
    published numbers."""
    lines = preset_comment(name)
    n = _summary_lines(lines)
    head = " ".join(lines[:n])
    first = re.split(r"(?<=\.)\s+(?=[A-Z])", head)[0]
    rest = " ".join(lines)[len(first) :]
    later = [s.strip() for s in re.split(r"(?<=\.)\s+(?=[A-Z])", rest) if "ublished" in s]
    if not later:
        return first or DASH
    return " ".join([first if first.endswith(".") else first + ".", *later])


def table_rows(group: str) -> dict[Table, list[str]]:
    """Each bundled preset of ``group`` in the first table whose pattern it matches."""
    from dkl.config import list_presets

    rows: dict[Table, list[str]] = {t: [] for t in TABLES[group]}
    for name in list_presets(group):
        table = next(t for t in TABLES[group] if any(fnmatch.fnmatch(name, p) for p in t.patterns))
        rows[table].append(name)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def presets_markdown(group: str) -> str:
    """One collapsed block per table (Material's ``???``): the reproduction table at the top of
    each recipe page carries the published numbers, these the full hyper-parameters."""
    from dkl.config import config_to_dict, load_config

    out = []
    for table, names in table_rows(group).items():
        if not names:
            continue
        heads = ["preset", *(h for h, _ in table.columns), "what it is · published"]
        n = f"{len(names)} preset{'s' if len(names) > 1 else ''}"
        out += [f'??? info "{table.title}: {n}, every hyper-parameter"', ""]
        rows = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for name in names:
            cfg = config_to_dict(load_config(name))
            cells = [f"`{name}`", *(_cell(f(cfg)) for _, f in table.columns)]
            cells.append(_cell(preset_notes(name)))
            rows.append("| " + " | ".join(cells) + " |")
        out += [f"    {row}" for row in rows]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def cli_markdown() -> str:
    """``dkl --help`` and the help of every subcommand, as argparse prints them."""
    import argparse
    import os

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width: fix it
    from dkl.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["```text", parser.format_help().rstrip(), "```", ""]
    for name, p in sub.choices.items():
        out += [f"## `dkl {name}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Measured results committed to the repository
# --------------------------------------------------------------------------------------------


def results_markdown(folder: str) -> str:
    """Every Markdown report under ``folder`` (relative to the repository), each in a collapsed
    block titled with its file name and its first heading; the report's headings become bold
    lines (they stay out of the page's table of contents)."""
    files = sorted((ROOT / folder).glob("*.md")) if (ROOT / folder).is_dir() else []
    if not files:
        return f"*No report in `{folder}/` yet.*\n"
    out = []
    for path in files:
        text = path.read_text().strip()
        first = re.search(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)
        title = f"{folder}/{path.name}" + (f": {first[1]}" if first else "")
        text = re.sub(r"^#{1,6} (.+)$", r"**\1**", text, flags=re.MULTILINE)
        body = "\n".join(f"    {line}" if line.strip() else "" for line in text.splitlines())
        out += [f'??? note "{title.replace(chr(34), chr(39))}"', "", body, ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# MathJax, bundled with the site
# --------------------------------------------------------------------------------------------

MATHJAX_DIR = "_static/mathjax"
#: the parts of MathJax's es5 build that a page typeset by tex-chtml.js loads: the combined
#: component, the TeX extensions it loads on demand, the CHTML fonts, and the menu's lazy parts
MATHJAX_PARTS = ("tex-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y")


def mathjax_es5() -> Path:
    """MathJax 3's ``es5`` folder, as the ``django-static-mathjax`` package (``docs`` extra)
    ships it."""
    spec = importlib.util.find_spec("mathjax")
    es5 = Path(spec.origin).parent / "static" / "mathjax" / "es5" if spec and spec.origin else None
    if es5 is None or not (es5 / "tex-chtml.js").is_file():
        raise RuntimeError(
            "the site bundles MathJax from the package django-static-mathjax, which is not "
            "installed (or has no static/mathjax/es5/tex-chtml.js): pip install -e '.[docs]'"
        )
    return es5


def mathjax_files() -> list[tuple[str, Path]]:
    """``(path in the site, file on disk)`` for every MathJax file the site ships."""
    es5 = mathjax_es5()
    out = []
    for part in MATHJAX_PARTS:
        found = [es5 / part] if (es5 / part).is_file() else sorted((es5 / part).rglob("*"))
        out += [(f"{MATHJAX_DIR}/{f.relative_to(es5).as_posix()}", f) for f in found if f.is_file()]
    return out


# --------------------------------------------------------------------------------------------
# MkDocs events
# --------------------------------------------------------------------------------------------


def expand(markdown: str) -> str:
    markdown = API_MARKER.sub(lambda m: api_markdown(m["module"]), markdown)
    markdown = PRESETS_MARKER.sub(lambda m: presets_markdown(m["group"]), markdown)
    markdown = CLI_MARKER.sub(lambda m: cli_markdown(), markdown)
    return RESULTS_MARKER.sub(lambda m: results_markdown(m["folder"]), markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return expand(markdown)


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for uri, path in mathjax_files():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
