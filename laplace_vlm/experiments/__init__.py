"""The experiments: the shared recipe, the demo, the benchmark and the active-learning sweep.

:mod:`laplace_vlm.experiments.recipe` is the entry point (data splits, the stand-in CLIP,
activations, the zero-shot posterior). Nothing is imported here, so that reusing the data and
the model does not load the experiments' evaluation code.
"""
