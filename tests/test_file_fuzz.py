"""Mutated posterior files (hypothesis): every load gives the saved posterior or a clear error.

One small fitted SigLIP posterior (heads with bias, logit bias) is saved once; each example
changes its file and loads it. Four families of change:

- raw bytes: flips anywhere, truncation, appended bytes;
- the safetensors header, re-serialised: a tensor's dtype, shape or offsets, a metadata entry
  replaced or deleted, one entry of the state JSON replaced;
- a re-signed state (a writer with a bug: the checksum is valid): a tensor cast, reshaped or
  sliced, an entry replaced by another JSON value;
- no change at all (the control: it must load).

Property: ``DualEncoderLaplace.load`` either returns a posterior whose ``state_dict`` equals the
one in the file bit for bit (for the first two families, the original one) or raises a
``ValueError`` whose message names the file. Any other exception type fails the test.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_dual_encoder_laplace import loader, make_problem

from laplace_vlm import DualEncoderLaplace
from laplace_vlm.io.posterior_file import read_state, save_state

CASES = 120  # per family: 360 mutated files and the controls, about 5 s on one core
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
OPTIONAL = {"curvature", "joint_bias"}  # absent from 0.1 files; defaults apply
DTYPES = ["F16", "BF16", "F32", "F64", "I64", "I32", "U8", "BOOL"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),  # fmt: skip
    max_leaves=6,
)


class Saved(tuple):
    """(state, file bytes, folder) with a short repr: hypothesis prints it with a failure."""

    def __repr__(self) -> str:
        return f"<saved posterior, {len(self[1])} bytes>"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        kw, a_i, a_t = make_problem(bias=True, contrastive="siglip", joint_bias=True)
        la = DualEncoderLaplace(**kw, temperature=0.5)
        la.fit(loader(a_i, a_t))
        path = tmp_path_factory.mktemp("fuzz") / "posterior.safetensors"
        la.save(path)
        yield Saved((la.state_dict(), path.read_bytes(), tmp_path_factory.mktemp("mutated")))
    finally:
        torch.set_default_dtype(previous)


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _assert_same_state(a: dict, b: dict, key: str = "state") -> None:
    """Equal bit for bit: same keys, same types, tensors with the same dtype and values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), key
        for k in a:
            # laplace's setter stores a scalar prior mean as shape (1,): the same prior
            if k == "n_outputs":  # the number of classes set_classes gave, not the posterior's
                continue
            if k == "prior_mean":
                torch.testing.assert_close(a[k].reshape(-1), b[k].reshape(-1), rtol=0, atol=0)
            else:
                _assert_same_state(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{key}.{i}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=False, msg=key)
    else:
        assert type(a) is type(b) and a == b, key


def _check_load(path, expected: dict | None) -> str:
    """Load ``path``: the expected state (``None``: that in the file) or a ValueError naming it.

    Returns ``"loaded"`` or ``"refused"`` (``--hypothesis-show-statistics`` counts them).
    """
    try:
        loaded = DualEncoderLaplace.load(path)
    except ValueError as err:
        assert str(path) in str(err), f"the error does not name the file: {err}"
        return "refused"
    state = loaded.state_dict()
    if expected is None:  # a re-signed file: what it holds; a missing optional key, its default
        expected = read_state(path)
        assert state.keys() - expected.keys() <= OPTIONAL, state.keys() - expected.keys()
        state = {k: state[k] for k in expected}
    _assert_same_state(state, expected)
    return "loaded"


def _write(directory, blob: bytes, name: str = "mutated.safetensors"):
    path = directory / name
    path.write_bytes(blob)
    return path


@FUZZ
@given(data=st.data())
def test_raw_byte_changes(saved, data):
    state, blob, directory = saved
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if kind == "flip":
        raw = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= data.draw(st.integers(1, 255))
        blob = bytes(raw)
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        blob = blob + data.draw(st.binary(min_size=1, max_size=64))
    event(_check_load(_write(directory, blob), state))


@FUZZ
@given(data=st.data())
def test_header_changes(saved, data):
    state, blob, directory = saved
    header, body = _split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    kind = data.draw(st.sampled_from(["dtype", "shape", "offsets", "metadata", "state"]))
    if kind in ("dtype", "shape", "offsets"):
        entry = header[data.draw(st.sampled_from(names))]
        if kind == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(DTYPES))
        elif kind == "shape":
            entry["shape"] = data.draw(st.lists(st.integers(0, 40), max_size=3))
        else:
            entry["data_offsets"] = data.draw(
                st.lists(st.integers(0, len(body) + 8), min_size=2, max_size=2)
            )
    elif kind == "metadata":
        meta = header["__metadata__"]
        key = data.draw(st.sampled_from(sorted(meta)))
        if data.draw(st.booleans()):
            del meta[key]
        else:
            meta[key] = data.draw(st.text(max_size=20) | st.just(json.dumps(None)))
    else:
        meta = header["__metadata__"]
        structure = json.loads(meta["state"])
        key = data.draw(st.sampled_from(sorted(structure)))
        structure[key] = data.draw(JSON_VALUES)
        meta["state"] = json.dumps(structure)
    event(_check_load(_write(directory, _join(header, body)), state))


def _mutated_tensor(t: torch.Tensor, data) -> torch.Tensor:
    kind = data.draw(st.sampled_from(["cast", "reshape", "slice", "scale"]))
    if kind == "cast":
        return t.to(data.draw(st.sampled_from(
            [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.bool])))  # fmt: skip
    if kind == "reshape":
        return t.reshape(-1) if t.ndim != 1 else t.reshape(1, -1)
    if kind == "slice":
        return t.reshape(-1)[: data.draw(st.integers(0, max(t.numel() - 1, 0)))]
    return t * data.draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))


def _leaves(state: dict, prefix: str = "") -> list[tuple[str, ...]]:
    """Paths to every leaf of a nested state (dict keys and list indices)."""
    out = []
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in items:
        if isinstance(v, (dict, list, tuple)) and len(v):
            out += [(k, *rest) for rest in _leaves(v)]
        else:
            out.append((k,))
    return out


@FUZZ
@given(data=st.data())
def test_re_signed_state_changes(saved, data):
    state, _, directory = saved
    mutated = _copy(state)
    path = data.draw(st.sampled_from(_leaves(state)))
    parent = mutated
    for k in path[:-1]:
        parent = parent[k]
    old = parent[path[-1]]
    if isinstance(old, torch.Tensor) and data.draw(st.booleans()):
        parent[path[-1]] = _mutated_tensor(old, data)
    elif data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    target = directory / "re_signed.safetensors"
    save_state(target, mutated, overwrite=True)
    event(_check_load(target, None))


def _copy(value):
    """A deep copy whose lists and dicts can be changed without touching the original."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value.clone() if isinstance(value, torch.Tensor) else value


def test_the_unchanged_file_loads_as_saved(saved):
    state, blob, directory = saved
    assert _check_load(_write(directory, blob, "unchanged.safetensors"), state) == "loaded"
    header, body = _split(blob)
    # a re-serialised header with the same content is the same file to a reader
    rewritten = _write(directory, _join(header, body), "rewritten.safetensors")
    assert _check_load(rewritten, state) == "loaded"
