"""A config that does not compose, told in one line that names the key and the fix.

Hydra reports a key that the chosen option's schema lacks in five lines and suggests appending it
(``+model.num_channels=64``), which is the wrong fix when the key belongs to another family of the same group: a
UNet field on a DiT (``model=dit_s_2 model.num_channels=64``), a DiT field on a UNet, or a recipe written for one
family applied to the other (``model=dit_s_2 experiment=digits`` sets the UNet's ``model.label_dropout``).
:func:`explain` turns such an error into one line: which family has the key, the chosen family's counterpart,
and the options or recipes that fit. :func:`run_main` runs an entry point's ``@hydra.main`` function with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

# A field of one model family and the other family's field that means the same (or nearly), by the family that
# lacks the first one: the hint when a field of one is set on the other.
COUNTERPARTS: dict[tuple[str, str], str] = {
    ("DiT", "image_size"): "model.input_size (the side it sees: the latent side on latent data)",
    ("DiT", "label_dropout"): "model.class_dropout_prob",
    ("DiT", "class_cond"): "model.num_classes (0: unconditional)",
    ("DiT", "num_channels"): "model.hidden_size (the token width)",
    ("UNetModel", "input_size"): "model.image_size",
    ("UNetModel", "class_dropout_prob"): "model.label_dropout",
    ("UNetModel", "hidden_size"): "model.num_channels (the base width)",
}


def _messages(e: BaseException) -> str:
    """The text of ``e`` and of what caused it (Hydra keeps the OmegaConf error as the cause or the context)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _schemas() -> dict[str, tuple[str, type]]:
    """Schema class name (``DiTConfig``) -> (ConfigStore name, schema), for every component schema."""
    from diffusion.config.store import component_schemas

    return {node.__name__: (name, node) for name, node in component_schemas().items()}


def _fields(node: type) -> list[str]:
    return [k for k in OmegaConf.structured(node) if k != "_target_"]


def _family(node: type) -> str:
    """What a schema builds, by its class name: ``DiT``, ``UNetModel`` (the schema's own name without one)."""
    target = OmegaConf.structured(node).get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else node.__name__.removesuffix("Config")


def options_of(group: str, schema_name: str) -> list[str]:
    """Options of ``conf/<group>`` that extend ``schema_name`` (directly or through another option)."""
    from diffusion import CONF_DIR

    parents = {}
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        defaults = OmegaConf.load(path).get("defaults") or []
        parents[path.stem] = str(defaults[0]) if defaults else ""

    def root(option: str, depth: int = 0) -> str:
        parent = parents.get(option, "")
        if parent in parents and depth < 10:
            return root(parent, depth + 1)
        return parent.lstrip("/").split("@")[0]

    return [o for o in parents if root(o) == schema_name]


def recipes_for(group: str, options: list[str]) -> list[str]:
    """Recipes in ``conf/experiment`` whose ``override /<group>:`` picks one of ``options``."""
    from diffusion import CONF_DIR

    found = []
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        for entry in OmegaConf.load(path).get("defaults") or []:
            if isinstance(entry, dict) or OmegaConf.is_dict(entry):
                for key, value in dict(entry).items():
                    if key.split()[-1].strip("/") == group and value in options:
                        found.append(path.stem)
    return found


def _listed(options: list[str], limit: int = 4) -> str:
    return ", ".join(options[:limit]) + (", ..." if len(options) > limit else "")


def explain(e: BaseException) -> str | None:
    """
    One line for a composition error that names a key its config's schema does not have; None for any other
    error (which keeps Hydra's own report).

    :param e: what Hydra's composition raised (a ConfigCompositionException).
    """
    text = _messages(e)
    key_match = re.search(r"full_key: (\S+)", text)
    type_match = re.search(r"Key '[^']+' not in '(\w+)'", text)
    if key_match is None or type_match is None:
        return None
    full_key, schema_class = key_match.group(1), type_match.group(1)
    if "." not in full_key:
        return _top_level(full_key, schema_class)
    schemas = _schemas()
    if schema_class not in schemas:
        return None
    group, field = full_key.split(".", 1)[0], full_key.rsplit(".", 1)[-1]
    name, node = schemas[schema_class]
    family = _family(node)
    recipe = re.search(r"In '(\w+)/(\w+)'", text)
    source = f"{recipe.group(1)}={recipe.group(2)} sets {full_key}," if recipe else f"{full_key} is"
    owners = [(n, s) for n, s in schemas.values() if n != name and field in _fields(s)]
    owners = [(n, s) for n, s in owners if options_of(group, n)]  # families the user can pick in this group
    if not owners:
        close = difflib.get_close_matches(field, _fields(node), n=1)
        hint = f"did you mean {group}.{close[0]}? " if close else ""
        return (
            f"{source.removesuffix(' is').rstrip(',')}: {family} ({group}={_listed(options_of(group, name))}) has "
            f"no such field: {hint}`--cfg job` prints every field of the composed config"
        )
    owner_name, owner = owners[0]
    owner_family = _family(owner)
    fixes = []
    if recipe:
        mine = recipes_for(group, options_of(group, name))
        if mine:
            fixes.append(f"use a {family} recipe ({recipe.group(1)}={_listed(mine)})")
        fixes.append(
            f"pick a {owner_family} for this recipe ({group}={_listed(options_of(group, owner_name))})"
        )
    else:
        counterpart = COUNTERPARTS.get((family, field))
        fixes.append(f"set {counterpart} instead" if counterpart else "drop it")
        fixes.append(f"pick a {owner_family} ({group}={_listed(options_of(group, owner_name))})")
    return f"{source} a {owner_family} field that {family} does not have: {', or '.join(fixes)}"


def _top_level(key: str, schema_class: str) -> str | None:
    """A misspelt top-level setting (``max_stepz=3``)."""
    from diffusion.config import schemas

    node = getattr(schemas, schema_class, None)
    if node is None or not dataclasses.is_dataclass(node):
        return None
    close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(node)], n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key}: no such setting: {hint}`--cfg job` prints every field of the composed config"


def run_main(main: Callable[[], Any]) -> Any:
    """
    Run an entry point's ``@hydra.main`` function. A config that does not compose ends the process with status 1
    and one line from :func:`explain` (or Hydra's own short report where it has none); every other exception
    propagates with its full traceback. With HYDRA_FULL_ERROR=1 set by the user, everything propagates.
    """
    from hydra.errors import CompactHydraException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous == "1":
        return main()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its report and exiting
    try:
        return main()
    except CompactHydraException as e:
        line = explain(e)
        if line is None:  # Hydra's own compact report: the error and the OmegaConf error behind it
            line = "\n".join(str(x) for x in (e, e.__cause__) if x is not None)
        print(line, file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
