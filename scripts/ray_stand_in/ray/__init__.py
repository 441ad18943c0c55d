"""Minimal Ray stand-in: verl's modules that ftrl's native trainer uses import ray but never call it."""
import sys
import types

__version__ = "0.0.0-ftrl-stand-in"


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Anything()


def remote(*args, **kwargs):
    return args[0] if len(args) == 1 and callable(args[0]) else (lambda f: f)


def is_initialized():
    return False


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


for _name in ("util", "actor", "exceptions", "runtime_env", "util.placement_group", "util.scheduling_strategies",
              "experimental", "experimental.state", "experimental.state.api", "_private", "_raylet", "util.state"):
    _full = f"ray.{_name}"
    sys.modules[_full] = _Module(_full)
