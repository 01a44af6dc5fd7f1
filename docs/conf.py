"""Sphinx configuration of the ktsft documentation.

Build (from the repository root, with the package installed)::

    pip install ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import ktsft

project = "ktsft"
author = "ktsft contributors"
copyright = "ktsft contributors"
version = ".".join(ktsft.__version__.split(".")[:2])
release = ktsft.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]

# No intersphinx: the docs build without network access.

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# ---- autodoc / autosummary -----------------------------------------------------------------
# Stubs go to docs/generated/ (git-ignored) and are rebuilt on every run.
autosummary_generate = True
autosummary_imported_members = False
autodoc_typehints = "none"  # numpydoc's Parameters sections state types, shapes and dtypes
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "inherited-members": False}

# ---- numpydoc ------------------------------------------------------------------------------
# Class pages get a table of their own methods from the autosummary template in
# _templates/autosummary/class.rst (autodoc documents every member), so numpydoc adds none.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# Every unresolved reference is a warning and, with -W, an error.
nitpicky = True
# Only for names outside this project that Sphinx cannot resolve without intersphinx; none are
# needed today (Python builtins resolve by themselves).
nitpick_ignore: list = []

# ---- HTML ----------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"ktsft {release}"
html_static_path = []
html_theme_options = {
    "description": "LoRA fine-tuning of Mixture-of-Experts layers on the CPU",
    "fixed_sidebar": True,
}
