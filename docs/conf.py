import dask_pconv

project = "dask_pconv"
author = "dask_pconv developers"
release = dask_pconv.__version__
# myst_parser: docs/benchmarks.md is Markdown (its tables are written by hand after each run)
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_parser"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
html_theme = "alabaster"
exclude_patterns = ["_build"]
nitpicky = False
