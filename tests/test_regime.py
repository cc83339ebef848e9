"""The regime card against its definitions computed independently (dense posterior, raw sums)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_dual_encoder_laplace import D, loader, make_problem

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.evaluation.pseudo_count import PosteriorSetting
from laplace_vlm.evaluation.regime import format_regime, posterior_card, reference_card

pytestmark = pytest.mark.usefixtures("float64")

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bayesvlm-clip-vit-b-32"


def test_posterior_card_against_the_fitted_pairs_and_the_dense_posterior():
    kw, a_i, a_t = make_problem(False, seed=4, n=24)
    la = DualEncoderLaplace(**kw)
    batches = loader(a_i, a_t)
    la.fit(batches)
    settings = {
        "paper": PosteriorSetting(10.0, torch.tensor([2.0, 3.0])),
        "wide": PosteriorSetting(0.5, torch.tensor([1.0, 1.0])),
    }
    card = posterior_card(la, a_i[:5], settings, in_batch_classes=8.0)
    assert card["curvature_pairs"] == 24 and card["embedding_dim"] == D
    assert card["logit_scale"] == pytest.approx(torch.tensor(0.7).exp().item())
    # sum a a^T over the pairs, by a loop over the raw activations
    assert card["trace_A_per_pair"]["image"] == pytest.approx(a_i.square().sum().item() / 24)
    assert card["trace_A_per_pair"]["text"] == pytest.approx(a_t.square().sum().item() / 24)
    # laplace's Kron scaling holds sum B as the output factor
    assert card["trace_B_per_pair"]["image"] == pytest.approx(
        la.H_facs.kfacs[0][0].trace().item() / 24
    )
    # the relative variance from the symmetric posterior written out densely
    sums, N, W = la.factor_sums(), 24.0, kw["image_projection"].weight.detach()
    for name, setting in settings.items():
        n, lam = setting.pseudo_count, setting.prior_precision[0]
        eye = lambda k: torch.eye(k, dtype=torch.float64)  # noqa: E731
        S_B = torch.linalg.inv(n**0.5 * sums.B_image / N**0.5 + lam**0.5 * eye(D))
        S_A = torch.linalg.inv(n**0.5 * sums.A_image / N**0.5 + lam**0.5 * eye(len(sums.A_image)))
        a = a_i[:5]
        tr_cov = torch.einsum("nd,de,ne->n", a, S_A, a) * S_B.trace()
        rel = (tr_cov / (a @ W.T).square().sum(-1)).median().item()
        assert card["relative_variance"][name] == pytest.approx(rel, rel=1e-10), name
    assert "tr B per pair, image head" in format_regime(
        {"stand_in": card, "vit_b_32": reference_card(None), "map_temperature": 1.0}
    )


def test_reference_card_reads_the_released_factors_or_states_its_stored_figures(tmp_path):
    stored = reference_card(tmp_path)  # no files here
    assert stored["source"] == "stored"
    # the released README's trace of B_img, 6128.3, is a sum over 327,680 pairs / sqrt(N)
    assert stored["trace_B_per_pair"]["image"] == pytest.approx(6128.3 / 327_680**0.5)
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} not found")
    files = reference_card(REFERENCE)
    assert files["source"] == "files"
    B_img = torch.load(REFERENCE / "B_img_analytic.pt", map_location="cpu", weights_only=True)
    assert files["trace_B_per_pair"]["image"] == pytest.approx(
        B_img.double().trace().item() / 327_680**0.5, rel=1e-9
    )
    for key in ("trace_A_per_pair", "trace_B_per_pair"):  # the stored figures are those files'
        for head in ("image", "text"):
            assert stored[key][head] == pytest.approx(files[key][head], rel=1e-4)
