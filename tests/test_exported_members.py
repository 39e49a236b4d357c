"""`__all__` is the public API: every name is importable, documented, and the list stays small."""

import ckptstore


def test_all_names_exist_and_are_documented():
    for name in ckptstore.__all__:
        member = getattr(ckptstore, name)
        assert member.__doc__, f"{name} has no docstring"


def test_every_error_is_a_ckptstore_error_and_a_builtin():
    errors = [getattr(ckptstore, n) for n in ckptstore.__all__ if n.endswith(("Error", "Exists", "NotFound", "Dependency"))]
    assert len(errors) == 12
    for cls in errors:
        assert issubclass(cls, ckptstore.CkptStoreError)
        assert len(cls.__mro__) > 3 or cls is ckptstore.CkptStoreError, cls  # also a builtin such as ValueError
        builtins = (ValueError, TypeError, OSError, ImportError, RuntimeError)  # RankError: another rank failed
        assert cls is ckptstore.CkptStoreError or issubclass(cls, builtins), f"{cls.__name__} subclasses no builtin it means"


def test_public_surface_is_small():
    assert len(ckptstore.__all__) <= 22  # 10 verbs and values (Transfers: how a file moves over the network), 12 error classes
