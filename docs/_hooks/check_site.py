"""Checks a built documentation site (``site/``) for what a reader without internet, or on a
server that mounts it under a sub-path, would see break.

- No page, stylesheet or inline style fetches a script, a stylesheet, a font or an image from
  another host (``http://``, ``https://`` or ``//``): everything the pages load ships with them.
- Every local reference (``src``, ``href`` of links and anchors, CSS ``url()``) resolves to a file
  of the site when the site is mounted at the path of its ``site_url`` (``/dkl/`` by default):
  relative links from any page, and the absolute ones of the 404 page.
- Pages with formulas load the bundled MathJax, and its CHTML fonts are there.

``make docs`` runs it after ``mkdocs build --strict``:
``python docs/_hooks/check_site.py site`` (exit 1 and one line per problem if any).
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

ROOT = Path(__file__).resolve().parents[2]
MATHJAX = "_static/mathjax/tex-chtml.js"
FONTS = "_static/mathjax/output/chtml/fonts/woff-v2"

#: ``<link rel=...>`` values that make the browser fetch the ``href``
FETCHING_RELS = {
    "stylesheet",
    "icon",
    "shortcut",
    "apple-touch-icon",
    "preload",
    "modulepreload",
    "prefetch",
    "preconnect",
    "dns-prefetch",
    "manifest",
}
#: ``<link rel=...>`` values that only name a URL (never fetched)
NAMING_RELS = {"canonical", "alternate", "next", "prev", "author", "license", "search"}
SRC_TAGS = {"script", "img", "iframe", "source", "audio", "video", "embed", "track", "input"}
CSS_URL = re.compile(
    r"""url\(\s*['"]?(?P<url>[^'")\s]+)['"]?\s*\)|@import\s+['"](?P<imp>[^'"]+)['"]"""
)


def is_external(url: str) -> bool:
    scheme = urlsplit(url).scheme
    return url.startswith("//") or scheme in ("http", "https", "ftp", "ws", "wss")


def is_local_reference(url: str) -> bool:
    """A URL that names a file of the site (not a fragment, data:, mailto:, javascript:...)."""
    return (
        bool(url) and not url.startswith("#") and not urlsplit(url).scheme and not is_external(url)
    )


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fetched: list[tuple[str, str]] = []  # (what, url) that the browser loads
        self.linked: list[str] = []  # anchors and naming links: must resolve, may be external
        self.styles: list[str] = []  # inline CSS
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if a.get("style"):
            self.styles.append(a["style"])
        if tag == "style":
            self._in_style = True
        if tag in SRC_TAGS and a.get("src"):
            self.fetched.append((f"<{tag} src>", a["src"]))
        if tag == "link" and a.get("href"):
            rels = set(a.get("rel", "").lower().split())
            if rels & FETCHING_RELS or not rels & NAMING_RELS:
                self.fetched.append((f"<link rel={a.get('rel', '')}>", a["href"]))
            elif not rels & {"canonical", "alternate"}:  # these name the published address
                self.linked.append(a["href"])
        if tag == "a" and a.get("href"):
            self.linked.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def _css_urls(css: str) -> list[str]:
    return [m["url"] or m["imp"] for m in CSS_URL.finditer(css)]


def _resolve(site: Path, base_path: str, page_url: str, ref: str) -> Path | None:
    """The file ``ref`` names from the page at ``page_url`` (a path under the mount point), or
    None when it points outside the site's mount point."""
    path = urlsplit(urljoin(page_url, ref)).path
    if not path.startswith(base_path):
        return None
    rel = path[len(base_path) :]
    target = site / rel
    return target / "index.html" if path.endswith("/") or target.is_dir() else target


def check_site(site: Path, site_url: str) -> list[str]:
    """Every problem found, one line each; an empty list when the site is fine."""
    site = Path(site)
    base_path = urlsplit(site_url).path or "/"
    base_path = base_path if base_path.endswith("/") else base_path + "/"
    problems: list[str] = []
    if not (site / "index.html").is_file():
        return [f"{site}: no index.html; build the site first (mkdocs build)"]

    def local(where: str, page_url: str, ref: str) -> None:
        if _resolve(site, base_path, page_url, ref) is None:
            problems.append(f"{where}: {ref!r} leaves the site mounted at {base_path}")
        elif not _resolve(site, base_path, page_url, ref).is_file():
            problems.append(f"{where}: {ref!r} names no file of the site")

    for html in sorted(site.rglob("*.html")):
        rel = html.relative_to(site).as_posix()
        page_url = base_path + rel.removesuffix("index.html")
        parser = _Refs()
        text = html.read_text(encoding="utf-8")
        parser.feed(text)
        for what, url in parser.fetched:
            if is_external(url):
                problems.append(f"{rel}: {what} loads {url} from another host")
            elif is_local_reference(url):
                local(f"{rel}: {what}", page_url, url)
        for url in parser.linked:
            if is_local_reference(url):
                local(f"{rel}: link", page_url, url)
        for css in parser.styles:
            for url in _css_urls(css):
                if is_external(url):
                    problems.append(f"{rel}: inline style loads {url} from another host")
        if 'class="arithmatex"' in text:
            scripts = [
                _resolve(site, base_path, page_url, u)
                for w, u in parser.fetched
                if w == "<script src>" and is_local_reference(u)
            ]
            if site / MATHJAX not in scripts:
                problems.append(f"{rel}: has formulas but does not load the bundled {MATHJAX}")
    for css in sorted(site.rglob("*.css")):
        rel = css.relative_to(site).as_posix()
        css_url = base_path + rel
        for url in _css_urls(css.read_text(encoding="utf-8", errors="replace")):
            if is_external(url):
                problems.append(f"{rel}: loads {url} from another host")
            elif is_local_reference(url):
                local(rel, css_url, url)
    if not (site / MATHJAX).is_file():
        problems.append(f"{MATHJAX} is missing: MathJax is not bundled with the site")
    elif not list((site / FONTS).glob("*.woff")):
        problems.append(f"{FONTS}/ has no fonts: formulas would render in fallback fonts")
    return problems


def configured_site_url(config: Path = ROOT / "mkdocs.yml") -> str:
    """``site_url`` of mkdocs.yml, with its ``!ENV`` default or override applied."""
    from mkdocs.utils.yaml import yaml_load

    with open(config, encoding="utf-8") as f:
        return yaml_load(f).get("site_url") or "/"


def main(argv: list[str]) -> int:
    site = Path(argv[0]) if argv else ROOT / "site"
    site_url = argv[1] if len(argv) > 1 else configured_site_url()
    problems = check_site(site, site_url)
    for line in problems:
        print(f"check_site: {line}", file=sys.stderr)
    if problems:
        print(f"check_site: {len(problems)} problem(s) in {site}", file=sys.stderr)
        return 1
    pages = len(list(site.rglob("*.html")))
    print(f"check_site: {pages} pages load nothing from another host; links resolve under "
          f"{urlsplit(site_url).path or '/'}; MathJax bundled")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
