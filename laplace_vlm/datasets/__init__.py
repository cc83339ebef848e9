"""The stand-in data sets: scikit-learn's digits, Fashion-MNIST, their prompts and the shifts.

Real images from packages (nothing is downloaded), as normalised `(N, 3, 32, 32)` tensors in
seeded splits (:mod:`.digits`, :mod:`.fashion_mnist`), the class names and templates of each
(:mod:`.prompts`), and the distribution shifts the experiments evaluate under (:mod:`.shifts`).
"""
