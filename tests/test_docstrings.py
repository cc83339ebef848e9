"""Every public docstring of ``laplace_vlm`` passes numpydoc's validator on the codes that matter.

Public objects are the functions and classes a module defines (``__module__`` is the module)
under names without a leading ``_``, and a class's own methods, classmethods, staticmethods and
properties without a leading ``_``, plus ``__call__``. Each is validated with
:func:`numpydoc.validate.validate`, and only these codes are enforced (style codes are not):

- GL08: no docstring;
- PR01 / PR02: a parameter of the signature undocumented / a documented one not in it;
- PR04 / PR07: a documented parameter without a type / without a description;
- RT01: no ``Returns`` section for a function that returns a value (a ``return <value>``, as
  numpydoc reads the source, or a return annotation other than ``None``);
- RT03: a return value without a description;
- YD01: no ``Yields`` section for a generator.

Properties are exempt from PR and RT checks (numpydoc validates them as plain objects). Where
numpydoc falls short it is corrected: a classmethod (a bound method) gets the RT and YD checks, a
module-level function keeps a first parameter named ``cls``, a dataclass without a docstring (it
gets ``Name(signature)``) is GL08, and a class is checked against its constructor only where its
package defines one (not an ``Enum``'s, an ``Exception``'s or an ``nn.Module``'s).

Two conventions of the project hold:

- a dataclass documents its fields under ``Attributes``: a field there counts as documented;
- an override without a docstring inherits its base's (:func:`inspect.getdoc`), validated as its
  own docstring.

Docstrings are filled at import by :data:`laplace_vlm.docstrings.fill_doc`; no ``%(key)s`` line
may be left, and :class:`~laplace_vlm.docstrings.DocEntries` is unit-tested here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
import re
import types

import pytest
from numpydoc.docscrape import get_doc_object
from numpydoc.validate import Validator, validate

import laplace_vlm
from laplace_vlm.docstrings import DocEntries

CHECKED_CODES = {"GL08", "PR01", "PR02", "PR04", "PR07", "RT01", "RT03", "YD01"}
MEMBER_KINDS = (types.FunctionType, classmethod, staticmethod, property, functools.cached_property)
NO_RETURN = {"None", "NoReturn", "Never", "typing.NoReturn", "typing.Never"}


def _public_objects() -> tuple[dict[str, object], list[object]]:
    """Qualified name -> public function, class or class member; and the modules."""
    modules = [laplace_vlm] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(laplace_vlm.__path__, "laplace_vlm.")
    ]
    objects = {}
    for module in modules:
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                objects[f"{module.__name__}.{name}"] = obj
            if not inspect.isclass(obj):
                continue
            for member, attr in vars(obj).items():
                if isinstance(attr, MEMBER_KINDS) and (
                    not member.startswith("_") or member == "__call__"
                ):
                    # through getattr: a classmethod bound, a staticmethod its function
                    objects[f"{module.__name__}.{name}.{member}"] = getattr(obj, member)
    return objects, modules


PUBLIC, MODULES = _public_objects()


def _own_doc(obj: object) -> str:
    """The docstring ``obj`` is validated against: a member's own or inherited, a class's own."""
    if not inspect.isclass(obj):
        return inspect.getdoc(obj) or ""
    if dataclasses.is_dataclass(obj):  # a dataclass without docstring gets ``Name(signature)``
        if obj.__doc__ == obj.__name__ + str(inspect.signature(obj)).replace(" -> None", ""):
            return ""
    return obj.__doc__ or ""


def _names(section: list) -> set[str]:
    """The names a parameter-list section documents (``a, b : type`` documents both)."""
    return {name.strip() for entry in section for name in entry.name.split(",")}


def _defines_constructor(cls: type) -> bool:
    """Whether ``cls``'s ``__init__`` or ``__new__`` comes from its package (else it is documented
    elsewhere: an ``Enum``'s, an ``Exception``'s, an ``nn.Module``'s)."""
    package = cls.__module__.split(".")[0]
    return any(
        (getattr(getattr(cls, method), "__module__", None) or "").split(".")[0] == package
        for method in ("__init__", "__new__")
    )


def _is_method(func: types.FunctionType) -> bool:
    """Whether ``func`` is defined in a class body (its qualified name's parent is no function)."""
    parent = func.__qualname__.rpartition(".")[0]
    return bool(parent) and not parent.endswith("<locals>")


