"""The posterior forms side by side on a stand-in: relative embedding variance, NLPD, ECE.

For the symmetric form (the paper's, the class default) and laplace's exact-prior form, at
pseudo-counts 10 (the paper's) and 1000, with the marginal-likelihood prior at each: the
median relative image-embedding variance ``tr Cov[z] / ||z||^2`` and the default predictive's
(probit ProbCosine) NLPD and ECE on the clean test split; the released ViT-B/32 figure beside.

    python benchmarks/bench_posterior_forms.py [--dataset digits|fashion-mnist]
"""

from __future__ import annotations

import argparse

import torch

from laplace_vlm.evaluation.metrics import classification_metrics
from laplace_vlm.evaluation.pseudo_count import tune_prior_at
from laplace_vlm.evaluation.regime import REFERENCE_RELATIVE_VARIANCE, relative_variance
from laplace_vlm.experiments.experiment import ExperimentConfig, prepare
from laplace_vlm.experiments.methods import FORMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = prepare(ExperimentConfig(args.dataset, pseudo_counts=(10.0,)))
    test_x, test_y = exp.splits["test"]
    acts = exp.encode(test_x)
    print(f"{args.dataset} stand-in, clean test ({len(test_y)} images), probit ProbCosine")
    print(f"{'form':10s} {'n':>6s} {'median tr Cov[z]/|z|^2':>24s} {'NLPD':>7s} {'ECE15':>7s}")
    for form in FORMS:
        classifier = exp.classifiers[form]
        for n in (10.0, 1000.0):
            tune_prior_at(classifier.la, n)
            with torch.no_grad():
                probs = classifier.predict(acts).probs
            m = classification_metrics(probs, test_y)
            rel = relative_variance(classifier.la, acts)
            print(f"{form:10s} {n:6g} {rel:24.4f} {m['nlpd']:7.3f} {m['ece15']:7.3f}")
    with torch.no_grad():
        m = classification_metrics(exp.deterministic(acts)["map"].probs, test_y)
    print(f"{'MAP':10s} {'':6s} {'':24s} {m['nlpd']:7.3f} {m['ece15']:7.3f}")
    print(f"released ViT-B/32, symmetric, n = 10: {REFERENCE_RELATIVE_VARIANCE} (stored)")


if __name__ == "__main__":
    main()
