"""Logit moments under the heads posterior (glm, ProbCosine), links, and uncertainty measures."""
