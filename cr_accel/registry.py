"""Named registries of swappable parts, and the one function that resolves a name or a `module:Name` target.

Models, losses, datasets, optimizers and schedules are all chosen from YAML by a short name registered
here (`@MODELS.register("mlp")`) or by a `package.module:Name` target pointing at the user's own code.
"""

import difflib
import importlib
import inspect
from typing import Any, Callable, Sequence


class Registry:
    """A name -> builder table that rejects duplicates and answers a miss with the valid choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} `{name}` is already registered (by {self._builders[name]!r})")
            self._builders[name] = builder
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def resolve(self, name: str) -> Callable[..., Any]:
        """The builder for a registered name or a `package.module:Name` target; LookupError says why not."""
        if ":" in name:
            return _import_target(name)
        if name in self._builders:
            return self._builders[name]
        close = difflib.get_close_matches(name, self._builders, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else "."
        raise LookupError(
            f"unknown {self.kind} `{name}`{hint} Choose one of: {', '.join(self.names())}, "
            f"or give your own as `package.module:Name`"
        )


def _import_target(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise LookupError(f"target `{target}` must look like `package.module:Name`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"cannot import module `{module_name}` for `{target}`: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LookupError(f"module `{module_name}` has no attribute `{attr}` (from `{target}`)")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LookupError(f"`{target}` is not callable")
    return obj


def check_kwargs(builder: Callable[..., Any], kwargs: dict[str, Any],
                 injected: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Problems with calling `builder(**injected, **kwargs)`, found from its signature without calling it.

    `injected` names the arguments the trainer passes itself (the parameters of an optimizer, say); they
    are neither required from nor allowed in the config.
    """
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return []  # builtins without a signature: let the call itself report problems
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    configurable = [n for n in accepted if n not in injected]
    problems = []
    for key in kwargs:
        if key in injected:
            problems.append((key, "is set by the trainer and cannot be given here"))
        elif key not in accepted and not takes_any:
            close = difflib.get_close_matches(key, configurable, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            allowed = ", ".join(configurable) or "none"
            problems.append((key, f"is not a parameter of `{_name(builder)}`{hint} (accepted: {allowed})"))
    for name in configurable:
        p = params[name]
        if p.default is inspect.Parameter.empty and name not in kwargs:
            problems.append((name, f"is required by `{_name(builder)}` but missing"))
    return problems


def accepts(builder: Callable[..., Any], name: str) -> bool:
    """Whether `builder` takes a keyword argument called `name`."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def names(builder: Callable[..., Any], name: str) -> bool:
    """Whether `builder` has a parameter called `name` by that name (a `**kwargs` catch-all does not count: it
    promises nothing about what it does with a value the trainer would inject)."""
    try:
        return name in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def _name(builder: Any) -> str:
    return getattr(builder, "__qualname__", repr(builder))