class ProjectValidator(Validator):
    """numpydoc's :class:`~numpydoc.validate.Validator` under the project's conventions.

    Parameters
    ----------
    obj_name : str
        the qualified name, a key of ``PUBLIC``.
    """

    def __init__(self, obj_name: str) -> None:
        obj = PUBLIC[obj_name]
        doc = _own_doc(obj)
        # numpydoc's GL08 reads ``obj.__doc__`` (None on an override) while it parses
        # ``inspect.getdoc`` (functions) or ``pydoc.getdoc``: here both are ``doc``
        super().__init__(get_doc_object(obj, doc=doc, config={"show_class_members": False}))
        self.raw_doc = doc

    @property
    def is_function_or_method(self) -> bool:
        """Whether RT and YD apply: functions, methods, staticmethods, and classmethods too."""
        return inspect.isfunction(self.obj) or inspect.ismethod(self.obj)

    @property
    def method_returns_something(self) -> bool:
        """Not for a generator; else the return annotation, or numpydoc's ``return <value>``."""
        if self.is_generator_function:
            return False
        annotation = inspect.signature(self.obj).return_annotation
        if annotation is inspect.Signature.empty:
            return super().method_returns_something
        return str(annotation) not in NO_RETURN

    @property
    def signature_parameters(self) -> tuple[str, ...]:
        """numpydoc's, less an inherited constructor's and dataclass fields under Attributes."""
        params = super().signature_parameters
        if inspect.isfunction(self.obj):
            first = next(iter(inspect.signature(self.obj).parameters), None)
            if first in ("self", "cls") and not _is_method(self.obj):
                params = (first, *params)  # numpydoc drops it from any function
            return params
        if not inspect.isclass(self.obj):
            return params
        if not _defines_constructor(self.obj):
            return ()
        if dataclasses.is_dataclass(self.obj):
            attributes = _names(self.doc["Attributes"]) - set(self.doc_parameters)
            params = tuple(param for param in params if param not in attributes)
        return params


def _violations(name: str) -> list[str]:
    """The enforced numpydoc errors of ``PUBLIC[name]``, as ``"CODE: message"``."""
    errors = validate(name, validator_cls=ProjectValidator)["errors"]
    return [f"{code}: {message}" for code, message in errors if code in CHECKED_CODES]


@pytest.mark.parametrize("name", list(PUBLIC), ids=list(PUBLIC))
def test_numpydoc(name):
    violations = _violations(name)
    assert not violations, "\n".join(violations)


@dataclasses.dataclass
class _Pair:
    """Two documented fields and one not.

    Attributes
    ----------
    a, b : int
        the two.
    """

    a: int
    b: int
    c: int = 0


@dataclasses.dataclass
class _Bare:
    x: int


class _Base:
    def twice(self, x: int) -> int:
        """Twice ``x``.

        Parameters
        ----------
        x : int
            a number.

        Returns
        -------
        int
            ``2 x``.
        """
        return 2 * x


class _Override(_Base):
    def twice(self, x: int) -> int:
        return x + x

    @classmethod
    def build(cls) -> _Override:
        """A new one."""
        return cls()


def _build(cls: type) -> object:
    """A new ``cls``.

    Parameters
    ----------
    cls : type
        a class.

    Returns
    -------
    object
        ``cls()``.
    """
    return cls()


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_Pair, ["PR01: Parameters {'c'} not documented"]),
        (_Bare, ["GL08: The object does not have a docstring"]),
        (_Override.twice, []),
        (_Override.build, ["RT01: No Returns section found"]),
        (_build, []),
    ],
    ids=[
        "dataclass-attributes",
        "dataclass-no-docstring",
        "inherited-docstring",
        "classmethod",
        "function-of-cls",
    ],
)
def test_conventions(monkeypatch, obj, expected):
    monkeypatch.setitem(PUBLIC, "example", obj)
    assert _violations("example") == expected


def test_no_placeholder_left():
    placeholder = re.compile(r"^\s*%\(\w+\)s\s*$", re.MULTILINE)
    docs = {module.__name__: module.__doc__ for module in MODULES}
    docs |= {name: getattr(obj, "__doc__", None) for name, obj in PUBLIC.items()}
    assert [name for name, doc in docs.items() if doc and placeholder.search(doc)] == []


ENTRIES = DocEntries(
    x="""
        x : int
            the x.
        """
)


def test_doc_entries_fill_at_the_placeholder_indent():
    def f(x):
        """Do.

        Parameters
        ----------
        %(x)s
        """

    expected = """Do.

        Parameters
        ----------
        x : int
            the x.
        """
    assert ENTRIES(f) is f
    assert f.__doc__ == expected


def test_doc_entries_refuse_a_redefinition_and_an_unknown_key():
    with pytest.raises(ValueError, match="'x'"):
        ENTRIES.extend(x="x : float\n    another x.")
    assert set(ENTRIES.extend(y="y : int\n    the y.").entries) == {"x", "y"}

    def g(y):
        """Do.

        Parameters
        ----------
        %(nope)s
        """

    with pytest.raises(KeyError, match="nope"):
        ENTRIES(g)
