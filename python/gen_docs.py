"""Generates the Python API reference (HTML, with pdoc) from the package's docstrings.

    python gen_docs.py OUT_DIR

Fails when a public name of ``apar`` has no docstring.
"""

import inspect
import pathlib
import sys

import pdoc

import apar


def main() -> int:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    missing = [
        name
        for name in apar.__all__
        if (inspect.isclass(getattr(apar, name)) or callable(getattr(apar, name)))
        and not (getattr(apar, name).__doc__ or "").strip()
    ]
    if missing:
        print(f"no docstring: {', '.join(missing)}", file=sys.stderr)
        return 1
    pdoc.render.configure(docformat="google")
    pdoc.pdoc("apar", output_directory=out)
    print(f"API reference: {out / 'apar.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
