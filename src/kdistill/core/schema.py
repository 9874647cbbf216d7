"""The JSON Schema of a recipe with every installed component's options (for editors and CI)."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from kdistill.core.config import SLOTS, Recipe
from kdistill.core.registry import Registry
from kdistill.core.schedule import Schedule


def recipe_json_schema(registry: Registry) -> dict[str, Any]:
    """Recipe's own schema, with each component slot an `anyOf` of the installed components."""
    schema: dict[str, Any] = Recipe.model_json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    entries = list(registry)
    keyed = [((e.kind, e.name), e.cls.Options) for e in entries]
    mapping, options_top = models_json_schema([(cls, "validation") for _, cls in keyed], ref_template="#/$defs/{model}")
    defs.update(options_top.get("$defs", {}))
    option_refs = {key: mapping[(cls, "validation")] for key, cls in keyed}

    for slot, (kind, many) in SLOTS.items():
        variants = []
        for entry in entries:
            if entry.kind != kind:
                continue
            options_schema = option_refs[(entry.kind, entry.name)]
            required_options = bool(entry.cls.Options.model_json_schema().get("required"))
            props: dict[str, Any] = {
                "name": {"const": entry.name, "description": (entry.cls.__doc__ or "").strip().split("\n")[0]},
                "options": options_schema,
            }
            if slot == "losses":
                props["weight"] = {"anyOf": [{"type": "number", "minimum": 0}, Schedule.model_json_schema()], "default": 1.0}
            variants.append({
                "type": "object",
                "title": f"{kind} {entry.name}",
                "properties": props,
                "required": ["name", "options"] if required_options else ["name"],
                "additionalProperties": False,
            })
        one: dict[str, Any] = {"anyOf": variants} if variants else {"not": {}}
        if many:
            schema["properties"][slot] = {"type": "array", "items": one}
        elif slot in Recipe.model_fields and not Recipe.model_fields[slot].is_required() and Recipe.model_fields[slot].default is None:
            schema["properties"][slot] = {"anyOf": [one, {"type": "null"}]}
        else:
            schema["properties"][slot] = one
    defs.pop("ComponentSpec", None)
    defs.pop("LossSpec", None)
    schema["title"] = "kdistill recipe"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
