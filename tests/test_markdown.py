"""Generated tables: the markdown equals the rows, and the README's tables equal the code now.

``test_readme_map_column_is_what_the_code_computes`` reads the README's generated table of each
shipped stand-in and recomputes its MAP column (accuracy, NLPD, ECE15 at every condition)
from the shipped model by hand, so a stale README number fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_seeds import row

from laplace_vlm.datasets import fashion_mnist as fm
from laplace_vlm.datasets.shifts import conditions
from laplace_vlm.evaluation import markdown as md
from laplace_vlm.experiments import recipe

README = Path(__file__).resolve().parents[1] / "README.md"


def rows_slice(with_se: bool):
    rng = np.random.default_rng(0)
    rows = []
    for condition, severity in (("clean", 0.0), ("noise", 0.5), ("noise", 1.0), ("blur", 1.0)):
        for method in ("map", "bayesvlm"):
            for metric in ("nlpd", "ece15"):
                one = row(method, condition, float(rng.uniform()), metric, severity)
                rows.append({**one, "se": float(rng.uniform()) / 10} if with_se else one)
    return rows


def parse_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header and label -> cells of the first markdown table in ``text``."""
    lines = []
    for line in text.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:  # the first table ended
            break
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]
    return header, {cells[0]: cells[1:] for cells in body}


@pytest.mark.parametrize("with_se", [False, True])
def test_method_table_equals_the_rows(with_se):
    rows = rows_slice(with_se)
    header, body = parse_table(md.method_table(rows, "calibration", ("nlpd", "ece15")))
    assert header == ["condition", "map", "bayesvlm"]
    assert list(body) == ["clean", "noise 1", "blur 1"]  # clean and severity 1 only
    for label, cells in body.items():
        condition = label.split()[0]
        for method, text in zip(header[1:], cells):
            expected = []
            for metric in ("nlpd", "ece15"):
                for r in rows:  # the loop the table must agree with
                    if (r["method"], r["metric"], r["condition"]) == (method, metric, condition):
                        if r["severity"] in (0.0, 1.0):
                            v = f"{r['value']:.3f}"
                            expected.append(v + (f" ± {r['se']:.3f}" if with_se else ""))
            assert text == " / ".join(expected)


def test_cells_and_bad_tables():
    assert md.cell(None) == "–"
    assert md.cell(0.12345) == "0.123"
    assert md.cell(0.12345, 0.0049) == "0.123 ± 0.005"
    assert md.markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"
    with pytest.raises(ValueError, match="body"):
        md.markdown_table(["a", "b"], [["1"]])


def expected_calibration(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, ...]:
    """Accuracy, NLPD and the 15-bin ECE written out in numpy."""
    probs = torch.softmax(logits.double(), -1).numpy()
    y = labels.numpy()
    conf, pred = probs.max(1), probs.argmax(1)
    nlpd = -np.log(probs[np.arange(len(y)), y]).mean()
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(
        abs((pred[bins == b] == y[bins == b]).mean() - conf[bins == b].mean()) * (bins == b).mean()
        for b in range(15)
        if (bins == b).any()
    )
    return float((pred == y).mean()), float(nlpd), float(ece)


def readme_section(dataset: str) -> str:
    text = README.read_text()
    start = text.index(f"#### {dataset}: the shipped stand-in")
    return text[start : text.index("<!-- end generated", start)]


@pytest.mark.parametrize(
    "dataset",
    [
        "digits",
        pytest.param(
            "fashion-mnist",
            marks=pytest.mark.skipif(not fm.available(), reason="Fashion-MNIST not installed"),
        ),
    ],
)
def test_readme_map_column_is_what_the_code_computes(dataset):
    section = readme_section(dataset)
    accuracy = float(re.search(r"clean MAP test accuracy ([0-9.]+)", section).group(1))
    header, body = parse_table(section)
    column = header.index("map") - 1
    model, tokenizer = recipe.load_clip(dataset)
    images, labels = recipe.load_splits(dataset)["test"]
    text = recipe.class_text_activations(model, tokenizer, dataset) @ model.text_projection
    text = torch.nn.functional.normalize(text, dim=-1)
    checked = 0
    with torch.no_grad():
        for condition, severity, shifted in conditions(images, 0):
            label = "clean" if condition == "clean" else f"{condition} {severity:g}"
            if label not in body:
                continue
            image = torch.nn.functional.normalize(model.encode_image(shifted), dim=-1)
            acc, nlpd, ece = expected_calibration(model.logit_scale.exp() * image @ text.T, labels)
            shown = [float(v) for v in body[label][column].split(" / ")]
            np.testing.assert_allclose(shown, [nlpd, ece], atol=5e-4 + 1e-6, err_msg=label)
            if condition == "clean":
                assert accuracy == pytest.approx(acc, abs=5e-4 + 1e-6)
            checked += 1
    assert checked == len(body) == 6
