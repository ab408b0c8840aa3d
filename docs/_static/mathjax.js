// MathJax reads the \( \) and \[ \] spans that pymdownx.arithmatex (generic mode) writes. MathJax
// itself is bundled with the site (_static/mathjax/, copied from the `docs` extra at build time):
// formulas render offline and under any sub-path.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};
// Material's instant navigation (if turned on) swaps the page without reloading: typeset the new
// one. The first page is left to MathJax, which typesets it when it starts (clearing its cache
// there would drop the glyphs' CSS and leave blank formulas); if MathJax failed to load, the
// spans stay as TeX instead of an error on every page.
if (typeof document$ !== "undefined") {
  let first = true;
  document$.subscribe(() => {
    if (first) {
      first = false;
      return;
    }
    const mj = window.MathJax;
    if (!mj || typeof mj.typesetPromise !== "function" || !mj.startup || !mj.startup.output) return;
    mj.startup.output.clearCache();
    mj.typesetClear();
    mj.texReset();
    mj.typesetPromise().catch((err) => console.warn("MathJax:", err));
  });
}
