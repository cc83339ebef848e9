"""The stand-in CLIPs: small open_clip models trained on the stand-in data sets, and their cache.

They stand in for a pretrained CLIP offline (:mod:`.training`, :mod:`.cache`); the experiments
load them through :func:`laplace_vlm.experiments.recipe.load_clip`.
"""
