"""The offline demos: data, prompts, a small trained CLIP, the shared recipe and the experiments.

:mod:`laplace_vlm.demo.recipe` is the entry point (data splits, the trained CLIP, activations,
the zero-shot posterior). Nothing is imported here, so that reusing the data and the model
does not load the experiments' evaluation code.
"""
