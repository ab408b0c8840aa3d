"""The documentation site: its code blocks run, its API reference is complete, its preset tables
cover every preset.

Code blocks in ``docs/*.md`` run page by page, in order, in one namespace per page and in a temp
folder: every ```` ```python ```` block, the ``dkl ...`` lines of every ```` ```bash ```` block
(other lines, e.g. ``make`` or ``torchrun``, are left alone) and the ``$ dkl ...`` lines of every
```` ```console ```` block (the rest is output). A block with a file name as its title
(```` ```yaml title="my_run.yaml" ````) is written to that file instead; a block that includes a
file of the repository (``--8<-- "examples/x.py"``) is that file. Markers before a block:

- ``<!-- no-test: reason -->``: not run (GPU-only, CIFAR / ImageNet data, hours of training), but
  its Python must compile and its ``dkl train`` lines must name a preset and keys that exist
  (checked with ``dkl show``);
- ``<!-- fails: reason -->``: its ``dkl`` commands must fail with a one-line ``dkl: error: ...``
  (pages that show an error message);
- ``<!-- needs: module -->``: runs only where ``module`` (an optional extra) is installed;
- ``<!-- test-setup ... -->`` (a comment, not before a block) holds hidden Python that runs
  before the next block: tiny stand-ins for the models and loaders a snippet takes as given.

Trainings run shortened: every config the snippets load (``dkl train``, ``load_config``) gets
``train.epochs=1 train.max_steps_per_epoch=2`` (up to 3 epochs where the snippet sets them;
``train.iterations=4`` for iteration-based runs), so the pages read as a user would type them and
the whole file stays well under a minute.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

BLOCK = re.compile(
    r"(?:<!-- (?P<marker>no-test|fails|needs): (?P<reason>[^>]*?) -->\s*\n)?"
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$"
    r"|<!-- test-setup\n(?P<setup>.*?)^-->",
    flags=re.DOTALL | re.MULTILINE,
)
TITLE = re.compile(r'title="(?P<title>[^"]+)"')
#: a whole file of the repository included into a block (pymdownx.snippets)
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', flags=re.MULTILINE)
SHELLS = ("bash", "console")


@dataclass
class Block:
    lang: str
    code: str
    marker: str | None = None  # no-test, fails, needs
    reason: str | None = None
    title: str | None = None  # a block titled with a file name is that file's content


def _hooks():
    """docs/_hooks/dkl_docs.py, the MkDocs hook that generates the reference and preset tables."""
    name = "dkl_docs_hooks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS / "_hooks" / "dkl_docs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def blocks(page: Path) -> list[Block]:
    """The fenced blocks (also inside admonitions) and hidden setups of a page, in order."""
    out = []
    for m in BLOCK.finditer(page.read_text()):
        if m["setup"] is not None:
            out.append(Block("python", m["setup"]))
            continue
        code = textwrap.dedent(m["code"]) if m["indent"] else m["code"]
        code = SNIPPET.sub(lambda f: (ROOT / f["path"]).read_text(), code)  # what the site shows
        title = TITLE.search(m["info"])
        out.append(Block(m["lang"], code, m["marker"], m["reason"], title and title["title"]))
    return out


def commands(code: str, console: bool = False) -> list[list[str]]:
    """The ``dkl`` (or ``python -m dkl``) command lines of a bash block (of the ``$ `` lines of a
    console block), as argv."""
    text = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in text.splitlines():
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        argv = shlex.split(line, comments=True)
        if argv[:3] == ["python", "-m", "dkl"]:
            argv = argv[2:]
        if argv[:1] == ["dkl"]:
            out.append(argv[1:])
    return out


GUIDES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]  # the front page runs too


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temp folder, registries that forget what the snippets register, and the global random
    state and thread count as they were (the snippets train models)."""
    import torch

    from dkl import config, recipes
    from dkl.config import loader
    from dkl.data import datasets

    monkeypatch.setattr(recipes, "_RECIPES", dict(recipes._RECIPES))
    monkeypatch.setattr(loader, "_RECIPE_SECTIONS", dict(loader._RECIPE_SECTIONS))
    monkeypatch.setattr(datasets, "_REGISTRY", dict(datasets._REGISTRY))
    monkeypatch.setattr(config, "load_config", _shortened(config.load_config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # modules a page writes (my_data.py) import
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield tmp_path
    torch.set_num_threads(threads)


def _shortened(load_config):
    def load(ref, overrides=()):
        cfg = load_config(ref, overrides)
        if cfg.train.iterations:
            short = ["train.iterations=4", "train.eval_every=4"]
        else:  # epochs a snippet sets (e.g. to extend a run on resume) stay, up to 3
            asked = any(o.split("=")[0] in ("train.epochs", "epochs") for o in overrides)
            short = [f"train.epochs={min(cfg.train.epochs, 3) if asked else 1}"]
            short.append("train.max_steps_per_epoch=2")
        return load_config(ref, [*overrides, *short, "train.progress=false", "train.plot=false"])

    return load


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: p.name)
def test_code_blocks_run(page, isolated, capsys):
    from dkl.cli import main

    namespace = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for i, block in enumerate(blocks(page)):
        where = f"{page.name}, block {i + 1}"
        lang, code, marker = block.lang, block.code, block.marker
        if marker == "needs" and importlib.util.find_spec(block.reason) is None:
            continue  # an optional extra that is not installed here
        if block.title and lang not in ("bash", "console"):
            Path(block.title).write_text(code)  # a file the page's commands use
            continue
        if marker == "no-test":
            if lang == "python":
                compile(code, where, "exec")  # not run, but it must stay valid Python
            for argv in commands(code, console=lang == "console") if lang in SHELLS else []:
                if argv[0] == "train" and "$" not in "".join(argv):
                    # not run, but the preset and its keys must exist
                    args = [a for a in argv[1:] if not a.startswith("--")]
                    assert main(["show", *args]) == 0, f"{where}: dkl {shlex.join(argv)}"
                    capsys.readouterr()
            continue
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102
            continue
        for argv in commands(code, console=lang == "console") if lang in SHELLS else []:
            code_ = main(argv)
            out = capsys.readouterr()
            if marker == "fails":  # a page showing an error: the error must happen
                assert code_ != 0 and "dkl: error:" in out.err, f"{where}: dkl {shlex.join(argv)}"
            else:
                assert code_ == 0, f"{where}: dkl {shlex.join(argv)} -> {code_}\n{out.err[-2000:]}"


def test_markers_say_why():
    for page in GUIDES:
        for block in blocks(page):
            if block.marker is not None:
                assert block.reason.strip(), (
                    f"{page.name}: a {block.marker} marker without a reason"
                )


def test_docs_never_cite_the_internal_spec():
    for page in DOCS.rglob("*.md"):
        assert not re.search(r"\bSPEC\b", page.read_text()), page


# --------------------------------------------------------------------------------------------
# API reference
# --------------------------------------------------------------------------------------------

#: the modules whose public names the reference must list
REQUIRED = (
    "dkl",
    "dkl.config",
    "dkl.train",
    "dkl.data",
    "dkl.models",
    "dkl.recipes",
    "dkl.api",
    "dkl.llm",
    "dkl.integrations.transformers",
    "dkl.ops",
    "dkl.prior",
    "dkl.attacks",
    "dkl.robust",
    "dkl.ema",
    "dkl.awp",
)


def _reference_modules() -> set[str]:
    hooks = _hooks()
    found = set()
    for page in (DOCS / "reference").glob("*.md"):
        found |= {m["module"] for m in hooks.API_MARKER.finditer(page.read_text())}
    return found


def test_reference_lists_every_public_name():
    hooks = _hooks()
    documented = _reference_modules()
    missing = [m for m in REQUIRED if m not in documented]
    assert not missing, f"no API reference page lists {missing}"
    for name in sorted(documented):
        if (
            name == "dkl.integrations.transformers"
            and importlib.util.find_spec("transformers") is None
        ):
            continue
        module = importlib.import_module(name)
        # the hook reads __all__ from the source; it must be what Python sees
        assert hooks.public_names(name) == list(module.__all__), name
        text = hooks.api_markdown(name)
        for public in module.__all__:
            assert f"::: {name}.{public}\n" in text or f"{{ #{name}.{public} }}" in text, (
                f"{name}.{public} is not in the API reference"
            )


def test_reference_covers_dkl_all():
    import dkl

    text = _hooks().api_markdown("dkl")
    assert [n for n in dkl.__all__ if f"::: dkl.{n}\n" not in text] == []


# --------------------------------------------------------------------------------------------
# Preset tables
# --------------------------------------------------------------------------------------------


def test_preset_tables_cover_every_preset():
    from dkl.config import list_presets

    hooks = _hooks()
    pages = "".join(p.read_text() for p in GUIDES)
    for group in hooks.TABLES:
        assert f"<!-- presets: {group} -->" in pages, f"no page shows the {group} presets"
        text = hooks.presets_markdown(group)
        for name in list_presets(group):
            assert f"| `{name}` |" in text, name


def test_preset_table_reads_the_resolved_config():
    text = _hooks().presets_markdown("kd")
    row = next(r for r in text.splitlines() if "`kd/cifar100_resnet32x4_resnet8x4_ikl`" in r)
    # alpha 1, beta 8 (the authors' KD-dkl config), T = 4, T2 = 100 from the CIFAR-100 fragments
    assert "IKL(α 1, β 8), T = 4, T₂ = 100" in row and "240 ep · 64" in row


# --------------------------------------------------------------------------------------------
# The built site works offline and under a sub-path (docs/_hooks/check_site.py; `make docs`
# runs it on site/ after every build)
# --------------------------------------------------------------------------------------------


def _check_site():
    name = "dkl_docs_check_site"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS / "_hooks" / "check_site.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _tiny_site(root: Path, head: str = "", css: str = "") -> Path:
    """A two-page site with the bundled MathJax, as mkdocs lays it out."""
    mj = '<script src="{up}_static/mathjax/tex-chtml.js"></script>'
    page = '<html><head>{head}<link rel="stylesheet" href="{up}a.css"></head><body>{mj}'
    page += '<span class="arithmatex">\\(x\\)</span><a href="{up}guide/">g</a>'
    page += '<a href="https://example.org/">an outside page is fine</a></body></html>'
    (root / "guide").mkdir(parents=True)
    (root / "index.html").write_text(page.format(up="", head=head, mj=mj.format(up="")))
    (root / "guide" / "index.html").write_text(
        page.format(up="../", head="", mj=mj.format(up="../"))
    )
    fonts = root / "_static/mathjax/output/chtml/fonts/woff-v2"
    fonts.mkdir(parents=True)
    (fonts / "MathJax_Main-Regular.woff").write_bytes(b"w")
    (root / "_static/mathjax/tex-chtml.js").write_text("//")
    (root / "a.css").write_text(css or "body { color: red }")
    return root


def test_site_check_passes_a_self_contained_site(tmp_path):
    assert _check_site().check_site(_tiny_site(tmp_path / "s"), "https://h.org/dkl/") == []


@pytest.mark.parametrize(
    "head, css, expected",
    [
        ('<script src="https://cdn.example.net/mathjax.js"></script>', "", "from another host"),
        ('<script src="//cdn.example.net/x.js"></script>', "", "from another host"),
        (
            '<link rel="stylesheet" href="https://fonts.example.com/css?family=Roboto">',
            "",
            "from another host",
        ),
        ('<link rel="preconnect" href="https://fonts.example.com">', "", "from another host"),
        ('<style>@import "https://fonts.example.com/x.css";</style>', "", "from another host"),
        ("", "@font-face { src: url(https://fonts.example.com/r.woff2) }", "from another host"),
        ('<script src="missing.js"></script>', "", "names no file"),
        ('<link rel="icon" href="/assets/favicon.png">', "", "leaves the site mounted at /dkl/"),
    ],
)
def test_site_check_fails_on_external_or_broken_loads(tmp_path, head, css, expected):
    problems = _check_site().check_site(_tiny_site(tmp_path / "s", head, css), "https://h.org/dkl/")
    assert len(problems) == 1 and expected in problems[0], problems


def test_site_check_fails_without_the_bundled_mathjax(tmp_path):
    site = _tiny_site(tmp_path / "s")
    (site / "_static/mathjax/tex-chtml.js").unlink()
    problems = _check_site().check_site(site, "https://h.org/")
    assert any("MathJax is not bundled" in p for p in problems)
    assert any("does not load the bundled" in p or "names no file" in p for p in problems)


def test_the_404_page_of_a_sub_path_site_resolves(tmp_path):
    # the 404 page is served at any depth, so its links are absolute: from the site_url's path
    site = _tiny_site(tmp_path / "s")
    ok = '<html><head><link rel="stylesheet" href="/dkl/a.css"></head><a href="/dkl/guide/">g</a>'
    (site / "404.html").write_text(ok)
    assert _check_site().check_site(site, "https://h.org/dkl/") == []
    (site / "404.html").write_text(ok.replace("/dkl/", "/"))  # what a build without site_url makes
    assert len(_check_site().check_site(site, "https://h.org/dkl/")) == 2


def test_mkdocs_yml_loads_nothing_from_another_host():
    text = (ROOT / "mkdocs.yml").read_text()
    assert "font: false" in text  # Material would fetch its fonts from a font service
    assert not re.search(r"^\s*-\s*(https?:)?//", text, flags=re.MULTILINE), "a CDN script or style"
    site_url = _check_site().configured_site_url()
    assert re.match(r"https?://[^/]+/\w+/$", site_url), f"site_url {site_url!r} has no sub-path"


@pytest.mark.skipif(not (ROOT / "site" / "index.html").is_file(), reason="site/ not built")
def test_the_built_site_is_self_contained():  # after `make docs` (CI runs it before the tests)
    site_url = _check_site().configured_site_url()
    assert _check_site().check_site(ROOT / "site", site_url) == []


# --------------------------------------------------------------------------------------------
# "Reproduce the paper": the table at the top of each recipe page
# --------------------------------------------------------------------------------------------

RECIPE_PAGES = {
    "kd": "distillation.md",
    "adversarial": "adversarial.md",
    "semisup": "semi-supervised.md",
}
#: the presets each page's table must show: the ones behind the paper's numbers
HEADLINE = {
    "kd": ("cifar100_*_ikl", "imagenet_*_ikl"),
    "adversarial": ("cifar*_ikl_at", "cifar100_ikl_at_autoaug"),
    "semisup": ("cifar100_*",),
}
NUMBER = re.compile(r"\d+\.\d+")


def _reproduce_rows(group: str) -> list[list[str]]:
    """The cells of the rows of the page's "Reproduce the paper" table."""
    text = (DOCS / RECIPE_PAGES[group]).read_text()
    section = text.split("## Reproduce the paper", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    rows += [line for line in section.splitlines() if re.match(r"\| [^`|]+ \| `", line)]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def _preset_of(cells: list[str]) -> str:
    return next(re.fullmatch(r"`(\w+)`", c)[1] for c in cells if re.fullmatch(r"`\w+`", c))


def _numbers(text: str) -> set[float]:
    return {float(x) for x in NUMBER.findall(text)}


@pytest.mark.parametrize("group", list(RECIPE_PAGES))
def test_reproduce_table_names_every_headline_preset(group):
    import fnmatch

    from dkl.config import list_presets

    shown = {_preset_of(cells) for cells in _reproduce_rows(group)}
    presets = {name.split("/", 1)[1] for name in list_presets(group)}
    assert shown <= presets, (
        f"{RECIPE_PAGES[group]} names presets that do not exist: {shown - presets}"
    )
    wanted = {n for n in presets if any(fnmatch.fnmatch(n, p) for p in HEADLINE[group])}
    assert wanted <= shown, f"{RECIPE_PAGES[group]} misses {wanted - shown}"


def test_reproduce_table_baselines_are_the_presets_quotes():
    # the KD and DKD columns (the paper's tables) are the numbers the _kd / _dkd presets quote
    hooks = _hooks()
    for cells in _reproduce_rows("kd"):
        preset = _preset_of(cells)
        ikl, kd, dkd = (float(c.strip("*")) for c in cells[1:4])
        assert ikl > max(kd, dkd) - 1, preset  # the paper's IKL-KD is the row's headline
        for method, value in (("kd", kd), ("dkd", dkd)):
            quoted = " ".join(hooks.preset_comment(f"kd/{preset[: -len('ikl')]}{method}"))
            # within 0.01: the paper's Table 13 has DKD WRN-40-2 -> WRN-16-2 at 76.24, the
            # preset quotes mdistiller's 76.23
            assert any(abs(value - q) < 0.0101 for q in _numbers(quoted)), (preset, method, quoted)


@pytest.mark.parametrize("group", ["adversarial", "semisup"])
def test_reproduce_table_numbers_are_the_presets_quotes(group):
    hooks = _hooks()
    for cells in _reproduce_rows(group):
        preset = _preset_of(cells)
        quoted = _numbers(" ".join(hooks.preset_comment(f"{group}/{preset}")))
        column = cells[2]  # published (adversarial) / the preset file quotes (semisup)
        assert _numbers(column) <= quoted, (preset, column, quoted)


# --------------------------------------------------------------------------------------------
# One version everywhere; the citation; every name a guide imports is in the reference
# --------------------------------------------------------------------------------------------


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"$', text, flags=re.MULTILINE)[1]


def test_one_version_in_pyproject_changelog_and_citation():
    import yaml

    version = _pyproject_version()
    top = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)[1]
    assert top == version, f"CHANGELOG.md's top section is {top}, pyproject.toml says {version}"
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert str(cff["version"]) == version
    paper = cff["preferred-citation"]
    assert paper["title"] == "Decoupled Kullback-Leibler Divergence Loss" and paper["year"] == 2024
    assert [a["family-names"] for a in paper["authors"]][:2] == ["Cui", "Tian"]
    assert cff["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()


IMPORT = re.compile(r"^\s*from (dkl(?:\.\w+)*) import \(?([\w, \n]+?)\)?$", flags=re.MULTILINE)


def _documented() -> str:
    """Everything the API reference pages render: generated entries and explicit ``:::`` ones."""
    hooks = _hooks()
    pages = "".join(p.read_text() for p in (DOCS / "reference").glob("*.md"))
    return pages + "".join(hooks.api_markdown(m) for m in _reference_modules())


def test_every_name_a_guide_imports_is_in_the_reference():
    documented = _documented()
    missing = set()
    for page in [*GUIDES, *sorted((ROOT / "examples").rglob("*.py"))]:
        for module, names in IMPORT.findall(page.read_text()):
            for name in (n.strip() for n in names.replace("\n", ",").split(",")):
                path = f"{module}.{name}"
                file = ROOT / "src" / Path(*path.split("."))
                if not name or file.is_dir() or file.with_suffix(".py").is_file():
                    continue  # a module imported from its package
                if f"::: {path}\n" not in documented and f"{{ #{path} }}" not in documented:
                    missing.add(f"{path} ({page.name})")
    assert not missing, f"guides use names the API reference does not document: {sorted(missing)}"


#: pages that are not guides: they need no link into the API reference
NOT_GUIDES = {"changelog.md", "citation.md", "licence.md"}


def test_every_guide_links_into_the_api_reference():
    for page in sorted(DOCS.glob("*.md")):
        if page.name not in NOT_GUIDES:
            assert "](reference/" in page.read_text(), f"{page.name} never links to the reference"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
