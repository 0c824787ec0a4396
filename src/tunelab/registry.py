"""One small generic registry: plugins register a class under a name together with a pydantic config.

Each plugin folder (methods/, objectives/, evaluate/tasks/, ...) owns one `Registry`. A plugin file does

    @METHODS.register("lora")
    class LoRA:
        Config = LoRAConfig
        ...

and the folder's `__init__` imports its siblings with `load_plugins`, so adding a file is enough.
The config class must carry a `name: Literal["lora"]` field; `Registry.parse` turns a mapping with a
`name` key into that config, raising a `UserError` that suggests the closest name when unknown.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from tunelab.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            cfg = getattr(obj, "Config", None)
            if cfg is None or not issubclass(cfg, BaseModel):
                raise RuntimeError(f"{self.kind} '{name}' has no pydantic `Config` class")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(self._unknown(name)) from None

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}'{hint} (known: {', '.join(self.names())})"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def config_class(self, name: str) -> type[BaseModel]:
        return self.get(name).Config  # type: ignore[attr-defined]

    def parse(self, data: Any, where: str, default: str | None = None) -> BaseModel:
        """Validate a `{name: ..., **fields}` mapping into the named plugin's config."""
        if isinstance(data, BaseModel):
            return data
        if isinstance(data, str):
            data = {"name": data}
        if isinstance(data, dict) and "name" not in data and default:
            data = {"name": default, **data}
        if not isinstance(data, dict) or "name" not in data:
            raise UserError(f"{where}: needs a 'name' key (one of: {', '.join(self.names())})")
        if data["name"] not in self._items:
            raise UserError(f"{where}.name: " + self._unknown(str(data["name"])))
        return self.config_class(data["name"]).model_validate(data)

    def describe(self, name: str) -> dict[str, Any]:
        """Name, one-line summary and fields (type, default, description) for `tunelab list`."""
        obj = self.get(name)
        doc = (obj.__doc__ or (importlib.import_module(obj.__module__).__doc__ or "")).strip()  # type: ignore[attr-defined]
        return {"name": name, "summary": doc.split("\n\n")[0].replace("\n", " "), "fields": _fields(obj.Config)}  # type: ignore[attr-defined]


def _fields(config: type[BaseModel], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every field, with a nested section's own fields after it as `section.field` (e.g. dpo's online.every)."""
    from typing import get_args

    out: dict[str, dict[str, Any]] = {}
    for fname, f in config.model_fields.items():
        if fname == "name" and not prefix:
            continue
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        out[prefix + fname] = {"type": _type_name(f.annotation), "default": default, "required": f.is_required(),
                               "help": f.description or ""}
        nested = [a for a in (f.annotation, *get_args(f.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)
                  and a is not BaseModel]
        if nested:
            out.update(_fields(nested[0], f"{prefix}{fname}."))
    return out


def _type_name(annotation: Any) -> str:
    from typing import Literal, get_args, get_origin

    if annotation is BaseModel:  # a plugin section of its own (e.g. a task), keyed by name
        return "{name: ..., <its fields>}"
    if get_origin(annotation) is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    s = str(annotation) if get_args(annotation) else getattr(annotation, "__name__", str(annotation))
    return re.sub(r"\b(?:[a-z_][\w]*\.)+(?=[A-Za-z_])", "", s)  # module paths off: tunelab.x.OnlineConfig -> OnlineConfig


def load_plugins(package_name: str, package_path: list[str]) -> None:
    """Import every non-private module in a plugin folder so their decorators run."""
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
