"""Drop duplicate <script> entries from each page (Sphinx 7.4 registers some inline scripts twice,
e.g. sphinx-book-theme's THEBE_JS_URL, which makes the browser report a redeclaration error)."""


def _dedup(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for js in context.get("script_files", []):
        key = (getattr(js, "filename", None) or "", tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _dedup, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
