"""Load MathJax on every page, not only on pages whose Markdown has math.

The results dashboard, the papers' landing pages and the notebooks' result tables carry their TeX inside
generated HTML (``flagcore.report.html_text``), which Sphinx does not see as math, so by default it would
leave MathJax off those pages and the reader would see raw ``\\(...\\)``."""


def setup(app):
    app.set_html_assets_policy("always")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
