"""Sphinx configuration of the ec-hooks documentation site.

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

# The packages are documented from this checkout, installed or not.
sys.path.insert(0, os.path.abspath(".."))

project = "ec-hooks"
author = "ec-hooks contributors"
copyright = "ec-hooks contributors"

import ec_hooks  # noqa: E402  (after the path is set)

release = ec_hooks.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: `#some-heading` links resolve to headings down to level 3.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# API reference: public import paths (``ec_hooks.TopK``), members in source order.
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False


def _drop_builtin_type_docstrings(app, what, name, obj, options, lines):
    """A tuple of names has no docstring of its own; autodoc would show ``tuple``'s instead."""
    doc = type(obj).__doc__ or ""
    if what == "data" and type(obj).__module__ == "builtins" and lines and doc.startswith(lines[0]):
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _drop_builtin_type_docstrings)


try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # the built-in theme, when only Sphinx is installed
    html_theme = "alabaster"
html_title = f"ec-hooks {release}"
