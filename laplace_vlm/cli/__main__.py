"""``python -m laplace_vlm.cli``: the command line, as ``torchrun -m laplace_vlm.cli`` starts it."""

from laplace_vlm.cli.main import main

if __name__ == "__main__":  # importing the module (docs, numpydoc) must not run the command
    raise SystemExit(main())
